"""The task's shape, read from the labels: single-label, multi-label or regression. Labels encoded once here,
and the one loss every recipe uses, so no recipe needs a branch per task shape."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, LargeList, List, Sequence, Value
from torch.nn import functional as F

from ..config import METRICS, MULTI, REGRESSION, SINGLE, DataArguments
from ..errors import UserError, listing
from .files import check_no_missing, check_type, split_name
from .weights import class_weights

logger = logging.getLogger(__name__)

PROBLEM_TYPES = {"single_label": SINGLE, "multi_label": MULTI, "regression": REGRESSION}


@dataclass
class Task:
    """What the labels are and how a model is scored against them.

    `problem_type` is the name transformers uses in a model config (so `pipeline()` applies softmax,
    sigmoid or nothing); `class_weights` are cross-entropy weights per class, or BCE `pos_weight` per label
    for multi-label; regression targets are trained as (y - target_mean) / target_std.
    """

    problem_type: str
    label_names: list[str]
    class_weights: list[float] | None = None
    target_mean: float = 0.0
    target_std: float = 1.0
    held_out_test: float | None = None  # the percentage of train held out as test, when the data had no test split
    metric_names: tuple[str, ...] = ()  # --metric_name: `evaluate` metrics, loaded by metrics.load_metric
    extra_metrics: tuple[str, ...] = ()  # what they report (their result keys), beside the built-in ones
    _weights: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_labels(self) -> int:
        return 1 if self.problem_type == REGRESSION else len(self.label_names)

    @property
    def primary_metric(self) -> str:
        return METRICS[self.problem_type][0]

    @property
    def metrics(self) -> tuple[str, ...]:
        """Every metric an evaluation reports: the built-in ones of the problem type, then --metric_name's."""
        return (*METRICS[self.problem_type], *self.extra_metrics)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy (single-label), BCE per label (multi-label) or MSE (regression), with the class
        weights when there are any; computed in float32 whatever the autocast precision. `reduction` as torch's
        ("none": one value per text, or per text and label)."""
        logits = logits.float()
        weights = self._weight_tensor(logits.device)
        if self.problem_type == SINGLE:
            return F.cross_entropy(logits, labels, weight=weights, reduction=reduction)
        if self.problem_type == MULTI:
            return F.binary_cross_entropy_with_logits(logits, labels.float(), pos_weight=weights, reduction=reduction)
        return F.mse_loss(logits.squeeze(-1), labels.float(), reduction=reduction)

    def _weight_tensor(self, device: torch.device) -> torch.Tensor | None:
        if self.class_weights is None:
            return None
        if device not in self._weights:  # made once per device, not once per step
            self._weights[device] = torch.tensor(self.class_weights, dtype=torch.float32, device=device)
        return self._weights[device]

    def scores(self, logits) -> np.ndarray:
        """What a user reads from logits: class probabilities, per-label probabilities, or values in y's units."""
        logits = torch.as_tensor(logits).float()
        if self.problem_type == SINGLE:
            return logits.softmax(-1).numpy()
        if self.problem_type == MULTI:
            return logits.sigmoid().numpy()
        return (logits.squeeze(-1) * self.target_std + self.target_mean).numpy()

    def references(self, labels) -> np.ndarray:
        """Encoded labels back as the metrics take them (regression targets in y's units)."""
        labels = np.asarray(labels)
        if self.problem_type == REGRESSION:
            return labels.astype(np.float64) * self.target_std + self.target_mean
        return labels

    def summary(self) -> dict:
        """For results.json and the logs: the problem type, and the weights or scale the loss used."""
        out: dict = {"problem_type": self.problem_type, "num_labels": self.num_labels, "metrics": list(self.metrics)}
        if self.class_weights is not None:
            kind = "pos_weight" if self.problem_type == MULTI else "class_weights"
            out[kind] = {n: round(w, 4) for n, w in zip(self.label_names, self.class_weights, strict=True)}
        if self.problem_type == REGRESSION:
            out["target_mean"], out["target_std"] = self.target_mean, self.target_std
        if self.held_out_test:
            out["held_out_test"] = self.held_out_test
        return out


def is_list(feature) -> bool:
    return isinstance(feature, (List, LargeList, Sequence, list))


