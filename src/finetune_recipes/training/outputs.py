"""The output directory: when a run may write into it, and what a finished run leaves there."""

from __future__ import annotations

import copy
import json
import logging
import os
import resource
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from accelerate import Accelerator

from ..config import TrainingArguments, UserError
from ..freezing import count_parameters

if TYPE_CHECKING:
    from .run import Run

logger = logging.getLogger("finetune_recipes")


def check_output_dir(args: TrainingArguments) -> None:
    """Refuses to write into a non-empty output_dir unless told to overwrite or resume from it."""
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} is a file; pass --output_dir a directory")
    if out.is_dir() and any(out.iterdir()) and not (args.overwrite_output_dir or args.resume_from_checkpoint):
        raise UserError(f"output_dir {out} is not empty; pass --overwrite_output_dir or another --output_dir")


def clear_output_dir(accelerator: Accelerator, output_dir: str | Path) -> None:
    """Empties an output_dir being overwritten, so no file or checkpoint of an older run survives beside the new."""
    out = Path(output_dir)
    if accelerator.is_main_process and out.is_dir():
        for path in out.iterdir():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    accelerator.wait_for_everyone()


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory on a GPU, else the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_text(path: Path, text: str) -> None:
    """Written under a temporary name and renamed, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_outputs(run: Run, model, results: dict[str, Any], extra_files: dict[str, str] | None = None) -> dict:
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
        summary = {k: v for k, v in results.items() if k.startswith(("eval_accuracy", "eval_f1", "test_accuracy"))}
        logger.info("Saved to %s: %s", out, ", ".join(f"{k} {v:.4f}" for k, v in summary.items()))
    accelerator.wait_for_everyone()
    return results


def save_merged(run: Run, path: str | Path) -> None:
    """Folds a copy of a peft adapter into its base weights and saves the plain model that `pipeline()` loads.

    A copy, because merging is in place and the run still evaluates and saves the adapter itself.
    """
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        merged = copy.deepcopy(accelerator.unwrap_model(run.model)).merge_and_unload()
        merged.save_pretrained(path)
        run.tokenizer.save_pretrained(path)
        logger.info("Saved the merged model to %s", path)
    accelerator.wait_for_everyone()
