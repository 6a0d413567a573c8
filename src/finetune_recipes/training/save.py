"""Saving a run: the model and tokenizer where `pipeline()` loads them, results.json, recipe_config.yaml, the
predictions files and thresholds, then the card and pictures drawn from what was saved; all of it staged and
moved into output_dir whole. And the Hub upload, and the merged copy of a LoRA adapter."""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from ..atomic import atomic_write
from ..catalog import describe as describe_recipe
from ..config import REGRESSION, DataArguments, RunArgs, TrainingArguments
from ..data import ClassificationData
from ..errors import UserError, write_failure
from ..freezing import count_parameters
from ..modeling import load_adapter_classifier, target_head
from ..ownership import OutputDir, check_output_dir, file_hash, owned_entries, write_manifest
from ..reporting import prediction_rows, render_saved, to_csv
from ..reporting.hub import check_hub, push
from .evaluate import Calibration, Evaluation

logger = logging.getLogger("finetune_recipes")
T = TypeVar("T")


def check_outputs(args: RunArgs) -> str:
    """What the end of the run needs, refused now rather than after the training: an output_dir the run may
    fill (none of the run's inputs removed by an overwrite), and with --push_to_hub a reachable Hub and
    credentials. Returns what was checked of output_dir, for claim_outputs' claim on it."""
    training_args = args.get(TrainingArguments)
    checked = check_output_dir(training_args, args.inputs())
    check_hub(training_args)
    return checked


def on_main(accelerator: Accelerator, work: Callable[[], T], failure: str) -> T | None:
    """Runs `work` on the main process and returns its result there (None on the others); its UserError, or a
    write failure (disk full, read-only, no permission: errors.write_failure) as `failure` with {reason} filled
    in, stops every process with that one line."""
    problem, result = None, None
    if accelerator.is_main_process:
        try:
            result = work()
        except UserError as error:
            problem = str(error)
        except Exception as error:
            if (reason := write_failure(error)) is None:
                raise
            problem = failure.format(reason=reason)
    [problem] = broadcast_object_list([problem])  # every process stops, not only the one that found it
    if problem:
        raise UserError(problem)
    return result


def save_run(
    accelerator: Accelerator,
    out: OutputDir | None,
    args: RunArgs,
    *,
    model: torch.nn.Module,
    tokenizer,
    data: ClassificationData,
    results: dict[str, Any],
    calibration: Calibration,
    trained: torch.nn.Module | None = None,
    files: dict[str, str | bytes] | None = None,
) -> dict[str, Any]:
    """Saves the run into output_dir (`out`: its claim, held by the main process) and returns the results with
    what the card says besides the metrics: the recipe, the examples, the hardware, the parameters, memory.

    `model` is what is saved: the prepared model itself, or a model built around what trained (`trained`: the
    feature head inside encoder + pooling + head). `calibration` (what `calibrate` returned) holds the final
    evaluations of validation and test, whose predictions files are written from the same numbers as the
    metrics, the scaling of the logits and the multi-label thresholds: what is saved depends only on these
    arguments. A regression model is saved predicting in the target's units, a classifier with its scaling (its
    output layer scaled and shifted in the saved copy: the live model is left as it trained). All of it is
    staged and moved into place once whole, so a full disk or a permission error leaves no config.json without
    its weights; the card and pictures are then drawn from the saved files.
    """
    task, training = data.task, args.get(TrainingArguments)
    state_dict = gathered_state(accelerator, model, trained if trained is not None else model)  # every process
    unwrapped = accelerator.unwrap_model(model)
    if task.problem_type == REGRESSION and state_dict:
        fold_into(state_dict, target_head(unwrapped), task.target_mean, task.target_std)
    scaling, thresholds = calibration.scaling, calibration.thresholds
    if scaling is not None and state_dict:  # logits · scale + shift: the calibrated probabilities
        fold_into(state_dict, target_head(unwrapped, task.num_labels), scaling.shift, scaling.scale)
    results = {**results, **describe(accelerator, args, len(data.train), unwrapped)}
    files = {
        "recipe_config.yaml": yaml.safe_dump(args.resolved(), sort_keys=False),
        "results.json": json.dumps(results, indent=2) + "\n",
        **prediction_files(data, args, calibration.scored, thresholds),
        **(files or {}),
    }
    if thresholds is not None:  # predict reads them back
        by_name = dict(zip(task.label_names, thresholds, strict=True))
        files["thresholds.json"] = json.dumps(by_name, indent=2) + "\n"

    def write(staging: Path) -> None:
        unwrapped.save_pretrained(staging, save_function=accelerator.save, state_dict=state_dict)
        tokenizer.save_pretrained(staging)
        if hasattr(unwrapped, "get_base_model"):  # a peft adapter: keep the label names beside it
            unwrapped.get_base_model().config.save_pretrained(staging)
        for name, content in files.items():
            atomic_write(staging / name, content)

    def save() -> None:
        publish(out, write)
        publish_report(out)

    failure = f"cannot save the outputs to {training.output_dir} ({{reason}}); none was written: free space or "
    on_main(accelerator, save, failure + "fix permissions, then run again")
    primary = task.primary_metric
    summary = {k: results[k] for k in (f"eval_{primary}", f"test_{primary}", f"test_{primary}_tuned") if k in results}
    logger.info("Saved to %s: %s", training.output_dir, ", ".join(f"{k} {v:.4f}" for k, v in summary.items()))
    return results


