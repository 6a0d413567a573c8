"""Evaluation of every task shape: predictions gathered once per document whatever the number of processes, the
task's metrics, an evaluation of the loop kept in the run's history, calibration (a temperature and multi-label
thresholds fitted on validation, returned as values), and the scores a run ends with."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from accelerate import Accelerator

from ..calibration import calibration_metrics, fit_temperature, reliability_bins, scaled_probabilities
from ..data import Task, aggregate_windows
from ..metrics import MULTI, REGRESSION, evaluate_metrics, per_class_report, task_metrics, tune_thresholds
from ..rendering import cell
from .checkpoints import TrainState
from .early_stopping import EarlyStopping
from .tracking import refuse_diverged

logger = logging.getLogger("finetune_recipes")


@dataclass
class Evaluation:
    """A split scored: per document, the scores (class or per-label probabilities, or values in the target's
    units) and the references; the task's metrics on them, and how many documents that was."""

    scores: np.ndarray
    references: np.ndarray
    metrics: dict[str, float]
    logits: np.ndarray | None = None  # what the scores come from: a temperature is fitted on them


@torch.no_grad()
def evaluate(model, loader, task: Task, accelerator: Accelerator, window_aggregation: str = "mean") -> Evaluation:
    """Every document of `loader` exactly once (gather_for_metrics drops the padding of the last batch): the
    task's metrics (accuracy and macro-F1; micro/macro/samples-F1 and subset accuracy at 0.5; or MSE, MAE,
    correlations and R²). The windows of a long document are aggregated to one row first."""
    training = model.training
    model.eval()
    gathered: dict[str, list[torch.Tensor]] = {}
    for batch in loader:
        kept = {k: batch.pop(k) for k in ("labels", "document") if k in batch}
        kept["logits"] = model(**batch).logits.float()
        for key, value in accelerator.gather_for_metrics(kept).items():
            gathered.setdefault(key, []).append(value.cpu())
    model.train(training)
    logits, labels = torch.cat(gathered["logits"]), torch.cat(gathered["labels"])
    if "document" in gathered:
        logits, labels = aggregate_windows(logits, labels, torch.cat(gathered["document"]), window_aggregation)
    scores, references = task.scores(logits), task.references(labels)
    metrics = task_metrics(task.problem_type, scores, references)
    if task.metric_names:  # --metric_name: evaluate's metrics beside them
        metrics |= evaluate_metrics(task.metric_names, task.problem_type, scores, references)
    metrics["samples"] = len(references)
    return Evaluation(scores, references, metrics, logits.numpy())


def record_evaluation(accelerator: Accelerator, model, state: TrainState, metrics: dict, steps_per_epoch: int) -> None:
    """An evaluation of the loop, kept: the weights are checked first (nan scores would be ranked, kept as the best
    and saved), then the metrics go into the TrainState's history (so a resumed run has them), to the trackers and
    to the log. The epoch is fractional, as transformers' Trainer logs it."""
    refuse_diverged(accelerator, model, state)
    epoch = round(state.completed_steps / steps_per_epoch, 2)
    state.history.append({"epoch": epoch, "step": state.completed_steps, **metrics})
    accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=state.completed_steps)
    shown = ", ".join(f"{k} {cell(v)}" for k, v in metrics.items() if k != "samples")  # None: undefined, –
    logger.info("step %d (epoch %s): %s", state.completed_steps, f"{epoch:g}", shown)


@dataclass(frozen=True)
class Calibration:
    """What `calibrate` fits on validation, which save_run folds into the saved model: the temperature (one, or one
    per label; None when none was fitted) and the multi-label decision thresholds; every split's evaluation on
    the calibrated scores (`scored`), and the numbers that measure the calibration (`results`)."""

    temperature: list[float] | None
    thresholds: list[float] | None
    scored: dict[str, Evaluation | None]
    results: dict

    def summary(self, label_names: list[str]) -> dict:
        """For results.json's task: the thresholds and the temperature by label name."""
        out = {}
        if self.thresholds is not None:
            out["thresholds"] = dict(zip(label_names, self.thresholds, strict=True))
        if self.temperature is not None:
            names = label_names if len(self.temperature) > 1 else ["all"]
            out["temperature"] = dict(zip(names, self.temperature, strict=True))
        return out


