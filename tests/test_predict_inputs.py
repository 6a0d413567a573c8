"""What `predict` reads back is checked as every input is: a multi-label model's thresholds.json (one line, exit
code 2, for every way it can be wrong), and its default precision agrees with the run's own predictions files."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from conftest import run_inline
from test_task_shapes import SHAPE_FLAGS, shape_args, shapes  # noqa: F401  (shapes: a fixture)

from finetune_recipes.tools.cli import main as cli
from finetune_recipes.tools.predict import predict


@pytest.fixture(scope="module")
def multi(tiny_args_module, shapes, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("multi") / "out"
    files = {k: v for k, v in shapes["multi"].items() if k != "test"}
    run_inline("full_finetune", *shape_args(tiny_args_module, files, *SHAPE_FLAGS["multi"]), "--output_dir", out)
    return out


@pytest.fixture(scope="module")
def tiny_args_module(module_args):
    return [*module_args, "--max_train_steps", "6", "--learning_rate", "3e-3"]


CASES = {
    "missing": (None, "without its thresholds.json"),
    "a label missing": ('{"business": 0.5, "sport": 0.5}', "holds thresholds for business, sport, not for"),
    "an extra label": ('{"business": 0.5, "sport": 0.5, "tech": 0.5, "x": 0.5}', "not for the model's labels"),
    "nan": ('{"business": NaN, "sport": 0.5, "tech": 0.5}', "the threshold of business is nan, not a number"),
    "above 1": ('{"business": 7, "sport": 0.5, "tech": 0.5}', "the threshold of business is 7, not a number in"),
    "below 0": ('{"business": -1, "sport": 0.5, "tech": 0.5}', "the threshold of business is -1"),
    "a string value": ('{"business": "0.5", "sport": 0.5, "tech": 0.5}', "the threshold of business is '0.5'"),
    "truncated": ('{"business": 0.5, "spo', "is not readable JSON"),
    "empty": ("", "is not readable JSON"),
    "a list": ("[0.5, 0.5, 0.5]", "holds thresholds for list, not for the model's labels"),
    "a string": ('"0.5"', "holds thresholds for str"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_bad_thresholds_file_is_one_line_and_exit_2(case, multi, tmp_path, capsys):
    content, message = CASES[case]
    model = tmp_path / "model"
    shutil.copytree(multi, model)
    if content is None:
        (model / "thresholds.json").unlink()
    else:
        (model / "thresholds.json").write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        cli(["predict", "--model", str(model), "goal win", "firm profit"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert message in lines[0] and "restore the file the run wrote" in lines[0], lines[0]


def test_a_file_of_texts_is_one_text_per_newline_whatever_else_breaks_a_line(multi, tmp_path, capsys):
    texts = tmp_path / "texts.txt"  # U+2028 and NEL inside texts, a Windows line end, a blank line
    texts.write_bytes("goal \u2028 win\r\nmarket\x85bank\n\n   \nvote\n".encode())
    cli(["predict", "--model", str(multi), "--file", str(texts), "--format", "jsonl"])
    said = capsys.readouterr()
    rows = [json.loads(line) for line in said.out.strip().split("\n")]
    assert [r["text"] for r in rows] == ["goal \u2028 win", "market\x85bank", "vote"]
    assert f"{texts}: 2 blank line(s) skipped" in said.err.splitlines()


def test_a_blank_text_argument_is_refused_not_classified(multi, capsys):
    """Issue 39, item 10: a blank line of --file is skipped (and counted); a blank argument was classified."""
    with pytest.raises(SystemExit) as exit_info:
        cli(["predict", "--model", str(multi), "goal win", "  "])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and lines == [
        "error: text 2 of the arguments is blank; pass a text to classify, or leave it out"
    ]


@pytest.mark.parametrize(
    "name, damage",
    [
        ("config.json", '{"architectures": ["BertForSeq'),
        ("tokenizer_config.json", ""),
        ("tokenizer.json", '{"version": "1.0", "trunc'),
        ("recipe_config.yaml", "max_length: [32\n"),
        ("results.json", "[1, 2]"),
    ],
)
def test_a_damaged_model_file_is_one_line_naming_it(name, damage, multi, tmp_path, capsys):
    """Issue 39, item 7: only damaged weights were one line; each file predict reads back now is."""
    model = tmp_path / "model"
    shutil.copytree(multi, model)
    (model / name).write_text(damage)
    with pytest.raises(SystemExit) as exit_info:
        cli(["predict", "--model", str(model), "goal win"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: {model / name} is damaged (") and lines[0].endswith(
        "; restore it, or train (and export) again"
    )


def test_the_thresholds_the_run_wrote_are_the_ones_predict_applies(multi):
    saved = json.loads((multi / "thresholds.json").read_text())
    rows = list(csv.DictReader((multi / "predictions_validation.csv").open()))
    predicted = predict(multi, [r["text"] for r in rows])
    assert [sorted(p["labels"]) for p in predicted] == [json.loads(r["predicted"]) for r in rows]
    assert set(saved) == {"business", "sport", "tech"} and all(0 <= t <= 1 for t in saved.values())


@pytest.mark.parametrize("shape", ["single", "regression"])
def test_predict_by_default_agrees_with_the_runs_predictions_file(shape, tiny_args_module, shapes, tmp_path):  # noqa: F811
    args = (
        tiny_args_module
        if shape == "single"
        else shape_args(tiny_args_module, {k: v for k, v in shapes[shape].items() if k != "test"}, *SHAPE_FLAGS[shape])
    )
    run_inline("full_finetune", *args, "--output_dir", tmp_path / "out")
    rows = list(csv.DictReader((tmp_path / "out" / "predictions_validation.csv").open()))
    predicted = predict(tmp_path / "out", [r["text"] for r in rows])
    if shape == "single":
        assert [p["label"] for p in predicted] == [r["predicted"] for r in rows]
        assert [p["score"] for p in predicted] == pytest.approx([float(r["score"]) for r in rows], abs=1e-4)
    else:
        assert [p["value"] for p in predicted] == pytest.approx([float(r["predicted"]) for r in rows], abs=1e-4)
