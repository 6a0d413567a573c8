"""Evaluation metrics per problem type, computed with scikit-learn and scipy on predictions already gathered
from every process (one row per document), plus the per-class report and multi-label thresholds."""

from __future__ import annotations

import functools
import logging

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    mean_absolute_error,
    mean_squared_error,
    precision_recall_fscore_support,
    r2_score,
)

from .config import LOWER_IS_BETTER, METRICS, MULTI, REGRESSION, SINGLE, greater_is_better  # noqa: F401
from .errors import UserError, first_line

logger = logging.getLogger(__name__)


def _array(values, what: str, ndim: int) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor, possibly on an accelerator
        values = values.detach().float().cpu().numpy() if values.is_floating_point() else values.cpu().numpy()
    array = np.asarray(values)
    if array.ndim != ndim:
        raise ValueError(f"{what} must be {ndim}-D, got shape {array.shape}")
    return array


def _label_ids(values, what: str) -> np.ndarray:
    array = _array(values, what, 1)
    if array.size and array.dtype.kind not in "iub":
        raise ValueError(f"{what} must hold integer label ids, got dtype {array.dtype}")
    return array.astype(np.int64)


def _check_lengths(preds: np.ndarray, refs: np.ndarray) -> None:
    if len(preds) != len(refs):
        raise ValueError(f"got {len(preds)} predictions for {len(refs)} references")
    if len(refs) == 0:
        raise ValueError("cannot compute metrics on an empty evaluation set")


def classification_metrics(predictions, references, num_labels: int | None = None) -> dict[str, float]:
    """Accuracy and macro-F1 of predicted label ids (argmax of the logits) against reference label ids.

    With `num_labels`, macro-F1 averages over every label id in `range(num_labels)`, not only those seen in
    either array (sklearn's default), so the set of averaged classes does not change with what a model
    happens to predict on a small evaluation set. A class absent from both arrays scores 0, sklearn's rule.
    """
    preds, refs = _label_ids(predictions, "predictions"), _label_ids(references, "references")
    _check_lengths(preds, refs)
    if num_labels is not None and num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    labels = None if num_labels is None else list(range(num_labels))
    return {
        "accuracy": float(accuracy_score(refs, preds)),
        "f1_macro": float(f1_score(refs, preds, labels=labels, average="macro", zero_division=0)),
    }


def multi_label_metrics(scores, references, thresholds=0.5) -> dict[str, float]:
    """Micro-, macro- and samples-F1 and subset accuracy of sigmoid scores (n, labels) cut at `thresholds`
    (one number, or one per label) against 0/1 references."""
    probs, refs = _array(scores, "scores", 2), _array(references, "references", 2).round().astype(np.int64)
    _check_lengths(probs, refs)
    preds = (probs >= np.asarray(thresholds)).astype(np.int64)
    f1 = {avg: float(f1_score(refs, preds, average=avg, zero_division=0)) for avg in ("micro", "macro", "samples")}
    return {
        "f1_micro": f1["micro"],
        "f1_macro": f1["macro"],
        "f1_samples": f1["samples"],
        "subset_accuracy": float(accuracy_score(refs, preds)),
    }


def regression_metrics(predictions, references) -> dict[str, float | None]:
    """MSE, MAE, Pearson and Spearman correlation and R². A correlation is undefined when either side is
    constant, R² when the references are: None then (null in results.json, '–' in the tables), not a 0 that
    reads as "no better than the mean"."""
    preds, refs = _array(predictions, "predictions", 1).astype(np.float64), _array(references, "references", 1)
    _check_lengths(preds, refs)
    flat_refs = len(refs) < 2 or np.ptp(refs) == 0
    flat = flat_refs or np.ptp(preds) == 0
    return {
        "mse": float(mean_squared_error(refs, preds)),
        "mae": float(mean_absolute_error(refs, preds)),
        "pearson": None if flat else float(pearsonr(preds, refs)[0]),
        "spearman": None if flat else float(spearmanr(preds, refs)[0]),
        "r2": None if flat_refs else float(r2_score(refs, preds)),
    }