def run_results(task: Task, state: TrainState, early_stopping: EarlyStopping, calibration: Calibration, schedule):
    """The scores every task shape ends with: eval_* of the final evaluation, test_* when the test split has
    labels, the per-class report of each (precision, recall, F1, support; single-label: the confusion matrix),
    the calibration's numbers, the history, where the run stopped, and the task's summary. Multi-label test
    metrics come at 0.5 and, as test_*_tuned, at the thresholds tuned on validation."""
    validation, test = calibration.scored["validation"], calibration.scored.get("test")
    results = {f"eval_{k}": v for k, v in validation.metrics.items()}
    results.update(calibration.results)
    thresholds = calibration.thresholds
    cut = thresholds if thresholds is not None else 0.5
    reports = {"validation": per_class_report(task.problem_type, *astuple(validation), task.label_names, cut)}
    if test is not None:
        results.update({f"test_{k}": v for k, v in test.metrics.items()})
        if thresholds is not None:
            tuned = task_metrics(task.problem_type, test.scores, test.references, thresholds)
            results.update({f"test_{k}_tuned": v for k, v in tuned.items()})
        reports["test"] = per_class_report(task.problem_type, *astuple(test), task.label_names, cut)
    epochs = math.ceil(state.completed_steps / schedule.steps_per_epoch)
    results.update(epochs=epochs, steps=state.completed_steps, history=state.history)
    results["loss_history"] = state.loss_history
    if early_stopping.metric:
        results["best_step"] = early_stopping.best_step  # the step whose weights the run ends with and saves
    if early_stopping.stop:
        results["stopped_early"] = True
    summary = {**task.summary(), **calibration.summary(task.label_names)}
    return {**results, "task": summary, **({"report": reports} if any(reports.values()) else {})}


def astuple(evaluation: Evaluation) -> tuple[np.ndarray, np.ndarray]:
    return evaluation.scores, evaluation.references


def calibrate(task: Task, scored: dict[str, Evaluation | None], method: str | None) -> Calibration:
    """Temperature scaling (unless `method` is "none"): the temperature that minimises the validation NLL,
    applied to every split's scores (`scored`: validation, and test when it has labels), so the predictions
    files, thresholds and pictures are those of the saved model, which save_run scales by it. Argmax labels, and
    every decision at 0.5, stay as they were. Multi-label decision thresholds are then tuned on validation's
    calibrated scores (each label's F1). The Calibration holds both, the calibrated evaluations, and ECE, NLL
    and Brier per split, after and (as *_uncalibrated) before, with the reliability bins the report draws.
    Regression has no temperature: nothing is fitted."""
    if task.problem_type == REGRESSION:
        if method is None:
            logger.info("Regression: no temperature to fit (calibration applies to class probabilities)")
        return Calibration(None, None, scored, {})
    kind, present = task.problem_type, {split: e for split, e in scored.items() if e is not None}
    prefix = {"validation": "eval", "test": "test"}
    before = {split: calibration_metrics(e.scores, e.references, kind) for split, e in present.items()}
    bins = {prefix[s]: {"before": reliability_bins(e.scores, e.references, kind)} for s, e in present.items()}
    results: dict = {}
    temperature = None
    if method != "none":
        temperature = fit_temperature(present["validation"].logits, present["validation"].references, kind)
        present = {  # float64, as predict computes them
            split: dataclasses.replace(e, scores=scaled_probabilities(e.logits, temperature, kind))
            for split, e in present.items()
        }
        for split, e in present.items():
            bins[prefix[split]]["after"] = reliability_bins(e.scores, e.references, kind)
            results.update({f"{prefix[split]}_{k}_uncalibrated": v for k, v in before[split].items()})
        logger.info("Calibration: temperature %s fitted on validation", ", ".join(f"{t:.3f}" for t in temperature))
    for split, e in present.items():
        metrics = calibration_metrics(e.scores, e.references, kind)
        results.update({f"{prefix[split]}_{k}": v for k, v in metrics.items()})
    thresholds = None
    if kind == MULTI:  # on the calibrated scores, which the saved model gives
        validation = present["validation"]
        thresholds = [float(t) for t in tune_thresholds(validation.scores, validation.references)]
    results["calibration"] = {"method": method or "temperature", "reliability": bins}
    return Calibration(temperature, thresholds, {**scored, **present}, results)
