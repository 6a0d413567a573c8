"""The output directory: when a run may write into it, and what a finished run leaves there."""

from __future__ import annotations

import fcntl
import fnmatch
import json
import logging
import os
import resource
import shutil
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from accelerate.utils import broadcast_object_list

from ..config import TrainingArguments, UserError
from ..freezing import count_parameters

if TYPE_CHECKING:
    from .run import Run

logger = logging.getLogger("finetune_recipes")


MANIFEST = ".finetune_recipes.json"  # the entries of output_dir that runs wrote: all that a run may remove
LOCK = ".finetune_recipes.lock"  # held (flock) by the run writing into output_dir, for its whole lifetime
# Names a run writes at the top of output_dir. A directory without a manifest (written before manifests
# existed) may be overwritten only when it holds nothing else.
RUN_OUTPUTS = (
    "config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json",
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "*.model",
    "adapter_*", "feature_head.*", "results.json", "recipe_config.yaml", "param_groups.md",
    "lr_schedule.png", "merged", "checkpoints", "finetune_recipes", MANIFEST, LOCK,
)  # fmt: skip


def entries(out: Path) -> set[str]:
    return {p.name for p in out.iterdir()} if out.is_dir() else set()


def owned_entries(out: Path) -> set[str] | None:
    """What runs wrote in `out`, by its manifest; None when there is no manifest."""
    try:
        return set(json.loads((out / MANIFEST).read_text())["entries"]) | {MANIFEST, LOCK}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{out / MANIFEST} is damaged; remove it and the outputs of the run it described") from None


def removable(out: Path) -> set[str]:
    """Entries of `out` an overwrite removes: those its manifest names, or, without one, all of them if every
    one is a name a run writes. Raises when a directory without a manifest holds anything else."""
    owned, present = owned_entries(out), entries(out)
    if owned is None:
        foreign = sorted(n for n in present if not any(fnmatch.fnmatch(n, p) for p in RUN_OUTPUTS))
        if foreign:
            raise UserError(
                f"output_dir {out} holds '{foreign[0]}', which no run wrote (there is no {MANIFEST}), and "
                "--overwrite_output_dir only removes what a run wrote; pass another --output_dir"
            )
        owned = present
    return (owned & present) - {MANIFEST, LOCK}


def check_output_dir(args: TrainingArguments, inputs: Iterable[str] = ()) -> None:
    """Refuses an output_dir whose contents the run would replace or remove without being told to.

    A non-empty output_dir needs --overwrite_output_dir, which removes only what runs wrote there and never
    one of this run's `inputs`, or --resume_from_checkpoint with a checkpoint of that same directory.
    """
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} is a file; pass --output_dir a directory")
    if not entries(out) - {MANIFEST, LOCK}:
        return
    resume = args.resume_from_checkpoint
    if resume and not args.overwrite_output_dir:
        if resume != "latest" and not _inside(Path(resume), out / "checkpoints"):
            raise UserError(
                f"output_dir {out} holds another run's outputs, which resuming from {resume} would replace; "
                "pass an empty --output_dir, or --overwrite_output_dir"
            )
        return
    if not args.overwrite_output_dir:
        raise UserError(f"output_dir {out} is not empty; pass --overwrite_output_dir or another --output_dir")
    doomed = [out / name for name in removable(out)]
    for path in inputs:
        if any(_inside(Path(path), d) or _inside(d, Path(path)) for d in doomed):
            raise UserError(
                f"--overwrite_output_dir would remove {path}, an input of this run; move it out of {out} "
                "or pass another --output_dir"
            )


def _inside(path: Path, directory: Path) -> bool:
    path, directory = path.resolve(), directory.resolve()
    return path == directory or directory in path.parents


def claim_output_dir(run: Run) -> None:
    """Locks output_dir for this run and records what runs wrote there; on overwrite, removes only that.

    Checked again here, just before the first write, because the directory may have changed since start.
    """
    accelerator, args, out = run.accelerator, run.training_args, Path(run.training_args.output_dir)
    problem = None
    if accelerator.is_main_process:
        try:
            check_output_dir(args, run_inputs(run))
            out.mkdir(parents=True, exist_ok=True)
            run.lock = lock_output_dir(out)
            if args.overwrite_output_dir and not args.resume_from_checkpoint:
                for name in removable(out):
                    shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
            run.kept = entries(out) - (owned_entries(out) or set()) - {MANIFEST, LOCK}
            record_outputs(
                run, "checkpoints", "finetune_recipes"
            )  # written later: claimed before a crash can leave them
        except UserError as error:
            problem = str(error)
    [problem] = broadcast_object_list([problem])  # every process stops, not only the one that found it
    if problem:
        raise UserError(problem)