def publish_report(out: OutputDir) -> None:
    """The card and pictures, drawn from the saved run and moved in whole; a failure says the model is saved."""
    try:
        publish(out, lambda staging: write_report(out, staging))
    except Exception as error:
        if (reason := write_failure(error)) is None:
            raise
        raise UserError(
            f"the model and results are saved in {out.path}, the card and pictures not ({reason}); free "
            f"space, then run `finetune-recipes report {out.path}`"
        ) from None


def write_report(out: OutputDir, staging: Path) -> None:
    """The card, eval_report.md and pictures, drawn from the saved run, into `staging`; a README.md of the
    user's own stays (the card then waits for `finetune-recipes report`, once it is moved)."""
    staging.mkdir()
    rendered = {}
    for name, content in render_saved(out.path).items():
        if name in out.kept:
            logger.warning("%s/%s is yours: not replaced (move it, then `finetune-recipes report`)", out.path, name)
            continue
        atomic_write(staging / name, content)
        rendered[name] = file_hash(content)
    write_manifest(out.path, [], out.kept, rendered)  # what `report` may redraw: these, while unedited


def prediction_files(
    data: ClassificationData, args: RunArgs, scored: dict[str, Evaluation | None], thresholds: list[float] | None
) -> dict:
    """predictions_<split>.csv of every scored split: one row per document, in the split's order; multi-label
    decisions at `thresholds` (0.5 without)."""
    files = {}
    for split, evaluation in scored.items():
        if evaluation is None or data.raw is None:
            continue
        texts = data.raw[split][args.get(DataArguments).text_column]
        if len(texts) == len(evaluation.references):
            task = data.task
            rows = prediction_rows(
                task.problem_type, task.label_names, evaluation.scores, evaluation.references, texts, thresholds
            )
            files[f"predictions_{split}.csv"] = to_csv(rows)
    return files


