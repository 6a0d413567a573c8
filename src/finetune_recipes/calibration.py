"""Calibration of a classifier's probabilities: temperature scaling fitted on held-out logits (Guo et al. 2017),
and how far probabilities are from frequencies: expected calibration error (ECE), negative log-likelihood and
Brier score, with the reliability diagram's bins.

Single-label: one temperature for all classes, ECE over the top label. Multi-label: one temperature per label
(each is its own sigmoid), and every (text, label) pair is a yes/no prediction whose confidence is
max(p, 1 - p), right when the cut at 0.5 matches the label. Written here because scikit-learn calibrates
its own estimators (CalibratedClassifierCV), not a network's logits, and has no ECE.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit, log_expit, log_softmax, softmax

from .config import SINGLE

logger = logging.getLogger(__name__)

BINS = 15  # equal-width confidence bins, as Guo et al. report ECE
LOG_T_RANGE = (np.log(0.05), np.log(20.0))  # the temperatures searched: from 20x sharper to 20x softer


def scaled_probabilities(logits, temperature, problem_type: str) -> np.ndarray:
    """softmax(logits / T), or sigmoid(logits / T_label) per label; T = 1 gives the model's own scores."""
    z = np.asarray(logits, dtype=np.float64) / np.asarray(temperature, dtype=np.float64)
    return softmax(z, axis=-1) if problem_type == SINGLE else expit(z)


def _nll_at(z: np.ndarray, refs: np.ndarray, problem_type: str) -> float:
    if problem_type == SINGLE:
        return float(-log_softmax(z, axis=-1)[np.arange(len(refs)), refs].mean())
    return float(-(refs * log_expit(z) + (1 - refs) * log_expit(-z)).mean())


def fit_temperature(logits, references, problem_type: str) -> list[float]:
    """The temperature(s) minimising the negative log-likelihood of `references` (validation) under the scaled
    logits: [T] for single-label, one per label for multi-label. Each is a bounded 1-D search over log T,
    deterministic, so every process of a run finds the same. T stays 1 where validation cannot tell: a label
    that is always (or never) given, or a search that ends at its bound, which is what separable validation
    does (every example right with a margin: the NLL falls towards T = 0 without a minimum)."""
    z = np.asarray(logits, dtype=np.float64)
    refs = _references(references, problem_type)
    columns = [(z, refs)] if problem_type == SINGLE else [(z[:, j], refs[:, j]) for j in range(z.shape[1])]
    return [_fit_one(zj, rj, problem_type) for zj, rj in columns]


def _fit_one(z: np.ndarray, refs: np.ndarray, problem_type: str) -> float:
    if problem_type != SINGLE and refs.min() == refs.max():
        return 1.0
    nll = lambda log_t: _nll_at(z / np.exp(log_t), refs, problem_type)  # noqa: E731
    log_t = minimize_scalar(nll, bounds=LOG_T_RANGE, method="bounded", options={"xatol": 1e-5}).x
    if min(nll(bound) for bound in LOG_T_RANGE) <= nll(log_t) + 1e-9:  # no minimum inside: it runs to a bound
        logger.warning(
            "Calibration: the validation split cannot fix a temperature (its NLL has no minimum "
            "between T = 0.05 and 20); kept 1"
        )
        return 1.0
    return float(np.exp(log_t))


def _references(references, problem_type: str) -> np.ndarray:
    refs = np.asarray(references)
    return refs.astype(np.int64) if problem_type == SINGLE else refs.round().astype(np.float64)


def _confidence_and_hits(probs: np.ndarray, refs: np.ndarray, problem_type: str) -> tuple[np.ndarray, np.ndarray]:
    if problem_type == SINGLE:
        return probs.max(-1), (probs.argmax(-1) == refs).astype(np.float64)
    return np.maximum(probs, 1 - probs).ravel(), ((probs >= 0.5) == (refs >= 0.5)).ravel().astype(np.float64)


def reliability_bins(probs, references, problem_type: str, bins: int = BINS) -> list[dict]:
    """Per equal-width confidence bin: how many predictions fell there, their mean confidence and how often
    they were right (None for an empty bin)."""
    confidence, hits = _confidence_and_hits(np.asarray(probs), _references(references, problem_type), problem_type)
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)  # (k/bins, (k+1)/bins]
    out = []
    for k in range(bins):
        inside = which == k
        n = int(inside.sum())
        out.append({
            "low": k / bins, "high": (k + 1) / bins, "count": n,
            "confidence": float(confidence[inside].mean()) if n else None,
            "accuracy": float(hits[inside].mean()) if n else None,
        })  # fmt: skip
    return out


def calibration_metrics(probs, references, problem_type: str) -> dict[str, float]:
    """ECE (15 bins; the top label, or every label's yes/no), NLL and Brier score (single-label: the squared
    distance to the one-hot label summed over classes; multi-label: per label), lower better for all three."""
    probs, refs = np.asarray(probs, dtype=np.float64), _references(references, problem_type)
    bins = reliability_bins(probs, refs, problem_type)
    total = sum(b["count"] for b in bins)
    ece = sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"])
    eps = 1e-12  # a probability rounded to exactly 0 would make the NLL infinite
    if problem_type == SINGLE:
        onehot = np.eye(probs.shape[1])[refs]
        nll = -np.log(np.clip(probs[np.arange(len(refs)), refs], eps, 1)).mean()
        brier = ((probs - onehot) ** 2).sum(-1).mean()
    else:
        clipped = np.clip(probs, eps, 1 - eps)
        nll = -(refs * np.log(clipped) + (1 - refs) * np.log(1 - clipped)).mean()
        brier = ((probs - refs) ** 2).mean()
    return {"ece": float(ece), "nll": float(nll), "brier": float(brier)}
