"""Tiny models, tokenizers and data sets built locally, so no test touches the network. The planted data and
the tiny BERT live in finetune_recipes.testing, which the benchmarks share; the tests import them from here."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import AutoModelForSequenceClassification

from finetune_recipes.testing import (  # noqa: F401  re-exported for the tests
    FILLER,
    SPECIALS,
    TOPICS,
    long_document_rows,
    multi_label_rows,
    regression_rows,
    topic_rows,
    write_csv,
    write_jsonl,
    write_sentence_pooling,
    write_tiny_bert,
)

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


def blocked(folder: Path, name: str) -> Path:
    """A folder that, first on PYTHONPATH, makes `import name` fail, as on a machine without it."""
    (folder / name).mkdir(parents=True, exist_ok=True)
    (folder / name / "__init__.py").write_text(f"raise ImportError('no {name} here')\n")
    return folder
