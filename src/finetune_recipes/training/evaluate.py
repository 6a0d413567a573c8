"""Evaluation of every task shape: predictions gathered once per document whatever the number of processes, the
task's metrics, the validation evaluations of a run (the best one kept, early stopping), and the final scores."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from accelerate import Accelerator

from ..calibration import calibration_metrics, fit_temperature, reliability_bins, scaled_probabilities
from ..data import Task, aggregate_windows
from ..errors import UserError
from ..metrics import MULTI, REGRESSION, greater_is_better, per_class_report, task_metrics, tune_thresholds
from ..rendering import cell
from .checkpoints import TrainState, load_best, prune_best, save_best
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
    metrics = {**task_metrics(task.problem_type, scores, references), "samples": len(references)}
    return Evaluation(scores, references, metrics, logits.numpy())


class Validation:
    """The validation evaluations of a run: each logged and kept in the TrainState's history (so a resumed run
    has them); by `metric_for_best_model`, the best one's weights saved beside the checkpoints and the
    evaluations without improvement counted for early stopping."""

    def __init__(self, accelerator: Accelerator, loader, task: Task, training_args, window_aggregation: str):
        self.accelerator, self.loader, self.task, self.args = accelerator, loader, task, training_args
        self.window_aggregation = window_aggregation
        self.last: Evaluation | None = None
        self.best: Evaluation | None = None

    def __call__(self, model, state: TrainState) -> Evaluation:
        """Evaluates at the current step, once: a second call at the same step returns the first's result."""
        if self.evaluated(state):
            return self.last or evaluate(model, self.loader, self.task, self.accelerator, self.window_aggregation)
        refuse_diverged(self.accelerator, model, state)  # nan scores would be ranked, kept as best, saved
        self.last = evaluate(model, self.loader, self.task, self.accelerator, self.window_aggregation)
        metrics = self.last.metrics
        state.history.append({"epoch": state.epoch, "step": state.completed_steps, **metrics})
        self.accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=state.completed_steps)
        shown = ", ".join(f"{k} {cell(v)}" for k, v in metrics.items() if k != "samples")  # None: undefined, –
        logger.info("step %d (epoch %d): %s", state.completed_steps, state.epoch, shown)
        self.track_best(model, state)
        return self.last

    @staticmethod
    def evaluated(state: TrainState) -> bool:
        """Evaluated at the current step already (possibly before a resume)."""
        return bool(state.history) and state.history[-1]["step"] == state.completed_steps

    def track_best(self, model, state: TrainState) -> None:
        name = self.args.metric_for_best_model
        if not name:
            return
        metrics = self.last.metrics
        if name not in metrics:
            raise UserError(f"metric_for_best_model '{name}' is not one of {', '.join(metrics)}")
        sign = 1 if greater_is_better(name) else -1
        if metrics[name] is None or (
            state.best_metric is not None and sign * metrics[name] <= sign * state.best_metric
        ):
            # undefined (a correlation of constant predictions) never improves
            state.evals_without_improvement += 1
            return
        state.best_metric, state.best_step, state.evals_without_improvement = metrics[name], state.completed_steps, 0
        self.best = self.last
        save_best(self.accelerator, model, self.args.output_dir, state)

    def patience_spent(self, state: TrainState) -> bool:
        """Early stopping: `early_stopping_patience` evaluations in a row without improvement."""
        patience = self.args.early_stopping_patience
        return patience is not None and state.evals_without_improvement >= patience

    def final(self, model, state: TrainState) -> Evaluation:
        """The evaluation the run ends with: the best one, whose weights are restored into `model`, or the last.

        Its predictions are reused, not computed again; only a resumed run whose chosen evaluation came before
        the resume evaluates it once more (its weights restored, the same numbers)."""
        if not self.evaluated(state):  # a run resumed from its last checkpoint, which came before the evaluation
            self(model, state)
        chosen = self.last  # None when a resumed run has not evaluated since
        if state.best_step is not None:
            load_best(self.accelerator, model, self.args.output_dir, state.best_step)
            name = self.args.metric_for_best_model
            logger.info("Restored the best weights: %s %.4f at step %d", name, state.best_metric, state.best_step)
            chosen = self.best
            self.accelerator.wait_for_everyone()
            if self.accelerator.is_main_process and not self.args.checkpointing_steps:
                prune_best(self.args.output_dir, None)  # scratch, when the run keeps no checkpoints to resume from
        if chosen is None:
            chosen = evaluate(model, self.loader, self.task, self.accelerator, self.window_aggregation)
        step = state.best_step if state.best_step is not None else state.history[-1]["step"]
        recorded = next(h for h in state.history if h["step"] == step)
        chosen.metrics = {k: v for k, v in recorded.items() if k not in ("epoch", "step")}
        return chosen

    def results(self, state: TrainState, validation: Evaluation, test: Evaluation | None) -> dict:
        """The scores every task shape ends with: eval_* of the chosen evaluation, test_* when the test split has
        labels, the per-class report of each (precision, recall, F1, support; single-label: the confusion
        matrix), the history, and the task's summary.

        Classification probabilities are calibrated first (`calibrate`). Multi-label thresholds are tuned on
        validation (each label's F1) and judged on test only: test metrics come at 0.5 and, as test_*_tuned, at
        the tuned thresholds."""
        task, results = self.task, {f"eval_{k}": v for k, v in validation.metrics.items()}
        results.update(calibrate(task, {"eval": validation, "test": test}, self.args.calibration))
        if task.problem_type == MULTI:  # on the calibrated scores, which the saved model gives
            task.thresholds = [float(t) for t in tune_thresholds(validation.scores, validation.references)]
        cut = task.thresholds if task.thresholds is not None else 0.5
        reports = {"validation": per_class_report(task.problem_type, *astuple(validation), task.label_names, cut)}
        if test is not None:
            results.update({f"test_{k}": v for k, v in test.metrics.items()})
            if task.thresholds is not None:
                tuned = task_metrics(task.problem_type, test.scores, test.references, task.thresholds)
                results.update({f"test_{k}_tuned": v for k, v in tuned.items()})
            reports["test"] = per_class_report(task.problem_type, *astuple(test), task.label_names, cut)
        results.update(epochs=state.epoch, steps=state.completed_steps, history=state.history)
        if self.args.metric_for_best_model:
            results["best_step"] = state.best_step  # the step whose weights were saved
        results["loss_history"] = state.loss_history
        if self.patience_spent(state):
            results["stopped_early"] = True
        return {**results, "task": task.summary(), **({"report": reports} if any(reports.values()) else {})}


