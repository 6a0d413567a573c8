"""The training loop every recipe shares: Accelerate, accumulation, evaluation, checkpoints, outputs."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
import yaml
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs, skip_first_batches
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .config import TrainingArguments, UserError
from .data import build_dataloader, labelled
from .freezing import count_parameters
from .metrics import classification_metrics
from .optim import build_scheduler

logger = logging.getLogger("finetune_recipes")

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT = re.compile(r"step_(\d+)$")


def bf16_supported(device: torch.device) -> bool:
    """bf16 pays off on GPUs that have it and on CPUs with AVX-512 BF16 or AMX; elsewhere it is emulated."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def resolve_mixed_precision(requested: str | None) -> str | None:
    """'auto' is bf16 where the hardware computes it natively (AMX / AVX-512 BF16 CPUs, Ampere+ GPUs), else fp32."""
    if requested != "auto":
        return requested
    device = torch.accelerator.current_accelerator() or torch.device("cpu")
    return "bf16" if bf16_supported(device) else "no"


def build_accelerator(args: TrainingArguments, find_unused_parameters: bool = False) -> Accelerator:
    """An Accelerator whose shuffling depends only on (seed, epoch), so processes agree and resumes repeat.

    `find_unused_parameters` is for strategies that change which parameters train mid-run: DDP must
    know every parameter up front and tolerate those that get no gradient in a step.
    """
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if find_unused_parameters else []
    accelerator = Accelerator(
        cpu=not torch.accelerator.is_available(),  # also makes torchrun's processes join one gloo group
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=resolve_mixed_precision(args.mixed_precision),
        log_with=args.report_to,
        project_dir=args.output_dir,
        step_scheduler_with_optimizer=False,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=handlers,
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logger.setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)
    if not accelerator.is_local_main_process:
        datasets.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    set_seed(args.seed)
    return accelerator


def check_output_dir(args: TrainingArguments) -> None:
    """Refuses to write into a non-empty output_dir unless told to overwrite or resume from it."""
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} is a file; pass --output_dir a directory")
    if out.is_dir() and any(out.iterdir()) and not (args.overwrite_output_dir or args.resume_from_checkpoint):
        raise UserError(f"output_dir {out} is not empty; pass --overwrite_output_dir or another --output_dir")


def pad_multiple(accelerator: Accelerator) -> int | None:
    """Tensor cores and AMX tiles want sequence lengths in multiples of 8 under mixed precision."""
    return 8 if accelerator.mixed_precision in ("fp16", "bf16") else None


def update_steps_per_epoch(num_batches: int, accelerator: Accelerator, accumulation: int) -> int:
    """Optimizer steps in one epoch of a not-yet-prepared loader, once its batches are shared out."""
    return math.ceil(math.ceil(num_batches / accelerator.num_processes) / accumulation)


def total_train_steps(args: TrainingArguments, steps_per_epoch: int) -> int:
    """max_train_steps when given, else the epochs' worth of optimizer steps."""
    steps = args.max_train_steps or math.ceil(args.num_train_epochs * steps_per_epoch)
    if steps <= 0:
        raise UserError("no training steps: raise --num_train_epochs or --max_train_steps")
    return steps


def build_schedule(optimizer, args: TrainingArguments, num_batches: int, accelerator: Accelerator):
    """The lr scheduler and the number of optimizer steps it spans (max_train_steps, else the epochs')."""
    steps = total_train_steps(args, update_steps_per_epoch(num_batches, accelerator, args.gradient_accumulation_steps))
    return build_scheduler(optimizer, args.lr_scheduler_type, steps, args.warmup_ratio, args.warmup_steps), steps


@dataclass
class TrainState:
    """Where a run is: saved in every checkpoint so a resumed run continues exactly here."""

    completed_steps: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_weights: dict[str, torch.Tensor] | None = None

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        vars(self).update(state)


