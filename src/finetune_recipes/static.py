"""Static word vectors: where they come from (a GloVe / word2vec / fastText text file, the encoder's own input
table, or model2vec's distillation of the encoder), a word-level tokenizer over the training words, and a
bag-of-vectors or BiLSTM classifier that saves and loads like any Transformers model.

Importing this module registers the model with the Auto classes, so `AutoModelForSequenceClassification`
and `pipeline("text-classification")` load a saved one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.modeling_outputs import SequenceClassifierOutput

from .atomic import atomic_path
from .errors import UserError
from .features import ClassificationHead
from .packing import check_packable
from .strategy_args import StaticArguments  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

MODEL_TYPE = "finetune_recipes_static"
FLOAT32_MAX = 3.4028234663852886e38  # the vectors train in float32: a larger value is inf there
PAD, UNK = "[PAD]", "[UNK]"


# The model -------------------------------------------------------------------------------------------------


class StaticConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(
        self,
        vocab_size: int = 2,
        embedding_dim: int = 8,
        encoder: str = "bag",
        lstm_hidden_size: int = 128,
        head_hidden_size: int = 0,
        dropout: float = 0.1,
        pad_token_id: int = 0,
        **kwargs,
    ):
        self.vocab_size, self.embedding_dim, self.encoder = vocab_size, embedding_dim, encoder
        self.lstm_hidden_size, self.head_hidden_size, self.dropout = lstm_hidden_size, head_hidden_size, dropout
        super().__init__(pad_token_id=pad_token_id, **kwargs)


class StaticEmbeddingsForSequenceClassification(PreTrainedModel):
    """Word vectors → the mean of a text's vectors (bag) or a bidirectional LSTM's last states in both
    directions (lstm) → a linear or MLP head. Padding never counts: the bag averages real tokens only, and
    the LSTM runs over packed sequences."""

    config_class = StaticConfig
    base_model_prefix = "static"
    main_input_name = "input_ids"

    def __init__(self, config: StaticConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.embedding_dim, padding_idx=config.pad_token_id)
        self.lstm = None
        width = config.embedding_dim
        if config.encoder == "lstm":
            self.lstm = nn.LSTM(config.embedding_dim, config.lstm_hidden_size, batch_first=True, bidirectional=True)
            width = 2 * config.lstm_hidden_size
        self.head = ClassificationHead(width, config.num_labels, config.head_hidden_size, config.dropout)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """PyTorch's own initialisation; the vectors are copied in by `build_static_model`."""

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, **_) -> SequenceClassifierOutput:
        mask = (input_ids != self.config.pad_token_id) if attention_mask is None else attention_mask.bool()
        vectors = self.embeddings(input_ids)
        if self.lstm is None:
            weights = mask.unsqueeze(-1).to(vectors.dtype)
            features = (vectors * weights).sum(1) / weights.sum(1).clamp(min=1)
        else:
            lengths = mask.sum(1).clamp(min=1).cpu()
            packed = nn.utils.rnn.pack_padded_sequence(vectors, lengths, batch_first=True, enforce_sorted=False)
            _, (last, _) = self.lstm(packed)
            features = torch.cat([last[-2], last[-1]], dim=-1)  # the forward and the backward direction
        return self.head(features)


AutoConfig.register(MODEL_TYPE, StaticConfig)
AutoModelForSequenceClassification.register(StaticConfig, StaticEmbeddingsForSequenceClassification)


# Where the vectors come from --------------------------------------------------------------------------------


@dataclass
class Vectors:
    """A tokenizer and one vector per token id, with what the file covered of the training tokens."""

    tokenizer: PreTrainedTokenizerFast
    matrix: torch.Tensor
    coverage: str = ""


def load_vectors(model_args, data_args, training_args, args: StaticArguments) -> Vectors:
    """The vectors and tokenizer `args` ask for: from --embeddings_file over the data's words, the encoder's
    input table, or model2vec's distillation of the encoder.

    The main process goes first: it fills the cache the others then read."""
    from accelerate import PartialState

    state = PartialState(cpu=not torch.accelerator.is_available())  # the Accelerator built later shares it
    with state.main_process_first():
        if args.embeddings_file:
            from .data import raw_splits

            raw, _ = raw_splits(data_args, training_args.seed)  # the data's words decide the vocabulary
            texts = {split: ds[data_args.text_column] for split, ds in raw.items()}
            return file_vectors(args.embeddings_file, texts, args, data_args.max_length, training_args.seed)
        if args.embeddings == "distill":
            return distilled(model_args.model_name_or_path, args.feature_cache_dir, str(state.device))
        return encoder_table(model_args.model_name_or_path)


