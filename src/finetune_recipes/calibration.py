"""Calibration of a classifier's probabilities fitted on held-out logits (Guo et al. 2017): temperature scaling
and vector scaling (a scale and a shift per class), the choice among them and the scores as trained made by
held-out evidence (folds of validation), and how far probabilities are from frequencies: expected calibration
error (ECE) with the floor a perfectly calibrated model of the same size would show, negative log-likelihood
and Brier score, with the reliability diagram's bins.

Single-label: one temperature for all classes, ECE over the top label. Multi-label: one temperature per label
(each is its own sigmoid; vector scaling is then Platt scaling per label), and every (text, label) pair is a
yes/no prediction whose confidence is max(p, 1 - p), right when the cut at 0.5 matches the label. Written
here because scikit-learn calibrates its own estimators (CalibratedClassifierCV), not a network's logits,
and has no ECE.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from scipy.special import expit, log_expit, log_softmax, softmax

from .config import SINGLE

logger = logging.getLogger(__name__)

BINS = 15  # equal-width confidence bins, as Guo et al. report ECE
LOG_T_RANGE = (np.log(0.05), np.log(20.0))  # the temperatures searched: from 20x sharper to 20x softer
SHIFT_RANGE = (-10.0, 10.0)  # vector scaling's shifts, in logits
RIDGE = 1e-4  # vector scaling's pull towards the logits as trained (and softmax's free shift pinned)
FOLDS = 5  # validation's folds for the held-out choice
MIN_HELD_OUT = 30  # fewer validation examples than this cannot choose: the scores stay as trained
METHODS = ("identity", "temperature", "vector")  # simplest first: a later one must earn its place


@dataclass(frozen=True)
class Scaling:
    """logits · scale + shift per class (or label), the map a calibration folds into the output layer: identity
    (1, 0), a temperature (1 / T, 0) or vector scaling. The scales are positive, so argmax, and a window
    aggregation's max or mean, commute with it."""

    method: str
    scale: list[float]
    shift: list[float]

    def probabilities(self, logits, problem_type: str) -> np.ndarray:
        z = np.asarray(logits, dtype=np.float64) * np.asarray(self.scale) + np.asarray(self.shift)
        return softmax(z, axis=-1) if problem_type == SINGLE else expit(z)


def scaled_probabilities(logits, temperature, problem_type: str) -> np.ndarray:
    """softmax(logits / T), or sigmoid(logits / T_label) per label; T = 1 gives the model's own scores: the
    Scaling of a temperature."""
    scale = (1 / np.asarray(temperature, dtype=np.float64)).tolist()
    return Scaling("temperature", scale, [0.0] * len(scale)).probabilities(logits, problem_type)


def _nll_rows(z: np.ndarray, refs: np.ndarray, problem_type: str) -> np.ndarray:
    """Each example's negative log-likelihood (multi-label: the mean over its labels)."""
    if problem_type == SINGLE:
        return -log_softmax(z, axis=-1)[np.arange(len(refs)), refs]
    return -(refs * log_expit(z) + (1 - refs) * log_expit(-z)).mean(-1)


def _nll_at(z: np.ndarray, refs: np.ndarray, problem_type: str) -> float:
    if problem_type != SINGLE and z.ndim == 1:  # one label's column
        z, refs = z[:, None], refs[:, None]
    return float(_nll_rows(z, refs, problem_type).mean())


def fit_temperature(logits, references, problem_type: str, warn: bool = True) -> list[float]:
    """The temperature(s) minimising the negative log-likelihood of `references` (validation) under the scaled
    logits: [T] for single-label, one per label for multi-label. Each is a bounded 1-D search over log T,
    deterministic, so every process of a run finds the same. T stays 1 where validation cannot tell: a label
    that is always (or never) given, or a search that ends at its bound, which is what separable validation
    does (every example right with a margin: the NLL falls towards T = 0 without a minimum)."""
    z = np.asarray(logits, dtype=np.float64)
    refs = _references(references, problem_type)
    columns = [(z, refs)] if problem_type == SINGLE else [(z[:, j], refs[:, j]) for j in range(z.shape[1])]
    fitted = [_fit_one(zj, rj, problem_type) for zj, rj in columns]
    if warn and None in fitted:
        logger.warning(
            "Calibration: the validation split cannot fix a temperature (its NLL has no minimum "
            "between T = 0.05 and 20); kept 1"
        )
    return [1.0 if t is None else t for t in fitted]


def _fit_one(z: np.ndarray, refs: np.ndarray, problem_type: str) -> float | None:
    if problem_type != SINGLE and refs.min() == refs.max():
        return 1.0
    nll = lambda log_t: _nll_at(z / np.exp(log_t), refs, problem_type)  # noqa: E731
    log_t = minimize_scalar(nll, bounds=LOG_T_RANGE, method="bounded", options={"xatol": 1e-5}).x
    if min(nll(bound) for bound in LOG_T_RANGE) <= nll(log_t) + 1e-9:  # no minimum inside: it runs to a bound
        return None
    return float(np.exp(log_t))


