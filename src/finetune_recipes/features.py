"""Feature extraction: encode texts once with a frozen encoder, cache the features, classify them with a head."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from datasets import Dataset
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModel, DataCollatorWithPadding, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling, SequenceClassifierOutput

from .atomic import atomic_path
from .config import DataArguments, TrainingArguments
from .data import EpochWeightedSampler, aggregate_windows
from .errors import UserError
from .modeling import is_decoder, last_real_token
from .strategy_args import CacheArguments, EncodeArguments  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

POOLINGS = ("cls", "mean", "pooler", "last")
HEAD_FILE, HEAD_CONFIG = "feature_head.safetensors", "feature_head.json"


def pool(outputs, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """One vector per text: the first token, the mean over real tokens, the last real token (read from the
    attention mask: right or left padding), or the model's pooler output."""
    if pooling == "pooler":
        return outputs.pooler_output
    hidden = outputs.last_hidden_state
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":
        last = last_real_token(attention_mask)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last.to(hidden.device)]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def check_pooling(encoder: PreTrainedModel, pooling: str | None) -> str:
    """The pooling to use: --pooling, or by default `last` for a decoder (the only token that has read the whole
    text) and `mean` for an encoder. Refuses one the model cannot give: an unknown one, `pooler` on a model
    without a pooler, `cls` or `pooler` on a decoder (its first token has seen nothing after it)."""
    decoder = is_decoder(encoder.config)
    pooling = pooling or ("last" if decoder else "mean")
    if pooling not in POOLINGS:
        raise UserError(f"pooling '{pooling}' is not one of {', '.join(POOLINGS)}")
    if decoder and pooling in ("cls", "pooler"):
        raise UserError(
            f"{type(encoder).__name__} is a decoder: its first token has read nothing after it and it has no "
            f"pooler; pass --pooling last (the default) or --pooling mean"
        )
    if pooling == "pooler" and getattr(encoder, "pooler", None) is None:
        raise UserError(f"{type(encoder).__name__} has no pooler; pass --pooling mean or --pooling cls")
    return pooling


def encoding_digest(encoder: PreTrainedModel, pooling: str, max_length: int, dtype: str) -> hashlib._Hash:
    """What every split's features depend on besides its texts: the weights, pooling, max length, precision."""
    digest = hashlib.sha256(f"{pooling}|{max_length}|{dtype}|{type(encoder).__name__}".encode())
    for tensor in encoder.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest


def row_keys(ds: Dataset) -> list[bytes]:
    """A key per row: its token ids' digest, so a text is found in the cache whichever split or run it is in."""
    ids = ds.with_format(None)["input_ids"]  # lists of ints, whatever format the caller set
    return [hashlib.blake2b(np.asarray(row, dtype=np.int64).tobytes(), digest_size=16).digest() for row in ids]


def read_cache(cache_dir: Path, encoding: str) -> dict[bytes, torch.Tensor]:
    """Every row feature cached for this encoding, by row key (each file holds the rows one run added)."""
    store: dict[bytes, torch.Tensor] = {}
    for path in sorted(cache_dir.glob(f"{encoding}-*.safetensors")):
        shard = load_file(path)
        store.update(zip((bytes(k) for k in shard["keys"].numpy()), shard["features"], strict=True))
    return store


@torch.inference_mode()
def encode(
    encoder: PreTrainedModel,
    ds: Dataset,
    collator: DataCollatorWithPadding,
    accelerator: Accelerator,
    pooling: str,
    batch_size: int,
    use_bf16: bool,
    desc: str = "encode",
) -> torch.Tensor:
    """Features of every row of `ds`, in order. Each process encodes its share; all receive the whole.

    Rows are taken longest first, so each batch pads only to texts of nearly its own length.
    """
    order = sorted(range(len(ds)), key=lambda i: -len(ds[i]["input_ids"]))
    mine = order[accelerator.process_index :: accelerator.num_processes]
    columns = [c for c in ds.column_names if c not in ("labels", "document")]
    encoder.eval()
    chunks = []
    for start in tqdm(range(0, len(mine), batch_size), desc=desc, disable=not accelerator.is_local_main_process):
        rows = ds.select(mine[start : start + batch_size]).select_columns(columns)
        batch = {k: v.to(accelerator.device) for k, v in collator(list(rows)).items()}
        with torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            outputs = encoder(**batch)
        chunks.append(pool(outputs, batch["attention_mask"], pooling).float().cpu())
    mine_features = torch.cat(chunks) if chunks else torch.empty(0)
    gathered = gather_object([(mine, mine_features)])  # one exchange per split, of finished features
    features = torch.empty(len(ds), encoder.config.hidden_size)
    for indices, values in gathered:
        if indices:
            features[torch.tensor(indices)] = values
    return features