def build_static_model(
    vectors: Vectors, task, args: StaticArguments, pack_sequences: bool = False
) -> StaticEmbeddingsForSequenceClassification:
    """The classifier over `vectors`, labelled for `task` (a data.Task), its vectors frozen unless asked. Packed
    batches (`pack_sequences`) are refused in one line, as build_model refuses them for a model they cannot serve."""
    num_labels = 1 if task.problem_type == "regression" else len(task.label_names)
    names = task.label_names[:num_labels]
    config = StaticConfig(
        vocab_size=vectors.matrix.shape[0],
        embedding_dim=vectors.matrix.shape[1],
        encoder=args.encoder,
        lstm_hidden_size=args.lstm_hidden_size,
        head_hidden_size=args.head_hidden_size,
        dropout=args.dropout,
        pad_token_id=vectors.tokenizer.pad_token_id,
        num_labels=num_labels,
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
        problem_type=task.problem_type,
    )
    model = StaticEmbeddingsForSequenceClassification(config)
    with torch.no_grad():
        model.embeddings.weight.copy_(vectors.matrix)
    model.embeddings.weight.requires_grad_(not args.freeze_embeddings)
    if pack_sequences:
        check_packable(model)  # not a transformers sequence classifier: refused
    return model


def load_encoder(model_name_or_path: str) -> PreTrainedModel:
    from .modeling import from_pretrained

    return from_pretrained(AutoModel, model_name_or_path, "model", "--model_name_or_path")


def encoder_table(model_name_or_path: str) -> Vectors:
    """The encoder's input embedding table (one vector per word piece) and its tokenizer."""
    from .data import load_tokenizer

    encoder = load_encoder(model_name_or_path)
    matrix = encoder.get_input_embeddings().weight.detach().float().clone()
    return Vectors(load_tokenizer(model_name_or_path), matrix, "the encoder's own word pieces: all covered")


def distilled(model_name_or_path: str, cache_dir: str | Path, device: str) -> Vectors:
    """model2vec's distillation of the encoder: every token of its vocabulary through the encoder once, the
    outputs reduced by PCA and weighted (SIF); cached by the encoder's weights and model2vec's version."""
    try:
        import model2vec
        from model2vec.distill import distill_from_model
    except ImportError:
        raise UserError("--embeddings distill needs model2vec; pip install 'model2vec[distill]'") from None
    from .data import load_tokenizer
    from .features import encoding_digest

    encoder, source = load_encoder(model_name_or_path), load_tokenizer(model_name_or_path)
    digest = encoding_digest(encoder, "model2vec-distill", 0, f"model2vec {model2vec.__version__}")
    digest.update(json.dumps(source.get_vocab(), sort_keys=True).encode())
    folder = Path(cache_dir) / f"distilled-{digest.hexdigest()[:24]}"
    if not (folder / "vectors.safetensors").exists():
        static = distill_from_model(encoder, source, device=device, quantize_to="float32")
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=static.tokenizer, pad_token=source.pad_token, unk_token=source.unk_token
        )
        if len(tokenizer) != static.embedding.shape[0]:  # a special token the distilled vocabulary lacks
            raise UserError(
                f"model2vec's vocabulary of {model_name_or_path} has no {source.pad_token} or {source.unk_token} "
                "token; use --embeddings table"
            )
        write_vectors(folder, tokenizer, torch.from_numpy(static.embedding).float())
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    return Vectors(tokenizer, load_file(folder / "vectors.safetensors")["vectors"], "")


def write_vectors(folder: Path, tokenizer: PreTrainedTokenizerFast, matrix: torch.Tensor) -> None:
    """The tokenizer and the vectors in a folder that appears whole or not at all (a killed run leaves none;
    when another process got there first, its copy is the same and stays)."""
    with atomic_path(folder, per_process=True) as tmp:
        tokenizer.save_pretrained(tmp)
        save_file({"vectors": matrix.contiguous()}, tmp / "vectors.safetensors")


def word_tokenizer(words: list[str], lowercase: bool, max_length: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `words`: Unicode-normalised (lowercased unless told otherwise), split on
    whitespace and punctuation as GloVe and fastText split their corpora, [PAD] 0 and [UNK] 1."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocab = {PAD: 0, UNK: 1, **{w: i + 2 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), *([normalizers.Lowercase()] if lowercase else [])])
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, unk_token=UNK, model_max_length=max_length)


def training_words(texts: list[str], lowercase: bool) -> Counter:
    """How often each word occurs in the training texts, split as `word_tokenizer` splits them."""
    splitter = word_tokenizer([], lowercase, 512).backend_tokenizer
    counts: Counter = Counter()
    for text in texts:
        counts.update(w for w, _ in splitter.pre_tokenizer.pre_tokenize_str(splitter.normalizer.normalize_str(text)))
    return counts


