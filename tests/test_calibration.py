"""Calibration: temperature and vector scaling fitted on validation, chosen by held-out folds and folded into the
saved output layer; ECE with its floor, NLL, Brier."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
from conftest import run_inline
from transformers import pipeline

from finetune_recipes.calibration import (
    Scaling,
    calibration_metrics,
    choose_method,
    ece_floor,
    fit_temperature,
    fit_vector,
    held_out_nll,
    scaled_probabilities,
)
from finetune_recipes.config import MULTI, SINGLE


def planted(temperature: float, n: int = 4000, classes: int = 4, seed: int = 0):
    """Logits whose labels are drawn from softmax(logits / temperature): that temperature calibrates them."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, size=(n, classes))
    probs = scaled_probabilities(logits, [temperature], SINGLE)
    labels = np.array([rng.choice(classes, p=p) for p in probs])
    return logits, labels


@pytest.mark.parametrize("temperature", [0.5, 2.5])
def test_the_fitted_temperature_recovers_a_planted_one(temperature):
    logits, labels = planted(temperature)
    (fitted,) = fit_temperature(logits, labels, SINGLE)
    assert fitted == pytest.approx(temperature, rel=0.08)
    before = calibration_metrics(scaled_probabilities(logits, [1.0], SINGLE), labels, SINGLE)
    after = calibration_metrics(scaled_probabilities(logits, [fitted], SINGLE), labels, SINGLE)
    assert after["ece"] < 0.03 < before["ece"] and after["nll"] < before["nll"] and after["brier"] < before["brier"]


def test_multi_label_fits_one_temperature_per_label():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, size=(4000, 2))
    truth = [0.5, 3.0]
    labels = (rng.random((4000, 2)) < scaled_probabilities(logits, truth, MULTI)).astype(int)
    assert fit_temperature(logits, labels, MULTI) == pytest.approx(truth, rel=0.1)


def test_validation_that_cannot_fix_a_temperature_keeps_one(caplog):
    separable = np.array([[8.0, -8.0], [-8.0, 8.0]] * 50)  # every example right with a margin: no minimum
    assert fit_temperature(separable, [0, 1] * 50, SINGLE) == [1.0]
    assert "cannot fix a temperature" in caplog.text
    logits, labels = planted(0.5)
    always = np.stack([logits[:, 0], logits[:, 1]], 1)  # the first label given to every example: nothing to fit
    refs = np.stack([np.ones(len(labels)), labels == 1], 1).astype(float)
    constant, fitted = fit_temperature(always, refs, MULTI)
    assert constant == 1.0 and fitted != pytest.approx(1.0, abs=0.05)


def drawn(probs: np.ndarray, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((len(probs), 1)) > probs.cumsum(-1)).sum(-1).clip(0, probs.shape[1] - 1)


def test_vector_scaling_recovers_a_planted_scale_and_shift():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (20000, 4))
    planted = Scaling("vector", [0.5, 1.5, 1.0, 2.0], [0.4, -0.4, 0.0, 0.2])
    fitted = fit_vector(logits, drawn(planted.probabilities(logits, SINGLE)), SINGLE)
    assert fitted.scale == pytest.approx(planted.scale, rel=0.1)
    # The shifts are fitted up to the sampling's noise (and a softmax ignores one shift added to all): what they
    # give is the planted probabilities.
    gap = np.abs(fitted.probabilities(logits, SINGLE) - planted.probabilities(logits, SINGLE))
    assert gap.mean() < 0.01 and gap.max() < 0.05
    scales_only = fit_vector(logits, drawn(planted.probabilities(logits, SINGLE)), SINGLE, shift=False)
    assert scales_only.shift == [0.0] * 4  # a head without a bias (decoders' `score`) has nowhere to fold one


