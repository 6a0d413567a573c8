"""What `finetune-recipes compare` hands on: the table over strategies (mean ± std and a 95% interval over
seeds), the verdict under it, the per-run CSV and the chart."""

from __future__ import annotations

import math
import os
import platform
import statistics
import warnings
from pathlib import Path

from ..atomic import atomic_write
from ..config import METRICS, MULTI, REGRESSION, SINGLE, greater_is_better
from ..rendering import cell, csv_text, markdown_table, png, pyplot

# The two metrics a table shows per problem type, the first the primary one (the plot's, and what a row says).
TABLE_METRICS = {SINGLE: ("accuracy", "f1_macro"), MULTI: ("f1_micro", "f1_macro"), REGRESSION: ("mse", "r2")}
BOUNDED = {"accuracy", "f1_macro", "f1_micro", "f1_samples", "subset_accuracy"}  # shares, in [0, 1]
COLUMNS = [  # results key, title, format; the metric columns go after the strategy
    ("strategy", "strategy", "{}"),
    ("trainable_params", "trainable params", "{:,}"),
    ("wall_time_s", "wall time (s)", "{:.1f}"),
    ("train_runtime_s", "train time (s)", "{:.1f}"),
    ("train_samples_per_second", "train samples/s", "{:.1f}"),
    ("peak_memory_mb", "peak memory (MB)", "{:,.0f}"),
    ("status", "status", "{}"),
]


def table_metrics(rows: list[dict]) -> tuple[str, ...]:
    """The metrics to show: those of the problem type the rows report (single-label when none ran), then any
    `evaluate` metric a run computed (--metric_name)."""
    problem_type = next((r["task"]["problem_type"] for r in rows if r.get("task")), SINGLE)
    extra = [m for r in rows if r.get("task") for m in r["task"].get("metrics", []) if m not in METRICS[problem_type]]
    return (*TABLE_METRICS[problem_type], *dict.fromkeys(extra))


def reported_split(rows: list[dict]) -> str:
    """`test` when the runs have test metrics (the table reports those; validation chose), else `eval`."""
    metric = table_metrics(rows)[0]
    return "test" if any(f"test_{metric}" in r for r in rows if r.get("status") == "ok") else "eval"


def summarise(runs: list[dict], prefix: str, metrics: tuple[str, ...]) -> list[dict]:
    """One row per strategy: the mean, standard deviation (n - 1) and 95% t-interval half-width of each
    metric over its seeds' runs, and the mean of the costs."""
    from scipy import stats

    rows: dict[str, dict] = {}
    for strategy in dict.fromkeys(r["strategy"] for r in runs):
        mine = [r for r in runs if r["strategy"] == strategy]
        ok = [r for r in mine if r.get("status") == "ok"]
        row: dict = {"strategy": strategy, "runs": len(ok), "task": next((r["task"] for r in ok if "task" in r), None)}
        row["status"] = (
            "ok"
            if len(ok) == len(mine)
            else f"{len(ok)}/{len(mine)} ok: " + next(r["status"] for r in mine if r.get("status") != "ok")
        )
        for metric in metrics:
            values = [r[f"{prefix}_{metric}"] for r in ok if r.get(f"{prefix}_{metric}") is not None]  # None: undefined
            row[f"values_{metric}"] = values
            if values:
                row[f"{prefix}_{metric}"] = sum(values) / len(values)
            if len(values) > 1:
                std = statistics.stdev(values)
                row[f"std_{metric}"] = std
                row[f"ci95_{metric}"] = stats.t.ppf(0.975, len(values) - 1) * std / math.sqrt(len(values))
        for key, _, _ in COLUMNS[1:-1]:
            values = [r[key] for r in ok if isinstance(r.get(key), int | float)]
            if values:
                row[key] = values[0] if len(set(values)) == 1 else sum(values) / len(values)
        rows[strategy] = row
    return list(rows.values())


def mean_cell(row: dict, prefix: str, metric: str) -> str:
    mean = cell(row.get(f"{prefix}_{metric}"))
    return f"{mean} ± {row[f'std_{metric}']:.4f}" if f"std_{metric}" in row else mean