def file_vectors(
    path: str | Path, texts: dict[str, list[str]], args: StaticArguments, max_length: int, seed: int
) -> Vectors:
    """Vectors of the data's words from a text vectors file, read in one streaming pass that keeps only
    those words. The vocabulary is every training word (those the file lacks get a seeded random vector at
    the file's scale, and train) and the words of the other splits the file has (unlabelled text, so no
    label leaks; without them, a word seen only at prediction time would be [UNK]). The reduced table is
    cached by the file's bytes, the words and the seed. Refuses a file that covers less than
    `min_coverage` of the training tokens."""
    counts = training_words(texts["train"], args.lowercase)
    others = training_words([t for split, part in texts.items() if split != "train" for t in part], args.lowercase)
    words = sorted(counts, key=lambda w: (-counts[w], w))  # most frequent first
    words += sorted(set(others) - set(counts))
    digest = hashlib.sha256("\n".join([str(args.lowercase), str(seed), *words]).encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    cached = Path(args.feature_cache_dir) / f"vectors-{digest.hexdigest()[:24]}.safetensors"
    if cached.exists():
        saved = load_file(cached)
        table, found = saved["vectors"], saved["found"].bool()
    else:
        table, found = reduced_table(path, words, args.lowercase, seed)
    hits = dict(zip(words, found.tolist(), strict=True))
    share = sum(n for w, n in counts.items() if hits[w]) / max(sum(counts.values()), 1)
    coverage = (
        f"{Path(path).name} covers {share:.1%} of the training tokens and "
        f"{sum(hits[w] for w in counts) / len(counts):.1%} of their {len(counts):,} distinct words"
    )
    if share < args.min_coverage:  # refused before anything is written
        raise UserError(
            f"{coverage}, below --min_coverage {args.min_coverage}; pass vectors of this language (check "
            "--lowercase), or lower --min_coverage"
        )
    if not cached.exists():
        cached.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cached, per_process=True) as tmp:
            save_file({"vectors": table.contiguous(), "found": found.to(torch.uint8)}, tmp)
    # Every training word stays (a missing one trains from its random vector); another split's word only
    # when the file has it.
    keep = [i for i, w in enumerate(words) if w in counts or hits[w]]
    tokenizer = word_tokenizer([words[i] for i in keep], args.lowercase, max_length)
    matrix = table[[0, 1, *(i + 2 for i in keep)]]
    return Vectors(tokenizer, matrix, coverage + "; the others get random vectors")


def reduced_table(path: str | Path, words: list[str], lowercase: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([PAD], [UNK] and one vector per word; which words the file had): the file's vectors where it has the
    word, else a seeded random vector at the scale of the file's vectors; [PAD] is zero."""
    vectors, dim = read_vectors(path, set(words), lowercase)
    found = torch.tensor([w in vectors for w in words], dtype=torch.bool)
    known = torch.tensor([vectors[w] for w in words if w in vectors]).reshape(-1, dim)
    scale = known.std().item() if known.numel() > 1 else 1.0
    matrix = torch.randn(len(words) + 2, dim, generator=torch.Generator().manual_seed(seed)) * scale
    matrix[0] = 0
    if vectors:
        matrix[2:][found] = known
    return matrix, found


def read_vectors(path: str | Path, vocabulary: set[str], lowercase: bool) -> tuple[dict[str, list[float]], int]:
    """(word → vector for the words of `vocabulary`, the dimension) from a GloVe (`word v1 ... vd`) or
    word2vec/fastText .vec (the same, after a `count dim` header line) text file, in one pass. The first
    occurrence of a word wins (with lowercasing, "The" and "the" are one word). Refuses, in one line naming
    the line, a file that is empty, not UTF-8, or has rows of another dimension or values that are not
    numbers (values are parsed for the words kept)."""
    found: dict[str, list[float]] = {}
    dim = header = None
    with open(path, "rb") as f:
        if f.read(2) == b"\x1f\x8b":
            raise UserError(f"{path} is gzip-compressed; decompress it first (gunzip -k {Path(path).name})")
        f.seek(0)
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").rstrip()
            except UnicodeDecodeError:
                raise UserError(f"{path} line {number} is not UTF-8; pass a UTF-8 vectors file") from None
            parts = line.split(" ")
            if number == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                header = int(parts[1])  # the word2vec / fastText header: count and dimension
                continue
            if not line:
                continue
            if dim is None and header is not None and len(parts) - 1 != header:
                raise UserError(
                    f"{path} line {number} has {len(parts) - 1} values, but its header says {header}; fix the header"
                )
            if dim is None:
                dim = len(parts) - 1
                if dim < 1:
                    raise UserError(f"{path} line {number} has a word and no vector; pass a GloVe or .vec file")
            elif len(parts) - 1 != dim:
                raise UserError(
                    f"{path} line {number} has {len(parts) - 1} values, the first row {dim}; every row needs the "
                    "same dimension"
                )
            word = parts[0].lower() if lowercase else parts[0]
            if word in vocabulary and word not in found:
                try:
                    found[word] = [float(v) for v in parts[1:]]
                except ValueError:
                    raise UserError(f"{path} line {number} has a value that is not a number; fix that row") from None
                if not all(abs(v) <= FLOAT32_MAX for v in found[word]):  # False for nan too
                    raise UserError(
                        f"{path} line {number} has a value that is nan, inf or beyond float32 (±3.4e38); fix that row"
                    )
    if dim is None:
        raise UserError(f"{path} holds no vectors; pass a GloVe or .vec file")
    return found, dim
