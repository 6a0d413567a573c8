"""Starting a run's loop: a resume checked and loaded before anything is written, output_dir claimed, the
trackers started, the plan logged; and each epoch's batches, those a resumed run already trained on skipped."""

from __future__ import annotations

import logging
import shutil

import torch
from accelerate import Accelerator, skip_first_batches

from ..config import DataArguments, RunArgs, TrainingArguments, resume_may_change
from ..data import ClassificationData, content_digest
from ..optim import Schedule
from ..ownership import OutputDir, claim_output_dir
from ..packing import accept_packed, check_packable
from ..processes import DISTRIBUTED
from .checkpoints import TrainState, adopt_best, resolve_checkpoint, resume
from .save import on_main
from .tracking import TRACKER_PROJECT

logger = logging.getLogger("finetune_recipes")


def start_training(
    accelerator: Accelerator,
    model: torch.nn.Module,
    data: ClassificationData,
    schedule: Schedule,
    args: RunArgs,
    checked: str | None = None,
) -> tuple[TrainState, OutputDir | None]:
    """Where the loop starts (a new TrainState, or a checkpoint's with --resume_from_checkpoint) and the run's
    claim on output_dir (on the main process; None on the others).

    With --pack_sequences, the model is checked and taught to read packed batches (packing.py) first. A resume
    is checked against the run's settings and data, and loaded, before anything is written: a
    refused resume leaves output_dir as it was. `checked` is check_outputs' answer at the run's start: the
    claim checks output_dir again only if it changed since. Then output_dir is locked and claimed (an overwrite removes
    only what runs wrote), the trackers start with the resolved config, and the plan is logged.
    """
    training = args.get(TrainingArguments)
    if accelerator.num_processes > 1:  # first: DDP's Reducer holds the process group (see processes.run_to_end)
        DISTRIBUTED.append(model)
    if args.get(DataArguments).pack_sequences:  # the loaders pack; the model learns to read packed batches
        check_packable(accelerator.unwrap_model(model))
        accept_packed(accelerator.unwrap_model(model))
    state = TrainState()
    if training.checkpointing_steps or training.resume_from_checkpoint:  # only checkpoints carry it
        state.fingerprint = fingerprint(args, data, accelerator.num_processes)
    path = None
    if training.resume_from_checkpoint:
        path = resolve_checkpoint(training.output_dir, training.resume_from_checkpoint)
        state = resume(accelerator, path, state.fingerprint, training.allow_config_change_on_resume)
    out = claim(accelerator, model, args, checked)
    if path:
        adopt_best(accelerator, path, training.output_dir, state)
        logger.info("Resumed at step %d from %s", state.completed_steps, path)
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
    return state, out


def fingerprint(args: RunArgs, data: ClassificationData, processes: int) -> dict[str, object]:
    """What determines a run's trajectory: its settings, the recipe, the process count and the data's content."""
    may_change = resume_may_change(*args.configs)
    settings = {k: v for k, v in args.resolved().items() if k not in may_change}
    digests = {f"{split}_data": content_digest(getattr(data, split)) for split in ("train", "validation")}
    return {**settings, **digests, "recipe": args.recipe, "processes": processes}


def claim(accelerator: Accelerator, model: torch.nn.Module, args: RunArgs, checked: str | None) -> OutputDir | None:
    """output_dir locked and claimed on the main process (checked again if it changed since the start);
    refused when the disk has no room for the model, a warning when checkpoints may not fit."""
    training = args.get(TrainingArguments)
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20

    def work() -> OutputDir:
        out = claim_output_dir(training, args.inputs(), model_mb, ("checkpoints", TRACKER_PROJECT), checked)
        kept = training.save_total_limit or 1
        free_mb = shutil.disk_usage(out.path).free / 2**20
        if training.checkpointing_steps and free_mb < model_mb * (1 + 3 * kept):
            logger.warning(
                "%s has %.0f MB free; %d checkpoints may need %.0f MB", out.path, free_mb, kept, 3 * kept * model_mb
            )
        return out

    failure = f"cannot write to output_dir {training.output_dir} ({{reason}}); pass a writable --output_dir"
    return on_main(accelerator, work, failure)


def epoch_batches(loader, epoch: int, state: TrainState):
    """The epoch's batches in their seeded order (the same in every process and on every resume); a run resumed
    mid-epoch skips those it had already trained on."""
    loader.set_epoch(epoch)
    skip = state.batches_in_epoch
    return skip_first_batches(loader, skip) if skip else loader