def task_metrics(problem_type: str, scores, references, thresholds=0.5) -> dict[str, float]:
    """The metrics of `problem_type` on `scores`: class probabilities (single-label), per-label sigmoid
    scores (multi-label) or values (regression), one row per document."""
    if problem_type == SINGLE:
        probs = _array(scores, "scores", 2)
        return classification_metrics(probs.argmax(-1), references, probs.shape[1])
    if problem_type == MULTI:
        return multi_label_metrics(scores, references, thresholds)
    return regression_metrics(scores, references)


def tune_thresholds(scores, references) -> np.ndarray:
    """Per label, the cut on its scores that maximises its F1 on these (validation) examples.

    One sort per label: cutting after the k highest scores gives F1 = 2·TP(k) / (k + positives), so every
    cut between two distinct scores is scored at once (sklearn has no per-label threshold search). The cut
    is the midpoint between the last score kept and the next; ties go to the cut nearest 0.5. A label with
    no positive example keeps 0.5.
    """
    probs, refs = _array(scores, "scores", 2), _array(references, "references", 2).round().astype(np.int64)
    thresholds = np.full(probs.shape[1], 0.5)
    for j in range(probs.shape[1]):
        positives = refs[:, j].sum()
        if positives == 0:
            continue
        order = np.argsort(-probs[:, j], kind="stable")
        ranked, hits = probs[order, j], refs[order, j]
        f1 = 2 * np.cumsum(hits) / (np.arange(1, len(ranked) + 1) + positives)
        cuts = np.append((ranked[:-1] + ranked[1:]) / 2, ranked[-1] / 2)
        distinct = np.append(ranked[:-1] > ranked[1:], True)  # a cut between two equal scores splits nothing
        best = np.flatnonzero(distinct & (f1 >= f1[distinct].max() - 1e-12))
        thresholds[j] = cuts[best[np.argmin(np.abs(cuts[best] - 0.5))]]
    return thresholds


def per_class_report(problem_type: str, scores, references, label_names: list[str], thresholds=0.5) -> dict:
    """Precision, recall, F1 and support per class (per label for multi-label), and, for single-label, the
    confusion matrix (rows: true class, columns: predicted, in label order)."""
    if problem_type == REGRESSION:
        return {}
    probs = _array(scores, "scores", 2)
    if problem_type == SINGLE:
        refs, preds = _label_ids(references, "references"), probs.argmax(-1)
    else:
        refs, preds = _array(references, "references", 2).round().astype(np.int64), probs >= np.asarray(thresholds)
    labels = list(range(len(label_names))) if problem_type == SINGLE else None
    p, r, f, s = precision_recall_fscore_support(refs, preds, labels=labels, zero_division=0)
    report = {
        "per_class": {
            name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, name in enumerate(label_names)
        }
    }
    if problem_type == SINGLE:
        report["confusion_matrix"] = confusion_matrix(refs, preds, labels=labels).tolist()
    return report


# --metric_name: any Hugging Face `evaluate` metric beside the built-in ones (run_classification.py's flag).
@functools.cache
def load_metric(name: str):
    """The `evaluate` metric `name` (a Hub name, or a local metric script's path), loaded once per process."""
    try:
        import evaluate
    except ImportError:
        raise UserError("--metric_name needs Hugging Face evaluate: pip install 'finetune-recipes[evaluate]'") from None
    try:
        return evaluate.load(name, keep_in_memory=True)  # no cache files: processes do not queue for a lock
    except Exception as error:  # FileNotFoundError, ConnectionError, the Hub's own: one line whatever it is
        raise UserError(
            f"cannot load metric '{name}' ({first_line(error)}); pass --metric_name a local metric script or a "
            "name reachable from this machine"
        ) from None