@torch.no_grad()
def evaluate(model, dataloader: DataLoader, accelerator: Accelerator, num_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 over every example exactly once, whatever the number of processes."""
    model.eval()
    predictions, references = [], []
    for batch in dataloader:
        logits = model(**batch).logits
        preds, refs = accelerator.gather_for_metrics((logits.argmax(dim=-1), batch["labels"]))
        predictions.append(preds.cpu())
        references.append(refs.cpu())
    predictions, references = torch.cat(predictions).numpy(), torch.cat(references).numpy()
    return {**classification_metrics(predictions, references, num_labels), "samples": len(references)}


def train(
    accelerator: Accelerator,
    model,
    optimizer,
    scheduler,
    train_dataloader: DataLoader,
    eval_dataloader: DataLoader,
    args: TrainingArguments,
    max_train_steps: int,
    num_labels: int,
    *,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Trains to `max_train_steps`, evaluating every epoch; returns the run's metrics and timings.

    `on_step(completed_steps)` runs before every batch: strategies that change what trains during
    the run (progressive unfreezing) hook in there, as a function of the step so resumes agree.
    """
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    if args.overwrite_output_dir and not args.resume_from_checkpoint:
        clear_output_dir(accelerator, args.output_dir)
    if args.resume_from_checkpoint:
        path = resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
        logger.info("Resuming from %s", path)
        accelerator.load_state(str(path))
    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    every = int(args.checkpointing_steps) if (args.checkpointing_steps or "").isdigit() else None
    if args.report_to:
        accelerator.init_trackers("finetune_recipes", {k: v for k, v in vars(args).items() if v is not None})
    logger.info(
        "%d optimizer steps on %d process(es) (%s), %s precision, %d examples per step",
        max_train_steps,
        accelerator.num_processes,
        accelerator.distributed_type.value,
        accelerator.mixed_precision if accelerator.mixed_precision != "no" else "fp32",
        args.per_device_train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes,
    )
    progress = tqdm(
        total=max_train_steps,
        initial=state.completed_steps,
        desc="train",
        disable=not accelerator.is_local_main_process,
    )
    start, samples = time.perf_counter(), 0
    loss_sum = torch.zeros((), device=accelerator.device)
    loss_batches = 0
    stop = False
    for epoch in range(state.epoch, num_epochs):
        model.train()
        train_dataloader.set_epoch(epoch)
        # A resumed run continues mid-epoch, after the batches it had already trained on.
        skip = state.batches_in_epoch
        batches = skip_first_batches(train_dataloader, skip) if skip else train_dataloader
        for batch in batches:
            if state.completed_steps >= max_train_steps:  # resumed from the final checkpoint
                break
            if on_step:
                on_step(state.completed_steps)
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:  # the schedule counts optimizer steps, not micro-batches
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            state.batches_in_epoch += 1
            samples += batch["labels"].shape[0]
            loss_sum += loss.detach()  # stays on the device: no host sync per step
            loss_batches += 1
            if not accelerator.sync_gradients:
                continue
            state.completed_steps += 1
            progress.update(1)
            if state.completed_steps % args.logging_steps == 0:
                mean_loss = accelerator.reduce(loss_sum, reduction="mean").item() / loss_batches
                loss_sum.zero_()
                loss_batches = 0
                progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{scheduler.get_last_lr()[-1]:.2e}")
                accelerator.log(
                    {"train/loss": mean_loss, "train/lr": scheduler.get_last_lr()[-1]}, step=state.completed_steps
                )
            if every and state.completed_steps % every == 0:
                save_checkpoint(accelerator, args, state.completed_steps)
            if state.completed_steps >= max_train_steps:
                break
        state.epoch, state.batches_in_epoch = epoch + 1, 0
        metrics = evaluate(model, eval_dataloader, accelerator, num_labels)
        state.history.append({"epoch": epoch + 1, "step": state.completed_steps, **metrics})
        accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=state.completed_steps)
        logger.info("epoch %d: %s", epoch + 1, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "samples"))
        stop = track_best(state, metrics, model, accelerator, args)
        if args.checkpointing_steps == "epoch":
            save_checkpoint(accelerator, args, state.completed_steps)
        if stop or state.completed_steps >= max_train_steps:
            break
    progress.close()
    runtime = time.perf_counter() - start
    if state.best_weights is not None:
        accelerator.unwrap_model(model).load_state_dict(state.best_weights, strict=False)
        logger.info(
            "Restored the best weights: %s %.4f at step %d",
            args.metric_for_best_model,
            state.best_metric,
            state.best_step,
        )
    final = (
        state.history[-1] if state.best_step is None else next(h for h in state.history if h["step"] == state.best_step)
    )
    return {
        **{f"eval_{k}": v for k, v in final.items() if k not in ("epoch", "step")},
        "epochs": state.epoch,
        "steps": state.completed_steps,
        "train_runtime_s": round(runtime, 2),
        "train_samples_per_second": round(samples * accelerator.num_processes / runtime, 2),
        "history": state.history,
        **({"stopped_early": True} if stop else {}),
    }


def track_best(
    state: TrainState, metrics: dict[str, float], model, accelerator: Accelerator, args: TrainingArguments
) -> bool:
    """Keeps a copy of the best weights by `metric_for_best_model`; True when early stopping says stop."""
    if not args.metric_for_best_model:
        return False
    if args.metric_for_best_model not in metrics:
        raise UserError(f"metric_for_best_model '{args.metric_for_best_model}' is not one of {', '.join(metrics)}")
    value = metrics[args.metric_for_best_model]
    if state.best_metric is None or value > state.best_metric:
        state.best_metric, state.best_step, state.evals_without_improvement = value, state.completed_steps, 0
        weights = accelerator.get_state_dict(model)  # whole weights, also from a sharded model
        state.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in weights.items()}
        return False
    state.evals_without_improvement += 1
    patience = args.early_stopping_patience
    return patience is not None and state.evals_without_improvement >= patience


