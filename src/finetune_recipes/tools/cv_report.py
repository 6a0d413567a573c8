"""What `finetune-recipes cv` hands on: the out-of-fold predictions, each fold's metrics with their mean, spread
and 95% interval (cv.md, cv.csv), a picture of the spread (cv.png), the test split scored by every fold model
and by their averaged probabilities, and the label audit's section when there is one."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..atomic import atomic_write, is_temporary
from ..config import METRICS, MULTI, REGRESSION, SINGLE
from ..errors import UserError
from ..metrics import task_metrics
from ..ownership import refuse_unowned, write_manifest
from ..readback import read_json
from ..rendering import cell, csv_text, markdown_table, png, pyplot
from ..reporting.predictions import read_csv, read_label_list, scores_of
from .compare_report import summarise

OOF = "oof_predictions.csv"
# What cv writes (and, before it kept a manifest, went by: ownership.adopt_earlier), beside its fold_K/ folders.
CV_NAMES = ("cv.md", "cv.csv", "cv.png", "cv.json", OOF, "label_issues.csv", "folds", "logs", "feature_cache")


def written_before_manifests(name: str) -> bool:
    return name in CV_NAMES or re.fullmatch(r"fold_\d+", name) is not None or is_temporary(name)


def out_of_fold(out: Path, plan: dict) -> list[dict]:
    """Every pooled example once, in pool order: fold k's run's validation predictions, with the example's
    index in the pool (`id`) and its fold. Each row is checked against the fold's own validation file, so a
    fold run on other data is refused, never mixed in."""
    fold_of = np.asarray(plan["fold_of"])
    rows: list[dict | None] = [None] * len(fold_of)
    for fold in range(plan["folds"]):
        members = np.flatnonzero(fold_of == fold)
        held = [
            json.loads(line)[plan["text_column"]]
            for line in _read(out / "folds" / f"fold_{fold}" / "validation.jsonl").split("\n")
            if line
        ]
        predicted = read_csv(_read(out / f"fold_{fold}" / "predictions_validation.csv"))
        if len(predicted) != len(members) or [r["text"] for r in predicted] != held:
            raise UserError(
                f"fold {fold}'s run predicted other examples than its {len(members)} held-out ones; "
                "run cv again with --overwrite_output_dir"
            )
        for row, index in zip(predicted, members, strict=True):
            rows[index] = {**row, "id": int(index), "fold": fold}
    return rows  # type: ignore[return-value]


def _read(path: Path) -> str:
    """A file cv wrote, as written: no newline translation (a text's own "\r\n" inside a CSV field stays)."""
    if not path.is_file():
        raise UserError(f"{path} is missing: the cv folder is incomplete; run cv again with --overwrite_output_dir")
    with path.open(encoding="utf-8", newline="") as file:
        return file.read()


def references(rows: list[dict], problem_type: str, names: list[str]) -> np.ndarray:
    """The truth of predictions file rows, as the metrics take it."""
    if problem_type == SINGLE:
        return np.array([names.index(r["label"]) for r in rows])
    if problem_type == MULTI:
        return np.array([[float(n in read_label_list(r["labels"])) for n in names] for r in rows])
    return np.array([float(r["target"]) for r in rows])


def scores(rows: list[dict], problem_type: str, names: list[str]) -> np.ndarray:
    if problem_type == REGRESSION:
        return np.array([float(r["predicted"]) for r in rows])
    return np.array([scores_of(r, names) for r in rows])


def ensemble_test(out: Path, plan: dict) -> dict[str, float]:
    """The test split scored by the fold models' averaged probabilities (regression: averaged values)."""
    kind, names = plan["problem_type"], plan["label_names"]
    per_fold = [read_csv(_read(out / f"fold_{k}" / "predictions_test.csv")) for k in range(plan["folds"])]
    if not all(per_fold) or not {"label", "labels", "target"} & set(per_fold[0][0]):  # an unlabelled test split
        return {}
    mean = np.mean([scores(rows, kind, names) for rows in per_fold], axis=0)
    return task_metrics(kind, mean, references(per_fold[0], kind, names))


def fold_table(runs: list[dict], plan: dict) -> tuple[str, list[dict], list[str]]:
    """cv.md's table: a row per fold, then the mean ± std and the 95% interval over folds; and the CSV rows."""
    metrics = list(METRICS[plan["problem_type"]])
    prefixes = [p for p in ("eval", "test") if any(f"{p}_{metrics[0]}" in r for r in runs)]
    columns = [f"{p}_{m}" for p in prefixes for m in metrics]
    header = ["fold", *(c.replace("eval_", "held-out ").replace("test_", "test ") for c in columns), "wall time (s)"]
    rows = [[str(r["fold"]), *(r.get(c) for c in columns), cell(r.get("wall_time_s"), "{:.0f}")] for r in runs]
    summary = {p: summarise(runs, p, tuple(metrics))[0] for p in prefixes}
    mean = ["mean ± std"] + [_mean_std(summary[c.split("_", 1)[0]], c) for c in columns] + [None]
    interval = ["95% interval"] + [_interval(summary[c.split("_", 1)[0]], c) for c in columns] + [None]
    csv_rows = [
        {"fold": r["fold"], **{c: r.get(c) for c in columns}, "wall_time_s": r.get("wall_time_s")} for r in runs
    ]
    table = markdown_table(header, [*rows, mean, interval], right=range(1, len(header)))
    return table, csv_rows, ["fold", *columns, "wall_time_s"]


def _mean_std(row: dict, column: str) -> str:
    metric = column.split("_", 1)[1]
    return f"{cell(row.get(column))} ± {cell(row.get(f'std_{metric}'))}"


def _interval(row: dict, column: str) -> str:
    metric = column.split("_", 1)[1]
    mean, half = row.get(column), row.get(f"ci95_{metric}")
    return "–" if mean is None or half is None else f"{mean - half:.4f} to {mean + half:.4f}"


def spread_png(runs: list[dict], metric: str) -> bytes:
    """Each fold's held-out (and test) score, with their mean: how much the result moves with the split."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for prefix, color, label in (("eval", "#4c72b0", "held-out fold"), ("test", "#dd8452", "test split")):
        values = [r[f"{prefix}_{metric}"] for r in runs if r.get(f"{prefix}_{metric}") is not None]
        if values:
            ax.plot(range(len(values)), values, "o", color=color, label=label)
            ax.axhline(float(np.mean(values)), color=color, linewidth=1, linestyle="--")
    ax.set(xlabel="fold", ylabel=metric, title=f"{metric} per fold (dashed: the mean)", xticks=range(len(runs)))
    ax.legend(fontsize=8)
    return png(fig)


def write_outputs(out: Path, plan: dict, runs: list[dict], audit: Callable | None = None) -> list[str]:
    """Writes the OOF predictions, cv.md, cv.csv and cv.png, and with `audit` (out-of-fold rows and the plan →
    label issue rows and their section of cv.md) label_issues.csv; returns the names written."""
    oof = out_of_fold(out, plan)
    files = {OOF: csv_text(oof, list(oof[0]))}
    section = None
    if audit is not None:
        issues, section = audit(oof, plan)
        files["label_issues.csv"] = csv_text(issues, ["rank", "id", "text", "given", "suggested", "score"])
    table, csv_rows, fields = fold_table(runs, plan)
    files["cv.csv"] = csv_text(csv_rows, fields)
    files["cv.png"] = spread_png(runs, METRICS[plan["problem_type"]][0])
    ensemble = ensemble_test(out, plan) if "test_samples" in runs[0] else {}
    files["cv.md"] = cv_markdown(plan, table, oof, ensemble, section)
    refuse_unowned(out, files, "audit" if audit is not None else "cv")
    write_manifest(out, files, set())  # first, as a run records; names listed ahead and never written drop out
    for name, content in files.items():
        atomic_write(out / name, content)
    return list(files)


def cv_markdown(plan: dict, table: str, oof: list[dict], ensemble: dict, section: str | None) -> str:
    kind, metric = plan["problem_type"], METRICS[plan["problem_type"]][0]
    oof_metrics = task_metrics(kind, scores(oof, kind, plan["label_names"]), references(oof, kind, plan["label_names"]))
    parts = [
        f"# {plan['folds']}-fold cross-validation: {plan['recipe']}",
        "",
        f"{len(oof):,} examples in {plan['folds']} folds (exact duplicates kept in one fold, stratified by label); "
        f"seed {plan['seed']}. Each fold's run trains on the others and is scored on it.",
        "",
        table,
        "",
        f"Out-of-fold {metric}, every example predicted once by the model that did not train on it: "
        f"{cell(oof_metrics[metric])} ([{OOF}]({OOF})). Each fold's held-out examples also calibrated it "
        "(and, with --metric_for_best_model, chose its checkpoint), so held-out scores lean slightly optimistic; "
        "a test split's do not.",
        "",
        "![per-fold scores](cv.png)",
    ]
    if ensemble:
        parts += ["", f"Test split, the {plan['folds']} fold models' averaged probabilities: "
                  + ", ".join(f"{k} {cell(v)}" for k, v in ensemble.items() if k != "samples") + "."]  # fmt: skip
    if section:
        parts += ["", section]
    return "\n".join(parts) + "\n"


def read_plan(out: Path) -> tuple[dict, list[dict]]:
    """A finished cv's plan and its folds' results, for `audit` (and a redraw)."""
    plan_file = out / "cv.json"
    if not plan_file.is_file():
        raise UserError(
            f"{out} holds no cv (no cv.json); pass audit the --output_dir of a finished `finetune-recipes cv`"
        )
    fix = "run its cv again (the same command with --overwrite_output_dir)"
    plan = read_json(plan_file, fix)
    runs = []
    for fold in range(plan["folds"]):
        results = out / f"fold_{fold}" / "results.json"
        if not results.is_file():
            raise UserError(f"{out} holds an unfinished cv (fold {fold} has no results); finish it with its command")
        runs.append({"strategy": plan["recipe"], **read_json(results, fix), "status": "ok", "fold": fold})
    return plan, runs