def metric_inputs(problem_type: str, scores, references, thresholds=0.5) -> tuple[list, list]:
    """(predictions, references) as `evaluate` metrics take them: class ids (single-label), 0/1 rows at the
    thresholds (multi-label), or values in the target's units (regression)."""
    if problem_type == SINGLE:
        return _array(scores, "scores", 2).argmax(-1).tolist(), _label_ids(references, "references").tolist()
    if problem_type == MULTI:
        predicted = (_array(scores, "scores", 2) >= np.asarray(thresholds)).astype(int)
        return predicted.tolist(), _array(references, "references", 2).round().astype(int).tolist()
    return np.asarray(scores, dtype=float).reshape(-1).tolist(), np.asarray(references, dtype=float).tolist()


def evaluate_metrics(
    names: tuple[str, ...], problem_type: str, scores, references, thresholds=0.5, catch: bool = True
) -> dict:
    """The numbers each metric of `names` reports on these predictions; a key a built-in metric already has
    (evaluate's `accuracy`) keeps the built-in value. A metric that fails is left out with a warning (`catch`),
    as the probe before training has shown it takes this task's predictions."""
    predictions, refs = metric_inputs(problem_type, scores, references, thresholds)
    out: dict = {}
    for name in names:
        try:
            computed = load_metric(name).compute(predictions=predictions, references=refs) or {}
        except Exception as error:  # a metric failing on real predictions must not end a trained run
            if not catch:
                raise
            logger.warning(
                "metric %s failed on these predictions (%s); its results are left out", name, first_line(error)
            )
            continue
        out |= {
            k: float(v) for k, v in computed.items() if isinstance(v, int | float) and k not in METRICS[problem_type]
        }
    return out


def probe_metrics(names: tuple[str, ...], problem_type: str, references) -> tuple[str, ...]:
    """What `names` report, found by scoring `references` against themselves before any training: a metric that
    cannot load, or does not take this task's predictions (a regression metric on classes), is one line now."""
    kind = problem_type.replace("_classification", "").replace("_", "-")
    keys: list[str] = []
    for name in names:
        # Told by its declared inputs, as `datasets` would cast 1.37 to class 1 without a word.
        takes = _prediction_kinds(load_metric(name))
        wanted = "f" if problem_type == REGRESSION else "i"
        if takes and wanted not in takes:
            what = "numbers" if "f" in takes else "class ids"
            raise UserError(
                f"metric '{name}' compares {what}, and a {kind} task predicts "
                f"{'numbers' if wanted == 'f' else 'class ids'}; drop it or pass one for this task"
            )
        try:
            keys += evaluate_metrics((name,), problem_type, *_perfect(problem_type, references), catch=False)
        except UserError:
            raise
        except Exception as error:
            raise UserError(
                f"metric '{name}' does not take a {kind} task's predictions ({first_line(error)}); drop it"
            ) from None
    return tuple(dict.fromkeys(keys))


def _prediction_kinds(metric) -> set[str]:
    """The kinds of number a metric's `predictions` take, by its declared features: 'i' (integers, booleans)
    and/or 'f' (floats); empty when it declares none."""
    kinds = set()
    for features in metric.features if isinstance(metric.features, list) else [metric.features]:
        feature = features.get("predictions") if features else None
        while feature is not None and not hasattr(feature, "dtype") and hasattr(feature, "feature"):
            feature = feature.feature  # a Sequence or List of values (multi-label rows)
        dtype = getattr(feature, "dtype", "")
        kinds |= {"f"} if dtype.startswith("float") else {"i"} if dtype.startswith(("int", "uint", "bool")) else set()
    return kinds


def _perfect(problem_type: str, references) -> tuple:
    """Scores that predict `references` exactly, and the references."""
    if problem_type == SINGLE:
        ids = _label_ids(references, "references")
        return np.eye(int(ids.max()) + 1)[ids], ids
    return references, references
