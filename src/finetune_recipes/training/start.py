"""Starting a run's loop, a call for each thing it does: the resume state (checked and loaded before anything is
written), the claim on output_dir, the trackers; and the training batches of every epoch, those a resumed run
already trained on skipped."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator, skip_first_batches

from ..config import RunArgs, TrainingArguments, resume_may_change
from ..data import ClassificationData, content_digest
from ..optim import Schedule
from ..ownership import OutputDir, claim_output_dir
from .checkpoints import TrainState, adopt_best, resolve_checkpoint, resume
from .early_stopping import EarlyStopping
from .save import on_main
from .tracking import TRACKER_PROJECT

logger = logging.getLogger("finetune_recipes")


def resume_state(accelerator: Accelerator, data: ClassificationData, args: RunArgs) -> tuple[TrainState, EarlyStopping]:
    """Where the loop starts and the early stopping that ranks its evaluations (by --metric_for_best_model,
    --early_stopping_patience): new ones, or a checkpoint's with --resume_from_checkpoint.

    A resume is checked against the run's settings and data, and the model, optimizer, scheduler and RNG states
    loaded, before anything is written: a refused resume leaves output_dir as it was.
    """
    training = args.get(TrainingArguments)
    state = TrainState()
    early_stopping = EarlyStopping(training.metric_for_best_model, training.early_stopping_patience)
    if training.checkpointing_steps or training.resume_from_checkpoint:  # only checkpoints carry it
        state.fingerprint = fingerprint(args, data, accelerator.num_processes)
    if not training.resume_from_checkpoint:
        return state, early_stopping
    path = resolve_checkpoint(training.output_dir, training.resume_from_checkpoint)
    state, counts = resume(accelerator, path, state.fingerprint, training.allow_config_change_on_resume)
    logger.info("Resumed at step %d from %s", state.completed_steps, path)
    return state, EarlyStopping(early_stopping.metric, early_stopping.patience, **counts)


def fingerprint(args: RunArgs, data: ClassificationData, processes: int) -> dict[str, object]:
    """What determines a run's trajectory: its settings, the recipe, the process count and the data's content."""
    may_change = resume_may_change(*args.configs)
    settings = {k: v for k, v in args.resolved().items() if k not in may_change}
    digests = {f"{split}_data": content_digest(getattr(data, split)) for split in ("train", "validation")}
    return {**settings, **digests, "recipe": args.recipe, "processes": processes}


def claim_outputs(
    accelerator: Accelerator, model: torch.nn.Module, args: RunArgs, checked: str, best_step: int | None
) -> OutputDir | None:
    """output_dir locked and claimed on the main process (None on the others): an overwrite removes only what
    runs wrote; checked again only if it changed since check_outputs (`checked`); refused when the disk has no
    room for the model, a warning when checkpoints may not fit. A resume from another directory's checkpoint
    brings its best weights (`best_step`) along."""
    training = args.get(TrainingArguments)
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    trained_mb = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) / 2**20
    peft = hasattr(accelerator.unwrap_model(model), "get_base_model")
    saved_mb = trained_mb if peft else model_mb  # a peft model saves its adapter (and head) only
    checkpoint_mb = model_mb + 2 * trained_mb  # the whole model, and the optimizer's two moments of what trains

    def work() -> OutputDir:
        out = claim_output_dir(training, args.inputs(), saved_mb, ("checkpoints", TRACKER_PROJECT), checked)
        kept = training.save_total_limit or 1
        free_mb = shutil.disk_usage(out.path).free / 2**20
        if training.checkpointing_steps and free_mb < saved_mb + checkpoint_mb * kept:
            logger.warning(
                "%s has %.0f MB free; %d checkpoints may need %.0f MB", out.path, free_mb, kept, checkpoint_mb * kept
            )
        return out

    failure = f"cannot write to output_dir {training.output_dir} ({{reason}}); pass a writable --output_dir"
    out = on_main(accelerator, work, failure)
    if training.resume_from_checkpoint not in (None, "latest"):  # a path: maybe another directory's checkpoint
        adopt_best(accelerator, Path(training.resume_from_checkpoint), training.output_dir, best_step)
    return out


def start_trackers(accelerator: Accelerator, args: RunArgs, schedule: Schedule) -> None:
    """The trackers (--report_to) started with the resolved config, and the run's plan logged."""
    training = args.get(TrainingArguments)
    if training.report_to:
        settings = {k: v for k, v in args.resolved().items() if v is not None and not isinstance(v, dict | list)}
        settings["total_steps"] = schedule.total_steps  # what a reader of the logs needs to place a step
        accelerator.init_trackers(TRACKER_PROJECT, settings)  # the resolved config: no token in it
    logger.info(
        "%d optimizer steps on %d process(es) (%s), %s precision, %d examples per step",
        schedule.total_steps,
        accelerator.num_processes,
        accelerator.distributed_type.value,
        accelerator.mixed_precision if accelerator.mixed_precision != "no" else "fp32",
        training.per_device_train_batch_size * training.gradient_accumulation_steps * accelerator.num_processes,
    )


def train_batches(loader, schedule: Schedule, completed_steps: int):
    """The training batches of every epoch, each epoch in its seeded order (the same in every process and on every
    resume), from where a run that completed `completed_steps` stood: the epoch and the batches into it follow
    from the step count (checkpoints are taken after an optimizer step, so they hold no partial accumulation)."""
    first, steps_into = divmod(completed_steps, schedule.steps_per_epoch)
    skip = steps_into * schedule.accumulation_steps
    for epoch in range(first, schedule.num_epochs):
        loader.set_epoch(epoch)
        yield from skip_first_batches(loader, skip) if skip else loader
        skip = 0