def cached_features(
    encoder: PreTrainedModel,
    splits: dict[str, Dataset],
    collator: DataCollatorWithPadding,
    accelerator: Accelerator,
    pooling: str,
    max_length: int,
    cache_dir: str | Path,
    batch_size: int = 64,
) -> dict[str, torch.Tensor]:
    """Features per split. A text whose token ids were encoded this exact way before, by any split of any run
    (the folds of a cv share one cache), is read from `cache_dir`; the others are encoded and added to it as
    one file per split. Written here because datasets caches a map by its whole input, not per row."""
    use_bf16 = accelerator.mixed_precision == "bf16"  # the run's precision: auto picks bf16 where it is native
    encoding = encoding_digest(encoder, pooling, max_length, "bf16" if use_bf16 else "fp32").hexdigest()[:16]
    cache_dir = Path(cache_dir)
    store = read_cache(cache_dir, encoding)  # every process reads before any writes: they agree on what is new
    features = {}
    for split, ds in splits.items():
        keys = row_keys(ds)
        new = sorted({i for i, key in enumerate(keys) if key not in store})
        logger.info("Features of %s: %d of %d from cache %s", split, len(keys) - len(new), len(keys), cache_dir)
        if new:
            encoded = encode(encoder, ds.select(new), collator, accelerator, pooling, batch_size, use_bf16,
                             f"encode {split}")  # fmt: skip
            store.update(zip((keys[i] for i in new), encoded, strict=True))
            if accelerator.is_main_process:
                added = torch.tensor([list(keys[i]) for i in new], dtype=torch.uint8)
                name = hashlib.blake2b(added.numpy().tobytes(), digest_size=8).hexdigest()
                cache_dir.mkdir(parents=True, exist_ok=True)
                with atomic_path(cache_dir / f"{encoding}-{name}.safetensors", per_process=True) as tmp:
                    save_file({"keys": added, "features": encoded.contiguous()}, tmp)
            accelerator.wait_for_everyone()
        rows = [store[key] for key in keys]
        features[split] = torch.stack(rows) if rows else torch.empty(0, encoder.config.hidden_size)
    return features


class ClassificationHead(nn.Module):
    """A linear layer, or a one-hidden-layer MLP, over features; returns what a HF classifier returns."""

    def __init__(self, in_features: int, num_labels: int, hidden_size: int = 0, dropout: float = 0.1):
        super().__init__()
        self.config = {
            "in_features": in_features,
            "num_labels": num_labels,
            "hidden_size": hidden_size,
            "dropout": dropout,
        }
        layers: list[nn.Module] = [nn.Dropout(dropout)]
        if hidden_size:
            layers += [nn.Linear(in_features, hidden_size), nn.GELU(), nn.Dropout(dropout)]
        layers.append(nn.Linear(hidden_size or in_features, num_labels))
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> SequenceClassifierOutput:
        return SequenceClassifierOutput(logits=self.net(features))


class FeatureClassifier(nn.Module):
    """Encoder + pooling + head on raw token ids: what the feature-extraction recipe saves and predicts with."""

    def __init__(self, encoder: PreTrainedModel, head: ClassificationHead, pooling: str):
        super().__init__()
        self.encoder, self.head, self.pooling = encoder, head, pooling
        self.config = encoder.config  # id2label for predictions

    def embed(self, input_ids, attention_mask, **inputs) -> torch.Tensor:
        """The pooled features the head reads (a long document's windows are averaged on these)."""
        outputs = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **inputs)
        return pool(outputs, attention_mask, self.pooling)

    def forward(self, input_ids, attention_mask, **inputs) -> SequenceClassifierOutput:
        return self.head(self.embed(input_ids, attention_mask, **inputs))

    def save_pretrained(
        self, path: str | Path, is_main_process: bool = True, state_dict: dict | None = None, **kwargs
    ) -> None:
        """The encoder as a standard checkpoint (with the label names), the head and its config beside it.

        `state_dict` (e.g. gathered from a sharded model) and `kwargs` (`save_function`, ...) are those
        `PreTrainedModel.save_pretrained` takes; the keys under `encoder.` go to the encoder.
        """
        if not is_main_process:
            return
        state_dict = self.state_dict() if state_dict is None else state_dict
        parts = {
            p: {k.removeprefix(p): v for k, v in state_dict.items() if k.startswith(p)} for p in ("encoder.", "head.")
        }
        self.encoder.save_pretrained(path, state_dict=parts["encoder."], **kwargs)
        save_file({k: v.contiguous() for k, v in parts["head."].items()}, Path(path) / HEAD_FILE)
        (Path(path) / HEAD_CONFIG).write_text(json.dumps({**self.head.config, "pooling": self.pooling}, indent=2))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> FeatureClassifier:
        config = json.loads((Path(path) / HEAD_CONFIG).read_text())
        pooling = config.pop("pooling")
        head = ClassificationHead(**config)
        head.load_state_dict(load_file(Path(path) / HEAD_FILE))
        return cls(AutoModel.from_pretrained(path), head, pooling)


