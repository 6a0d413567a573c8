"""What `finetune-recipes tune` hands on: best.yaml, the trials table (CSV and Markdown) and the picture of the
study (its optimisation history and Optuna's parameter importances)."""

from __future__ import annotations

import warnings
from pathlib import Path

import yaml

from ..atomic import atomic_write
from ..catalog import as_flags, flag_groups, recipe_config
from ..config import greater_is_better
from ..parsing import parse_config
from ..rendering import csv_text, markdown_table, png, pyplot


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
    atomic_write(directory / "trials.csv", csv_text(rows, columns))
    table = markdown_table(columns, ([row.get(c) for c in columns] for row in rows), fmt="{:.4g}")
    atomic_write(directory / "trials.md", f"{table}\n\nCommand: `{command}`\n")
    return ["trials.csv", "trials.md"]


def plot_study(study, metric: str, path: Path, optuna) -> bool:
    """The optimisation history (each complete trial and the best so far) and, with two or more complete
    trials, Optuna's parameter importances, side by side."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()

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
    atomic_write(path, png(fig))
    return True


def given_config(flags: list[str]) -> str | None:
    """The --config file among `flags`, if any."""
    found = [tokens for name, tokens in flag_groups(flags) if name == "config"]
    return (found[-1][1] if len(found[-1]) > 1 else found[-1][0].split("=", 1)[1]) if found else None


def write_best_config(study, best) -> None:
    """The recipe's own config with the command line's flags and the best trial's values on top: all that
    `python recipe.py --config best.yaml` needs to train the best trial's model again."""
    flags = [*study.flags, *as_flags(best.params)]
    parsed = parse_config(*study.types, args=flags, default_config=recipe_config(study.recipe), announce=False)
    values = {k: v for config in parsed for k, v in vars(config).items()}
    used = given_config(study.flags) or recipe_config(study.recipe)  # --config replaces the recipe's YAML
    keys = list(yaml.safe_load(Path(used).read_text()) or {}) if used else []
    keys += [name.removeprefix("no_") for name, _ in flag_groups(study.flags) if name != "config"]
    keys += list(best.params)
    chosen = {k: values[k] for k in dict.fromkeys(keys) if k in values and k not in ("feature_cache_dir", "report_to")}
    header = (
        f"# finetune-recipes tune {study.recipe.stem}: trial {best.number} of {len(study.study.trials)}, "
        f"validation {study.metric} {best.value:.4f}\n# python {study.recipe} --config {study.dir / 'best.yaml'}\n"
    )
    atomic_write(study.dir / "best.yaml", header + yaml.safe_dump(chosen, sort_keys=False))