def test_multi_label_vector_scaling_is_platt_scaling_per_label_and_a_constant_label_keeps_identity():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (20000, 3))
    planted = Scaling("vector", [0.5, 2.0, 1.0], [1.0, -0.5, 0.0])
    labels = (rng.random(logits.shape) < planted.probabilities(logits, MULTI)).astype(float)
    labels[:, 2] = 1.0  # always given: nothing to fit
    fitted = fit_vector(logits, labels, MULTI)
    assert fitted.scale[:2] == pytest.approx([0.5, 2.0], rel=0.1)
    assert fitted.shift[:2] == pytest.approx([1.0, -0.5], abs=0.15)
    gap = np.abs(fitted.probabilities(logits, MULTI) - planted.probabilities(logits, MULTI))[:, :2]
    assert gap.mean() < 0.01 and gap.max() < 0.05
    assert (fitted.scale[2], fitted.shift[2]) == (1.0, 0.0)


@pytest.mark.parametrize(
    "planted, chosen",
    [
        (Scaling("identity", [1.0] * 3, [0.0] * 3), "identity"),  # calibrated as trained: nothing earns a place
        (Scaling("temperature", [0.4] * 3, [0.0] * 3), "temperature"),  # overconfident by T = 2.5
        (Scaling("vector", [0.4, 1.5, 0.8], [1.0, -1.0, 0.0]), "vector"),
    ],
)
def test_held_out_folds_choose_the_simplest_method_that_fits_what_was_planted(planted, chosen):
    """500 validation examples, as a small real split: the choice is made on folds held out of the fits, so vector
    scaling, which always fits validation itself best, must beat the simpler methods where it did not fit."""
    logits = np.random.default_rng(3).normal(0, 2.5, (500, 3))
    labels = drawn(planted.probabilities(logits, SINGLE), seed=4)
    held_out = held_out_nll(logits, labels, SINGLE)
    assert choose_method(held_out) == chosen
    assert set(held_out) == {"identity", "temperature", "vector"} and all(len(v) == 500 for v in held_out.values())


def test_the_ece_floor_is_what_perfect_calibration_measures_and_shrinks_with_size():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1.5, (5000, 3))
    probs = Scaling("identity", [1.0] * 3, [0.0] * 3).probabilities(logits, SINGLE)
    small, large = ece_floor(probs[:300], SINGLE), ece_floor(probs, SINGLE)
    assert small[0] < small[1] and large[0] < large[1] and large[1] < small[0]  # 300 examples cannot show 0
    measured = [calibration_metrics(probs[:300], drawn(probs[:300], seed), SINGLE)["ece"] for seed in range(40)]
    assert np.mean(np.array(measured) <= small[1]) >= 0.85  # perfect calibration lies inside the 95th percentile
    overconfident = Scaling("temperature", [3.0] * 3, [0.0] * 3).probabilities(logits[:300], SINGLE)
    ece = calibration_metrics(overconfident, drawn(probs[:300]), SINGLE)["ece"]
    assert ece > ece_floor(overconfident, SINGLE)[1]
    multi = 1 / (1 + np.exp(-logits[:300]))
    assert 0 < ece_floor(multi, MULTI)[0] < ece_floor(multi, MULTI)[1]


def test_a_calibrated_set_has_ece_near_zero_and_an_overconfident_one_does_not():
    rng = np.random.default_rng(2)
    confidence = rng.uniform(0.5, 1.0, 20000)
    right = rng.random(20000) < confidence  # right exactly as often as it says
    probs = np.stack([confidence, 1 - confidence], 1)
    labels = np.where(right, 0, 1)
    assert calibration_metrics(probs, labels, SINGLE)["ece"] < 0.01
    sure = np.stack([np.full(20000, 0.99), np.full(20000, 0.01)], 1)
    assert calibration_metrics(sure, labels, SINGLE)["ece"] == pytest.approx(0.99 - right.mean(), abs=1e-9)


@pytest.fixture(scope="module")
def runs(module_args, tmp_path_factory):
    root = tmp_path_factory.mktemp("calibration")
    args = [*module_args, "--num_train_epochs", "3", "--learning_rate", "3e-3", "--test_file"]
    test = module_args[module_args.index("--validation_file") + 1].replace("validation", "test")
    for name, method in (("calibrated", "temperature"), ("raw", "none"), ("vector", "vector"), ("auto", None)):
        flags = ["--calibration", method] if method else []  # auto: the default
        if name == "vector":  # 3 epochs at 3e-3 separate the 30 validation texts: no scale has a minimum there
            flags += ["--num_train_epochs", "2", "--learning_rate", "1e-3"]
        run_inline("full_finetune", *args, test, *flags, "--output_dir", root / name)
    return root


