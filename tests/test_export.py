"""`finetune-recipes export --onnx`: what ONNX Runtime serves agrees with the torch model, for every recipe and
task shape, without torch; and bad input is one line, exit 2, nothing written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from conftest import FP32, run_inline
from test_cli import snapshot
from test_recipes import RECIPES
from test_task_shapes import SHAPE_FLAGS, shape_args, shapes  # noqa: F401  (shapes: a fixture)
from tiny import blocked, topic_rows

from finetune_recipes import features
from finetune_recipes.catalog import caches_features
from finetune_recipes.errors import UserError
from finetune_recipes.tools import predict
from finetune_recipes.tools.cli import main as cli_main
from finetune_recipes.tools.export import export_onnx

CLI = str(Path(sys.executable).parent / "finetune-recipes")
TEXTS = [row["text"] for row in topic_rows(40, seed=7)]


def cli(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, env={**os.environ, **(env or {})})


def assert_same_predictions(torch_dir: Path, onnx_dir: Path, texts: list[str], tolerance: float = 1e-4) -> None:
    expected, served = predict.predict(torch_dir, texts, bf16=False), predict.predict(onnx_dir, texts)
    for want, got in zip(expected, served, strict=True):
        assert want.keys() == got.keys()
        for key in ("label", "labels"):
            assert want.get(key) == got.get(key)
        for key in ("score", "value"):
            if key in want:
                assert got[key] == pytest.approx(want[key], abs=tolerance)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model, tiny_data) -> Path:
    """A full fine-tuning run of the tiny BERT, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("export") / "out"
    args = [
        "--model_name_or_path", tiny_model, "--max_length", "32", "--num_train_epochs", "6",
        "--learning_rate", "3e-3", "--output_dir", out, *FP32,
        *[f for split, path in tiny_data.items() for f in (f"--{split}_file", path)],
    ]  # fmt: skip
    run_inline("full_finetune", *args)
    return out


@pytest.fixture(scope="module")
def exported(trained) -> Path:
    """`finetune-recipes export --model OUT --onnx`, as a user runs it: OUT/onnx."""
    proc = cli("export", "--model", trained, "--onnx")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"exported {trained / 'onnx'}"
    return trained / "onnx"


