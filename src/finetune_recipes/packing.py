"""Packed batches (`--pack_sequences`): a batch's texts laid end to end in rows of at most `max_length` tokens
instead of each padded to the longest, every text attending only to itself, its positions counted from its own
first token, and the classifier reading each text's first token. The logits are the padded path's (tested per
architecture to 1e-4 in fp32); the encoder's matrix products skip the padding.

Written here because no library packs for an encoder's classification head: transformers'
`DataCollatorWithFlattening` keeps one label per row, not per text (transformers#41652), and its position ids
start at 0 where RoBERTa's start at padding_idx + 1 (#47496). The block-diagonal mask is transformers' own
(`create_bidirectional_mask` with `packed_sequence_mask_function`), in the format of the model's attention
implementation; a model whose output differs on a probe is refused in one line.

    collator = PackedCollator(tokenizer, capacity=128)  # loaders.build_dataloaders, with --pack_sequences
    accept_packed(model)                                 # modeling.build_model, with --pack_sequences
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .errors import UserError

TOKEN_KEYS = ("input_ids", "token_type_ids", "attention_mask")
PACKED_KEY = "sequence_ids"  # per token: the index of its text in the batch, -1 for padding
PROBE_TOLERANCE = 1e-4  # fp32; a mask that leaks or positions that are off differ by far more


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Rows of text indices, each row's lengths summing to at most `capacity` (a longer text gets a row of its
    own), longest texts first: first-fit decreasing, within 22% of the fewest rows possible."""
    rows, free = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        row = next((r for r, room in enumerate(free) if room >= lengths[i]), None)
        if row is None:
            rows.append([]), free.append(capacity)
            row = len(rows) - 1
        rows[row].append(i)
        free[row] -= lengths[i]
    return rows


