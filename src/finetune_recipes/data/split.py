"""Splitting without leakage: duplicates dropped, a validation split held out per task shape (stratified by
class, keeping every label on both sides, or by quantile bins of the target), overlap warned about."""

from __future__ import annotations

import logging
import math

import numpy as np
from datasets import ClassLabel, Dataset

from ..config import MULTI, REGRESSION, DataArguments
from ..errors import UserError, first_line

logger = logging.getLogger(__name__)


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


def _key(label) -> object:
    return tuple(label) if isinstance(label, list) else label


def warn_conflicts(train: Dataset, columns: list[str]) -> None:
    """Warns when the same text occurs in train under different labels: the model is asked to learn both (the
    first copy is all a held-out split keeps of it; `finetune-recipes cv --find_label_issues` ranks such rows)."""
    labels: dict[tuple, set] = {}
    for *key, label in zip(*(train[c] for c in columns), train["labels"], strict=True):
        labels.setdefault(tuple(key), set()).add(_key(label))
    conflicting = [key for key, seen in labels.items() if len(seen) > 1]
    if conflicting:
        logger.warning(
            "%d text(s) of the train split occur with different labels (the first: %r); fix their labels or "
            "drop the copies",
            len(conflicting), " / ".join(conflicting[0])[:60],
        )  # fmt: skip


def warn_overlap(train: Dataset, validation: Dataset, columns: list[str]) -> None:
    """Warns when validation texts also occur in train: their scores measure recall of the training set, and
    where the labels differ, noise the model cannot get right."""
    train_labels: dict[tuple, set] = {}
    for *key, label in zip(*(train[c] for c in columns), train["labels"], strict=True):
        train_labels.setdefault(tuple(key), set()).add(_key(label))
    shared = conflicting = 0
    for *key, label in zip(*(validation[c] for c in columns), validation["labels"], strict=True):
        if tuple(key) in train_labels:
            shared += 1
            conflicting += train_labels[tuple(key)] != {_key(label)}
    if shared:
        logger.warning(
            "%d of %d validation texts also occur in train, %d of them with another label there; "
            "validation scores overstate what the model learned (drop them from one file)",
            shared, len(validation), conflicting,
        )  # fmt: skip


# The test split tune and compare hold out is drawn with this seed, not the run's: every seed of a comparison
# and every trial of a study is then tested on the same texts, and none of them ever trained or chose on them.
TEST_SPLIT_SEED = 0


def split_validation(
    train: Dataset,
    text_columns: list[str],
    args: DataArguments,
    seed: int,
    problem_type: str,
    split: str = "validation",
) -> tuple[Dataset, Dataset]:
    """Holds out a seeded `split` (validation, or test by --test_split_percentage) from the deduplicated train
    split, so no text is in both: stratified by class (single-label), keeping every label on both sides
    (multi-label), or stratified by quantile bins of the target (regression)."""
    pool = drop_duplicate_texts(train, text_columns)
    percentage = getattr(args, f"{split}_split_percentage")
    if problem_type == MULTI:
        return multi_label_split(pool, percentage / 100, seed, split)
    column = "labels"
    if problem_type == REGRESSION:
        pool, column = with_quantile_bins(pool, percentage / 100), "_target_bin"
    if problem_type != REGRESSION:
        check_stratifiable(pool, percentage, split)
    try:
        if column == "_target_bin" and pool.features[column].num_classes < 2:
            split = pool.train_test_split(test_size=percentage / 100, seed=seed)
        else:
            split = pool.train_test_split(test_size=percentage / 100, stratify_by_column=column, seed=seed)
    except ValueError as error:  # a class with one example, fewer held-out examples than classes, 0 or 100%
        reason = first_line(error)
        raise UserError(
            f"cannot hold out {percentage}% of {len(pool)} unique training examples stratified by label ({reason}); "
            f"pass --{split}_file or another --{split}_split_percentage"
        ) from None
    train_part, validation = split["train"], split["test"]
    if column == "_target_bin":
        train_part, validation = train_part.remove_columns(column), validation.remove_columns(column)
    return train_part, validation