def fit_vector(logits, references, problem_type: str, shift: bool = True) -> Scaling | None:
    """Vector scaling: a positive scale and (with `shift`; a head without a bias, as decoders' `score`, has
    nowhere to fold one) a shift per class or label, minimising the NLL of `references` plus a small ridge
    towards the logits as trained, by L-BFGS-B with the gradient written out. A multi-label label that is
    always (or never) given keeps (1, 0). None where a parameter ends at its bound: validation cannot fix it."""
    z, refs = np.asarray(logits, dtype=np.float64), _references(references, problem_type)
    n, k = z.shape
    target = np.eye(k)[refs] if problem_type == SINGLE else refs
    fixed = np.zeros(k, bool) if problem_type == SINGLE else refs.min(0) == refs.max(0)
    free = lambda bounds: [(0.0, 0.0) if f else bounds for f in fixed]  # noqa: E731

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        scale, offset = np.exp(theta[:k]), (theta[k:] if shift else 0.0)
        u = z * scale + offset
        probs = softmax(u, axis=-1) if problem_type == SINGLE else expit(u)
        grad_u = (probs - target) / (n if problem_type == SINGLE else n * k)
        grad = [(grad_u * z).sum(0) * scale] + ([grad_u.sum(0)] if shift else [])
        value = _nll_rows(u, refs, problem_type).mean() + RIDGE * (theta**2).sum()
        return float(value), np.concatenate(grad) + 2 * RIDGE * theta

    bounds = free((-LOG_T_RANGE[1], -LOG_T_RANGE[0])) + (free(SHIFT_RANGE) if shift else [])
    theta = minimize(loss, np.zeros(len(bounds)), jac=True, method="L-BFGS-B", bounds=bounds).x
    if any(lo != hi and min(abs(t - lo), abs(t - hi)) < 1e-6 for t, (lo, hi) in zip(theta, bounds, strict=True)):
        return None
    return Scaling("vector", np.exp(theta[:k]).tolist(), (theta[k:] if shift else np.zeros(k)).tolist())


def fit_scaling(method: str, logits, references, problem_type: str, shift: bool = True, warn: bool = True):
    """The Scaling of `method` fitted on (logits, references). Where validation cannot fix vector scaling, a
    temperature is fitted instead (and T = 1 where it cannot fix that either)."""
    k = np.asarray(logits).shape[1]
    if method == "vector":
        fitted = fit_vector(logits, references, problem_type, shift)
        if fitted is not None:
            return fitted
        if warn:
            logger.warning("Calibration: the validation split cannot fix vector scaling (a scale or shift ends at "
                           "its bound: some class is separable there); fitted a temperature instead")  # fmt: skip
        method = "temperature"
    if method == "temperature":
        temperature = fit_temperature(logits, references, problem_type, warn=warn)
        if set(temperature) != {1.0}:  # 1 everywhere: nothing could be fixed
            return Scaling("temperature", [1 / t for t in temperature] * (k // len(temperature)), [0.0] * k)
    return Scaling("identity", [1.0] * k, [0.0] * k)


def held_out_nll(logits, references, problem_type: str, shift: bool = True) -> dict[str, np.ndarray]:
    """Every validation example's NLL under each method fitted on the other folds (5, shuffled with seed 0):
    held-out evidence, where the fit on validation itself would always favour the method with more parameters."""
    from sklearn.model_selection import KFold  # scikit-learn's folds; imported here, as calibrate is rare

    z, refs = np.asarray(logits, dtype=np.float64), _references(references, problem_type)
    out = {method: np.zeros(len(z)) for method in METHODS}
    for fit, held in KFold(FOLDS, shuffle=True, random_state=0).split(z):
        for method in METHODS:
            scaling = fit_scaling(method, z[fit], refs[fit], problem_type, shift, warn=False)
            held_z = z[held] * np.asarray(scaling.scale) + np.asarray(scaling.shift)
            out[method][held] = _nll_rows(held_z, refs[held], problem_type)
    return out


def choose_method(held_out: dict[str, np.ndarray]) -> str:
    """The simplest method no later one beats: a method replaces the one chosen so far only where its held-out
    NLL is lower by more than one standard error of the paired difference (the one-standard-error rule)."""
    chosen = METHODS[0]
    for method in METHODS[1:]:
        gain = held_out[chosen] - held_out[method]
        if gain.mean() > gain.std(ddof=1) / np.sqrt(len(gain)):
            chosen = method
    return chosen


def ece_floor(probs, problem_type: str, draws: int = 200, seed: int = 0) -> tuple[float, float]:
    """The ECE a perfectly calibrated model with these scores shows on this many examples: labels drawn from the
    probabilities themselves, `draws` times; their mean and 95th percentile. A measured ECE inside it cannot be
    told apart from calibrated at this size. The confidences, and so the bins, are the same in every draw: only
    which predictions are right changes, so all draws are scored at once."""
    probs, rng = np.asarray(probs, dtype=np.float64), np.random.default_rng(seed)
    if problem_type == SINGLE:
        cumulative = probs.cumsum(-1)
        drawn = np.minimum((rng.random((draws, len(probs), 1)) > cumulative).sum(-1), probs.shape[1] - 1)
        confidence, hits = probs.max(-1), (drawn == probs.argmax(-1)).astype(np.float64)
    else:
        drawn = rng.random((draws, *probs.shape)) < probs
        confidence = np.maximum(probs, 1 - probs).ravel()
        hits = (drawn == (probs >= 0.5)).reshape(draws, -1).astype(np.float64)
    which = np.clip(np.ceil(confidence * BINS).astype(np.int64) - 1, 0, BINS - 1)
    gaps = (hits - confidence) @ np.eye(BINS)[which]  # per draw and bin: the sum of (right - confidence)
    eces = np.abs(gaps).sum(-1) / len(confidence)
    return float(eces.mean()), float(np.percentile(eces, 95))


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
    ece = expected_calibration_error(probs, refs, problem_type)
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


def expected_calibration_error(probs, references, problem_type: str) -> float:
    bins = reliability_bins(probs, references, problem_type)
    total = sum(b["count"] for b in bins)
    return float(sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]))