def problem_type_of(train: Dataset, args: DataArguments) -> str:
    """--problem_type when given (and consistent with the labels), else what the label column holds."""
    feature = train.features[args.label_sources[0]]
    multi_source = (
        "--label_columns" if args.label_columns else
        "--label_delimiter" if args.label_delimiter else
        f"column '{args.label_column}' (it holds lists)" if is_list(feature) else None
    )  # fmt: skip
    asked = PROBLEM_TYPES.get(args.problem_type) if args.problem_type else None
    if multi_source:
        if asked not in (None, MULTI):
            raise UserError(f"{multi_source} makes a multi-label task; drop --problem_type {args.problem_type}")
        return MULTI
    if asked == MULTI:
        raise UserError(
            f"problem_type multi_label needs several labels per text: a label column of lists, "
            f"--label_delimiter for '{args.label_column}', or --label_columns"
        )
    if asked:
        return asked
    # A CSV's labels are the strings written (labels 01 and 1 stay two classes): their numbers are read here, as
    # pandas read them before; JSON and Parquet say themselves which values are numbers.
    cells = train[args.label_column]
    labels = [v for v in cells if v is not None]
    numeric = isinstance(feature, Value) and feature.dtype.startswith("float")
    if from_csv(args) and labels and not numeric:
        readable = [_reads_as_float(v) for v in labels]
        decimals = [v for v, ok in zip(labels, readable, strict=True) if ok and not float(v).is_integer()]
        if decimals and not all(readable):  # a regression's column with a cell that is no number ('NA', 'high')
            i = next(i for i, v in enumerate(cells) if v is not None and not _reads_as_float(v))
            raise UserError(
                f"column '{args.label_column}' holds numbers such as {decimals[0]} and {cells[i]!r} (example {i} "
                "of the train split); fill in or drop that row, or pass --problem_type single_label for classes"
            )
        numeric = all(readable)
    if numeric and labels:
        values = np.asarray(labels, dtype=np.float64)
        if np.any(values != np.round(values)):
            logger.info("Labels hold non-integer numbers: regression (pass --problem_type single_label for classes)")
            return REGRESSION
    return SINGLE


def encode_task(raw: DatasetDict, args: DataArguments) -> tuple[DatasetDict, Task]:
    """Every labelled split with a `labels` column the models take, and the Task that decodes it."""
    problem_type = problem_type_of(raw["train"], args)
    if problem_type == MULTI:
        raw, task = encode_multi_label(raw, args)
    elif problem_type == REGRESSION:
        raw, task = encode_regression(raw, args)
    else:
        raw, task = encode_single_label(raw, args)
    if args.sampler == "weighted" and problem_type == REGRESSION:
        raise UserError("sampler weighted draws classes equally often, and regression has none; drop --sampler")
    return raw, task


def _labelled(raw: DatasetDict, args: DataArguments):
    """(split, dataset) of each split that has its labels (a test file may not)."""
    return [(split, ds) for split, ds in raw.items() if args.label_sources[0] in ds.column_names]


def _replace_labels(ds: Dataset, args: DataArguments, labels: list, feature) -> Dataset:
    # A column already named `labels` (the data's, not the one asked for) would clash with the encoded one.
    ds = ds.remove_columns([c for c in {*args.label_sources, "labels"} if c in ds.column_names])
    return ds.add_column("labels", labels).cast_column("labels", feature)


def encode_single_label(raw: DatasetDict, args: DataArguments) -> tuple[DatasetDict, Task]:
    """Maps labels (strings or integers) to ids 0..n-1 in sorted order of the training labels."""
    column = args.label_column
    for split, ds in _labelled(raw, args):
        check_type(ds.features[column], column, split_name(args, split), text=False)
        check_no_missing(ds[column], column, split)
    feature = raw["train"].features[column]
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
        values = list(range(len(names)))
    else:
        values = sorted(set(raw["train"][column]), key=label_order if from_csv(args) else None)
        names = [str(v) for v in values]
    if len(raw["train"]) >= 20 and len(names) > len(raw["train"]) / 2:
        logger.warning(
            "the label column '%s' has %d different values in %d training examples; if it is not the label, pass "
            "--label_column; if it is a score, --problem_type regression",
            column, len(names), len(raw["train"]),
        )  # fmt: skip
    if len(names) < 2:
        raise UserError(
            f"the train split has one label ('{names[0]}'); classification needs at least two classes: "
            "add examples of another class"
        )
    to_id = {v: i for i, v in enumerate(values)}
    encoded = dict(raw)
    for split, ds in _labelled(raw, args):
        _refuse_unseen({str(v) for v in ds[column]}, [str(v) for v in values], split, names)
        encoded[split] = _replace_labels(ds, args, [to_id[v] for v in ds[column]], ClassLabel(names=names))
    return DatasetDict(encoded), Task(SINGLE, names)


