"""Data: read a text-classification data set, find its task shape and encode its labels, split it without
leakage, tokenize (truncated, or as windows of long documents), batch.

files: reading and column checks · tasks: problem type, labels, loss, class weights · split: validation
split per task shape · tokens / windows: token ids · loaders: samplers and dataloaders.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from datasets import Dataset, DatasetDict
from transformers import PreTrainedTokenizerBase

from ..config import REGRESSION, DataArguments, ModelArguments
from ..errors import UserError
from ..metrics import probe_metrics
from .files import BBC_NEWS, check_columns, drop_absent_test_labels, labelled, load_bbc_news, load_raw_datasets
from .loaders import EpochLengthGroupedSampler, EpochWeightedSampler, build_dataloader, build_dataloaders, train_sampler
from .split import TEST_SPLIT_SEED, drop_duplicate_texts, split_validation, warn_conflicts, warn_overlap
from .tasks import Task, constant_target, encode_task, fit_task
from .tokens import build_tokenizer, content_digest, load_tokenizer, tokenize
from .windows import aggregate_windows, check_windows, encode_windows

UNDEFINED_WHEN_CONSTANT = ("pearson", "spearman", "r2")  # regression_metrics reports these as None there


@dataclass
class ClassificationData:
    """Tokenized splits and the task that decodes their labels (its label names order the label ids)."""

    train: Dataset
    validation: Dataset
    test: Dataset | None
    task: Task
    raw: DatasetDict | None = None  # the texts before tokenizing, one row per document: for predictions files

    @property
    def label_names(self) -> list[str]:
        return self.task.label_names

    def labelled_splits(self) -> dict[str, Dataset]:
        """train, validation, and test when it has labels: the splits a run trains on and scores."""
        splits = {"train": self.train, "validation": self.validation, "test": labelled(self.test)}
        return {name: ds for name, ds in splits.items() if ds is not None}


logger = logging.getLogger(__name__)


def load_data(
    model_args: ModelArguments, data_args: DataArguments, training_args, accelerator, tokenizer=None
) -> tuple:
    """(tokenizer, ClassificationData); the main process builds first, so the others read its cache. A
    `tokenizer` given (static word vectors bring their own) replaces the model's. Checks that the task computes
    --metric_for_best_model: now, not at the first evaluation."""
    if tokenizer is None:
        tokenizer = build_tokenizer(model_args, data_args)
    else:
        check_windows(tokenizer, data_args)
    with accelerator.main_process_first():
        data = build_datasets(data_args, tokenizer, training_args.seed)
    check_task_flags(training_args, data.task, data.validation)
    return tokenizer, data


def check_task_flags(training_args, task: Task, validation: Dataset) -> None:
    """The training flags that depend on the task: metric_for_best_model must be one it computes (--metric_name's
    included) and defined on this validation split; --calibration temperature or vector needs classes (the
    default skips regression)."""
    problem_type = task.problem_type
    if training_args.calibration in ("temperature", "vector") and problem_type == REGRESSION:
        method = training_args.calibration
        raise UserError(f"calibration {method} scales class probabilities, and regression has none; drop it")
    name = training_args.metric_for_best_model
    if name and name not in task.metrics:
        kind = problem_type.replace("_classification", "").replace("_", "-")
        known = ", ".join(task.metrics)
        raise UserError(f"metric_for_best_model '{name}' is not computed for a {kind} task; pass one of {known}")
    if name in UNDEFINED_WHEN_CONSTANT and problem_type == REGRESSION and constant_target(validation) is not None:
        raise UserError(
            f"every validation target has one value, so {name} is undefined there; pass --metric_for_best_model "
            "mse or mae, or a validation split whose targets vary"
        )


def build_datasets(args: DataArguments, tokenizer: PreTrainedTokenizerBase, seed: int) -> ClassificationData:
    """Raw data → task and labels fixed from train → deduplicated validation split if missing → tokens."""
    raw, task = raw_splits(args, seed)
    tokenized = tokenize(raw, tokenizer, args)
    return ClassificationData(tokenized["train"], tokenized["validation"], tokenized.get("test"), task, raw)


def raw_splits(args: DataArguments, seed: int) -> tuple[DatasetDict, Task]:
    """The raw texts of train, validation (held out when missing) and test, with encoded labels and the task."""
    raw = load_raw_datasets(args)
    if "train" not in raw:
        raise UserError(f"the data has no train split (splits: {', '.join(raw)}); pass --train_file")
    raw = DatasetDict({k: raw[k] for k in ("train", "validation", "test") if k in raw})  # not MNLI's *_matched
    raw = drop_absent_test_labels(raw, args.label_sources)
    check_columns(raw, args)
    text_columns = [c for c in (args.text_column, args.text_pair_column) if c]
    raw, task = encode_task(raw, args)
    if args.metric_names:  # loaded and tried on the labels now, so a metric that cannot serve stops no training
        task.metric_names = args.metric_names
        labelled = raw["validation"] if "validation" in raw else raw["train"]
        task.extra_metrics = probe_metrics(args.metric_names, task.problem_type, labelled["labels"])
    warn_conflicts(raw["train"], text_columns)
    if "test" not in raw and args.test_split_percentage:
        raw["train"], raw["test"] = split_validation(
            raw["train"], text_columns, args, TEST_SPLIT_SEED, task.problem_type, split="test"
        )
        task.held_out_test = args.test_split_percentage
        logger.info(
            "The data has no test split: held out %g%% of train (%d texts, stratified, seed %d) as test",
            args.test_split_percentage, len(raw["test"]), TEST_SPLIT_SEED,
        )  # fmt: skip
    if "validation" not in raw:
        raw["train"], raw["validation"] = split_validation(raw["train"], text_columns, args, seed, task.problem_type)
    else:
        warn_overlap(raw["train"], raw["validation"], text_columns)
    # A seeded sample, not the first rows: files are often sorted by label.
    for split, limit in (("train", args.max_train_samples), ("validation", args.max_eval_samples)):
        if limit and limit < len(raw[split]):
            logger.info("A seeded sample of %d of the %d %s texts (max_%s_samples)", limit, len(raw[split]), split,
                        "train" if split == "train" else "eval")  # fmt: skip
            raw[split] = raw[split].shuffle(seed=seed).select(range(limit))
    return fit_task(raw, task, args), task


__all__ = [
    "BBC_NEWS",
    "ClassificationData",
    "EpochLengthGroupedSampler",
    "EpochWeightedSampler",
    "Task",
    "aggregate_windows",
    "build_dataloader",
    "build_dataloaders",
    "build_datasets",
    "build_tokenizer",
    "check_columns",
    "content_digest",
    "drop_absent_test_labels",
    "drop_duplicate_texts",
    "encode_task",
    "encode_windows",
    "fit_task",
    "labelled",
    "load_bbc_news",
    "load_data",
    "load_raw_datasets",
    "load_tokenizer",
    "raw_splits",
    "split_validation",
    "tokenize",
    "train_sampler",
    "warn_conflicts",
    "warn_overlap",
]
