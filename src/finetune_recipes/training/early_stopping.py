"""Early stopping: which evaluation is the best so far, and when to stop, as a small value the loop feeds."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import greater_is_better
from ..errors import UserError


@dataclass
class EarlyStopping:
    """transformers' `EarlyStoppingCallback` as a value the recipe's loop feeds each evaluation.

    `update(step, metrics)` says whether the evaluation is the best so far by `metric` (the loop then keeps its
    weights); `stop` turns true once `patience` evaluations in a row brought no improvement. Without a metric
    nothing is ranked and nothing stops; without a patience the best is kept and the run goes on. Its fields go
    into every checkpoint (`state_dict`), so a resumed run goes on counting exactly where it stood.
    """

    metric: str | None = None
    patience: int | None = None
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0

    def update(self, step: int, metrics: dict) -> bool:
        """Feeds one evaluation; True when it is the best so far (an undefined value, such as a correlation of
        constant predictions, never is)."""
        if not self.metric:
            return False
        if self.metric not in metrics:
            raise UserError(f"metric_for_best_model '{self.metric}' is not one of {', '.join(metrics)}")
        value, sign = metrics[self.metric], 1 if greater_is_better(self.metric) else -1
        if value is None or (self.best_metric is not None and sign * value <= sign * self.best_metric):
            self.evals_without_improvement += 1
            return False
        self.best_metric, self.best_step, self.evals_without_improvement = value, step, 0
        return True

    @property
    def stop(self) -> bool:
        return self.patience is not None and self.evals_without_improvement >= self.patience

    def state_dict(self) -> dict:
        """What a checkpoint keeps: the counts, not the settings (those come from the resumed run's flags)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("metric", "patience")}
