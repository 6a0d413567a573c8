"""The training loop every recipe shares: the recipe's loss step, accumulation, logging, evaluation, checkpoints."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import skip_first_batches
from tqdm.auto import tqdm

from ..config import UserError, resume_may_change
from ..data import aggregate_windows, content_digest
from ..metrics import METRICS, greater_is_better, task_metrics
from .checkpoints import (
    TrainState,
    adopt_best,
    load_best,
    prune_best,
    resolve_checkpoint,
    resume,
    save_best,
    save_checkpoint,
)
from .outputs import claim_output_dir, record_outputs
from .tracking import TRACKER_PROJECT

if TYPE_CHECKING:
    from .run import Run

logger = logging.getLogger("finetune_recipes")

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LossStep = Callable[[torch.nn.Module, dict[str, torch.Tensor], Criterion], torch.Tensor]


def train(run: Run, loss_step: LossStep, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Trains `run.model` to the end of its schedule; returns the metrics, the history and the timings.

    `loss_step(model, batch, criterion)` is the recipe's: whatever it returns is backpropagated. `criterion`
    is the task's loss on (logits, labels): cross-entropy, per-label BCE or MSE, class-weighted when asked.
    `on_step(completed_steps)` runs before every batch: a strategy that changes what trains mid-run
    (progressive unfreezing) hooks in there, as a function of the step alone so a resumed run lands in the
    same place. Evaluation follows
    `eval_strategy` (and always ends the run), checkpoints `checkpointing_steps`.
    """
    accelerator, args, model, state = run.accelerator, run.training_args, run.model, begin(run)
    progress = tqdm(
        total=run.schedule.total_steps,
        initial=state.completed_steps,
        desc="train",
        disable=not accelerator.is_local_main_process,
    )
    start, samples, losses = time.perf_counter(), 0, LossMeter(run)
    for epoch in range(state.epoch, run.schedule.num_epochs):
        if finished(run):  # resumed from the last checkpoint of a run
            break
        model.train()
        for batch in epoch_batches(run, epoch):
            if finished(run):  # resumed at the end, or patience spent
                break
            if on_step:
                on_step(state.completed_steps)
            samples += len(batch["labels"])  # before loss_step, which may pop the labels
            with accelerator.accumulate(model):
                loss = loss_step(model, batch, run.task.loss)
                accelerator.backward(loss)
                optimizer_step(run)
            state.batches_in_epoch += 1
            losses.add(loss)
            if accelerator.sync_gradients:
                state.completed_steps += 1
                progress.update(1)
                losses.log(progress, every=args.logging_steps)
                step_done(run, end_of_epoch=False)
        state.epoch, state.batches_in_epoch = epoch + 1, 0
        step_done(run, end_of_epoch=True)
        if finished(run):
            break
    evaluate_if_due(run, end_of_epoch=True)  # a run resumed from its last checkpoint may not have yet
    progress.close()
    runtime = time.perf_counter() - start
    return {
        **final_metrics(run),
        "epochs": state.epoch,
        "steps": state.completed_steps,
        "train_runtime_s": round(runtime, 2),
        "train_samples_per_second": round(samples * accelerator.num_processes / runtime, 2),
        "history": state.history,
        "loss_history": state.loss_history,
        **({"stopped_early": True} if stop_early(run) else {}),
    }


