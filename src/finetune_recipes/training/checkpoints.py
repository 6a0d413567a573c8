"""Checkpoints: the run's position (TrainState), atomic saves, rotation, the best weights, and resuming."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import load_checkpoint_in_model
from safetensors import SafetensorError

from ..errors import UserError, first_line, write_failure
from .early_stopping import EarlyStopping
from .tracking import refuse_diverged

logger = logging.getLogger("finetune_recipes")

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT = re.compile(r"step_(\d+)$")
BEST = "best_step_{}"
STATE_FILE = "trainer_state.json"
INDEX_FILE = "index.json"  # written last: every file of the checkpoint and its size


@dataclass
class TrainState:
    """Where a run is: written into every checkpoint as JSON, with the early stopping's counts, so a resumed run
    continues exactly here. The epoch and the batches into it follow from the step count (`train_batches`)."""

    completed_steps: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # the validation evaluations
    loss_history: list[dict[str, float]] = field(default_factory=list)  # the logged training-loss means
    fingerprint: dict[str, object] = field(default_factory=dict)  # what determines the run: see start.fingerprint

    def save(self, directory: Path, early_stopping: EarlyStopping) -> None:
        content = {**dataclasses.asdict(self), "early_stopping": early_stopping.state_dict()}
        (directory / STATE_FILE).write_text(json.dumps(content, indent=1) + "\n")

    @staticmethod
    def load(directory: Path) -> tuple[TrainState, dict]:
        """The state and the early stopping's counts of a checkpoint."""
        content = json.loads((directory / STATE_FILE).read_text())
        if "early_stopping" not in content:  # 0.1 saved mid-epoch before an epoch's evaluation: not this loop's
            raise UserError(
                f"checkpoint {directory} was written by finetune-recipes 0.1, whose loop checkpointed and evaluated "
                "in another order; resume it with 0.1, or start the run again without --resume_from_checkpoint"
            )
        stopping = content.pop("early_stopping")
        return TrainState(**content), stopping


def checkpoint_due(checkpointing_steps: str | None, step: int, steps_per_epoch: int) -> bool:
    """--checkpointing_steps N: after every N-th optimizer step; "epoch": after an epoch's last step."""
    if checkpointing_steps == "epoch":
        return step % steps_per_epoch == 0
    return checkpointing_steps is not None and step % int(checkpointing_steps) == 0


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (a save in progress has a temporary name until it is whole)."""
    root = checkpoint_root(output_dir)
    found = [p for p in root.glob("step_*") if CHECKPOINT.search(p.name)] if root.is_dir() else []
    return sorted(found, key=lambda p: int(CHECKPOINT.search(p.name).group(1)))


def resolve_checkpoint(output_dir: str | Path, which: str) -> Path:
    """`latest` is the newest complete checkpoint in output_dir (an incomplete one is passed over with a
    warning); anything else is a path, which must be complete."""
    if which == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise UserError(
                f"no checkpoint in {checkpoint_root(output_dir)} to resume from; drop --resume_from_checkpoint"
            )
        for path in reversed(found):
            problem = incomplete(path)
            if problem is None:
                return path
            logger.warning("Checkpoint %s is incomplete (%s): passed over", path, problem)
        raise UserError(f"no complete checkpoint in {checkpoint_root(output_dir)}; drop --resume_from_checkpoint")
    if not Path(which).is_dir():
        raise UserError(f"checkpoint {which} does not exist; pass a checkpoint directory or 'latest'")
    problem = incomplete(Path(which))
    if problem:
        raise UserError(f"checkpoint {which} is incomplete ({problem}); resume from another checkpoint or 'latest'")
    return Path(which)


def write_index(path: Path) -> None:
    files = {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}
    (path / INDEX_FILE).write_text(json.dumps(files, indent=1) + "\n")


def incomplete(path: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (a file missing or truncated), or None when it is whole."""
    try:
        files = json.loads((path / INDEX_FILE).read_text())
    except (OSError, ValueError):
        return f"no readable {INDEX_FILE}, which a complete save writes last"
    for name, size in files.items():
        found = (path / name).stat().st_size if (path / name).is_file() else None
        if found != size:
            return f"{name} is missing" if found is None else f"{name} has {found} bytes, not {size}"
    return None


def write_atomically(accelerator: Accelerator, final: Path, write: Callable[[Path], None]) -> None:
    """Every process writes its part into a temporary directory, which is renamed once whole.

    A run killed mid-save leaves only the temporary name behind, which nothing reads.
    """
    partial = final.with_name(f".partial_{final.name}")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        write(partial)
    except Exception as error:  # a full disk or a forbidden folder: one line, and no half-written checkpoint
        if (reason := write_failure(error)) is None:
            raise
        shutil.rmtree(partial, ignore_errors=True)
        output_dir = final.parent.parent
        raise UserError(
            f"cannot save {final.name} in {final.parent} ({reason}): free space or fix permissions; "
            f"{kept_checkpoint(output_dir)}"
        ) from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
    accelerator.wait_for_everyone()


