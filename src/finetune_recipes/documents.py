"""From windows back to documents: a long document tokenized as several windows is scored as one row. numpy
only, so `predict` on an ONNX export shares it with evaluation in torch (data.windows) without loading torch."""

from __future__ import annotations

import numpy as np


def aggregate_rows(values: np.ndarray, documents: np.ndarray, how: str) -> tuple[np.ndarray, np.ndarray]:
    """One row per document, in document order: the mean or the max (`how`) of its windows' rows; and the
    index of each document's first window (to take its label, the same on every window)."""
    ids, first, inverse = np.unique(documents, return_index=True, return_inverse=True)
    shape = (len(ids), *values.shape[1:])
    if how == "max":
        out = np.full(shape, -np.inf, dtype=values.dtype)
        np.maximum.at(out, inverse, values)
        return out, first
    out = np.zeros(shape, dtype=values.dtype)
    np.add.at(out, inverse, values)
    counts = np.bincount(inverse, minlength=len(ids)).astype(values.dtype)  # float32 stays float32
    return out / counts.reshape(-1, *[1] * (values.ndim - 1)), first
