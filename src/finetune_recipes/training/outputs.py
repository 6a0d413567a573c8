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
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from ..atomic import atomic_write, remove
from ..config import TrainingArguments, UserError
from ..freezing import count_parameters
from ..modeling import load_adapter_classifier
from ..reporting import render

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
    "adapter_*", "feature_head.*", "results.json", "recipe_config.yaml", "param_groups.md", "thresholds.json",
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
    args, out = run.training_args, Path(run.training_args.output_dir)

    def claim() -> None:
        check_output_dir(args, run_inputs(run))
        out.mkdir(parents=True, exist_ok=True)
        # Released when the Run is dropped (its main returned or failed; a process's end releases it too), so that a
        # run called from Python (a notebook, a test) does not keep the directory from the next run in that process.
        run.lock = weakref.finalize(run, os.close, lock_output_dir(out))
        check_free_space(run, out)
        if args.overwrite_output_dir and not args.resume_from_checkpoint:
            for name in removable(out):
                shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
        run.kept = entries(out) - (owned_entries(out) or set()) - {MANIFEST, LOCK}
        # Claimed before they exist, so a run that dies after writing them still owns them.
        record_outputs(run, *(entries(out) - run.kept), "checkpoints", "finetune_recipes")

    on_main(run.accelerator, claim, f"cannot write to output_dir {out} ({{reason}}); pass a writable --output_dir")


def check_free_space(run: Run, out: Path) -> None:
    """Refuses a disk without room for the model; warns when checkpoints (weights and AdamW's moments) may not."""
    model_mb = sum(p.numel() * p.element_size() for p in run.model.parameters()) / 2**20
    free_mb = shutil.disk_usage(out).free / 2**20
    if free_mb < model_mb:
        raise UserError(
            f"output_dir {out} has {free_mb:,.0f} MB free and the model alone needs {model_mb:,.0f} MB; "
            "free space or pass another --output_dir"
        )
    kept = run.training_args.save_total_limit or 1
    if run.training_args.checkpointing_steps and free_mb < model_mb * (1 + 3 * kept):
        logger.warning("%s has %.0f MB free; %d checkpoints may need %.0f MB", out, free_mb, kept, 3 * kept * model_mb)


def record_outputs(run: Run, *written: str) -> None:
    """Adds `written` (entries this run wrote or is about to write) to the manifest.

    Only names the run itself reports are added, so a file someone drops into output_dir while the run
    writes there never becomes the run's, and a later overwrite leaves it alone.
    """
    write_manifest(Path(run.training_args.output_dir), written, run.kept)


def write_manifest(out: Path, written, kept: set[str]) -> None:
    """The manifest: what it listed and is still there, plus `written`, never a kept (user's) entry."""
    ours = sorted((((owned_entries(out) or set()) & entries(out)) | {MANIFEST, *written}) - kept - {LOCK})
    atomic_write(out / MANIFEST, json.dumps({"written_by": "finetune-recipes", "entries": ours}, indent=1) + "\n")


def claim_tool_dir(
    directory: Path,
    tool: str,
    flag: str,
    owned: Callable[[str], bool],
    leftover: Callable[[str], bool],
    earlier: str = "",
) -> int:
    """A directory that `tool` (tune, compare) fills with many runs: refused when it is a file or holds an entry
    that is not `owned` (what the tool writes), and, when `earlier` (the message) is given, when it holds
    anything; then locked, and cleared of a killed session's `leftover` entries. Returns the lock."""
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{flag} {directory} is a file; pass --{flag} a directory")
    present = sorted(entries(directory) - {MANIFEST, LOCK})
    leftovers = [n for n in present if leftover(n)]
    foreign = [n for n in present if not owned(n) and n not in leftovers]
    if foreign:
        raise UserError(f"{flag} {directory} holds '{foreign[0]}', which {tool} did not write; pass another --{flag}")
    if present and earlier:
        raise UserError(earlier)
    (directory / "logs").mkdir(parents=True, exist_ok=True)
    lock = lock_output_dir(directory)
    for name in leftovers:
        remove(directory / name)
    return lock