def check_stratifiable(pool: Dataset, percentage: float, split: str) -> None:
    """A stratified hold-out needs two unique examples of every class and one held-out example per class: said
    with the class and the flag that fixes it, not in scikit-learn's words."""
    names = pool.features["labels"].names
    counts = np.bincount(np.asarray(pool["labels"], dtype=np.int64), minlength=len(names))
    rare = [i for i in np.argsort(counts, kind="stable") if 0 < counts[i] < 2]
    if rare:
        raise UserError(
            f"class '{names[rare[0]]}' has one unique training example, and holding out a stratified {split} split "
            f"needs two of each class: add examples of '{names[rare[0]]}', or pass --{split}_file"
        )
    # datasets holds out ceil(n · share), as scikit-learn's train_test_split does
    held_out, classes = math.ceil(percentage / 100 * len(pool)), int((counts > 0).sum())
    if 0 < held_out < classes:
        least = math.ceil(100 * classes / len(pool))
        raise UserError(
            f"--{split}_split_percentage {percentage:g} holds out {held_out} of {len(pool)} unique examples, fewer "
            f"than the {classes} classes; pass --{split}_split_percentage {least} or more, or --{split}_file"
        )


def with_quantile_bins(pool: Dataset, fraction: float, most: int = 10) -> Dataset:
    """A `_target_bin` column: the target's rank cut into equal-sized bins, as many as the held-out part
    (and the rest) can take one example of each."""
    n = len(pool)
    held_out = round(n * fraction)
    bins = max(1, min(most, held_out, n - held_out, n // 2))
    ranks = np.argsort(np.argsort(np.asarray(pool["labels"]), kind="stable"), kind="stable")
    binned = (ranks * bins // max(n, 1)).tolist()
    return pool.add_column("_target_bin", binned).cast_column("_target_bin", ClassLabel(num_classes=bins))


def multi_label_split(pool: Dataset, fraction: float, seed: int, split: str = "validation") -> tuple[Dataset, Dataset]:
    """A seeded split that puts one example of every label with two or more examples into validation first
    (rarest label first), then fills validation in seeded random order; no example leaves train if that
    would take a label's last training example. Simpler than iterative stratification, and enough to score
    every label on both sides; label frequencies are otherwise left to chance."""
    rows = np.asarray(pool["labels"]) > 0.5
    n = len(rows)
    wanted = round(n * fraction)
    if not 0 < wanted < n:
        raise UserError(
            f"cannot hold out {fraction:.0%} of {n} unique training examples; "
            f"pass --{split}_file or another --{split}_split_percentage"
        )
    order = np.random.default_rng(seed).permutation(n)
    left_in_train = rows.sum(0)
    chosen: list[int] = []
    taken = np.zeros(n, dtype=bool)

    def take(i: int) -> bool:
        if taken[i] or np.any(left_in_train[rows[i]] < 2):
            return False
        taken[i] = True
        left_in_train[rows[i]] -= 1
        chosen.append(int(i))
        return True

    for label in np.argsort(rows.sum(0), kind="stable"):
        if not rows[chosen, label].any():
            next((True for i in order if rows[i, label] and take(i)), None)
    for i in order:
        if len(chosen) >= wanted:
            break
        take(i)
    if len(chosen) > wanted:
        logger.info("%s holds %d examples, not %d, so that every label occurs in it", split, len(chosen), wanted)
    absent = int(((rows[chosen].sum(0) == 0) & (rows.sum(0) > 0)).sum())
    if absent:
        logger.warning("%d label(s) have a single training example and no validation example", absent)
    kept = sorted(set(range(n)) - set(chosen))
    return pool.select(kept), pool.select(sorted(chosen))