def document_features(features: torch.Tensor, ds: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, labels) with one row per document: the windows of a long document averaged."""
    labels = torch.tensor(ds["labels"])
    if "document" not in ds.column_names:
        return features, labels
    return aggregate_windows(features, labels, torch.tensor(ds["document"]), "mean")


def feature_dataloader(
    columns: dict[str, torch.Tensor], batch_size: int, shuffle: bool = False, sampler=None
) -> torch.utils.data.DataLoader:
    """Batches of `columns` (the model's input, "labels", and "document" for windows), row by row."""
    dataset = torch.utils.data.StackDataset(**columns)
    generator = torch.Generator().manual_seed(0)  # see data.build_dataloader: keeps the global RNG untouched
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler, generator=generator
    )


def feature_loaders(
    features: dict[str, torch.Tensor],
    splits: dict[str, Dataset],
    args: TrainingArguments,
    data_args: DataArguments,
    key: str = "features",
    average_windows: bool = True,
) -> tuple:
    """(train, validation, test) loaders over cached features (test None unless `splits` has it), batched as
    {key, "labels"}; the train split's is shuffled, or class-weighted with --sampler weighted.

    A long document's windows are averaged to one row (what `FeatureClassifier` predicts on); with
    `average_windows=False`, for a model that scores windows and averages their logits, training sees each
    window as an example and evaluation batches carry each window's "document", as token batches do.
    """
    loaders = {}
    for split, ds in splits.items():
        if average_windows or "document" not in ds.column_names:
            columns = dict(zip((key, "labels"), document_features(features[split], ds), strict=True))
        else:
            columns = {key: features[split], "labels": torch.tensor(ds["labels"])}
            if split != "train":
                columns["document"] = torch.tensor(ds["document"])
        if split == "train":
            weighted = data_args.sampler == "weighted"
            sampler = EpochWeightedSampler(columns["labels"].tolist(), args.seed) if weighted else None
            loaders[split] = feature_dataloader(columns, args.per_device_train_batch_size, True, sampler)
        else:
            loaders[split] = feature_dataloader(columns, args.per_device_eval_batch_size)
    return loaders["train"], loaders["validation"], loaders.get("test")


class FirstTokenStates(nn.Module):
    """Stands in for a frozen encoder whose first-token states were encoded once (`cached_features`, pooling
    "cls"): returns a batch of them as the encoder's output, a one-token sequence, with the encoder's own
    pooler applied.

    What a sequence classifier runs after its encoder reads the first token alone (BERT's and ALBERT's
    poolers, then dropout and classifier; the heads of RoBERTa, ELECTRA, DistilBERT and DeBERTa), so the
    model's own forward on these gives the whole model's logits at the cost of its head. Written by hand:
    no library caches an encoder's output below a Transformers head.
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        self.pooler = getattr(base, "pooler", None)
        # ALBERT's pooler is a bare Linear that AlbertModel applies to the first token, then a tanh.
        self.activation = getattr(base, "pooler_activation", None) if isinstance(self.pooler, nn.Linear) else None

    def forward(self, input_ids=None, inputs_embeds=None, **_) -> BaseModelOutputWithPooling:
        hidden = inputs_embeds.unsqueeze(1)  # (batch, 1, hidden)
        if self.pooler is None:
            pooled = None
        elif self.activation is not None:
            pooled = self.activation(self.pooler(inputs_embeds))
        else:
            pooled = self.pooler(hidden)
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)


def on_cached_states(model: PreTrainedModel) -> PreTrainedModel:
    """`model` with its encoder replaced by `FirstTokenStates`: call it as `top(inputs_embeds=states)`.

    The pooler and head are `model`'s own modules, so what trains in `top` trains in `model`, which stays
    a whole `AutoModelForSequenceClassification` to save. Refuses when something that trains in `model`
    (set by `set_trainable`) would not be in `top`: a layer between the encoder and its first-token state;
    or when the head pools more than the first token.
    """
    if is_decoder(model.config):
        raise UserError(
            f"{type(model).__name__} is a decoder: it has no pooler and classifies from its last token, not a "
            "first-token state; run feature_extraction (it pools the last token) or lora"
        )
    pooling = getattr(model.config, "classifier_pooling", "cls")  # ModernBERT's head may pool every token
    if pooling != "cls":
        raise UserError(
            f"{type(model).__name__} pools every token for its head (classifier_pooling '{pooling}'), but only "
            "the first token's state is encoded; run feature_extraction --pooling mean, or full_finetune"
        )
    top = copy.copy(model)
    for name, value in vars(model).items():  # its own tables (modules, parameters, hooks); their contents shared
        if isinstance(value, dict | set):
            setattr(top, name, copy.copy(value))
    top._modules[model.base_model_prefix] = FirstTokenStates(model.base_model)
    kept = {id(p) for p in top.parameters()}
    missed = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in kept]
    if missed:
        raise UserError(
            f"{missed[0]} trains but runs before the first-token state, which is encoded once; "
            "map only the pooler and the head as trainable (--layer_mapping)"
        )
    return top