def _refuse_unseen(seen: set[str], known: list[str], split: str, names: list[str] | None = None) -> None:
    names = known if names is None else names
    unseen = sorted(seen - set(known))
    if unseen:
        numeric = all(_is_number(label) for label in [*seen, *known])
        hint = "; if the labels are quantities, pass --problem_type regression" if numeric else ""
        raise UserError(
            f"label '{unseen[0]}' of the {split} split never occurs in train (labels: {listing(names)}); "
            f"add training examples for it or drop it{hint}"
        )


def from_csv(args: DataArguments) -> bool:
    return (args.train_file or "").lower().endswith(".csv")


def label_order(label) -> tuple:
    """A CSV's labels in order: numbers by value, as pandas' numbers sorted before they were read as written ('2'
    before '10', '01' beside '1'), then the rest."""
    return (0, float(label), str(label)) if _is_number(label) else (1, 0.0, str(label))


def _reads_as_float(label) -> bool:
    try:
        float(label)
    except (TypeError, ValueError):
        return False
    return True


def _is_number(label) -> bool:
    """A finite number, or a string that reads as one ('NaN' and 'inf' are names here, not numbers)."""
    try:
        return math.isfinite(float(label))
    except (TypeError, ValueError, OverflowError):
        return False


def encode_multi_label(raw: DatasetDict, args: DataArguments) -> tuple[DatasetDict, Task]:
    """Multi-hot float vectors over the train split's labels (sorted), from lists, delimited strings or 0/1
    columns."""
    per_split = {split: _label_sets(ds, split, args) for split, ds in _labelled(raw, args)}
    names = sorted(args.label_sources if args.label_columns else {label for row in per_split["train"] for label in row})
    if len(names) < 2:
        raise UserError(
            f"the train split has {len(names)} label(s) ({listing(names)}); multi-label needs at least two: "
            "check --label_column/--label_delimiter"
        )
    never = [n for n in names if not any(n in row for row in per_split["train"])]
    if never:  # only 0/1 columns can name a label train never has: the model would learn "never"
        raise UserError(
            f"label column '{never[0]}' has no positive example in the train split, so no model can learn it; "
            "drop it from --label_columns, or add examples"
        )
    index = {n: i for i, n in enumerate(names)}
    encoded = dict(raw)
    for split, rows in per_split.items():
        _refuse_unseen({label for row in rows for label in row}, names, split)
        vectors = []
        for row in rows:
            vector = [0.0] * len(names)
            for label in row:
                vector[index[label]] = 1.0
            vectors.append(vector)
        encoded[split] = _replace_labels(raw[split], args, vectors, List(Value("float32")))
    return DatasetDict(encoded), Task(MULTI, names)


def _label_sets(ds: Dataset, split: str, args: DataArguments) -> list[set[str]]:
    """Each example's labels, as strings, from whichever form the data holds them in."""
    where = split_name(args, split)
    if args.label_columns:
        rows = _from_indicator_columns(ds, args.label_sources, where)
    else:
        column, feature = args.label_column, ds.features[args.label_column]
        if is_list(feature):
            inner = getattr(feature, "feature", None)
            named = isinstance(inner, ClassLabel)  # class ids with names, as Hub sets like go_emotions store them
            if not (
                named
                or isinstance(inner, Value)
                and (inner.dtype in ("string", "large_string") or "int" in inner.dtype)
            ):
                raise UserError(
                    f"column '{column}' of {where} holds lists of {getattr(inner, 'dtype', type(inner).__name__)}, "
                    "not lists of labels; give each text a list of label names"
                )
            check_no_missing(ds[column], column, split)
            rows = [{inner.int2str(v) if named else str(v) for v in row} for row in ds[column]]
        else:
            if not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")):
                raise UserError(
                    f"label_delimiter needs column '{column}' of {where} to hold text, not {feature}; "
                    "drop --label_delimiter or point --label_column at the delimited labels"
                )
            rows = [{p.strip() for p in (v or "").split(args.label_delimiter)} - {""} for v in ds[column]]
    if not args.allow_empty_labels:
        empty = next((i for i, row in enumerate(rows) if not row), None)
        if empty is not None:
            raise UserError(
                f"example {empty} (counting from 0) of {where} has no label, and --allow_empty_labels is false; "
                "give it a label, drop that row, or allow texts without labels"
            )
    return rows


_ALL_ZERO_OR_ONE = object()