def astuple(evaluation: Evaluation) -> tuple[np.ndarray, np.ndarray]:
    return evaluation.scores, evaluation.references


def calibrate(task: Task, evaluations: dict[str, Evaluation | None], method: str | None) -> dict:
    """Temperature scaling (unless `method` is "none"): the temperature that minimises the validation NLL, kept
    in the task (save_run folds it into the saved output layer) and applied to every split's scores here, so
    the predictions files, thresholds and pictures are the saved model's. Argmax labels, and every decision at
    0.5, stay as they were. Returns ECE, NLL and Brier per split, after and (as *_uncalibrated) before, and the
    reliability bins the report draws. Regression has no temperature: nothing."""
    if task.problem_type == REGRESSION:
        if method is None:
            logger.info("Regression: no temperature to fit (calibration applies to class probabilities)")
        return {}
    kind, scored = task.problem_type, {split: e for split, e in evaluations.items() if e is not None}
    before = {split: calibration_metrics(e.scores, e.references, kind) for split, e in scored.items()}
    bins = {split: {"before": reliability_bins(e.scores, e.references, kind)} for split, e in scored.items()}
    results: dict = {}
    if method != "none":
        task.temperature = fit_temperature(scored["eval"].logits, scored["eval"].references, kind)
        for split, e in scored.items():
            e.scores = scaled_probabilities(e.logits, task.temperature, kind)  # float64, as predict computes them
            bins[split]["after"] = reliability_bins(e.scores, e.references, kind)
            results.update({f"{split}_{k}_uncalibrated": v for k, v in before[split].items()})
        shown = ", ".join(f"{t:.3f}" for t in task.temperature)
        logger.info("Calibration: temperature %s fitted on validation", shown)
    for split, e in scored.items():
        results.update({f"{split}_{k}": v for k, v in calibration_metrics(e.scores, e.references, kind).items()})
    return {**results, "calibration": {"method": method or "temperature", "reliability": bins}}
