"""Batch prediction on raw text: from the output of any recipe (a full model, a LoRA adapter, encoder + head)
with torch, or from its ONNX export (`finetune-recipes export --onnx`) with ONNX Runtime and without torch.

Both read texts as the model was trained to (max_length, windows of long documents), batch them sorted by
length so each pads little, and give one prediction per text in input order.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..trained import (  # noqa: F401  (HEAD_CONFIG, MODEL_ONNX, HEAD_ONNX, load_classifier: export's and the tests')
    HEAD_CONFIG,
    HEAD_ONNX,
    MODEL_ONNX,
    RESTORE,
    check_model_dir,
    load_classifier,
    read_json,
    thresholds_of,
    trained_logits,
)


def predict(
    path: str | Path, texts: list[str], batch_size: int = 64, bf16: bool | None = None
) -> list[dict[str, object]]:
    """One prediction per text, in input order: label and score (single-label), every label over its
    threshold with its score (multi-label), or the value (regression).

    `path` is a recipe's output_dir (torch; in bf16 where the CPU or GPU computes it natively, unless `bf16`
    says otherwise) or an ONNX export of one (ONNX Runtime, fp32 or int8). Long documents are read as
    windows when the model was trained so."""
    path = Path(path)
    check_model_dir(path)
    if not texts:
        return []
    config = read_json(path / "config.json", RESTORE)
    kind, id2label = config.get("problem_type"), config.get("id2label") or {}
    names = [id2label[str(i)] for i in range(len(id2label))] if id2label else ["LABEL_0"]
    thresholds = thresholds_of(path, names, kind)  # checked before the model loads
    logits, kind, names = trained_logits(path, texts, batch_size, bf16)
    return [describe(text, row, names, kind, thresholds) for text, row in zip(texts, logits, strict=True)]


def describe(
    text: str, logits: np.ndarray, names: list[str], problem_type: str | None, thresholds: list[float]
) -> dict[str, object]:
    """One text's prediction as the model's problem type reads its logits (multi-label: over `thresholds`)."""
    if problem_type == "regression":
        return {"text": text, "value": round(float(logits[0]), 4)}
    if problem_type == "multi_label_classification":
        scores = (1 / (1 + np.exp(-logits))).tolist()
        over = [(n, s) for n, s, t in zip(names, scores, thresholds, strict=True) if s >= t]
        over.sort(key=lambda pair: -pair[1])
        return {"text": text, "labels": [n for n, _ in over], "scores": [round(s, 4) for _, s in over]}
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
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