def lock_output_dir(out: Path) -> int:
    """An exclusive lock on output_dir until its file descriptor is closed: by the run, or by the process's end.

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


def save_outputs(run: Run, model, results: dict[str, Any], extra_files: dict[str, str | bytes] | None = None) -> dict:
    """Model and tokenizer (safetensors) so `pipeline()` loads them, results.json, and the resolved config.

    All of it is written into a staging directory first and moved into output_dir once whole, so a full disk
    or a permission error leaves no config.json without its weights. Returns the results with the parameter
    counts and peak memory added.
    """
    accelerator, out = run.accelerator, Path(run.training_args.output_dir)
    state_dict = gathered_state(accelerator, model, run.model)  # every process takes part
    unwrapped = accelerator.unwrap_model(model)
    trainable, total = count_parameters(unwrapped)
    memory = round(peak_memory_mb(accelerator.device), 1)
    results = {**results, "trainable_params": trainable, "total_params": total, "peak_memory_mb": memory}
    files = {
        "recipe_config.yaml": yaml.safe_dump(run.resolved_config, sort_keys=False),
        "results.json": json.dumps(results, indent=2) + "\n",
        **(extra_files or {}),
    }

    def write(staging: Path) -> None:
        unwrapped.save_pretrained(staging, save_function=accelerator.save, state_dict=state_dict)
        run.tokenizer.save_pretrained(staging)
        if hasattr(unwrapped, "get_base_model"):  # a peft adapter: keep the label names beside it
            unwrapped.get_base_model().config.save_pretrained(staging)
        for name, content in files.items():
            atomic_write(staging / name, content)
        predictions = {k: v for k, v in files.items() if k.startswith("predictions_")}
        names = {p.name for p in staging.iterdir()}
        rendered = render(results, run.resolved_config, run.task.label_names, names, out, predictions)
        if "README.md" in run.kept:  # the user's own README stays; the card waits for `report` once it is moved
            logger.warning(
                "%s/README.md is yours: no model card written (move it, then `finetune-recipes report`)", out
            )
            rendered.pop("README.md")
        for name, content in rendered.items():
            atomic_write(staging / name, content)

    failure = f"cannot save the outputs to {out} ({{reason}}); none was written: free space or fix permissions"
    on_main(accelerator, lambda: publish(run, write), failure + ", then run again")
    primary = run.task.primary_metric
    summary = {k: results[k] for k in (f"eval_{primary}", f"test_{primary}", f"test_{primary}_tuned") if k in results}
    logger.info("Saved to %s: %s", out, ", ".join(f"{k} {v:.4f}" for k, v in summary.items()))
    return results


def gathered_state(accelerator: Accelerator, model, trained) -> dict[str, Any]:
    """`model`'s state dict, whole even when an engine shards what trained.

    `model` is the prepared `trained` itself, or a model built around its modules (feature extraction's
    encoder + head; the pooler's whole classifier around what trained on cached states): then the trained
    parameters, which `model` shares by identity, come gathered from the engine (ZeRO-3 and FSDP2 leave
    only shards in the modules), and the frozen rest from `model` itself.
    """
    if model is trained:
        return accelerator.get_state_dict(model)
    gathered = accelerator.get_state_dict(trained)
    names = {id(p): n for n, p in accelerator.unwrap_model(trained).named_parameters()}
    state = model.state_dict()
    for name, param in model.named_parameters():
        if id(param) in names and gathered is not None and names[id(param)] in gathered:
            state[name] = gathered[names[id(param)]]
    return state


def publish(run: Run, write: Callable[[Path], None]) -> None:
    """`write`s into a staging directory inside output_dir, then moves each file into place."""
    out = Path(run.training_args.output_dir)
    staging = out / ".partial_outputs"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        write(staging)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    clash = sorted({p.name for p in staging.iterdir()} & run.kept)
    if clash:  # never replace a user's file, and never lose the trained outputs either
        raise UserError(
            f"{out / clash[0]} is not a run's output and the save would replace it; the outputs are in "
            f"{staging}: move {clash[0]} away, then move them into {out}"
        )
    published = [path.name for path in staging.iterdir()]
    record_outputs(run, *published)  # first: a run that dies while moving them still owns them
    for name in published:
        if (out / name).is_dir():  # merged/ of an earlier save
            shutil.rmtree(out / name)
        os.replace(staging / name, out / name)  # a rename: needs no space, cannot leave half a file
    staging.rmdir()


def on_main(accelerator: Accelerator, work: Callable[[], None], failure: str) -> None:
    """Runs `work` on the main process; its UserError, or an OSError (disk full, read-only, no permission)
    as `failure` with {reason} filled in, stops every process with that one line."""
    problem = None
    if accelerator.is_main_process:
        try:
            work()
        except UserError as error:
            problem = str(error)
        except OSError as error:
            problem = failure.format(reason=error.strerror or error.__class__.__name__)
    [problem] = broadcast_object_list([problem])  # every process stops, not only the one that found it
    if problem:
        raise UserError(problem)


def save_merged(run: Run, name: str = "merged") -> None:
    """Folds a peft adapter into its base weights and saves the plain model `pipeline()` loads in output_dir/name.

    Call it after `run.finish`. The adapter it saved is read back on the CPU and merged there, so this works
    whatever engine trained it: under FSDP2 or ZeRO-3 the live model's parameters are shards.
    """
    if not run.accelerator.is_main_process:
        return
    merged = load_adapter_classifier(run.training_args.output_dir).merge_and_unload()

    def write(staging: Path) -> None:
        merged.save_pretrained(staging / name)
        run.tokenizer.save_pretrained(staging / name)

    try:
        publish(run, write)
    except OSError as error:
        where = Path(run.training_args.output_dir) / name
        reason = error.strerror or error.__class__.__name__
        raise UserError(f"cannot save the merged model to {where} ({reason}); the adapter is saved") from None
    logger.info("Saved the merged model to %s", Path(run.training_args.output_dir) / name)