def begin(run: Run) -> TrainState:
    """output_dir locked and claimed (an overwrite removes what runs wrote); a resume; trackers; the plan logged."""
    accelerator, args = run.accelerator, run.training_args
    if args.checkpointing_steps or args.resume_from_checkpoint:  # only checkpoints carry it: hash data only then
        run.state.fingerprint = fingerprint(run)
    path = resolve_checkpoint(args.output_dir, args.resume_from_checkpoint) if args.resume_from_checkpoint else None
    if path:  # checked and loaded before anything is written: a refused resume leaves output_dir as it was
        allow = args.allow_config_change_on_resume
        run.state = resume(accelerator, path, run.state.fingerprint, allow)
    claim_output_dir(run)
    if path:
        adopt_best(accelerator, path, args.output_dir, run.state)
        logger.info("Resumed at step %d from %s", run.state.completed_steps, path)
    if args.report_to:
        settings = {k: v for k, v in run.resolved_config.items() if v is not None and not isinstance(v, dict | list)}
        settings["total_steps"] = run.schedule.total_steps  # what a reader of the logs needs to place a step
        accelerator.init_trackers(TRACKER_PROJECT, settings)  # the resolved config: no token in it
        if accelerator.is_main_process and (Path(args.output_dir) / TRACKER_PROJECT).exists():
            record_outputs(run, TRACKER_PROJECT)  # the tracker's logs are the run's: an overwrite removes them
    logger.info(
        "%d optimizer steps on %d process(es) (%s), %s precision, %d examples per step",
        run.schedule.total_steps,
        accelerator.num_processes,
        accelerator.distributed_type.value,
        accelerator.mixed_precision if accelerator.mixed_precision != "no" else "fp32",
        args.per_device_train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes,
    )
    return run.state


def fingerprint(run: Run) -> dict[str, object]:
    """What determines a run's trajectory: its settings, the recipe, the process count and the data's content."""
    may_change = resume_may_change(run.model_args, run.data_args, run.training_args, *run.recipe_args)
    settings = {k: v for k, v in run.resolved_config.items() if k not in may_change}
    data = {f"{split}_data": content_digest(getattr(run.data, split)) for split in ("train", "validation")}
    recipe = Path(sys.argv[0]).stem
    return {**settings, **data, "recipe": recipe, "processes": run.accelerator.num_processes}


def epoch_batches(run: Run, epoch: int):
    """The epoch's batches in their seeded order; a resumed run skips those it had already trained on."""
    loader = run.loaders["train"]
    loader.set_epoch(epoch)
    skip = run.state.batches_in_epoch
    return skip_first_batches(loader, skip) if skip else loader


def optimizer_step(run: Run) -> None:
    """Clip, step and schedule once the accumulated micro-batches are in (the schedule counts optimizer steps)."""
    accelerator = run.accelerator
    if accelerator.sync_gradients and run.training_args.max_grad_norm:
        accelerator.clip_grad_norm_(run.model.parameters(), run.training_args.max_grad_norm)
    run.optimizer.step()
    if accelerator.sync_gradients:
        run.schedule.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)


class LossMeter:
    """The mean training loss since the last log line, kept on the device: no host sync per step."""

    def __init__(self, run: Run):
        self.run, self.total, self.batches = run, torch.zeros((), device=run.accelerator.device), 0

    def add(self, loss: torch.Tensor) -> None:
        self.total += loss.detach()
        self.batches += 1

    def log(self, progress: tqdm, every: int) -> None:
        step = self.run.state.completed_steps
        if step % every:
            return
        mean = self.run.accelerator.reduce(self.total, reduction="mean").item() / self.batches
        lr = self.run.schedule.scheduler.get_last_lr()[-1]
        self.total.zero_()
        self.batches = 0
        progress.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}")
        self.run.state.loss_history.append({"step": step, "loss": round(mean, 6), "lr": lr})
        self.run.accelerator.log({"train/loss": mean, "train/lr": lr}, step=step)


def step_done(run: Run, end_of_epoch: bool) -> None:
    """Evaluates and checkpoints when they are due after an optimizer step or at the end of an epoch."""
    args, state = run.training_args, run.state
    evaluate_if_due(run, end_of_epoch)
    every = args.checkpointing_steps
    due = every == "epoch" if end_of_epoch else every not in (None, "epoch") and state.completed_steps % int(every) == 0
    if due:
        save_checkpoint(run.accelerator, state, args.output_dir, args.save_total_limit)


def evaluate_if_due(run: Run, end_of_epoch: bool) -> None:
    """Evaluates, logs, and tracks the best model when `evaluation_due`."""
    state = run.state
    if evaluation_due(run, end_of_epoch):
        metrics = evaluate(run)
        state.history.append({"epoch": state.epoch, "step": state.completed_steps, **metrics})
        run.accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=state.completed_steps)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "samples")
        logger.info("step %d (epoch %d): %s", state.completed_steps, state.epoch, shown)
        track_best(run, metrics)


