"""Batching: dynamic padding, and training orders that depend only on (seed, epoch), so every process
agrees on them and a resumed run repeats them: shuffled, length-grouped, or class-weighted."""

from __future__ import annotations

from collections import Counter

import torch
from datasets import Dataset
from torch.utils.data import DataLoader, WeightedRandomSampler
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase
from transformers.trainer_pt_utils import LengthGroupedSampler

from ..config import TrainingArguments
from ..packing import PackedCollator
from .files import labelled


class EpochSeeded:
    """A sampler whose order depends only on (seed, epoch): reseeded on every pass, so iterating twice in one
    epoch (a resume skipping batches) repeats the order, and processes that share a seed agree on it."""

    seed: int
    epoch: int = 0
    generator: torch.Generator

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator.manual_seed(self.seed + self.epoch)
        return super().__iter__()


class EpochLengthGroupedSampler(EpochSeeded, LengthGroupedSampler):
    """Length-grouped order (transformers' megabatches), seeded by epoch."""

    def __init__(self, batch_size: int, dataset: Dataset, seed: int):
        super().__init__(batch_size, lengths=[len(x) for x in dataset["input_ids"]], generator=torch.Generator())
        self.seed = seed


class EpochWeightedSampler(EpochSeeded, WeightedRandomSampler):
    """Draws (with replacement) each example with weight 1 / (examples of its class), so each class comes up
    about equally often; an epoch draws as many examples as the split holds."""

    def __init__(self, labels: list, seed: int):
        keys = [_class_key(label) for label in labels]
        counts = Counter(k for key in keys for k in key)
        # A multi-label example weighs as its rarest label; one without labels as the other unlabelled ones.
        weights = [max(1 / counts[k] for k in key) for key in keys]
        super().__init__(weights, num_samples=len(weights), replacement=True, generator=torch.Generator())
        self.seed = seed


def _class_key(label) -> tuple:
    if isinstance(label, (list, tuple)) or getattr(label, "ndim", 0) == 1:  # multi-hot
        return tuple(i for i, v in enumerate(label) if v > 0.5) or ("none",)
    return (int(label),)


def train_sampler(ds: Dataset, sampler: str, group_by_length: bool, batch_size: int, seed: int):
    """The training split's sampler, or None for a plain seeded shuffle."""
    if sampler == "weighted":
        return EpochWeightedSampler(ds["labels"], seed)
    if group_by_length:
        return EpochLengthGroupedSampler(batch_size, ds, seed)
    return None


def build_dataloader(
    ds: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    *,
    shuffle: bool = False,
    sampler=None,
    seed: int = 0,
    pad_to_multiple_of: int | None = None,
    pack_to: int | None = None,
) -> DataLoader:
    """Dynamic padding to the longest text of each batch (rounded up to a multiple under mixed precision); or,
    with `pack_to`, the texts packed into rows of that many tokens (packing.PackedCollator)."""
    if pack_to:
        collator = PackedCollator(tokenizer, pack_to, pad_to_multiple_of=pad_to_multiple_of)
    else:
        collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)
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
    data, tokenizer: PreTrainedTokenizerBase, data_args, args: TrainingArguments, accelerator
) -> tuple:
    """(train, validation, test) loaders: train shuffled (plain, length-grouped or class-weighted); test None
    unless its split has labels. Dynamic padding, to a multiple of 8 under mixed precision (tensor cores, AMX);
    with --pack_sequences, packed rows of max_length tokens.

    Training sees windows as examples; evaluation keeps each window's `document`, to score documents."""
    pad = {"pad_to_multiple_of": 8 if accelerator.mixed_precision in ("fp16", "bf16") else None, "seed": args.seed}
    pad["pack_to"] = data_args.max_length if data_args.pack_sequences else None
    train = data.train.remove_columns([c for c in ("document",) if c in data.train.column_names])
    batch = args.per_device_train_batch_size
    sampler = train_sampler(train, data_args.sampler, data_args.group_by_length, batch, args.seed)
    loaders = [build_dataloader(train, tokenizer, batch, shuffle=True, sampler=sampler, **pad)]
    for ds in (labelled(data.validation), labelled(data.test)):
        loaders.append(None if ds is None else build_dataloader(ds, tokenizer, args.per_device_eval_batch_size, **pad))
    return tuple(loaders)