class PackedCollator:
    """Tokenized texts → `input_ids` (and `token_type_ids`) of shape (rows, width) with `sequence_ids` saying
    whose each token is; every other column (labels, a window's document) stays one entry per text, in order."""

    def __init__(self, tokenizer, capacity: int, pad_to_multiple_of: int | None = None):
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.capacity, self.multiple = capacity, pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        lengths = [len(f["input_ids"]) for f in features]
        rows = first_fit_decreasing(lengths, max(self.capacity, max(lengths)))
        width = max(sum(lengths[i] for i in row) for row in rows)
        if self.multiple:
            width = -(-width // self.multiple) * self.multiple
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        sequence_ids = torch.full((len(rows), width), -1, dtype=torch.long)
        types = torch.zeros((len(rows), width), dtype=torch.long) if "token_type_ids" in features[0] else None
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                end = start + lengths[i]
                ids[r, start:end] = torch.as_tensor(features[i]["input_ids"])
                sequence_ids[r, start:end] = i
                if types is not None:
                    types[r, start:end] = torch.as_tensor(features[i]["token_type_ids"])
                start = end
        batch = {k: torch.as_tensor([f[k] for f in features]) for k in features[0] if k not in TOKEN_KEYS}
        batch.update(input_ids=ids, **{PACKED_KEY: sequence_ids})
        if types is not None:
            batch["token_type_ids"] = types
        return batch


def text_starts(sequence_ids: torch.Tensor) -> torch.Tensor:
    """(rows, width) → a boolean of the same shape: True where a text (or a run of padding) begins."""
    starts = torch.ones_like(sequence_ids, dtype=torch.bool)
    starts[:, 1:] = sequence_ids[:, 1:] != sequence_ids[:, :-1]
    return starts


def positions(sequence_ids: torch.Tensor) -> torch.Tensor:
    """Each token's position within its own text (padding: within its run), from 0."""
    columns = torch.arange(sequence_ids.shape[1], device=sequence_ids.device).expand_as(sequence_ids)
    first = torch.where(text_starts(sequence_ids), columns, 0).cummax(dim=1).values
    return columns - first


def first_tokens(sequence_ids: torch.Tensor) -> torch.Tensor:
    """Flat indices (into rows × width) of each text's first token, in the texts' order in the batch."""
    flat = sequence_ids.flatten()
    index = torch.nonzero(text_starts(sequence_ids).flatten() & (flat >= 0)).squeeze(1)
    return index[flat[index].argsort()]


def hf_model_of(model: nn.Module):
    """The transformers model inside `model` (itself, or the one a PEFT wrapper holds)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def encoder_of(model: nn.Module) -> nn.Module:
    """The module whose output's first element is the token states the head reads: the blocks' parent."""
    from .layers import blocks_path

    return model.get_submodule(blocks_path(model).rpartition(".")[0])


def position_offset(model: nn.Module) -> int:
    """RoBERTa-family embeddings count positions from padding_idx + 1 (their own position ids skip padding)."""
    embeddings = next((m for m in model.modules() if hasattr(m, "position_embeddings")), None)
    padding_idx = getattr(embeddings, "padding_idx", None)
    return 0 if padding_idx is None else padding_idx + 1


def accept_packed(model: nn.Module) -> nn.Module:
    """Teaches `model` (a transformers sequence classifier, or a PEFT model of one) to take a batch from
    PackedCollator: hooks, so the recipe's `model(**batch).logits` is unchanged and has one row per text."""
    from transformers.masking_utils import create_bidirectional_mask, packed_sequence_mask_function

    hf = hf_model_of(model)
    encoder, offset = encoder_of(hf), position_offset(hf)
    dtype = next(hf.parameters()).dtype
    pending = []  # the first-token indices of the batch the encoder is running

    def unpack_inputs(module, args, kwargs):
        pending.clear()
        sequence_ids = kwargs.pop(PACKED_KEY, None)
        if sequence_ids is None:
            return None
        embeds = torch.empty((*sequence_ids.shape, 0), dtype=dtype, device=sequence_ids.device)  # shape and dtype
        kwargs["attention_mask"] = create_bidirectional_mask(
            config=hf.config,
            inputs_embeds=embeds,
            attention_mask=None,
            and_mask_function=packed_sequence_mask_function(sequence_ids),
        )
        kwargs["position_ids"] = positions(sequence_ids) + offset
        pending.append(first_tokens(sequence_ids))
        return args, kwargs

    def one_row_per_text(module, args, output):
        if not pending:
            return None
        states = output[0].flatten(0, 1)[pending.pop()].unsqueeze(1)  # (texts, 1, hidden): the head reads [:, 0]
        if isinstance(output, tuple):
            return (states, *output[1:])
        output["last_hidden_state"] = states
        return output

    model.register_forward_pre_hook(unpack_inputs, with_kwargs=True)
    encoder.register_forward_hook(one_row_per_text)
    return model


def check_packable(model: nn.Module) -> None:
    """Refuses (UserError) a model that packing cannot serve: not a transformers sequence classifier, or one
    whose packed logits differ from its padded ones on a probe. The probe is a one-block copy of the model's
    architecture with random weights, in fp32 on the CPU, so it is exact whatever the run's precision or
    sharding, and costs milliseconds."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    hf = hf_model_of(model)
    known = set(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values())
    # The class transformers made, not a subclass a wrapper swapped in (FSDP2's FSDPBertForSequenceClassification).
    cls = next((c for c in type(hf).__mro__ if c.__name__ in known), None)
    name = type(hf).__name__ if cls is None else cls.__name__
    if cls is None:
        raise UserError(
            f"--pack_sequences packs the batches of a transformers sequence classifier; this recipe's model is "
            f"{name}: drop --pack_sequences"
        )
    if getattr(hf, "score", None) is not None and not hasattr(hf, "classifier"):  # modeling.is_decoder's models
        raise UserError(
            f"--pack_sequences packs texts for an encoder's pooled first token; {name} is a decoder, which reads "
            "each text's last one: drop --pack_sequences"
        )
    config = copy.deepcopy(hf.config)
    config.num_hidden_layers = 1
    if hasattr(config, "initializer_range"):  # at the usual 0.02, a leaking mask moves random logits by only 1e-5
        config.initializer_range = 0.5  # here by 1 or more, while a right one stays within 1e-5
    try:
        with torch.random.fork_rng(devices=[]):  # seeded here; the run's own random state is left as it was
            torch.manual_seed(0)
            probe = cls(config).eval()  # the class itself: from_config would partition it under ZeRO-3
            diff = probe_difference(probe, config)
    except Exception as error:  # an attention kernel that cannot take the mask, a layout not found
        raise UserError(f"--pack_sequences cannot serve {name}: {error}; drop --pack_sequences") from None
    if diff > PROBE_TOLERANCE:
        raise UserError(
            f"--pack_sequences: {name} ({config._attn_implementation} attention) gives packed logits that differ "
            f"from padded ones by {diff:.2g}; drop --pack_sequences or pass --attn_implementation sdpa"
        )


def probe_difference(model: nn.Module, config) -> float:
    """Max |packed − padded| logit over two texts of 7 and 4 random tokens (none of them padding)."""
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    generator = torch.Generator().manual_seed(0)
    texts = [torch.randint(pad + 1, config.vocab_size, (n,), generator=generator) for n in (7, 4)]
    padded = torch.full((2, 7), pad, dtype=torch.long)
    mask = torch.zeros((2, 7), dtype=torch.long)
    for i, text in enumerate(texts):
        padded[i, : len(text)], mask[i, : len(text)] = text, 1
    accept_packed(model)
    packed = torch.cat(texts).unsqueeze(0)
    sequence_ids = torch.tensor([[0] * 7 + [1] * 4])
    with torch.no_grad():
        expected = model(input_ids=padded, attention_mask=mask).logits
        got = model(input_ids=packed, **{PACKED_KEY: sequence_ids}).logits
    return (expected - got).abs().max().item()