def evaluation_due(run: Run, end_of_epoch: bool) -> bool:
    """By `eval_strategy`, and always when training ends; never twice at one step."""
    state, args = run.state, run.training_args
    if state.history and state.history[-1]["step"] == state.completed_steps:
        return False
    if end_of_epoch and state.completed_steps >= run.schedule.total_steps:
        return True
    if args.eval_strategy == "steps":
        return not end_of_epoch and state.completed_steps % args.eval_steps == 0
    return end_of_epoch


@torch.no_grad()
def predict_split(run: Run, split: str = "validation") -> tuple:
    """(scores, references) of every document of `split` exactly once, whatever the number of processes:
    class probabilities, per-label probabilities or values (regression, in the target's units). Windows of a
    long document are aggregated to one row first."""
    model, accelerator = run.model, run.accelerator
    training = model.training
    model.eval()
    gathered: dict[str, list[torch.Tensor]] = {}
    for batch in run.loaders[split]:
        kept = {k: batch.pop(k) for k in ("labels", "document") if k in batch}
        kept["logits"] = model(**batch).logits.float()
        for key, value in accelerator.gather_for_metrics(kept).items():
            gathered.setdefault(key, []).append(value.cpu())
    model.train(training)
    logits, labels = torch.cat(gathered["logits"]), torch.cat(gathered["labels"])
    if "document" in gathered:
        logits, labels = aggregate_windows(
            logits, labels, torch.cat(gathered["document"]), run.data_args.window_aggregation
        )
    return run.task.scores(logits), run.task.references(labels)


def evaluate(run: Run, split: str = "validation") -> dict[str, float]:
    """The task's metrics (accuracy and macro-F1; micro/macro/samples-F1 and subset accuracy at 0.5; or MSE,
    MAE, correlations and R²) over every document once, and how many documents that was."""
    scores, references = predict_split(run, split)
    return {**task_metrics(run.task.problem_type, scores, references), "samples": len(references)}


def check_metric(args, problem_type: str) -> None:
    """metric_for_best_model must be one the task computes: checked before training, not at the first evaluation."""
    name, known = args.metric_for_best_model, METRICS[problem_type]
    if name and name not in known:
        kind = problem_type.replace("_classification", "").replace("_", "-")
        raise UserError(
            f"metric_for_best_model '{name}' is not computed for a {kind} task; pass one of {', '.join(known)}"
        )


def track_best(run: Run, metrics: dict[str, float]) -> None:
    """Saves the best weights by `metric_for_best_model` to disk; counts evaluations without improvement."""
    state, name = run.state, run.training_args.metric_for_best_model
    if not name:
        return
    if name not in metrics:
        raise UserError(f"metric_for_best_model '{name}' is not one of {', '.join(metrics)}")
    sign = 1 if greater_is_better(name) else -1
    if state.best_metric is not None and sign * metrics[name] <= sign * state.best_metric:
        state.evals_without_improvement += 1
        return
    state.best_metric, state.best_step, state.evals_without_improvement = metrics[name], state.completed_steps, 0
    save_best(run.accelerator, run.model, run.training_args.output_dir, state)


def finished(run: Run) -> bool:
    """The schedule is done, or early stopping's patience is spent."""
    return run.state.completed_steps >= run.schedule.total_steps or stop_early(run)


def stop_early(run: Run) -> bool:
    patience = run.training_args.early_stopping_patience
    return patience is not None and run.state.evals_without_improvement >= patience


def final_metrics(run: Run) -> dict[str, float]:
    """eval_* of the best evaluation, whose weights are restored, or of the last one."""
    state, args = run.state, run.training_args
    if state.best_step is None:
        final = state.history[-1]
    else:
        load_best(run.accelerator, run.model, args.output_dir, state.best_step)
        name = args.metric_for_best_model
        logger.info("Restored the best weights: %s %.4f at step %d", name, state.best_metric, state.best_step)
        final = next(h for h in state.history if h["step"] == state.best_step)
        run.accelerator.wait_for_everyone()
        if run.accelerator.is_main_process and not args.checkpointing_steps:
            prune_best(args.output_dir, None)  # scratch, when the run keeps no checkpoints to resume from
    return {f"eval_{k}": v for k, v in final.items() if k not in ("epoch", "step")}
