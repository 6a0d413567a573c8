"""Planted data and a tiny BERT, built locally, that the tests and the benchmarks share (as accelerate ships
`accelerate.test_utils`): topic texts a small model learns in a few steps, their multi-label, regression and
long-document variants, and a randomly initialised BERT over their words. Standard library at import; torch and
transformers load when a model is written."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

TOPICS = {
    "business": "market bank share price profit trade economy growth sales firm",
    "sport": "goal match team score win player coach season league cup",
    "tech": "phone software chip internet computer data network robot code game",
}
FILLER = ["the", "a", "of", "to", "and", "in", "on", "said", "new", "year"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


TOPIC_WORDS = SPECIALS + sorted({w for text in TOPICS.values() for w in text.split()} | set(FILLER))
TINY_BERT = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, max_position_embeddings=64
)


def write_bert(path: Path, words: list[str] | None = None, model_max_length: int = 64, **config) -> Path:
    """A BERT with random weights (seed 0) of `config`'s sizes, saved with a WordPiece tokenizer over `words`
    (default: the topic words): nothing downloaded."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    words = words or TOPIC_WORDS
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)}, model_max_length=model_max_length)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), **config)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_tiny_bert(path: Path, num_hidden_layers: int = 2) -> Path:
    """A 2-layer BERT with a pooler (like MiniLM), its pooling named as sentence-transformers models do."""
    write_bert(path, **{**TINY_BERT, "num_hidden_layers": num_hidden_layers})
    write_sentence_pooling(path, "mean")
    return path


def write_sentence_pooling(path: Path, mode: str) -> None:
    """The files a sentence-transformers model folder names its pooling in (as all-MiniLM-L6-v2's do)."""
    kinds = ("Transformer", ""), ("Pooling", "1_Pooling")
    modules = [{"idx": i, "name": str(i), "path": p, "type": f"sentence_transformers.models.{k}"}
               for i, (k, p) in enumerate(kinds)]  # fmt: skip
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir(exist_ok=True)
    modes = {"pooling_mode_cls_token": mode == "cls", "pooling_mode_mean_tokens": mode == "mean"}
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **modes}))


def topic_rows(n: int, seed: int) -> list[dict[str, str]]:
    """`n` short texts, each mostly words of its topic, labels as strings."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = sorted(TOPICS)[i % len(TOPICS)]
        words = rng.choices(TOPICS[label].split(), k=rng.randint(4, 10)) + rng.choices(FILLER, k=rng.randint(1, 5))
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def multi_label_rows(n: int, seed: int) -> list[dict]:
    """`n` texts about one or two topics; `labels` lists them (the label set follows the words)."""
    rng = random.Random(seed)
    names = sorted(TOPICS)
    rows = []
    for i in range(n):
        topics = sorted(rng.sample(names, 1 + i % 2))
        words = [w for t in topics for w in rng.choices(TOPICS[t].split(), k=rng.randint(3, 6))]
        words += rng.choices(FILLER, k=rng.randint(1, 4))
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "labels": topics})
    return rows


def regression_rows(n: int, seed: int) -> list[dict]:
    """`n` texts of sport and tech words; `score` is the share of sport words among them, in 0..10."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        sport, tech = rng.randint(0, 8), rng.randint(0, 8)
        words = rng.choices(TOPICS["sport"].split(), k=sport) + rng.choices(TOPICS["tech"].split(), k=tech)
        words += rng.choices(FILLER, k=2)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "score": round(10 * sport / max(sport + tech, 1), 3)})
    return rows


def long_document_rows(n: int, seed: int, filler_words: int = 60) -> list[dict[str, str]]:
    """`n` documents of `filler_words` neutral words whose topic words come only at the very end, so a
    model reading the first `max_length` tokens cannot tell the topic and one reading windows can."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = sorted(TOPICS)[i % len(TOPICS)]
        words = rng.choices(FILLER, k=filler_words) + rng.choices(TOPICS[label].split(), k=6)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


DECODERS = ("llama", "qwen3", "gemma3_text", "gpt2")  # the decoder families the tests build


def write_tiny_decoder(path: Path, family: str = "llama") -> Path:
    """A 2-layer causal LM of `family` with random weights (seed 0), saved as its pretrained LM is, with a word-level
    tokenizer over the topic words that has an end-of-sequence token and, like Llama's, GPT-2's and Qwen's own,
    no padding token: what a user's Hub decoder looks like, nothing downloaded."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [w for w in TOPIC_WORDS if not w.startswith("[")] + ["<unk>", "<eos>"]
    vocab = {w: i for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>", model_max_length=64
    )
    sizes = dict(vocab_size=len(words), eos_token_id=vocab["<eos>"], bos_token_id=None, pad_token_id=None)
    decoder = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=2, max_position_embeddings=64, **sizes)  # fmt: skip
    config = {
        "llama": lambda: transformers.LlamaConfig(**decoder),
        "qwen3": lambda: transformers.Qwen3Config(head_dim=16, **decoder),
        "gemma3_text": lambda: transformers.Gemma3TextConfig(head_dim=16, sliding_window=16, **decoder),
        "gpt2": lambda: transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, **sizes),
    }[family]()
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