def verdict(rows: list[dict], prefix: str, metric: str, seeds: int) -> str:
    """A few plain sentences: the best strategy, those within the noise of it (Welch's t-test over the seeds,
    p ≥ 0.05), the cheapest of those, and where the TF-IDF baseline stands."""
    from scipy import stats

    baseline = next((r for r in rows if r["strategy"].startswith("tfidf")), None)
    ranked = [r for r in rows if r is not baseline and f"{prefix}_{metric}" in r]
    if not ranked:
        finished = [r["strategy"] for r in rows if r is not baseline and r.get("status") == "ok"]
        where = "test" if prefix == "test" else "validation"
        if finished:  # they ran, but report no score on the split the table ranks by
            return f"No strategy reports {where} {metric} ({', '.join(finished)} finished): read their results.json."
        return "No strategy finished: read the logs in logs/."
    sign = 1 if greater_is_better(metric) else -1
    ranked.sort(key=lambda r: -sign * r[f"{prefix}_{metric}"])
    best, where = ranked[0], "test" if prefix == "test" else "validation"
    lines = [f"Best on {where} {metric}: {best['strategy']} ({mean_cell(best, prefix, metric)})."]
    if seeds < 2:
        lines.append(
            "One seed gives no estimate of the noise, so differences of a point or less may be chance; "
            "run with --seeds 3 to tell the strategies apart."
        )
        tied = [best]
    elif len(best[f"values_{metric}"]) < 2:  # a test needs two runs a side: no claim about the noise
        lines.append("It has fewer than 2 finished runs, so nothing can be told apart from it; see the status column.")
        tied = [best]
    else:

        def same(row: dict) -> bool:
            a, b = best[f"values_{metric}"], row[f"values_{metric}"]
            if statistics.pvariance(a) + statistics.pvariance(b) == 0:  # no spread on either side
                return a[0] == b[0]
            with warnings.catch_warnings():  # runs alike to the last digits: scipy warns of precision loss, and
                warnings.simplefilter("ignore", RuntimeWarning)  # its p-value still says what the test can tell
                return bool(stats.ttest_ind(a, b, equal_var=False).pvalue >= 0.05)

        tested = [r for r in ranked[1:] if len(r[f"values_{metric}"]) >= 2]
        untested = [r["strategy"] for r in ranked[1:] if len(r[f"values_{metric}"]) < 2]
        tied = [best, *(r for r in tested if same(r))]
        others = [r["strategy"] for r in tied[1:]]
        if others:
            lines.append(f"Within the noise of it at {seeds} seeds (Welch's t-test, p ≥ 0.05): {', '.join(others)}.")
        elif tested:
            lines.append(
                f"Every other strategy{' tested' if untested else ''} is below it beyond the noise of {seeds} seeds "
                "(Welch's t-test)."
            )
        if untested:
            lines.append(f"Not tested, with fewer than 2 finished runs: {', '.join(untested)}.")
    if len(tied) > 1 and all("wall_time_s" in r for r in tied):
        cheapest = min(tied, key=lambda r: r["wall_time_s"])
        lines.append(
            f"The best is also the cheapest of these ({best['wall_time_s']:.0f} s a run)."
            if cheapest is best
            else f"The cheapest of these: {cheapest['strategy']}, {cheapest['wall_time_s']:.0f} s a run "
            f"(the best took {best['wall_time_s']:.0f} s)."
        )
    if baseline is not None and f"{prefix}_{metric}" in baseline:
        value = baseline[f"{prefix}_{metric}"]
        beaten = [r["strategy"] for r in ranked if sign * r[f"{prefix}_{metric}"] > sign * value]
        lines.append(f"The TF-IDF baseline scores {value:.4f}: {len(beaten)} of {len(ranked)} strategies do better.")
    return " ".join(lines)


def split_note(rows: list[dict], prefix: str) -> str:
    if prefix != "test":
        return "Scores are on validation: the data has no labelled test split and none was held out."
    held = next((r["task"].get("held_out_test") for r in rows if r.get("task")), None)
    source = (
        f"{held:g}% of train held out before training (stratified, seed 0), as the data has no test split"
        if held
        else "the data's test split"
    )
    return f"Scores are on test ({source}); validation chose the best weights and, with --trials, the settings."