def rows(out, split: str = "validation") -> list[dict]:
    return list(csv.DictReader((out / f"predictions_{split}.csv").open()))


def test_the_saved_model_gives_the_calibrated_scores_and_the_same_labels(runs):
    calibrated, raw = runs / "calibrated", runs / "raw"
    results = json.loads((calibrated / "results.json").read_text())
    (temperature,) = results["task"]["temperature"].values()
    assert temperature != pytest.approx(1.0, abs=0.05)
    assert results["eval_nll"] <= results["eval_nll_uncalibrated"]  # what the temperature minimised
    assert {"test_ece", "test_nll", "test_brier", "test_ece_uncalibrated"} <= set(results)
    assert results["eval_accuracy"] == json.loads((raw / "results.json").read_text())["eval_accuracy"]
    assert [r["predicted"] for r in rows(calibrated, "test")] == [r["predicted"] for r in rows(raw, "test")]
    validation = rows(calibrated)
    piped = pipeline("text-classification", model=str(calibrated), top_k=None)([r["text"] for r in validation])
    for row, scores in zip(validation, piped, strict=True):  # pipeline() sorts its scores, best first
        assert scores[0]["label"] == row["predicted"] and scores[0]["score"] == pytest.approx(
            float(row["score"]), abs=1e-3
        )
    uncalibrated = [float(r["score"]) for r in rows(raw)]
    assert [float(r["score"]) for r in validation] != pytest.approx(uncalibrated, abs=1e-3)  # the scores did move
    raw_results = json.loads((raw / "results.json").read_text())
    assert "temperature" not in raw_results["task"] and "eval_ece_uncalibrated" not in raw_results
    assert raw_results["eval_ece"] == pytest.approx(results["eval_ece_uncalibrated"], abs=1e-6)


def card_scores(out, texts: list[str], snippet: str | None = None) -> list[dict[str, float]]:
    """Each text's scores by label through the card's own `pipeline()` snippet (or `snippet`)."""
    card = (out / "README.md").read_text()
    snippet = snippet or next(b for b in re.findall(r"```python\n(.*?)```", card, re.S) if "pipeline(" in b)
    scope: dict = {}
    exec(snippet.replace('classifier("Your text here")', ""), scope)
    return [{s["label"]: s["score"] for s in piped} for piped in scope["classifier"](texts, top_k=None)]


def test_the_cards_pipeline_snippet_reproduces_the_predictions_file(module_args, tmp_path):
    """The card's snippet truncates as the run did (max_length 6 cuts most tiny texts): its scores are the
    predictions file's, where `pipeline()` without it reads whole texts and gives others."""
    out = tmp_path / "short"
    args = [*module_args, "--max_length", "6", "--num_train_epochs", "3", "--learning_rate", "3e-3"]
    run_inline("full_finetune", *args, "--output_dir", out)
    validation = rows(out)
    texts = [r["text"] for r in validation]
    saved = [{n: float(v) for n, v in (p.split(":") for p in r["scores"].split())} for r in validation]
    through_card = card_scores(out, texts)
    for got, want in zip(through_card, saved, strict=True):
        assert got == pytest.approx(want, abs=2e-4)
    assert len({max(w, key=w.get) for w in saved}) > 1  # it learned something: the check has teeth
    plain = f'from transformers import pipeline\nclassifier = pipeline("text-classification", model="{out}")'
    whole = card_scores(out, texts, plain)
    gap = max(abs(w[n] - scores[n]) for w, scores in zip(whole, saved, strict=True) for n in scores)
    assert gap > 0.01


