"""Inference on raw text from the output of any recipe: a full model, a LoRA adapter, or encoder + head."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
import yaml
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from .config import UserError, listing
from .data import aggregate_windows, encode_windows
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


def recipe_settings(path: Path, tokenizer) -> dict:
    """How the model read its texts in training (max_length, windows), from its recipe config when there."""
    config = path / "recipe_config.yaml"
    saved = yaml.safe_load(config.read_text()) if config.exists() else {}
    return {
        "max_length": int(saved.get("max_length") or min(tokenizer.model_max_length, 512)),
        "windows": saved.get("long_documents") == "windows",
        "stride": int(saved.get("window_stride") or 0),
        "aggregation": saved.get("window_aggregation") or "mean",
    }


def thresholds_of(path: Path, label_names: list[str]) -> list[float]:
    """Multi-label decision thresholds tuned on validation (thresholds.json), else 0.5 for every label."""
    file = path / "thresholds.json"
    saved = json.loads(file.read_text()) if file.exists() else {}
    return [float(saved.get(name, 0.5)) for name in label_names]


@torch.inference_mode()
def predict(path: str | Path, texts: list[str], batch_size: int = 32) -> list[dict[str, object]]:
    """One prediction per text, in input order: label and score (single-label), every label over its
    threshold with its score (multi-label), or the value (regression). Long documents are read as windows
    when the model was trained so; batches are length-sorted to pad little."""
    path = Path(path)
    model = load_classifier(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    settings = recipe_settings(path, tokenizer)
    if settings["windows"]:
        encoded = encode_windows(tokenizer, [texts], settings["max_length"], settings["stride"])
        documents = torch.tensor(encoded.pop("overflow_to_sample_mapping"))
    else:
        encoded = tokenizer(texts, truncation=True, max_length=settings["max_length"])
        documents = torch.arange(len(texts))
    rows = [{k: encoded[k][i] for k in encoded} for i in range(len(documents))]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    collator = DataCollatorWithPadding(tokenizer)
    # A feature head was trained on a document's window features averaged, so it predicts from those too.
    features = isinstance(model, FeatureClassifier) and settings["windows"]
    values = torch.empty(len(rows), model.config.hidden_size if features else model.config.num_labels)
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        batch = collator([rows[i] for i in indices])
        values[indices] = (model.embed(**batch) if features else model(**batch).logits).float()
    values, _ = aggregate_windows(values, documents, documents, "mean" if features else settings["aggregation"])
    logits = model.head(values).logits if features else values
    return [describe(text, row, model.config, path) for text, row in zip(texts, logits, strict=True)]


def describe(text: str, logits: torch.Tensor, config, path: Path) -> dict[str, object]:
    """One text's prediction as the model's problem type reads its logits."""
    names = [config.id2label[i] for i in range(config.num_labels)]
    if config.problem_type == "regression":
        return {"text": text, "value": round(float(logits[0]), 4)}
    if config.problem_type == "multi_label_classification":
        scores = logits.sigmoid().tolist()
        over = [(n, s) for n, s, t in zip(names, scores, thresholds_of(path, names), strict=True) if s >= t]
        over.sort(key=lambda pair: -pair[1])
        return {"text": text, "labels": [n for n, _ in over], "scores": [round(s, 4) for _, s in over]}
    probs = logits.softmax(-1)
    return {"text": text, "label": names[int(probs.argmax())], "score": round(float(probs.max()), 4)}


def format_table(results: list[dict[str, object]], width: int = 60) -> str:
    """The prediction (label and score; labels with scores; or the value) and the start of each text, aligned."""
    if results and "labels" in results[0]:
        shown = [
            ", ".join(f"{n} {s:.2f}" for n, s in zip(r["labels"], r["scores"], strict=True)) or "-" for r in results
        ]
        header = "labels"
    elif results and "value" in results[0]:
        shown, header = [f"{r['value']:.4f}" for r in results], "value"
    else:
        label_width = max([len("label")] + [len(str(r["label"])) for r in results])
        shown = [f"{r['label']!s:<{label_width}}  {r['score']:.4f}" for r in results]
        header = f"{'label':<{label_width}}  score "
    column = max([len(header)] + [len(s) for s in shown])
    lines = [f"{header:<{column}}  text"]
    for r, prediction in zip(results, shown, strict=True):
        text = " ".join(str(r["text"]).split())
        text = text if len(text) <= width else text[: width - 1] + "…"
        lines.append(f"{prediction:<{column}}  {text}")
    return "\n".join(lines)


def format_jsonl(results: list[dict[str, object]]) -> str:
    return "\n".join(json.dumps(r, ensure_ascii=False) for r in results)
