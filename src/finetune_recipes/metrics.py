"""Evaluation metrics, computed with scikit-learn on predictions already gathered from every process."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, f1_score


def _label_ids(values, what: str) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor, possibly on an accelerator
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{what} must be a 1-D sequence of label ids, got shape {array.shape}")
    if array.size and array.dtype.kind not in "iub":
        raise ValueError(f"{what} must hold integer label ids, got dtype {array.dtype}")
    return array.astype(np.int64)


def classification_metrics(predictions, references, num_labels: int | None = None) -> dict[str, float]:
    """Accuracy and macro-F1 of predicted label ids (argmax of the logits) against reference label ids.

    With `num_labels`, macro-F1 averages over every label id in `range(num_labels)`, not only those seen in
    either array (sklearn's default), so the set of averaged classes does not change with what a model
    happens to predict on a small evaluation set. A class absent from both arrays scores 0, sklearn's rule.
    """
    preds, refs = _label_ids(predictions, "predictions"), _label_ids(references, "references")
    if len(preds) != len(refs):
        raise ValueError(f"got {len(preds)} predictions for {len(refs)} references")
    if len(refs) == 0:
        raise ValueError("cannot compute metrics on an empty evaluation set")
    if num_labels is not None and num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    labels = None if num_labels is None else list(range(num_labels))
    return {
        "accuracy": float(accuracy_score(refs, preds)),
        "f1_macro": float(f1_score(refs, preds, labels=labels, average="macro", zero_division=0)),
    }
