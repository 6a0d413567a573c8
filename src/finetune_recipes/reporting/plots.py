"""The evaluation pictures, drawn with matplotlib (no display needed) from what a run saved: the confusion
matrix (single-label), per-label scores (multi-label), predicted against true (regression), and the
training curves."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import ConfusionMatrixDisplay

from ..config import MULTI, SINGLE, greater_is_better
from ..rendering import png, pyplot

plt = pyplot()


def confusion_matrix_png(matrix: list[list[int]], label_names: list[str], split: str) -> bytes:
    """Counts, true class down, predicted across: sklearn's display of the matrix results.json holds."""
    size = max(4.5, 0.6 * len(label_names) + 2.5)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    display = ConfusionMatrixDisplay(np.asarray(matrix), display_labels=label_names)
    display.plot(ax=ax, cmap="Blues", colorbar=False, xticks_rotation=45 if len(label_names) > 4 else "horizontal")
    ax.set_title(f"Confusion matrix ({split})")
    return png(fig)


def per_label_png(per_class: dict[str, dict[str, float]], split: str) -> bytes:
    """Precision, recall and F1 of each label, side by side (multi-label, at the decision thresholds)."""
    names = list(per_class)
    y = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.45 * len(names) + 1.5)))
    for offset, key, color in ((-0.27, "precision", "#4c72b0"), (0, "recall", "#dd8452"), (0.27, "f1", "#55a868")):
        ax.barh(y + offset, [per_class[n][key] for n in names], height=0.26, label=key, color=color)
    ax.set(yticks=y, yticklabels=[f"{n} ({per_class[n]['support']})" for n in names], xlim=(0, 1))
    ax.set(xlabel="score", title=f"Per-label scores ({split}; support in brackets)")
    ax.legend(loc="lower right", fontsize=8)
    return png(fig)


def scatter_png(targets: np.ndarray, predictions: np.ndarray, split: str, name: str) -> bytes:
    """Predicted against true, with the diagonal a perfect model would sit on."""
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(targets, predictions, s=10, alpha=0.6, color="#4c72b0")
    low, high = float(min(targets.min(), predictions.min())), float(max(targets.max(), predictions.max()))
    ax.plot([low, high], [low, high], color="grey", linewidth=1, linestyle="--")
    ax.set(xlabel=f"true {name}", ylabel=f"predicted {name}", title=f"Predicted against true ({split})")
    return png(fig)


def training_curves_png(losses: list[dict], history: list[dict], metric: str) -> bytes:
    """The training loss (its logged means) and the evaluation metric over optimizer steps."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    if losses:
        left.plot([r["step"] for r in losses], [r["loss"] for r in losses], color="#4c72b0", marker=".")
    left.set(xlabel="optimizer step", ylabel="training loss", title="Training loss")
    if history:
        right.plot([h["step"] for h in history], [h[metric] for h in history], color="#55a868", marker="o")
    better = "higher" if greater_is_better(metric) else "lower"
    right.set(xlabel="optimizer step", ylabel=metric, title=f"Validation {metric} ({better} is better)")
    return png(fig)


def reliability_png(bins: dict[str, list[dict]], split: str) -> bytes:
    """Accuracy against confidence per bin, before and after calibration, beside the diagonal a calibrated model
    sits on; below, how many predictions each bin holds."""
    fig, (top, counts) = plt.subplots(2, 1, figsize=(5.5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], color="grey", linewidth=1, linestyle="--", label="calibrated")
    for key, color, label in (("before", "#dd8452", "as trained"), ("after", "#4c72b0", "calibrated scores")):
        filled = [b for b in bins.get(key, []) if b["count"]]
        if filled:
            top.plot([b["confidence"] for b in filled], [b["accuracy"] for b in filled], marker="o", color=color,
                     label=label)  # fmt: skip
            width = filled[0]["high"] - filled[0]["low"]
            offset = -width / 4 if key == "before" else width / 4
            middles = [(b["low"] + b["high"]) / 2 + offset for b in filled]
            counts.bar(middles, [b["count"] for b in filled], width=width / 2, color=color)
    top.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1.02), title=f"Reliability ({split})")
    top.legend(loc="upper left", fontsize=8)
    counts.set(xlabel="confidence", ylabel="predictions")
    return png(fig)


def evaluation_pictures(results: dict, label_names: list[str], regression_pairs=None) -> dict[str, bytes]:
    """File name → PNG bytes for the run's problem type, from results.json (and, for regression, the
    (targets, predictions) of the predictions file)."""
    problem_type = results["task"]["problem_type"]
    split = "test" if "test" in results.get("report", {}) else "validation"
    report = results.get("report", {}).get(split, {})
    metric = {SINGLE: "accuracy", MULTI: "f1_micro"}.get(problem_type, "mse")
    pictures = {"training_curves.png": training_curves_png(results.get("loss_history", []), results["history"], metric)}
    if problem_type == SINGLE and "confusion_matrix" in report:
        pictures["confusion_matrix.png"] = confusion_matrix_png(report["confusion_matrix"], label_names, split)
    elif problem_type == MULTI and "per_class" in report:
        pictures["per_label_scores.png"] = per_label_png(report["per_class"], split)
    elif regression_pairs is not None:
        pictures["predicted_vs_true.png"] = scatter_png(*regression_pairs, split, label_names[0])
    reliability = results.get("calibration", {}).get("reliability", {})
    where = "test" if "test" in reliability else "eval"
    if where in reliability:
        pictures["reliability.png"] = reliability_png(reliability[where], "test" if where == "test" else "validation")
    return pictures