def clear_output_dir(accelerator: Accelerator, output_dir: str | Path) -> None:
    """Empties an output_dir being overwritten, so no file or checkpoint of an older run survives beside the new."""
    out = Path(output_dir)
    if accelerator.is_main_process and out.is_dir():
        for path in out.iterdir():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    accelerator.wait_for_everyone()


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (a save in progress has a temporary name until it is whole)."""
    root = Path(output_dir) / CHECKPOINT_DIR
    found = [p for p in root.glob("step_*") if CHECKPOINT.search(p.name)] if root.is_dir() else []
    return sorted(found, key=lambda p: int(CHECKPOINT.search(p.name).group(1)))


def resolve_checkpoint(output_dir: str | Path, which: str) -> Path:
    """`latest` is the newest complete checkpoint in output_dir; anything else is a path."""
    if which == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise UserError(
                f"no checkpoint in {Path(output_dir) / CHECKPOINT_DIR} to resume from; drop --resume_from_checkpoint"
            )
        return found[-1]
    if not Path(which).is_dir():
        raise UserError(f"checkpoint {which} does not exist; pass a checkpoint directory or 'latest'")
    return Path(which)


def save_checkpoint(accelerator: Accelerator, args: TrainingArguments, step: int) -> None:
    """Saves the whole training state atomically: written under a temporary name, then renamed."""
    root = Path(args.output_dir) / CHECKPOINT_DIR
    final, partial = root / f"step_{step}", root / f".partial_step_{step}"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        if args.save_total_limit:
            for old in list_checkpoints(args.output_dir)[: -args.save_total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory on a GPU, else the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def save_outputs(
    accelerator: Accelerator,
    model,
    tokenizer,
    args: TrainingArguments,
    results: dict[str, Any],
    config: dict[str, Any],
    extra_files: dict[str, str] | None = None,
) -> None:
    """Model and tokenizer (safetensors) so `pipeline()` loads them, results.json, and the resolved config."""
    accelerator.wait_for_everyone()
    out = Path(args.output_dir)
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
        tokenizer.save_pretrained(out)
        if hasattr(unwrapped, "get_base_model"):  # a peft adapter: keep the label names beside it
            unwrapped.get_base_model().config.save_pretrained(out)
        for name, text in {
            "recipe_config.yaml": yaml.safe_dump(config, sort_keys=False),
            "results.json": json.dumps(results, indent=2) + "\n",
            **(extra_files or {}),
        }.items():
            tmp = out / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, out / name)
        summary = {k: v for k, v in results.items() if k.startswith(("eval_accuracy", "eval_f1", "test_accuracy"))}
        logger.info("Saved to %s: %s", out, ", ".join(f"{k} {v:.4f}" for k, v in summary.items()))
    accelerator.wait_for_everyone()


def build_dataloaders(
    data, tokenizer, args: TrainingArguments, accelerator: Accelerator, group_by_length: bool = False
):
    """Train (shuffled, optionally length-grouped), validation and test loaders (None without labelled test data)."""
    pad = pad_multiple(accelerator)
    train = build_dataloader(
        data.train,
        tokenizer,
        args.per_device_train_batch_size,
        shuffle=True,
        group_by_length=group_by_length,
        seed=args.seed,
        pad_to_multiple_of=pad,
    )
    evals = [
        build_dataloader(ds, tokenizer, args.per_device_eval_batch_size, pad_to_multiple_of=pad) if ds else None
        for ds in (data.validation, labelled(data.test))
    ]
    return train, *evals


def test_results(
    accelerator: Accelerator, model, test_dataloader: DataLoader | None, num_labels: int
) -> dict[str, float]:
    """test_* metrics when the data has a labelled test split, else nothing."""
    if test_dataloader is None:
        return {}
    return {f"test_{k}": v for k, v in evaluate(model, test_dataloader, accelerator, num_labels).items()}


def save_merged(accelerator: Accelerator, model, tokenizer, path: Path) -> None:
    """Folds a peft adapter into its base weights and saves the plain model that `pipeline()` loads."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        merged = accelerator.unwrap_model(model).merge_and_unload()
        merged.save_pretrained(path)
        tokenizer.save_pretrained(path)
        logger.info("Saved the merged model to %s", path)
    accelerator.wait_for_everyone()
