"""Bundled evaluate metrics (accuracy, f1) and `classification_metrics`, checked against scikit-learn."""

import math
import socket
import warnings

import evaluate
import numpy as np
import pytest

from finetune_recipes.metrics import BUNDLED_METRICS, _cached_metric, classification_metrics, load_metric

skm = pytest.importorskip("sklearn.metrics")

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


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Every test runs as if offline: the bundled metrics must never reach for the network."""

    def refuse(*args, **kwargs):
        raise OSError("network access attempted in a metrics test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


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


@pytest.mark.parametrize(
    "kwargs",
    [
        {"average": "micro"},
        {"average": "weighted"},
        {"average": "macro", "labels": [0, 2]},  # a present label left out
        {"average": "macro", "labels": [0, 1, 2, 5]},  # a label that never occurs
        {"average": "weighted", "labels": [3, 4]},  # no support at all
        {"average": "macro", "sample_weight": [1, 2, 0.5, 1, 3, 1]},
        {"average": "micro", "labels": [1, 2]},
    ],
)
def test_f1_module_matches_sklearn_multiclass(kwargs):
    refs, preds, _ = CASES["mixed"]
    got = load_metric("f1").compute(predictions=preds, references=refs, **kwargs)["f1"]
    assert got == pytest.approx(_sk(skm.f1_score, refs, preds, **kwargs))


@pytest.mark.parametrize("pos_label", [0, 1])
def test_f1_module_binary_matches_sklearn(pos_label):
    refs, preds, _ = CASES["binary"]
    f1 = load_metric("f1")
    got = f1.compute(predictions=preds, references=refs, pos_label=pos_label)["f1"]
    assert got == pytest.approx(skm.f1_score(refs, preds, pos_label=pos_label))
    per_label = f1.compute(predictions=preds, references=refs, average=None)["f1"]
    np.testing.assert_allclose(per_label, skm.f1_score(refs, preds, average=None))


def test_f1_module_errors_like_sklearn():
    f1 = load_metric("f1")
    refs, preds, _ = CASES["mixed"]
    with pytest.raises(ValueError, match="average='binary'"):
        f1.compute(predictions=preds, references=refs)  # default average="binary" on 3 classes
    with pytest.raises(ValueError, match="pos_label=2"):
        f1.compute(predictions=[0, 1], references=[1, 0], pos_label=2)
    with pytest.raises(ValueError, match="average"):
        f1.compute(predictions=preds, references=refs, average="samples")


def test_f1_zero_division_options():
    f1 = load_metric("f1")
    kw = {"predictions": [0, 0], "references": [0, 0], "labels": [0, 1], "average": "macro"}
    assert f1.compute(**kw)["f1"] == 0.5
    assert f1.compute(**kw, zero_division=1.0)["f1"] == 1.0
    assert f1.compute(**kw, zero_division=float("nan"))["f1"] == 1.0  # the undefined label is left out
    assert math.isnan(f1.compute(**{**kw, "labels": [1]}, zero_division=float("nan"))["f1"])


def test_accuracy_module_options_match_sklearn():
    refs, preds, _ = CASES["mixed"]
    acc = load_metric("accuracy")
    weights = [1, 2, 0.5, 1, 3, 1]
    assert acc.compute(predictions=preds, references=refs) == {"accuracy": pytest.approx(1 / 3)}
    got = acc.compute(predictions=preds, references=refs, normalize=False)["accuracy"]
    assert got == skm.accuracy_score(refs, preds, normalize=False)
    got = acc.compute(predictions=preds, references=refs, sample_weight=weights)["accuracy"]
    assert got == pytest.approx(skm.accuracy_score(refs, preds, sample_weight=weights))


def test_load_metric_offline_returns_bundled_evaluate_modules():
    assert set(BUNDLED_METRICS) >= {"accuracy", "f1"}
    acc = load_metric("accuracy")
    assert isinstance(acc, evaluate.EvaluationModule)
    assert acc.name == "accuracy"
    assert acc.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 1]) == {"accuracy": 0.5}
    # the usual incremental API works too
    acc.add_batch(predictions=[1, 1], references=[1, 0])
    acc.add(prediction=2, reference=2)
    assert acc.compute() == {"accuracy": pytest.approx(2 / 3)}
    assert load_metric("f1").name == "f1"


def test_load_metric_unknown_name_raises_clear_value_error():
    with pytest.raises(ValueError, match=r"no_such_metric_xyz.*bundled: accuracy, f1") as err:
        load_metric("no_such_metric_xyz")
    assert "\n" not in str(err.value)


def test_modules_are_cached_and_quiet(capfd):
    _cached_metric.cache_clear()
    classification_metrics([0, 1], [0, 1])
    first = _cached_metric("accuracy")
    classification_metrics([0, 1, 1], [0, 1, 0], num_labels=2)
    assert _cached_metric("accuracy") is first
    assert len(first) == 0  # compute() left no stored examples behind
    out, err = capfd.readouterr()
    assert out == "" and err == ""