def record_outputs(run: Run, *to_come: str) -> None:
    """Writes the manifest: every entry of output_dir (and `to_come`) but the lock and what was not ours."""
    out = Path(run.training_args.output_dir)
    ours = sorted((entries(out) | {MANIFEST, *to_come}) - run.kept - {LOCK})
    write_text(out / MANIFEST, json.dumps({"written_by": "finetune-recipes", "entries": ours}, indent=1) + "\n")


def lock_output_dir(out: Path) -> int:
    """An exclusive lock on output_dir for this process's lifetime.

    flock is released by the kernel however the process ends (SIGKILL included), so a dead run never
    leaves a stale lock; the file names the holder for the message a second run prints.
    """
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another run"
        os.close(fd)
        raise UserError(
            f"output_dir {out} is in use by {holder}; wait for it to end or pass another --output_dir"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"the run of pid {os.getpid()} on {socket.gethostname()}".encode())
    return fd


def run_inputs(run: Run) -> list[str]:
    """Paths this run reads: data files, a local model or tokenizer, the checkpoint, a recipe's *_dir/_file."""
    model, data, training = run.model_args, run.data_args, run.training_args
    named = [data.train_file, data.validation_file, data.test_file, model.model_name_or_path, model.tokenizer_name]
    named.append(training.resume_from_checkpoint)
    for recipe_args in run.recipe_args:
        named += [v for k, v in vars(recipe_args).items() if k.endswith(("_dir", "_file"))]
    return [p for p in named if isinstance(p, str) and p != "latest" and Path(p).exists()]


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory on a GPU, else the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_text(path: Path, content: str | bytes) -> None:
    """Written under a temporary name and renamed, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(content if isinstance(content, bytes) else content.encode())
    os.replace(tmp, path)


def save_outputs(run: Run, model, results: dict[str, Any], extra_files: dict[str, str | bytes] | None = None) -> dict:
    """Model and tokenizer (safetensors) so `pipeline()` loads them, results.json, and the resolved config.

    Returns the results with the parameter counts and peak memory added.
    """
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    out = Path(run.training_args.output_dir)
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(
        out,
        is_main_process=accelerator.is_main_process,
        save_function=accelerator.save,
        state_dict=accelerator.get_state_dict(model),
    )
    trainable, total = count_parameters(unwrapped)
    results = {
        **results,
        "trainable_params": trainable,
        "total_params": total,
        "peak_memory_mb": round(peak_memory_mb(accelerator.device), 1),
    }
    if accelerator.is_main_process:
        run.tokenizer.save_pretrained(out)
        if hasattr(unwrapped, "get_base_model"):  # a peft adapter: keep the label names beside it
            unwrapped.get_base_model().config.save_pretrained(out)
        for name, text in {
            "recipe_config.yaml": yaml.safe_dump(run.resolved_config, sort_keys=False),
            "results.json": json.dumps(results, indent=2) + "\n",
            **(extra_files or {}),
        }.items():
            write_text(out / name, text)
        record_outputs(run)
        summary = {k: v for k, v in results.items() if k.startswith(("eval_accuracy", "eval_f1", "test_accuracy"))}
        logger.info("Saved to %s: %s", out, ", ".join(f"{k} {v:.4f}" for k, v in summary.items()))
    accelerator.wait_for_everyone()
    return results


def save_merged(run: Run, name: str = "merged") -> None:
    """Folds a peft adapter into its base weights and saves the plain model `pipeline()` loads in output_dir/name.

    Call it after `run.finish`: merging is in place, and the adapter has been evaluated and saved by then.
    """
    if run.accelerator.is_main_process:
        path = Path(run.training_args.output_dir) / name
        merged = run.accelerator.unwrap_model(run.model).merge_and_unload()
        merged.save_pretrained(path)
        run.tokenizer.save_pretrained(path)
        record_outputs(run)
        logger.info("Saved the merged model to %s", path)