def write_table(rows: list[dict], runs: list[dict], out: Path, command: str, seeds: int) -> str:
    """comparison.md (per strategy, with the verdict, the machine and the command) and comparison.csv (per
    run, validation and test metrics); returns the Markdown."""
    metrics = table_metrics(rows)
    prefix = reported_split(rows)
    where = "test" if prefix == "test" else "validation"
    heading = [f"{where} {m}" + (" (mean ± std)" if seeds > 1 else "") for m in metrics]
    header = ["strategy", *heading, *([f"95% CI of {metrics[0]}"] if seeds > 1 else [])]
    header += [title for _, title, _ in COLUMNS[1:]]
    lines = []
    for row in rows:
        cells = [row["strategy"], *(mean_cell(row, prefix, m) for m in metrics)]
        if seeds > 1:
            mean, half = row.get(f"{prefix}_{metrics[0]}"), row.get(f"ci95_{metrics[0]}")
            low, high = (0.0, 1.0) if metrics[0] in BOUNDED else (-math.inf, math.inf)  # a share cannot leave [0, 1]
            interval = f"{max(low, mean - half):.4f} to {min(high, mean + half):.4f}" if half is not None else "–"
            cells.append(interval)
        cells += [cell(row.get(key), fmt) for key, _, fmt in COLUMNS[1:]]
        lines.append(cells)
    lines = [markdown_table(header, lines)]
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"
    text = [*lines, "", verdict(rows, prefix, metrics[0], seeds), "", split_note(rows, prefix), ""]
    markdown = "\n".join([*text, f"Machine: {machine}. Command: `{command}`", ""])
    atomic_write(out / "comparison.md", markdown)
    keys = [
        "strategy",
        "seed",
        *(f"{p}_{m}" for p in ("eval", "test") for m in metrics),
        *(k for k, _, _ in COLUMNS[1:]),
    ]
    atomic_write(out / "comparison.csv", csv_text(runs, keys))
    return markdown


def plot(rows: list[dict], path: Path) -> None:
    """The reported metric (with its standard deviation over seeds) and wall time per strategy, side by side."""
    plt = pyplot()
    metric, prefix = table_metrics(rows)[0], reported_split(rows)
    done = [r for r in rows if f"{prefix}_{metric}" in r and "wall_time_s" in r]
    if not done:
        return
    names = [r["strategy"] for r in done]
    values = [r[f"{prefix}_{metric}"] for r in done]
    errors = [r.get(f"std_{metric}", 0.0) for r in done]
    fig, (acc, wall) = plt.subplots(1, 2, figsize=(11, 4.2))
    acc.barh(names, values, xerr=errors, capsize=3, color="#4c72b0")
    low = min(v - e for v, e in zip(values, errors, strict=True))
    limits = (max(0.0, low - 0.02), 1.0) if greater_is_better(metric) else (0.0, max(values) * 1.15 or 1.0)
    where = "test" if prefix == "test" else "validation"
    acc.set(xlabel=f"{where} {metric}" + ("" if greater_is_better(metric) else " (lower is better)"), xlim=limits)
    wall.barh(names, [r["wall_time_s"] for r in done], color="#dd8452")
    wall.set(xlabel="wall time per run (s)")
    wall.set_yticklabels([])
    for ax, key, fmt, past in ((acc, f"{prefix}_{metric}", "{:.3f}", errors), (wall, "wall_time_s", "{:.0f}", None)):
        for i, r in enumerate(done):  # the label after the error bar, not on it
            ax.text(r[key] + (past[i] if past else 0), i, " " + fmt.format(r[key]), va="center", fontsize=8)
    seeds = max(r.get("runs", 1) for r in done)
    fig.suptitle(
        "Transfer-learning strategies on the same data and budget" + (f", {seeds} seeds (± std)" if seeds > 1 else "")
    )
    atomic_write(path, png(fig, dpi=120))