def save_checkpoint(
    accelerator: Accelerator, model, state: TrainState, early_stopping: EarlyStopping, output_dir: str, keep: int | None
) -> None:
    """The whole training state (accelerator.save_state), TrainState and the early stopping's counts; only the
    newest `keep` are kept. A diverged model is refused: the last good checkpoint stays the newest."""
    refuse_diverged(accelerator, model, state)

    def write(path: Path) -> None:
        accelerator.save_state(str(path))
        accelerator.wait_for_everyone()  # every process's RNG state is on disk before the index lists it
        if accelerator.is_main_process:
            state.save(path, early_stopping)
            write_index(path)

    write_atomically(accelerator, checkpoint_root(output_dir) / f"step_{state.completed_steps}", write)
    if accelerator.is_main_process and keep:
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old)
        prune_best(output_dir, early_stopping.best_step)


def kept_checkpoint(output_dir: str | Path) -> str:
    """What an interrupted run has kept, for its Ctrl-C line: the checkpoint `--resume_from_checkpoint latest`
    would resume from (the newest complete one), read from the disk."""
    try:
        newest = resolve_checkpoint(output_dir, "latest")
    except UserError:  # none, or none complete
        return "nothing was saved"
    return (
        f"the last checkpoint is {newest.name.replace('_', ' ')} in {checkpoint_root(output_dir)}: the same "
        "command with --resume_from_checkpoint latest goes on from there"
    )


def resume(accelerator: Accelerator, path: Path, fingerprint: dict, allow_changes: bool) -> tuple[TrainState, dict]:
    """Loads model, optimizer, scheduler and RNG states from a checkpoint; returns where the run stood and the
    early stopping's counts.

    Refuses a checkpoint written with other settings or data (`fingerprint`) unless `allow_changes`.
    """
    try:
        state, stopping = TrainState.load(path)
    except UserError:
        raise
    except (OSError, ValueError, TypeError, KeyError):
        raise UserError(f"{path} has no readable {STATE_FILE}, so it is not a recipe's checkpoint") from None
    changed = [
        k for k in sorted(set(fingerprint) | set(state.fingerprint)) if fingerprint.get(k) != state.fingerprint.get(k)
    ]
    if changed and not allow_changes:
        shown = ", ".join(f"{k} {state.fingerprint.get(k)} → {fingerprint.get(k)}" for k in changed[:4])
        raise UserError(
            f"checkpoint {path} was written with other settings or data ({shown}); resume with the same ones, "
            "or pass --allow_config_change_on_resume"
        )
    try:
        accelerator.load_state(str(path))
    except (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError, SafetensorError) as error:
        raise UserError(
            f"cannot load checkpoint {path} ({first_line(error)}); resume from another checkpoint"
        ) from None
    state.fingerprint = fingerprint
    best = path.parent / BEST.format(stopping["best_step"])
    if stopping["best_step"] is not None and not best.is_dir():
        raise UserError(f"{path} names best weights {best} that do not exist; resume from another checkpoint")
    return state, stopping


def adopt_best(accelerator: Accelerator, path: Path, output_dir: str, best_step: int | None) -> None:
    """Copies the best weights of a checkpoint resumed from elsewhere beside this run's checkpoints."""
    source = path.parent / BEST.format(best_step)
    target = checkpoint_root(output_dir) / source.name
    if best_step is not None and not target.is_dir():
        if accelerator.is_main_process:
            shutil.copytree(source, target)
        accelerator.wait_for_everyone()


def save_best(accelerator: Accelerator, model, output_dir: str, step: int) -> None:
    """The weights of the best evaluation so far (at `step`), on disk beside the checkpoints, not in memory."""
    final = checkpoint_root(output_dir) / BEST.format(step)
    write_atomically(accelerator, final, lambda path: accelerator.save_model(model, path))
    if accelerator.is_main_process:
        prune_best(output_dir, step)


def restore_best(accelerator: Accelerator, model, training_args, step: int) -> None:
    """The best evaluation's weights (at `step`) back into `model`; without checkpoints to resume from, the best
    weights were scratch and are removed."""
    root = checkpoint_root(training_args.output_dir)
    load_checkpoint_in_model(accelerator.unwrap_model(model), str(root / BEST.format(step)))
    logger.info("Restored the best weights: those of step %d", step)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and not training_args.checkpointing_steps:
        prune_best(training_args.output_dir, None)


def prune_best(output_dir: str | Path, current: int | None) -> None:
    """Removes best weights that neither the run nor any kept checkpoint refers to (a resume needs its own).

    With `current` None and no checkpoint kept, that is all of them, and an emptied checkpoints/ goes too.
    """
    root = checkpoint_root(output_dir)
    wanted = {current} | {TrainState.load(c)[1]["best_step"] for c in list_checkpoints(output_dir)}
    for path in root.glob(BEST.format("*")):
        if path.name not in {BEST.format(step) for step in wanted}:
            shutil.rmtree(path)
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()
