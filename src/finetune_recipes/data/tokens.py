"""The tokenizer, checked against the model's position limit, and the splits as unpadded token ids."""

from __future__ import annotations

import hashlib

import torch
from datasets import Dataset, DatasetDict
from transformers import PreTrainedTokenizerBase

from ..config import DataArguments, ModelArguments
from ..errors import UserError
from ..modeling import load_config, load_tokenizer, max_positions
from .windows import check_windows, tokenize_windows


def build_tokenizer(model_args: ModelArguments, data_args: DataArguments) -> PreTrainedTokenizerBase:
    """The model's fast tokenizer; `max_length` is checked against the model's position limit, and windows
    against what the tokenizer can do."""
    config = load_config(model_args.model_name_or_path)
    tokenizer = load_tokenizer(model_args.tokenizer_name or model_args.model_name_or_path)
    limit = max_positions(config, tokenizer.model_max_length)
    if not 0 < data_args.max_length <= limit:
        raise UserError(
            f"max_length {data_args.max_length} is outside 1..{limit}, the model's limit; "
            "pass a --max_length in that range"
        )
    check_windows(tokenizer, data_args)
    return tokenizer


def tokenize(raw: DatasetDict, tokenizer: PreTrainedTokenizerBase, args: DataArguments) -> DatasetDict:
    """Unpadded token ids (padding happens per batch), truncated at max_length or, for long documents, as
    overlapping windows with a `document` column; `datasets` caches file-backed results."""
    text_columns = [c for c in (args.text_column, args.text_pair_column) if c]
    if args.long_documents == "windows":
        return DatasetDict(
            {split: tokenize_windows(ds, tokenizer, text_columns, args, split) for split, ds in raw.items()}
        )

    def encode(batch):
        return tokenizer(*(batch[c] for c in text_columns), truncation=True, max_length=args.max_length)

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
            digest.update(torch.tensor(value).numpy().tobytes())
    return digest.hexdigest()[:24]