def _from_indicator_columns(ds: Dataset, columns: list[str], where: str) -> list[set[str]]:
    """Labels from 0/1 (or true/false) columns, one column per label."""
    matrix = []
    for column in columns:
        values = ds[column]
        bad = next((v for v in values if v is None or v not in (0, 1)), _ALL_ZERO_OR_ONE)
        if bad is not _ALL_ZERO_OR_ONE:  # `True == 1` and `1.0 == 1`: bools and whole floats pass
            raise UserError(
                f"column '{column}' of {where} holds {bad!r}, not 0 or 1; "
                "--label_columns takes one 0/1 column per label"
            )
        matrix.append(values)
    return [{c for c, v in zip(columns, row, strict=True) if v} for row in zip(*matrix, strict=True)]


def encode_regression(raw: DatasetDict, args: DataArguments) -> tuple[DatasetDict, Task]:
    """Float targets, as given; `fit_task` standardises them once the training split is final."""
    column = args.label_column
    encoded = dict(raw)
    for split, ds in _labelled(raw, args):
        encoded[split] = _replace_labels(
            ds, args, _numbers(ds, column, split_name(args, split), split, target_limit(args)), Value("float32")
        )
    return DatasetDict(encoded), Task(REGRESSION, [column])


def fit_task(raw: DatasetDict, task: Task, args: DataArguments) -> DatasetDict:
    """What the final training split decides (after validation is held out and samples are taken, so no
    validation label leaks into it): the class weights, and a regression target's mean and standard
    deviation, by which every split's targets are then standardised."""
    task.class_weights = class_weights(raw["train"]["labels"], task, args.class_weights)
    if task.problem_type == REGRESSION:
        warn_constant_validation(raw)
    if task.problem_type != REGRESSION or not args.standardize_target:
        return raw
    train = np.asarray(raw["train"]["labels"], dtype=np.float64)
    if train.std() == 0:
        raise UserError(
            f"every target in the train split is {train[0]:g}; regression needs targets that vary "
            "(or pass --standardize_target false)"
        )
    task.target_mean, task.target_std = float(train.mean()), float(train.std())
    logger.info("Regression targets: mean %.4g, std %.4g (train)", task.target_mean, task.target_std)
    scaled = {}
    for split, ds in raw.items():
        if "labels" in ds.column_names:
            values = [(v - task.target_mean) / task.target_std for v in ds["labels"]]
            ds = ds.remove_columns("labels").add_column("labels", values).cast_column("labels", Value("float32"))
        scaled[split] = ds
    return DatasetDict(scaled)


def target_limit(args: DataArguments) -> float:
    """The largest target float32 training holds: standardised, the saved output layer folds the mean and std in
    (float32's largest is 3.4e38); in its own units, the squared error must fit too."""
    return 1e38 if args.standardize_target else 1e18


def warn_constant_validation(raw: DatasetDict) -> None:
    """A constant validation target leaves Pearson, Spearman and R² undefined: said up front (they are then
    reported as undefined, and --metric_for_best_model refuses them: data.check_task_flags)."""
    value = constant_target(raw["validation"]) if "validation" in raw else None
    if value is not None:
        logger.warning(
            "every validation target is %g: Pearson, Spearman and R² are undefined there (reported as null); "
            "rank runs by mse or mae",
            value,
        )


def constant_target(ds: Dataset) -> float | None:
    """The one value of a split's `labels` when it never varies (a regression target), else None."""
    values = np.asarray(ds["labels"], dtype=np.float64)
    return float(values[0]) if len(values) and values.ndim == 1 and np.ptp(values) == 0 else None


def _numbers(ds: Dataset, column: str, where: str, split: str, limit: float = math.inf) -> list[float]:
    feature = ds.features[column]
    if not isinstance(feature, Value):
        check_type(feature, column, where, text=False)
    check_no_missing(ds[column], column, split)
    out = []
    for i, value in enumerate(ds[column]):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise UserError(
                f"label {value!r} (example {i} of {where}) is not a number; regression needs numeric labels: "
                "fix or drop that row, or pass --problem_type single_label for classes"
            ) from None
        if not math.isfinite(number):
            raise UserError(f"label {value!r} (example {i} of {where}) is not finite; fix or drop that row")
        if abs(number) > limit:
            raise UserError(
                f"target {value!r} (example {i} of {where}) is beyond what float32 training holds (±{limit:.0e} "
                "here); rescale the target column (e.g. to its logarithm)"
            )
        out.append(number)
    return out
