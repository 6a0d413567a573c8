"""Evaluation of every task shape: predictions gathered once per document whatever the number of processes, the
task's metrics, an evaluation of the loop kept in the run's history, calibration (a scaling of the logits chosen
and fitted on validation, and multi-label thresholds, returned as values), and the scores a run ends with."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from accelerate import Accelerator

from ..calibration import (
    METHODS,
    MIN_HELD_OUT,
    Scaling,
    calibration_metrics,
    choose_method,
    ece_floor,
    fit_scaling,
    held_out_nll,
    reliability_bins,
)
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
    logits: np.ndarray | None = None  # what the scores come from: the calibration is fitted on them


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
    return Evaluation(scores, references, split_metrics(task, scores, references), logits.numpy())


def split_metrics(task: Task, scores: np.ndarray, references: np.ndarray) -> dict[str, float]:
    """The task's metrics, --metric_name's beside them, and how many documents."""
    metrics = task_metrics(task.problem_type, scores, references)
    if task.metric_names:  # --metric_name: evaluate's metrics beside them
        metrics |= evaluate_metrics(task.metric_names, task.problem_type, scores, references)
    return {**metrics, "samples": len(references)}


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
    """What `calibrate` fits on validation, which save_run folds into the saved model: the scaling of the logits
    (None when the scores stay as trained) and the multi-label decision thresholds; every split's evaluation on
    the calibrated scores (`scored`), and the numbers that measure the calibration (`results`)."""

    scaling: Scaling | None
    thresholds: list[float] | None
    scored: dict[str, Evaluation | None]
    results: dict

    def summary(self, label_names: list[str]) -> dict:
        """For results.json's task: the thresholds, and the scaling (a temperature also as T) by label name."""
        out = {}
        if self.thresholds is not None:
            out["thresholds"] = dict(zip(label_names, self.thresholds, strict=True))
        if self.scaling is not None:
            scaling = self.scaling
            out["calibration"] = {
                "method": scaling.method,
                "scale": dict(zip(label_names, scaling.scale, strict=True)),
                "shift": dict(zip(label_names, scaling.shift, strict=True)),
            }
            if scaling.method == "temperature":
                names = label_names if len(label_names) > 1 and len(set(scaling.scale)) > 1 else ["all"]
                out["temperature"] = dict(zip(names, (1 / s for s in scaling.scale), strict=False))
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


def calibrate(task: Task, scored: dict[str, Evaluation | None], method: str | None, shift: bool = True):
    """Calibration fitted on validation's logits (`scored`: validation, and test when it has labels), returned
    as a Calibration that save_run folds into the saved output layer. `method`: temperature or vector (a scale
    and, where the head has a bias to fold it into (`shift`), a shift per class); auto (None) chooses among the
    scores as trained, a temperature and vector scaling by held-out evidence: each fitted on 4 folds of
    validation and scored on the fifth (held_out_nll, choose_method); none keeps the scores as trained.

    Every split is rescored with the scaling (vector scaling may move an argmax, so the metrics are computed
    again), the predictions files, thresholds and pictures are those of the saved model. Multi-label decision
    thresholds are then tuned on validation's calibrated scores (each label's F1). The results hold ECE, NLL and
    Brier per split, after and (as *_uncalibrated) before; the ECE a perfectly calibrated model with the same
    scores would show at the split's size (*_ece_floor, its 95th percentile *_ece_floor_p95); each method's
    held-out NLL and test scores; and the reliability bins the report draws. Regression: nothing is fitted."""
    if task.problem_type == REGRESSION:
        if method is None:
            logger.info("Regression: no scaling to fit (calibration applies to class probabilities)")
        return Calibration(None, None, scored, {})
    kind, present = task.problem_type, {split: e for split, e in scored.items() if e is not None}
    prefix = {"validation": "eval", "test": "test"}
    before = {split: calibration_metrics(e.scores, e.references, kind) for split, e in present.items()}
    bins = {prefix[s]: {"before": reliability_bins(e.scores, e.references, kind)} for s, e in present.items()}
    asked, results, scaling = method or "auto", {}, None
    evidence = {} if asked == "none" else compare_methods(kind, present, shift)
    if asked != "none":
        chosen = asked if asked != "auto" else evidence.get("chosen", "identity")
        validation = present["validation"]
        scaling = fit_scaling(chosen, validation.logits, validation.references, kind, shift)
        if scaling.method == "identity":
            scaling = None
            logger.info("Calibration: the scores stay as trained (%s)", evidence.get("said", "by held-out evidence"))
        else:
            present = {split: rescored(task, e, scaling) for split, e in present.items()}
            for split, e in present.items():
                bins[prefix[split]]["after"] = reliability_bins(e.scores, e.references, kind)
                results.update({f"{prefix[split]}_{k}_uncalibrated": v for k, v in before[split].items()})
            logger.info("Calibration: %s fitted on validation (%s)", scaling.method, evidence.get("said", "asked"))
    for split, e in present.items():
        metrics = calibration_metrics(e.scores, e.references, kind)
        mean, p95 = ece_floor(e.scores, kind)
        results.update({f"{prefix[split]}_{k}": v for k, v in metrics.items()})
        results.update({f"{prefix[split]}_ece_floor": mean, f"{prefix[split]}_ece_floor_p95": p95})
    thresholds = None
    if kind == MULTI:  # on the calibrated scores, which the saved model gives
        validation = present["validation"]
        thresholds = [float(t) for t in tune_thresholds(validation.scores, validation.references)]
    summary = {"asked": asked, "method": scaling.method if scaling else "identity", "reliability": bins}
    results["calibration"] = {**summary, **{k: v for k, v in evidence.items() if k != "said"}}
    return Calibration(scaling, thresholds, {**scored, **present}, results)


def compare_methods(kind: str, present: dict[str, Evaluation], shift: bool) -> dict:
    """The held-out evidence: each method's mean NLL on validation's held-out folds and the one it supports
    (none below MIN_HELD_OUT examples), and what each, fitted on all of validation, scores on test."""
    validation, test = present["validation"], present.get("test")
    evidence: dict = {}
    if len(validation.references) >= MIN_HELD_OUT:
        held_out = held_out_nll(validation.logits, validation.references, kind, shift)
        evidence["chosen"] = choose_method(held_out)
        evidence["held_out_nll"] = {m: float(v.mean()) for m, v in held_out.items()}
        shown = ", ".join(f"{m} {v:.4f}" for m, v in evidence["held_out_nll"].items())
        evidence["said"] = f"held-out NLL on validation's folds: {shown}"
    else:
        evidence["said"] = f"{len(validation.references)} validation examples, under {MIN_HELD_OUT}: too few to choose"
    if test is not None:
        fitted = {m: fit_scaling(m, validation.logits, validation.references, kind, shift, warn=False) for m in METHODS}
        evidence["test"] = {
            m: calibration_metrics(s.probabilities(test.logits, kind), test.references, kind) for m, s in fitted.items()
        }
    return evidence


def rescored(task: Task, evaluation: Evaluation, scaling: Scaling) -> Evaluation:
    """`evaluation` with the scaled logits' scores (float64, as predict computes them) and their metrics."""
    scores = scaling.probabilities(evaluation.logits, task.problem_type)
    return dataclasses.replace(evaluation, scores=scores, metrics=split_metrics(task, scores, evaluation.references))
