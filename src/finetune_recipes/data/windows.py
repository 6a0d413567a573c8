"""Long documents: overlapping windows of `max_length` tokens per text (the tokenizer's overflow and stride),
and the way back, window logits aggregated to one row per document."""

from __future__ import annotations

import logging

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from ..config import DataArguments
from ..documents import aggregate_rows
from ..errors import UserError

logger = logging.getLogger(__name__)


def check_windows(tokenizer: PreTrainedTokenizerBase, args: DataArguments) -> None:
    """Windows need a fast tokenizer (overflow with a mapping back to the text) and a stride below the room
    one window has for text once the special tokens are in."""
    if args.long_documents != "windows":
        return
    if not tokenizer.is_fast:
        raise UserError(
            f"long_documents windows needs a fast tokenizer, and {type(tokenizer).__name__} is not one (it cannot "
            "map windows back to texts); pass a model with a tokenizer.json, or --long_documents truncate"
        )
    room = args.max_length - tokenizer.num_special_tokens_to_add(pair=bool(args.text_pair_column))
    if args.window_stride >= room:
        raise UserError(
            f"window_stride {args.window_stride} leaves windows no new tokens ({room} text tokens fit in max_length "
            f"{args.max_length}); pass a --window_stride below {room}"
        )


def encode_windows(tokenizer: PreTrainedTokenizerBase, texts: list[list[str]], max_length: int, stride: int) -> dict:
    """Every window of every text (the second of a text pair is kept whole in each), with
    `overflow_to_sample_mapping` naming the text each window came from."""
    return tokenizer(
        *texts,
        truncation="only_first" if len(texts) > 1 else True,
        max_length=max_length,
        stride=stride,
        return_overflowing_tokens=True,
    )


def tokenize_windows(ds: Dataset, tokenizer, text_columns: list[str], args: DataArguments, split: str) -> Dataset:
    """One row per window with its document's labels and a `document` column (the text's row in `ds`); a
    document's windows past `max_windows_per_document` are dropped, and counted."""

    def encode(batch, indices):
        encoded = encode_windows(tokenizer, [batch[c] for c in text_columns], args.max_length, args.window_stride)
        source = encoded.pop("overflow_to_sample_mapping")
        rows = {k: list(v) for k, v in encoded.items()}
        rows["document"] = [indices[i] for i in source]
        first: dict[int, int] = {}  # a text's windows come one after another: number them from its first
        rows["window"] = [w - first.setdefault(i, w) for w, i in enumerate(source)]
        if "labels" in batch:
            rows["labels"] = [batch["labels"][i] for i in source]
        return rows

    windows = ds.map(encode, batched=True, with_indices=True, remove_columns=ds.column_names)
    cap = args.max_windows_per_document
    if cap:
        kept = windows.filter(lambda w: [i < cap for i in w], input_columns="window", batched=True)
        dropped = len(windows) - len(kept)
        if dropped:
            longer = sum(1 for w in windows["window"] if w == cap)  # each longer document has one window number cap
            logger.warning(
                "%s: %d windows dropped, past the first %d of each of %d longer documents (--max_windows_per_document)",
                split, dropped, cap, longer,
            )  # fmt: skip
        windows = kept
    logger.info("%s: %d documents as %d windows", split, len(ds), len(windows))
    return windows.remove_columns("window")


def aggregate_windows(
    logits: torch.Tensor, labels: torch.Tensor, documents: torch.Tensor, how: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """One row per document, in document order: the mean or max of its windows' logits, and its labels
    (the same on every window)."""
    rows, first = aggregate_rows(logits.float().numpy(), documents.numpy(), how)  # numpy has no bf16
    return torch.from_numpy(rows).to(logits.dtype), labels[torch.from_numpy(first)]