def test_vector_scaling_is_folded_into_the_saved_weights_and_bias(runs):
    """The saved model gives the vector-scaled scores through `pipeline()`; an argmax it moved is the predictions
    file's label and the metrics are computed on it."""
    out = runs / "vector"
    results = json.loads((out / "results.json").read_text())
    scaling = results["task"]["calibration"]
    assert scaling["method"] == "vector" and any(abs(b) > 1e-3 for b in scaling["shift"].values())
    validation = rows(out)
    piped = pipeline("text-classification", model=str(out), top_k=None)([r["text"] for r in validation])
    for row, scores in zip(validation, piped, strict=True):
        assert scores[0]["label"] == row["predicted"]
        assert {s["label"]: s["score"] for s in scores} == pytest.approx(
            {n: float(v) for n, v in (p.split(":") for p in row["scores"].split())}, abs=2e-4
        )
    accuracy = np.mean([r["label"] == r["predicted"] for r in validation])
    assert results["eval_accuracy"] == pytest.approx(accuracy)
    assert results["eval_nll"] <= results["eval_nll_uncalibrated"]  # what it minimised (with a small ridge)


def test_the_default_chooses_by_held_out_folds_and_the_card_says_what_the_evidence_shows(runs):
    results = json.loads((runs / "auto" / "results.json").read_text())
    calibration = results["calibration"]
    held_out = calibration["held_out_nll"]
    assert calibration["asked"] == "auto" and calibration["method"] == calibration["chosen"]
    assert set(held_out) == set(calibration["test"]) == {"identity", "temperature", "vector"}
    if calibration["method"] != "identity":  # chosen only where it beat the simpler ones held out
        assert held_out[calibration["method"]] < held_out["identity"]
    assert results["test_ece_floor"] < results["test_ece_floor_p95"]
    card = (runs / "auto" / "README.md").read_text().split("### Calibration")[1]
    words = {"identity": "Scores are as trained: on held-out folds of validation", "temperature": "by a temperature"}
    assert words.get(calibration["method"], "by vector scaling") in card
    inside = results["test_ece"] <= results["test_ece_floor_p95"]
    assert ("cannot be told apart from perfectly calibrated" if inside else "not calibrated on this split") in card
    assert f"up to {results['test_ece_floor_p95']:.4f} (95th percentile" in card
    for method, figures in calibration["test"].items():  # each method's held-out and test figures, side by side
        assert f"| {method} | {held_out[method]:.4f} | {figures['ece']:.4f} |" in card
    forced = (runs / "calibrated" / "README.md").read_text()
    supported = json.loads((runs / "calibrated" / "results.json").read_text())["calibration"]["chosen"]
    assert ("supported" in forced) == (supported != "temperature")  # a forced method says what the evidence chose


@pytest.mark.parametrize("method", ["temperature", "vector"])
def test_calibrating_a_regression_is_refused_before_training(method, module_args, tmp_path):
    from test_task_shapes import regression_rows, write_csv

    data = write_csv(tmp_path / "reg.csv", regression_rows(30, 0))
    args = [*module_args, "--train_file", data, "--validation_file", data, "--label_column", "score"]
    proc = run_inline("full_finetune", *args, "--calibration", method, "--output_dir", tmp_path / "out", check=False)
    assert proc.returncode == 2 and not (tmp_path / "out").exists()
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: calibration {method} scales class probabilities, and regression has none; drop it"
    )


def test_the_card_report_and_reliability_diagram_show_before_and_after(runs):
    from finetune_recipes.rendering import cell

    calibrated, raw = runs / "calibrated", runs / "raw"
    results = json.loads((calibrated / "results.json").read_text())
    assert (calibrated / "reliability.png").read_bytes().startswith(b"\x89PNG")
    bins = results["calibration"]["reliability"]["test"]
    assert sum(b["count"] for b in bins["after"]) == sum(b["count"] for b in bins["before"]) == results["test_samples"]
    for name in ("README.md", "eval_report.md"):
        text = (calibrated / name).read_text()
        section = text.split("### Calibration")[1]
        assert f"| test (as trained) | {cell(results['test_ece_uncalibrated'])} |" in section
        assert f"| test (calibrated) | {cell(results['test_ece'])} |" in section
        assert "![reliability diagram](reliability.png)" in section
    assert "Scores are as trained (--calibration none)." in (raw / "README.md").read_text()
