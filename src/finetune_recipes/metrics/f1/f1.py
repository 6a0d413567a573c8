"""F1 as an `evaluate` metric module, numpy only, loadable offline with `evaluate.load(<this dir>)`.

Same inputs and output as the Hub's `evaluate-metric/f1` (single-label case), computed like
`sklearn.metrics.f1_score` without needing scikit-learn: per label, F1 = 2 TP / (2 TP + FP + FN), and a
label whose denominator is 0 (never true, never predicted) scores `zero_division` (sklearn's "warn" = 0.0).
This file is self-contained on purpose: `evaluate.load` copies it alone into its modules cache and imports it
from there, so it must not import anything from `finetune_recipes`.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
The F1 score is the harmonic mean of the precision and recall. It can be computed with the equation:
F1 = 2 * (precision * recall) / (precision + recall) = 2 TP / (2 TP + FP + FN).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): Predicted labels.
    references (`list` of `int`): Ground truth labels.
    labels (`list` of `int`): The set of labels to include when `average` is not 'binary', and their order
        when `average` is None. Labels present in the data can be excluded, for example to compute a
        multiclass average ignoring a majority negative class; labels absent from the data are included and
        score `zero_division` if never predicted either. Defaults to the sorted labels present in
        `predictions` or `references`.
    pos_label (`int`): The positive class when `average` is 'binary'. Defaults to 1.
    average (`string`): One of 'binary' (default; only for binary data), 'micro' (global TP/FP/FN counts),
        'macro' (unweighted mean of per-label F1), 'weighted' (mean weighted by the labels' support) or None
        (per-label scores, returned as an array).
    sample_weight (`list` of `float`): Sample weights. Defaults to None.
    zero_division (`float`): Value of a label's F1 when it has no true and no predicted samples:
        0.0 (default, like sklearn), 1.0, or nan (nan labels are left out of the average).

Returns:
    f1 (`float` or `array` of `float`): F1 score or list of F1 scores, depending on `average`.

Examples:
    >>> f1_metric = evaluate.load("path/to/metrics/f1")
    >>> f1_metric.compute(predictions=[0, 2, 1, 0, 0, 1], references=[0, 1, 2, 0, 1, 2], average="macro")
    {'f1': 0.26666666666666666}
"""

_CITATION = """
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and Varoquaux, G. and Gramfort, A. and Michel, V. and Thirion, B. and Grisel, O. and
          Blondel, M. and Prettenhofer, P. and Weiss, R. and Dubourg, V. and Vanderplas, J. and Passos, A. and
          Cournapeau, D. and Brucher, M. and Perrot, M. and Duchesnay, E.},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""

_AVERAGES = ("binary", "micro", "macro", "weighted", None)


def _label_index(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Position of each value in `labels`, or -1 where the value is not one of them."""
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    pos = np.clip(np.searchsorted(sorted_labels, values), 0, len(labels) - 1)
    return np.where(sorted_labels[pos] == values, order[pos], -1)


def _safe_divide(num: np.ndarray, den: np.ndarray, zero_division: float) -> np.ndarray:
    out = np.full(num.shape, zero_division, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def f1_score(
    references, predictions, labels=None, pos_label=1, average="binary", sample_weight=None, zero_division=0.0
):
    """numpy equivalent of `sklearn.metrics.f1_score` for 1-D (binary or multiclass) label arrays."""
    y_true = np.asarray(references).reshape(-1)
    y_pred = np.asarray(predictions).reshape(-1)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"predictions ({len(y_pred)}) and references ({len(y_true)}) differ in length")
    if average not in _AVERAGES:
        raise ValueError(f"average has to be one of {_AVERAGES}, got {average!r}")
    zero_division = float(zero_division)
    if not (zero_division in (0.0, 1.0) or np.isnan(zero_division)):
        raise ValueError(f"zero_division has to be 0.0, 1.0 or nan, got {zero_division}")
    weights = np.ones(len(y_true)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)

    present = np.union1d(y_true, y_pred)
    if average == "binary":
        if len(present) > 2:
            raise ValueError(
                "Target is multiclass but average='binary'. Please choose another average setting, "
                "one of [None, 'micro', 'macro', 'weighted']."
            )
        if pos_label not in present and len(present) == 2:
            raise ValueError(f"pos_label={pos_label} is not a valid label. It should be one of {present.tolist()}")
        labels = np.asarray([pos_label])
    elif labels is None:
        labels = present
    else:
        labels = np.asarray(labels).reshape(-1)
    if len(labels) == 0:  # no data and no labels: nothing to score
        return float(zero_division) if average is not None else np.zeros(0)

    idx_true = _label_index(y_true, labels)
    idx_pred = _label_index(y_pred, labels)
    hit = (y_true == y_pred) & (idx_true >= 0)
    n = len(labels)
    tp = np.bincount(idx_true[hit], weights=weights[hit], minlength=n)
    true_sum = np.bincount(idx_true[idx_true >= 0], weights=weights[idx_true >= 0], minlength=n)
    pred_sum = np.bincount(idx_pred[idx_pred >= 0], weights=weights[idx_pred >= 0], minlength=n)

    if average == "micro":
        tp, true_sum, pred_sum = (
            tp.sum(keepdims=True),
            true_sum.sum(keepdims=True),
            pred_sum.sum(keepdims=True),
        )
    f1 = _safe_divide(2 * tp, true_sum + pred_sum, zero_division)
    if average is None:
        return f1

    keep = ~np.isnan(f1)
    if not keep.any():
        return float("nan")
    if average == "weighted" and true_sum[keep].sum() > 0:
        return float(np.average(f1[keep], weights=true_sum[keep]))
    return float(f1[keep].mean())  # micro/binary (one value), macro, weighted without any support (like sklearn)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.f1_score.html"],
        )

    def _compute(
        self,
        predictions,
        references,
        labels=None,
        pos_label=1,
        average="binary",
        sample_weight=None,
        zero_division=0.0,
    ):
        score = f1_score(
            references,
            predictions,
            labels=labels,
            pos_label=pos_label,
            average=average,
            sample_weight=sample_weight,
            zero_division=zero_division,
        )
        return {"f1": score if isinstance(score, np.ndarray) else float(score)}
