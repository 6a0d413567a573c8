"""A run: what a recipe carries from set-up to saving, and the set-up and tail every recipe shares."""

from __future__ import annotations

import json
import logging
import math
import sys
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from ..config import DataArguments, ModelArguments, TrainingArguments, UserError, config_to_dict
from ..data import ClassificationData, Task, build_dataloaders, load_data
from ..errors import DISTRIBUTED
from ..metrics import MULTI, REGRESSION, per_class_report, task_metrics, tune_thresholds
from ..modeling import fold_target_scale
from ..optim import build_scheduler
from ..reporting import prediction_rows, to_csv
from ..reporting.hub import check_hub, push
from .checkpoints import TrainState
from .loop import check_metric, predict_split
from .outputs import check_output_dir, on_main, owned_entries, save_outputs
from .precision import build_accelerator, pad_multiple

logger = logging.getLogger("finetune_recipes")


def update_steps_per_epoch(num_batches: int, accelerator: Accelerator, accumulation: int) -> int:
    """Optimizer steps in one epoch of a not-yet-prepared loader, once its batches are shared out."""
    return math.ceil(math.ceil(num_batches / accelerator.num_processes) / accumulation)


def total_train_steps(args: TrainingArguments, steps_per_epoch: int) -> int:
    """max_train_steps when given, else the epochs' worth of optimizer steps."""
    steps = args.max_train_steps or math.ceil(args.num_train_epochs * steps_per_epoch)
    if steps <= 0:
        raise UserError("no training steps: raise --num_train_epochs or --max_train_steps")
    return steps


@dataclass
class Schedule:
    """The lr scheduler and the optimizer steps it spans, counted once, before the loaders are sharded."""

    scheduler: torch.optim.lr_scheduler.LambdaLR
    total_steps: int
    steps_per_epoch: int

    @property
    def num_epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)


@dataclass
class Run:
    """The arguments, the accelerator, the tokenizer, the data and its loaders of one training run.

    `prepare` adds the model, optimizer and schedule; `train` moves `state`; `finish` saves.
    """

    model_args: ModelArguments
    data_args: DataArguments
    training_args: TrainingArguments
    recipe_args: tuple[Any, ...]
    accelerator: Accelerator
    tokenizer: PreTrainedTokenizerBase
    data: ClassificationData
    loaders: dict[str, DataLoader]  # train, validation, and test when it has labels
    model: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    schedule: Schedule | None = None
    state: TrainState = field(default_factory=TrainState)
    kept: set[str] = field(default_factory=set)  # entries of output_dir that are not the run's: never removed
    lock: weakref.finalize | None = None  # closes the file descriptor holding output_dir's lock, once dropped

    @property
    def task(self) -> Task:
        return self.data.task

    @property
    def resolved_config(self) -> dict[str, Any]:
        """The resolved configuration, as `--config` reads it back."""
        return config_to_dict(self.model_args, self.data_args, self.training_args, *self.recipe_args)

    def build_schedule(self, optimizer: torch.optim.Optimizer) -> Schedule:
        """`lr_scheduler_type` over max_train_steps, else the epochs' worth of optimizer steps."""
        args = self.training_args
        per_epoch = update_steps_per_epoch(
            len(self.loaders["train"]), self.accelerator, args.gradient_accumulation_steps
        )
        steps = total_train_steps(args, per_epoch)
        if args.eval_strategy == "steps" and args.eval_steps > steps:  # it would only evaluate at the end
            raise UserError(
                f"eval_steps {args.eval_steps} is more than the run's {steps} optimizer steps; pass a smaller "
                "--eval_steps, or --eval_strategy epoch"
            )
        scheduler = build_scheduler(optimizer, args.lr_scheduler_type, steps, args.warmup_ratio, args.warmup_steps)
        return Schedule(scheduler, steps, per_epoch)

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, schedule: Schedule) -> None:
        """`accelerator.prepare`: devices, DDP, mixed precision, and each process's share of the loaders."""
        names = list(self.loaders)
        wrap_blocks_not_embeddings(self.accelerator, model)
        model, optimizer, scheduler, *loaders = self.accelerator.prepare(
            model, optimizer, schedule.scheduler, *self.loaders.values()
        )
        self.model, self.optimizer, self.loaders = model, optimizer, dict(zip(names, loaders, strict=True))
        if self.accelerator.num_processes > 1:  # DDP's Reducer holds the process group: see errors.run_to_end
            DISTRIBUTED.append(model)
        self.schedule = Schedule(scheduler, schedule.total_steps, schedule.steps_per_epoch)

    def finish(self, results: dict[str, Any], model=None, extra_files: dict[str, str | bytes] | None = None) -> dict:
        """Test metrics (when the test split has labels), multi-label thresholds tuned on validation, the
        per-class report and predictions files, then the model (`model` when it differs from the one
        trained), tokenizer, results.json, recipe_config.yaml, the model card and the evaluation pictures;
        with --push_to_hub, all of it but the checkpoints uploaded. Returns the results."""
        results, predictions = score_splits(self, results)
        extra_files = {**(extra_files or {}), **predictions}
        model = model if model is not None else self.model
        if self.task.thresholds is not None:  # predict reads them back
            thresholds = dict(zip(self.task.label_names, self.task.thresholds, strict=True))
            extra_files["thresholds.json"] = json.dumps(thresholds, indent=2) + "\n"
        if self.task.problem_type == REGRESSION:  # the saved model predicts in the target's units
            fold_target_scale(self.accelerator.unwrap_model(model), self.task.target_mean, self.task.target_std)
        results = save_outputs(self, model, {**results, **self.describe()}, extra_files)
        if self.training_args.push_to_hub:
            primary = self.task.primary_metric
            value = results.get(f"test_{primary}", results.get(f"eval_{primary}"))
            message = f"finetune-recipes {results['strategy']}: {primary} {value:.4f}"
            folder = self.training_args.output_dir

            def upload() -> None:
                url = push(folder, self.training_args, message, owned_entries(Path(folder)) or set())
                logger.info("Pushed %s to %s", folder, url)

            on_main(self.accelerator, upload, "{reason}")
        self.accelerator.wait_for_everyone()  # no process may tear the group down while another still uses it
        self.accelerator.end_training()
        return results

    def describe(self) -> dict[str, Any]:
        """What the card says besides the metrics: the recipe, the training examples, the hardware."""
        accelerator = self.accelerator
        device = torch.cuda.get_device_name() if accelerator.device.type == "cuda" else accelerator.device.type
        precision = accelerator.mixed_precision if accelerator.mixed_precision != "no" else "fp32"
        return {
            "strategy": Path(sys.argv[0]).stem,
            "train_examples": len(self.data.train),
            "hardware": {"device": device, "processes": accelerator.num_processes, "precision": precision},
        }


