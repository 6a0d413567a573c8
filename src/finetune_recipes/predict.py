"""Inference on raw text from the output of any recipe: a full model, a LoRA adapter, or encoder + head."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
import yaml
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from .config import UserError, listing
from .features import HEAD_CONFIG, FeatureClassifier
from .modeling import load_adapter_classifier


def check_model_dir(path: Path) -> None:
    """Refuses, in one line, a path that holds no saved classifier and tokenizer."""
    if not path.is_dir():
        raise UserError(f"model directory {path} does not exist; pass --model a recipe's output_dir")
    if not any((path / name).exists() for name in ("config.json", "adapter_config.json", HEAD_CONFIG)):
        raise UserError(f"{path} holds no saved model (no config.json); pass --model a recipe's output_dir")
    if not (path / "tokenizer_config.json").exists():
        raise UserError(f"{path} holds no tokenizer (no tokenizer_config.json); pass --model a recipe's output_dir")


def load_classifier(path: str | Path) -> torch.nn.Module:
    """The model a recipe saved in `path`, ready for inference, whichever strategy produced it.

    Refuses a bare encoder: its classification head would be freshly initialised, and its confident
    labels random. A missing head is what tells (id2label cannot: a regression model keeps LABEL_0).
    """
    path = Path(path)
    check_model_dir(path)
    if (path / HEAD_CONFIG).exists():
        model = FeatureClassifier.from_pretrained(path)
    elif (path / "adapter_config.json").exists():
        model = load_adapter_classifier(path)
    else:
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # the load report of a bare encoder; we say it in one line
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(path, output_loading_info=True)
        finally:
            transformers.logging.set_verbosity(verbosity)
        if info["missing_keys"]:
            missing = listing(sorted(info["missing_keys"]), limit=3)
            raise UserError(
                f"{path} holds no trained classification head ({missing} not in its weights), so its labels "
                "would be random; train a head with a recipe and pass --model its output_dir"
            )
    return model.eval()


def max_length_of(path: Path, tokenizer) -> int:
    """The max_length the model was trained with, when its recipe config is there, else the tokenizer's."""
    config = path / "recipe_config.yaml"
    if config.exists():
        return int(yaml.safe_load(config.read_text()).get("max_length") or 512)
    return min(tokenizer.model_max_length, 512)


@torch.inference_mode()
def predict(path: str | Path, texts: list[str], batch_size: int = 32) -> list[dict[str, object]]:
    """Label and score of every text, in input order; batches are length-sorted to pad little."""
    path = Path(path)
    model = load_classifier(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    id2label = model.config.id2label
    encoded = tokenizer(texts, truncation=True, max_length=max_length_of(path, tokenizer))
    rows = [{k: encoded[k][i] for k in encoded} for i in range(len(texts))]
    order = sorted(range(len(texts)), key=lambda i: len(rows[i]["input_ids"]))
    collator = DataCollatorWithPadding(tokenizer)
    results: list[dict[str, object]] = [{} for _ in texts]
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        probs = model(**collator([rows[i] for i in indices])).logits.float().softmax(-1)
        scores, labels = probs.max(-1)
        for i, label, score in zip(indices, labels.tolist(), scores.tolist(), strict=True):
            results[i] = {"text": texts[i], "label": id2label[label], "score": round(score, 4)}
    return results


def format_table(results: list[dict[str, object]], width: int = 60) -> str:
    """label, score and the start of each text, aligned."""
    label_width = max([len("label")] + [len(str(r["label"])) for r in results])
    lines = [f"{'label':<{label_width}}  score   text"]
    for r in results:
        text = " ".join(str(r["text"]).split())
        text = text if len(text) <= width else text[: width - 1] + "…"
        lines.append(f"{r['label']!s:<{label_width}}  {r['score']:.4f}  {text}")
    return "\n".join(lines)


def format_jsonl(results: list[dict[str, object]]) -> str:
    return "\n".join(json.dumps(r, ensure_ascii=False) for r in results)