def describe(accelerator: Accelerator, args: RunArgs, train_examples: int, model: torch.nn.Module) -> dict[str, Any]:
    """What the card says besides the metrics: the recipe, the training examples, the hardware, the size."""
    device = torch.cuda.get_device_name() if accelerator.device.type == "cuda" else accelerator.device.type
    precision = accelerator.mixed_precision if accelerator.mixed_precision != "no" else "fp32"
    trainable, total = count_parameters(model)
    return {
        "strategy": args.recipe,
        "description": describe_recipe(args.recipe_file),
        "train_examples": train_examples,
        "hardware": {"device": device, "processes": accelerator.num_processes, "precision": precision},
        "trainable_params": trainable,
        "total_params": total,
        "peak_memory_mb": round(peak_memory_mb(accelerator.device), 1),
    }


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory on a GPU, else the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fold_into(state_dict: dict[str, torch.Tensor], head: str, mean, std) -> None:
    """An affine map of the outputs folded into the saved output layer `head` (w·std, b·std + mean; each one
    number or one per output): a regression target's standardisation, so the saved model gives values in the
    target's units, or a calibration's scale and shift, so it gives calibrated probabilities. `pipeline()`,
    `predict` and the ONNX export then need no extra step. A head without a bias takes no shift (calibrate
    fits none for it)."""
    weight, bias = f"{head}.weight", f"{head}.bias"
    like = {"dtype": state_dict[weight].dtype, "device": state_dict[weight].device}
    factor, offset = torch.as_tensor(std, **like), torch.as_tensor(mean, **like)
    state_dict[weight] = state_dict[weight] * (factor.unsqueeze(-1) if factor.dim() else factor)
    if bias in state_dict:
        state_dict[bias] = state_dict[bias] * factor + offset
    elif offset.count_nonzero():
        raise ValueError(f"{head} has no bias to fold a shift into")


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


def publish(out: OutputDir, write: Callable[[Path], None]) -> None:
    """`write`s into a staging directory inside output_dir, then moves each entry into place."""
    staging = out.path / ".partial_outputs"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        write(staging)
        published = [path.name for path in staging.iterdir()]
        clash = sorted(set(published) & out.kept)
        if not clash:
            out.record(*published)  # first: a run that dies while moving them still owns them
    except BaseException:  # a full disk (whatever a library raises for it), Ctrl-C: nothing half-written stays
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if clash:  # never replace a user's file, and never lose the trained outputs either
        raise UserError(
            f"{out.path / clash[0]} is not a run's output and the save would replace it; the outputs are in "
            f"{staging}: move {clash[0]} away, then move them into {out.path}"
        )
    for name in published:
        if (out.path / name).is_dir():  # merged/ of an earlier save
            shutil.rmtree(out.path / name)
        os.replace(staging / name, out.path / name)  # a rename: needs no space, cannot leave half a file
    staging.rmdir()


def push_to_hub(accelerator: Accelerator, out: OutputDir | None, training_args, results: dict, task) -> None:
    """Uploads output_dir (the run's own entries; no checkpoints) to --hub_model_id."""
    primary = task.primary_metric
    value = results.get(f"test_{primary}", results.get(f"eval_{primary}"))
    message = f"finetune-recipes {results['strategy']}: {primary} {value:.4f}"

    def upload() -> None:
        url = push(str(out.path), training_args, message, owned_entries(out.path))
        logger.info("Pushed %s to %s", out.path, url)

    on_main(accelerator, upload, "{reason}")


def save_merged(accelerator: Accelerator, out: OutputDir | None, tokenizer, name: str = "merged") -> None:
    """Folds a peft adapter into its base weights and saves the plain model `pipeline()` loads in output_dir/name.

    Call it after `save_run`. The adapter it saved is read back on the CPU and merged there, so this works
    whatever engine trained it: under FSDP2 or ZeRO-3 the live model's parameters are shards.
    """
    if not accelerator.is_main_process:
        return
    merged = load_adapter_classifier(out.path).merge_and_unload()

    def write(staging: Path) -> None:
        merged.save_pretrained(staging / name)
        tokenizer.save_pretrained(staging / name)

    try:
        publish(out, write)
    except Exception as error:
        if (reason := write_failure(error)) is None:
            raise
        raise UserError(f"cannot save the merged model to {out.path / name} ({reason}); the adapter is saved") from None
    logger.info("Saved the merged model to %s", out.path / name)