def score_splits(run: Run, results: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The final scoring every task shape shares, and the predictions files.

    Multi-label thresholds are tuned on validation (each label's F1), and judged on test only: test metrics
    come at 0.5 and, as test_*_tuned, at the tuned thresholds. Adds the per-class report (precision, recall,
    F1, support; single-label: the confusion matrix) of validation and test, and the task's summary.
    """
    task, reports, scored = run.task, {}, {"validation": predict_split(run, "validation")}
    if task.problem_type == MULTI:
        task.thresholds = [float(t) for t in tune_thresholds(*scored["validation"])]
    cut = task.thresholds if task.thresholds is not None else 0.5
    if "test" in run.loaders:
        scores, references = scored["test"] = predict_split(run, "test")
        metrics = {**task_metrics(task.problem_type, scores, references), "samples": len(references)}
        results = {**results, **{f"test_{k}": v for k, v in metrics.items()}}
        if task.thresholds is not None:
            tuned = task_metrics(task.problem_type, scores, references, task.thresholds)
            results.update({f"test_{k}_tuned": v for k, v in tuned.items()})
    predictions = {}
    for split, (scores, references) in scored.items():
        reports[split] = per_class_report(task.problem_type, scores, references, task.label_names, cut)
        texts = run.data.raw[split][run.data_args.text_column] if run.data.raw is not None else []
        if len(texts) == len(references):  # one row per document, in the split's order
            rows = prediction_rows(task.problem_type, task.label_names, scores, references, texts, task.thresholds)
            predictions[f"predictions_{split}.csv"] = to_csv(rows)
    results = {**results, "task": task.summary(), **({"report": reports} if any(reports.values()) else {})}
    return results, predictions


def wrap_blocks_not_embeddings(accelerator, model: torch.nn.Module) -> None:
    """Under FSDP2 with transformer-based wrapping, shard the model's blocks, but not the module that holds
    its input embedding.

    accelerate (1.15) wraps every class of `model._no_split_modules` (BERT's lists BertEmbeddings) and then
    shards the input embedding once more on its own, which fails inside `fully_shard` ("Invariant
    encountered: value was None") when its parent is already sharded. Measured on an H200 with torch 2.11.
    An explicit `fsdp_transformer_layer_cls_to_wrap` in the config is left as the user wrote it.
    """
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None or plugin.fsdp_version != 2 or plugin.transformer_cls_names_to_wrap:
        return
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):  # a head over cached features, or a model without one
        return
    holders = {type(m).__name__ for m in model.modules() if any(c is embeddings for c in m.children())}
    plugin.transformer_cls_names_to_wrap = [
        n for n in getattr(model, "_no_split_modules", None) or [] if n not in holders
    ]


def start_run(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    *recipe_args: Any,
    find_unused_parameters: bool = False,
    tokenizer=None,
) -> Run:
    """The set-up every recipe shares: check output_dir, build the accelerator, load the data, batch it.

    `recipe_args` are the recipe's own dataclasses, saved with the rest of the config. Set
    `find_unused_parameters` when what trains changes mid-run: DDP must then tolerate parameters without
    gradients. A `tokenizer` replaces the model's (static word vectors bring their own).
    """
    check_output_dir(training_args)
    check_hub(training_args)  # offline or without credentials: now, not after the training
    accelerator = build_accelerator(training_args, find_unused_parameters)
    tokenizer, data = load_data(model_args, data_args, training_args.seed, accelerator, tokenizer)
    check_metric(training_args, data.task.problem_type)
    loaders = build_dataloaders(data, tokenizer, training_args, data_args, pad_multiple(accelerator))
    return Run(model_args, data_args, training_args, recipe_args, accelerator, tokenizer, data, loaders)