def test_the_export_serves_the_models_predictions_without_torch(trained, exported):
    # Inside the run's output_dir it is the run's: an --overwrite_output_dir run that retrains removes it.
    assert "onnx" in json.loads((trained / ".finetune_recipes.json").read_text())["entries"]
    names = {p.name for p in exported.iterdir()}
    assert {"model.onnx", "config.json", "tokenizer.json", "tokenizer_config.json", "recipe_config.yaml"} <= names
    assert_same_predictions(trained, exported, TEXTS)
    # The command line serves it importing neither torch nor transformers (their import alone takes seconds).
    code = (
        "import sys; from finetune_recipes.tools.cli import main;"
        "main(['predict', '--model', sys.argv[1], 'goal win']);"
        "assert not {'torch', 'transformers'} & set(sys.modules), sorted(sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(exported)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_int8_quantises_the_matrix_multiplies_and_mostly_agrees(trained, exported, tmp_path):
    out = export_onnx(trained, tmp_path / "int8", quantize=True)
    ops = {node.op_type for node in onnx.load(str(out / "model.onnx")).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops
    assert (out / "model.onnx").stat().st_size < (exported / "model.onnx").stat().st_size
    labels = [p["label"] for p in predict.predict(out, TEXTS)]
    reference = [p["label"] for p in predict.predict(trained, TEXTS)]
    assert sum(a == b for a, b in zip(labels, reference, strict=True)) >= 0.9 * len(TEXTS)
    # An export again into the same folder replaces the earlier one whole; a file of the user's there stops it.
    first = (out / "model.onnx").stat().st_ino
    assert export_onnx(trained, out, quantize=True) == out and (out / "model.onnx").stat().st_ino != first
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds 'notes.txt', which no export wrote"):
        export_onnx(trained, out, quantize=True)
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_exports(recipe, tiny_args, tmp_path):
    run_inline(recipe, *tiny_args, *(["--feature_cache_dir", tmp_path / "cache"] if caches_features(recipe) else []))
    out = tmp_path / "out"
    assert_same_predictions(out, export_onnx(out), TEXTS)


@pytest.mark.slow
@pytest.mark.parametrize("recipe, shape", [("full_finetune", "multi"), ("full_finetune", "regression"),
                                           ("full_finetune", "long"), ("feature_extraction", "long")])  # fmt: skip
def test_every_task_shape_exports(recipe, shape, shapes, tiny_args, tmp_path):  # noqa: F811
    extra = ["--feature_cache_dir", tmp_path / "cache"] if caches_features(recipe) else []
    args = shape_args(tiny_args, shapes[shape], *SHAPE_FLAGS[shape], "--max_train_steps", "6", *map(str, extra))
    run_inline(recipe, *args)
    out = tmp_path / "out"
    long_texts = [" ".join([t] * 6) for t in TEXTS[:12]]  # several windows each
    assert_same_predictions(out, export_onnx(out), long_texts if shape == "long" else TEXTS)


def test_the_feature_head_file_name_is_the_one_features_saves():
    assert predict.HEAD_CONFIG == features.HEAD_CONFIG


def blocked_module(tmp_path: Path, name: str) -> dict[str, str]:
    return {"PYTHONPATH": str(blocked(tmp_path / "blocked", name))}


def test_bad_export_input_is_one_line_exit_2_nothing_written(trained, tmp_path, monkeypatch, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("a user's file")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "model.onnx").write_text("a user's own export")
    cases = {
        "not a model": (["--model", tmp_path / "taken", "--onnx"], "holds no saved model (no config.json)"),
        "no format": (["--model", trained], "the following arguments are required: --onnx"),
        "output_dir taken": (
            ["--model", trained, "--onnx", "--output_dir", tmp_path / "taken"],
            "exists and holds no earlier export; pass another --output_dir",
        ),
        "a user's model.onnx": (
            ["--model", trained, "--onnx", "--output_dir", tmp_path / "mine"],
            "exists and holds no earlier export; pass another --output_dir",
        ),
        "no onnxruntime": (
            ["--model", trained, "--onnx", "--quantize", "--output_dir", tmp_path / "q"],
            "onnxruntime not installed; pip install 'finetune-recipes[export]'",
        ),
    }
    for case, (args, message) in cases.items():
        before = snapshot(tmp_path), snapshot(trained)
        with monkeypatch.context() as patch:
            if case == "no onnxruntime":  # as where it is missing: `import onnxruntime` fails
                patch.setitem(sys.modules, "onnxruntime", None)
            with pytest.raises(SystemExit) as exit_info:
                cli_main(["export", *map(str, args)])
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2, (case, lines)
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (case, lines)
        assert (snapshot(tmp_path), snapshot(trained)) == before, case


def test_serving_an_export_without_onnxruntime_is_one_line(exported, tmp_path):
    proc = cli("predict", "--model", exported, "goal win", env=blocked_module(tmp_path, "onnxruntime"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: onnxruntime is not installed; pip install 'finetune-recipes[export]'"


def damage(model: Path, name: str, how: str) -> None:
    if how == "missing":
        (model / name).unlink()
    else:  # truncated: the first half of the file
        data = (model / name).read_bytes()
        (model / name).write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "kind, name, how, message",
    [
        ("full", "model.safetensors", "missing", "has no model.safetensors, the model's weights"),
        ("full", "model.safetensors", "truncated", "model.safetensors is damaged"),
        ("onnx", "model.onnx", "missing", "has no model.onnx, the model's weights"),
        ("onnx", "model.onnx", "truncated", "model.onnx is damaged"),
        ("feature_extraction", "feature_head.safetensors", "missing", "has no feature_head.safetensors"),
        ("lora", "adapter_model.safetensors", "missing", "has no adapter_model.safetensors"),
        ("lora", "adapter_model.safetensors", "truncated", "adapter_model.safetensors is damaged"),
    ],
)
def test_missing_or_damaged_weights_are_one_line_for_predict_and_export(
    kind, name, how, message, trained, exported, tiny_args, tmp_path, capsys
):
    if kind in ("full", "onnx"):
        source = trained if kind == "full" else exported
    else:
        source = tmp_path / "run"
        run_inline(kind, *tiny_args, "--max_train_steps", "2", "--output_dir", source)
    model = tmp_path / "model"
    shutil.copytree(source, model)
    damage(model, name, how)
    commands = [["predict", "--model", str(model), "goal win"]]
    if kind != "onnx":
        commands.append(["export", "--model", str(model), "--onnx", "--output_dir", str(tmp_path / "exp")])
    for command in commands:
        with pytest.raises(SystemExit) as exit_info:
            cli_main(command)
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(lines) == 1 and message in lines[0], (command[0], lines)
    assert not (tmp_path / "exp").exists()


def test_exporting_an_export_is_one_line(exported, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["export", "--model", str(exported), "--onnx", "--output_dir", str(exported.parent / "again")])
    assert exit_info.value.code == 2 and "is an ONNX export already" in capsys.readouterr().err
