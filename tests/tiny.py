"""Tiny models, tokenizers and data sets built locally, so no test touches the network."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import AutoModelForSequenceClassification, BertConfig, BertModel, BertTokenizer

COMMON = dict(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=37,
    max_position_embeddings=64,
    num_labels=3,
)


def tiny_configs() -> dict[str, transformers.PretrainedConfig]:
    """One tiny random config per architecture layer discovery supports."""
    configs = {
        "bert": transformers.BertConfig(**COMMON),
        "roberta": transformers.RobertaConfig(**COMMON),
        "xlm-roberta": transformers.XLMRobertaConfig(**COMMON),
        "distilbert": transformers.DistilBertConfig(
            vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=37, max_position_embeddings=64, num_labels=3
        ),
        "electra": transformers.ElectraConfig(embedding_size=16, **COMMON),
        # DeBERTa-v3 style: relative-position table, its LayerNorm and the conv beside the blocks.
        "deberta-v2": transformers.DebertaV2Config(
            relative_attention=True,
            position_buckets=8,
            pos_att_type=["p2c", "c2p"],
            norm_rel_ebd="layer_norm",
            conv_kernel_size=3,
            **COMMON,
        ),
        "albert": transformers.AlbertConfig(embedding_size=16, num_hidden_groups=1, **COMMON),
        "albert-2-groups": transformers.AlbertConfig(
            embedding_size=16, num_hidden_groups=2, inner_group_num=2, **{**COMMON, "num_hidden_layers": 4}
        ),
    }
    if hasattr(transformers, "ModernBertConfig"):
        special = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
        configs["modernbert"] = transformers.ModernBertConfig(**special, **COMMON)
    return configs


def build_tiny(name: str) -> nn.Module:
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(tiny_configs()[name])


TOPICS = {
    "business": "market bank share price profit trade economy growth sales firm",
    "sport": "goal match team score win player coach season league cup",
    "tech": "phone software chip internet computer data network robot code game",
}
FILLER = ["the", "a", "of", "to", "and", "in", "on", "said", "new", "year"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_tiny_bert(path: Path, num_hidden_layers: int = 2) -> Path:
    """A 2-layer BERT with a pooler (like MiniLM) and a WordPiece tokenizer over the topic words."""
    words = SPECIALS + sorted({w for text in TOPICS.values() for w in text.split()} | set(FILLER))
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)}, model_max_length=64)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(words),
        hidden_size=32,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
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
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def blocked(folder: Path, name: str) -> Path:
    """A folder that, first on PYTHONPATH, makes `import name` fail, as on a machine without it."""
    (folder / name).mkdir(parents=True, exist_ok=True)
    (folder / name / "__init__.py").write_text(f"raise ImportError('no {name} here')\n")
    return folder
