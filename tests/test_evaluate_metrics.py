"""--metric_name (issue 42, item 2): any Hugging Face `evaluate` metric beside the built-in ones, from local metric
scripts written here (no download): computed on validation and test, in results.json, the card and compare's
table, usable as --metric_for_best_model; refused in one line before training when it cannot serve."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import run_inline

ERROR_RATE = """
import datasets
import evaluate


class ErrorRate(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="the share of wrong predictions", citation="", inputs_description="",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        wrong = sum(p != r for p, r in zip(predictions, references))
        return {"error_rate": wrong / len(references), "agreement": 1 - wrong / len(references), "note": "text"}
"""
MEAN_GAP = ERROR_RATE.replace('Value("int64")', 'Value("float32")').replace("ErrorRate", "MeanGap")


@pytest.fixture(scope="module")
def scripts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("metrics")
    files = {"error_rate": ERROR_RATE, "mean_gap": MEAN_GAP}
    for name, text in files.items():
        (root / f"{name}.py").write_text(text)
    return {name: root / f"{name}.py" for name in files}


@pytest.fixture(scope="module")
def measured(module_args, tiny_data, scripts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("evaluate") / "out"
    run_inline(
        "full_finetune", *module_args, "--test_file", tiny_data["test"], "--num_train_epochs", "2",
        "--learning_rate", "3e-3", "--metric_name", scripts["error_rate"], "--metric_for_best_model", "agreement",
        "--output_dir", out,
    )  # fmt: skip
    return out


def test_an_evaluate_metric_is_computed_beside_the_built_in_ones(measured):
    results = json.loads((measured / "results.json").read_text())
    rows = list(csv.DictReader((measured / "predictions_test.csv").open()))
    wrong = sum(r["predicted"] != r["label"] for r in rows) / len(rows)
    assert results["test_error_rate"] == pytest.approx(wrong) and results["test_agreement"] == pytest.approx(1 - wrong)
    assert results["eval_agreement"] == pytest.approx(results["eval_accuracy"])  # the same thing, twice
    assert "eval_note" not in results  # only numbers are metrics
    assert results["task"]["metrics"] == ["accuracy", "f1_macro", "error_rate", "agreement"]
    assert all("agreement" in entry for entry in results["history"])  # every evaluation has it
    # --metric_for_best_model agreement chose the step: the best agreement of the history.
    best = max(results["history"], key=lambda entry: entry["agreement"])
    assert results["best_step"] == best["step"]
    card = (measured / "README.md").read_text()
    assert "| agreement |" in card and "| error_rate |" in card


def test_compare_shows_the_metric_in_its_table():
    from finetune_recipes.tools.compare_report import table_metrics

    rows = [{"task": {"problem_type": "single_label_classification", "metrics": ["accuracy", "f1_macro", "mcc"]}}]
    assert table_metrics(rows)[-1] == "mcc"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--metric_name", "{tmp}/missing.py"], "cannot load metric '{tmp}/missing.py' ("),
        (["--metric_name", "{mean_gap}"], "compares numbers, and a single-label task predicts class ids"),
        (["--metric_name", "{error_rate}", "--metric_for_best_model", "agreemnt"], "pass one of accuracy, f1_macro"),
    ],
)
def test_a_metric_that_cannot_serve_is_one_line_before_training(flags, message, module_args, scripts, tmp_path):
    names = {"tmp": tmp_path, **{k: str(v) for k, v in scripts.items()}}
    flags = [f.format(**names) for f in flags]
    proc = run_inline("full_finetune", *module_args, *flags, "--output_dir", tmp_path / "out", check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and message.format(**names) in last, last
    assert not (tmp_path / "out").exists()


def test_without_evaluate_installed_the_flag_says_how_to_get_it(monkeypatch, scripts):
    import sys

    from finetune_recipes.errors import UserError
    from finetune_recipes.metrics import load_metric

    load_metric.cache_clear()
    monkeypatch.setitem(sys.modules, "evaluate", None)  # import evaluate fails, as where it is not installed
    with pytest.raises(UserError, match=r"needs Hugging Face evaluate: pip install 'finetune-recipes\[evaluate\]'"):
        load_metric(str(scripts["error_rate"]))
    load_metric.cache_clear()


def test_an_error_is_minimised_and_any_other_metric_maximised():
    from finetune_recipes.config import greater_is_better
    from finetune_recipes.training.early_stopping import EarlyStopping

    assert [greater_is_better(m) for m in ("agreement", "error_rate", "eval_loss", "mse", "matthews_correlation")] == [
        True, False, False, False, True,
    ]  # fmt: skip
    stopping = EarlyStopping("error_rate", patience=None)
    assert stopping.update(1, {"error_rate": 0.4}) and stopping.update(2, {"error_rate": 0.3})
    assert not stopping.update(3, {"error_rate": 0.35}) and stopping.best_step == 2
