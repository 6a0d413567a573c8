"""Evaluation metrics for the recipes: `evaluate` modules shipped in the package first, the Hub second.

The recipes report accuracy and macro-F1. Loading them with `evaluate.load("accuracy")` fetches the metric
script from the Hugging Face Hub, which fails offline, so this package bundles numpy-only versions of
`accuracy` and `f1` under `metrics/<name>/<name>.py` and resolves a name to those before asking the Hub.

Bundled modules are loaded with `evaluate.load(<their directory>)`, evaluate's own local-script path (it works
with evaluate 0.4.6 + datasets 5): the result is a regular `evaluate.EvaluationModule` (same `compute`,
`add_batch`, `features`, ...) as the Hub's, with the same inputs and output keys.

Distributed runs: `classification_metrics` expects predictions that are already gathered (accelerate's
`gather_for_metrics`, or the Trainer's `compute_metrics`) and computes in-process on each rank. Modules are
loaded with `keep_in_memory=True`, so `compute` writes no Arrow cache file and takes no file lock; the only
disk access is evaluate copying the bundled script into its modules cache (`HF_MODULES_CACHE`) once, under a
file lock, so several processes on one machine can load at the same time. evaluate's own cross-process
gathering (`num_process`/`process_id`, rendez-vous lock files) is only used when `num_process > 1` is
passed, which we never do (the default is 1).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from pathlib import Path

import evaluate
import numpy as np

__all__ = ["BUNDLED_METRICS", "bundled_metric_path", "classification_metrics", "load_metric"]

_HERE = Path(__file__).resolve().parent

#: Metric names shipped in the package: each is a directory `<name>/` holding the script `<name>.py`.
BUNDLED_METRICS: tuple[str, ...] = tuple(
    sorted(p.name for p in _HERE.iterdir() if p.is_dir() and (p / f"{p.name}.py").is_file())
)


def bundled_metric_path(name: str) -> Path | None:
    """Directory of the bundled metric `name` (what `evaluate.load` accepts), or None if there is none."""
    return _HERE / name if name in BUNDLED_METRICS else None


_TRUE = {"1", "ON", "YES", "TRUE"}


def _hub_offline() -> bool:
    """Whether the user asked for no Hub access, read from the environment at call time."""
    return any(os.environ.get(var, "").upper() in _TRUE for var in ("HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE"))


@contextlib.contextmanager
def _evaluate_offline(offline: bool) -> Iterator[None]:
    # evaluate 0.4.6 ignores HF_HUB_OFFLINE: it only knows its own HF_EVALUATE_OFFLINE, read once at import,
    # and otherwise tries the Hub with `requests` (3 attempts and 1.5 s of sleeps for a name it cannot
    # reach) before falling back to the scripts it cached earlier. Its modules read `evaluate.config` at
    # call time, so setting the flag there for the duration of the call makes it skip straight to that cache.
    saved = evaluate.config.HF_EVALUATE_OFFLINE
    evaluate.config.HF_EVALUATE_OFFLINE = saved or offline
    try:
        yield
    finally:
        evaluate.config.HF_EVALUATE_OFFLINE = saved


def load_metric(name: str, **kwargs) -> evaluate.EvaluationModule:
    """Load the evaluation module `name`: the one bundled in this package if any, else `evaluate.load(name)`.

    `name` can also be a Hub id (`"evaluate-metric/bleu"`) or a path to a local metric script or directory.
    With `HF_HUB_OFFLINE=1` (or `HF_EVALUATE_OFFLINE=1`) set, a name that is not bundled is only looked up
    in evaluate's cache of scripts fetched earlier, never on the network.
    `kwargs` go to `evaluate.load` (e.g. `config_name`, `experiment_id`); `keep_in_memory` defaults to True
    (no Arrow cache file or lock on disk) unless `num_process > 1` is passed for evaluate's own file-based
    distributed gathering, which needs it False. Each call returns a new module instance (it holds the state
    of `add_batch`); the script itself is cached by evaluate, so a repeated load costs milliseconds.

    Raises:
        ValueError: no bundled metric has that name and `evaluate.load` cannot find it (offline, unknown name,
            missing local path).
    """
    kwargs.setdefault("keep_in_memory", kwargs.get("num_process", 1) == 1)
    path = bundled_metric_path(name)
    if path is not None:
        return evaluate.load(str(path), **kwargs)
    try:
        with _evaluate_offline(_hub_offline()):
            return evaluate.load(name, **kwargs)
    except OSError as err:  # FileNotFoundError, ConnectionError (incl. evaluate's OfflineModeIsEnabled)
        reason = " ".join(str(err).split()) or type(err).__name__
        raise ValueError(
            f"Unknown metric {name!r}: it is not bundled with finetune_recipes (bundled: "
            f"{', '.join(BUNDLED_METRICS)}) and evaluate.load could not load it ({reason})"
        ) from err


@functools.cache
def _cached_metric(name: str) -> evaluate.EvaluationModule:
    # Reused across calls: `compute(predictions=..., references=...)` starts from and leaves an empty state.
    return load_metric(name)


def _as_label_array(values, what: str) -> np.ndarray:
    if hasattr(values, "detach"):  # torch tensor, possibly on an accelerator
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{what} must be a 1-D sequence of label ids, got shape {array.shape}")
    if array.size and array.dtype.kind not in "iub":
        raise ValueError(f"{what} must hold integer label ids, got dtype {array.dtype}")
    return array.astype(np.int64)


def classification_metrics(predictions, references, num_labels: int | None = None) -> dict[str, float]:
    """Accuracy and macro-F1 of predicted label ids against reference label ids.

    Args:
        predictions: predicted label ids (list, numpy array or tensor, 1-D; take the argmax of logits first).
        references: reference label ids, same length.
        num_labels: number of classes of the task. When given, macro-F1 averages over every label id in
            `range(num_labels)`, i.e. `sklearn.metrics.f1_score(references, predictions,
            labels=range(num_labels), average="macro")`. When None, it averages over the labels that occur
            in `predictions` or `references`, like sklearn's default.

    Returns:
        `{"accuracy": float, "f1_macro": float}`.

    Why `range(num_labels)`: sklearn (and the Hub's f1) averages by default over the labels *seen* in either
    array, so on a small eval set the set of averaged classes changes with what the model happens to predict,
    and scores are not comparable between runs. With a fixed label set every class counts, using sklearn's
    rule for classes that are absent from both arrays: their F1 is 0/0, scored 0 (sklearn's
    `zero_division="warn"` default), so such a class pulls macro-F1 down even when every prediction is
    right: perfect predictions on an eval set missing one of 4 classes give 0.75. That is deliberate: the
    model was not shown to handle that class, and the number matches the sklearn call above.
    """
    preds = _as_label_array(predictions, "predictions")
    refs = _as_label_array(references, "references")
    if len(preds) != len(refs):
        raise ValueError(f"got {len(preds)} predictions for {len(refs)} references")
    if len(refs) == 0:
        raise ValueError("cannot compute metrics on an empty evaluation set")
    labels = None
    if num_labels is not None:
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        labels = list(range(num_labels))

    accuracy = _cached_metric("accuracy").compute(predictions=preds, references=refs)
    f1 = _cached_metric("f1").compute(predictions=preds, references=refs, average="macro", labels=labels)
    return {"accuracy": float(accuracy["accuracy"]), "f1_macro": float(f1["f1"])}
