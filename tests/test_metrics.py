"""`classification_metrics`: accuracy and macro-F1 over a fixed label set, checked against scikit-learn."""

import warnings

import numpy as np
import pytest
import sklearn.metrics as skm

from finetune_recipes.metrics import classification_metrics

# (references, predictions, num_labels)
CASES = {
    "mixed": ([0, 1, 2, 0, 1, 2], [0, 2, 1, 0, 0, 1], 3),
    "binary": ([0, 0, 0, 1, 1, 0, 1, 0], [0, 1, 0, 1, 0, 0, 1, 0], 2),
    "missing_class": ([0, 0, 1, 1, 1], [0, 1, 1, 1, 0], 4),  # classes 2 and 3 never occur
    "predicted_absent_class": ([0, 0, 1, 1], [0, 2, 1, 1], 3),  # 2 is predicted but not in the references
    "perfect": ([0, 1, 2, 3, 2, 1], [0, 1, 2, 3, 2, 1], 4),
    "perfect_missing_class": ([0, 1, 1, 0], [0, 1, 1, 0], 3),
    "all_wrong": ([0, 1, 2, 0, 1], [1, 2, 0, 2, 0], 3),
    "single_class": ([1, 1, 1], [1, 1, 1], 2),
}


def _sk(fn, *args, **kwargs):
    # sklearn scores an undefined F1 as 0 by default (zero_division="warn") and warns: keep the value only
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.mark.parametrize("case", CASES)
def test_classification_metrics_match_sklearn(case):
    refs, preds, num_labels = CASES[case]
    got = classification_metrics(preds, refs, num_labels=num_labels)
    assert set(got) == {"accuracy", "f1_macro"}
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(refs, preds))
    expected = _sk(skm.f1_score, refs, preds, labels=list(range(num_labels)), average="macro")
    assert got["f1_macro"] == pytest.approx(expected)
    # without num_labels: sklearn's default, the labels seen in either array
    got = classification_metrics(preds, refs)
    assert got["f1_macro"] == pytest.approx(_sk(skm.f1_score, refs, preds, average="macro"))
    assert all(type(v) is float for v in got.values())


def test_num_labels_counts_a_class_absent_from_the_eval_set():
    refs = preds = [0, 1, 1, 0]
    assert classification_metrics(preds, refs) == {"accuracy": 1.0, "f1_macro": 1.0}
    # class 2 never occurs: F1 0/0 -> 0 like sklearn's default, so macro-F1 is 2/3 despite perfect predictions
    got = classification_metrics(preds, refs, num_labels=3)
    assert got == {"accuracy": 1.0, "f1_macro": pytest.approx(2 / 3)}


def test_zero_predictions_right():
    got = classification_metrics([1, 0, 1, 0], [0, 1, 0, 1], num_labels=2)
    assert got == {"accuracy": 0.0, "f1_macro": 0.0}


def test_accepts_numpy_and_torch():
    torch = pytest.importorskip("torch")
    refs, preds, n = CASES["mixed"]
    expected = classification_metrics(preds, refs, num_labels=n)
    assert classification_metrics(np.array(preds), np.array(refs, dtype=np.int32), num_labels=n) == expected
    assert classification_metrics(torch.tensor(preds), torch.tensor(refs), num_labels=n) == expected


@pytest.mark.parametrize(
    ("preds", "refs", "match"),
    [([0, 1], [0], "2 predictions for 1 references"), ([], [], "empty"), ([[0.1, 0.9]], [1], "1-D")],
)
def test_classification_metrics_rejects_bad_input(preds, refs, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(preds, refs)
