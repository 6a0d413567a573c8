"""What `finetune-recipes tune` hands on besides best.yaml: the trials table (CSV and Markdown) and the picture
of the study (its optimisation history and Optuna's parameter importances)."""

from __future__ import annotations

import csv
import io
import math
import warnings
from pathlib import Path

from ..atomic import atomic_write
from ..metrics import greater_is_better


def trial_rows(study, metric: str) -> list[dict]:
    rows = []
    for t in study.trials:
        row = {"trial": t.number, "state": t.state.name.lower(), f"validation {metric}": t.value}
        row |= {f"test {metric}": t.user_attrs.get(f"test_{metric}"), **t.params}
        row |= {"pruned at step": max(t.intermediate_values) if t.state.name == "PRUNED" else None}
        row |= {"wall time (s)": t.user_attrs.get("wall_time_s")}
        rows.append(row)
    return rows


def write_trials(study, metric: str, directory: Path, command: str) -> list[str]:
    rows = trial_rows(study, metric)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(directory / "trials.csv", table.getvalue())

    def cell(value) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "–"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    atomic_write(directory / "trials.md", "\n".join([*lines, "", f"Command: `{command}`", ""]))
    return ["trials.csv", "trials.md"]


def plot_study(study, metric: str, path: Path, optuna) -> bool:
    """The optimisation history (each complete trial and the best so far) and, with two or more complete
    trials, Optuna's parameter importances, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    if not complete:
        return False
    fig, (history, importance) = plt.subplots(1, 2, figsize=(11, 4))
    numbers, values = [t.number for t in complete], [t.value for t in complete]
    better = max if greater_is_better(metric) else min
    history.plot(numbers, values, "o", color="#4c72b0", label="trial")
    history.step(
        numbers, [better(values[: i + 1]) for i in range(len(values))], where="post", color="#dd8452", label="best"
    )
    history.set(xlabel="trial", ylabel=f"validation {metric}", title="Optimisation history")
    history.xaxis.set_major_locator(MaxNLocator(integer=True))
    history.legend()
    importances = {}
    if len(complete) >= 2:
        try:
            with warnings.catch_warnings():  # "importances will be equal" when every trial scored the same
                warnings.simplefilter("ignore")
                importances = optuna.importance.get_param_importances(study)
        except (RuntimeError, ValueError):  # too few distinct trials to attribute anything
            importances = {}
    if importances:
        names = list(importances)[::-1]
        importance.barh(names, [importances[n] for n in names], color="#55a868")
        importance.set(xlabel="share of the metric's variation (Optuna's importance)", title="Parameter importances")
    else:
        importance.axis("off")
        importance.text(0.5, 0.5, "importances need two complete trials\nwith different values", ha="center")
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, image.getvalue())
    return True
