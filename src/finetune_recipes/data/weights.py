"""Class weights for the loss (--class_weights): none, balanced from the train split's frequencies, or a JSON
file of the user's {label: weight}, checked as every input is."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..config import MULTI, REGRESSION
from ..errors import UserError, listing


def class_weights(labels: list, task, spec: str) -> list[float] | None:
    """none; balanced: n / (classes × count) per class (sklearn's rule), or per label (negatives / positives)
    as BCE's pos_weight; or a JSON file {label: weight}, unnamed labels weighing 1. `task`: a data.Task."""
    if spec == "none":
        return None
    if task.problem_type == REGRESSION:
        raise UserError("class_weights weigh classes, and regression has none; drop --class_weights")
    if spec == "balanced":
        if task.problem_type == MULTI:
            positives = np.asarray(labels, dtype=np.float64).sum(0)
            return [float((len(labels) - p) / p) if p else 1.0 for p in positives]
        counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=task.num_labels)
        return [float(len(labels) / (task.num_labels * c)) if c else 1.0 for c in counts]
    path = Path(spec).expanduser()
    try:
        given = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"class_weights {spec} is not none, balanced or an existing JSON file") from None
    except (OSError, ValueError) as error:
        raise UserError(
            f"cannot read class weights from {spec} ({error.__class__.__name__}); pass a JSON file"
        ) from None
    if not isinstance(given, dict):
        raise UserError(f'class weights file {spec} is not a mapping; write {{"label": weight, ...}}')
    unknown = sorted(set(map(str, given)) - set(task.label_names))
    if unknown:
        raise UserError(
            f"class weights file {spec} names '{unknown[0]}', which is not a label (labels: "
            f"{listing(task.label_names)}); fix that name"
        )
    weights = {str(k): v for k, v in given.items()}
    bad = next(
        (
            k
            for k, v in weights.items()
            if isinstance(v, bool) or not (isinstance(v, int | float) and v > 0 and math.isfinite(v))
        ),
        None,
    )
    if bad is not None:
        raise UserError(f"class weight of '{bad}' in {spec} is {weights[bad]!r}; weights must be positive numbers")
    return [float(weights.get(name, 1.0)) for name in task.label_names]
