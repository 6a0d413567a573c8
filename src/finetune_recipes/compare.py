"""`finetune-recipes compare`: every strategy on the same data, model, seed and budget, in one table."""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path

from tqdm.auto import tqdm

from .catalog import CACHED_RECIPES, flag_groups, list_recipes, recipe_types, recipes_dir
from .config import SHARED_TYPES, Parser, UserError, listing, parse_config
from .metrics import MULTI, REGRESSION, SINGLE, greater_is_better, task_metrics
from .training.outputs import LOCK, MANIFEST, entries, lock_output_dir, write_text

# The two metrics a table shows per problem type, the first the primary one (the plot's, and what a row says).
TABLE_METRICS = {SINGLE: ("accuracy", "f1_macro"), MULTI: ("f1_micro", "f1_macro"), REGRESSION: ("mse", "r2")}
COLUMNS = [  # results key, title, format; the metric columns go after the strategy
    ("strategy", "strategy", "{}"),
    ("trainable_params", "trainable params", "{:,}"),
    ("wall_time_s", "wall time (s)", "{:.1f}"),
    ("train_runtime_s", "train time (s)", "{:.1f}"),
    ("train_samples_per_second", "train samples/s", "{:.1f}"),
    ("peak_memory_mb", "peak memory (MB)", "{:,.0f}"),
    ("status", "status", "{}"),
]
ORDER = [
    "static_embeddings",
    "feature_extraction",
    "frozen_base_pooler",
    "progressive_unfreezing",
    "full_finetune",
    "llrd",
    "lora",
]


SHARED_FLAGS = {f.name for t in SHARED_TYPES for f in fields(t)} | {"config"}
OUTPUTS = ("comparison.md", "comparison.csv", "comparison.png", "logs", "studies", MANIFEST, LOCK)  # + a folder per run


def route_flags(recipes: list[str], argv: list[str]) -> dict[str, list[str]]:
    """Each recipe's share of the command line: the shared flags, and the recipe-specific flags it declares.

    A flag no recipe declares is an error; one that only some declare goes to those, and a line says so.
    Each recipe's share is parsed here, before anything runs, so a bad value fails before hours of work.
    """
    shared = SHARED_FLAGS
    own = {r: {f.name for t in recipe_types(r) for f in fields(t)} for r in recipes}
    groups = flag_groups(argv)
    routes: dict[str, list[str]] = {r: [] for r in recipes}
    for name, tokens in groups:
        field_name = (
            name.removeprefix("no_") if name.removeprefix("no_") in shared | set().union(*own.values()) else name
        )
        takers = [r for r in recipes if field_name in shared or field_name in own[r]]
        if not takers:
            raise UserError(f"none of the recipes {listing(recipes)} takes --{name}; run a recipe with --help")
        if len(takers) < len(recipes):
            print(f"--{name} goes to {', '.join(takers)} only: the others do not take it", file=sys.stderr)
        for recipe in takers:
            routes[recipe] += tokens
    for recipe in recipes:
        parse_config(*SHARED_TYPES, *recipe_types(recipe), args=routes[recipe])
    return routes


def claim_compare_dir(out: Path, overwrite: bool) -> int:
    """Refuses an output_dir holding anything but an earlier comparison, and that too without
    --overwrite_output_dir; locks it for this comparison. Nothing is removed here: each recipe's own
    overwrite removes only what its runs wrote, and the tables are replaced file by file."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} is a file; pass --output_dir a directory")
    present = sorted(entries(out) - {MANIFEST, LOCK})
    # Also compare's own leftovers: the feature_cache of older versions, and a killed run's temporary files.
    leftovers = [
        n for n in present if fnmatch.fnmatch(n, ".feature_cache_*") or n == "feature_cache" or n.endswith(".tmp")
    ]
    foreign = [n for n in present if n not in OUTPUTS and n not in list_recipes() and n not in leftovers]
    if foreign:
        raise UserError(
            f"output_dir {out} holds '{foreign[0]}', which compare did not write; pass another --output_dir"
        )
    if present and not overwrite:
        raise UserError(
            f"output_dir {out} holds an earlier comparison; pass --overwrite_output_dir to replace it "
            "(a recipe's folder loses only what its run wrote) or another --output_dir"
        )
    (out / "logs").mkdir(parents=True, exist_ok=True)
    lock = lock_output_dir(out)
    for name in leftovers:
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    return lock


def run_recipe(recipe: str, out: Path, flags: list[str], overwrite: bool) -> dict:
    """One recipe in its own process (clean memory peak, failures isolated); its results plus wall time."""
    log = out / "logs" / f"{recipe}.log"
    with tempfile.TemporaryDirectory(dir=out, prefix=".feature_cache_") as cache:  # every encoding is paid for
        given = any(f.split("=")[0] == "--feature_cache_dir" for f in flags)  # the user's own cache is kept
        extra = ["--feature_cache_dir", cache] if recipe in CACHED_RECIPES and not given else []
        cmd = [sys.executable, str(recipes_dir() / f"{recipe}.py"), *flags, *extra, "--output_dir", str(out / recipe)]
        cmd += ["--overwrite_output_dir"] if overwrite else []
        start = time.perf_counter()
        with log.open("w") as f:
            code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
        wall = round(time.perf_counter() - start, 1)
    if code != 0:
        return {"strategy": recipe, "wall_time_s": wall, "status": f"failed ({code}): see {log}"}
    results = json.loads((out / recipe / "results.json").read_text())
    return {"strategy": recipe, **results, "wall_time_s": wall, "status": "ok"}


def tfidf_baseline(shared: list[str]) -> dict:
    """TF-IDF and a linear model on exactly the recipes' train and validation texts (whole texts, never
    truncated): logistic regression (single-label), one-vs-rest logistic regression (multi-label), or ridge
    regression on the standardised target (regression); scored by the same metrics as the recipes."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.multiclass import OneVsRestClassifier

    from .data import raw_splits

    _, data_args, args = parse_config(
        *SHARED_TYPES, args=shared, default_config=recipes_dir() / "configs" / "full_finetune.yaml"
    )
    start = time.perf_counter()
    splits, task = raw_splits(data_args, args.seed)
    columns = [c for c in (data_args.text_column, data_args.text_pair_column) if c]

    def texts(split):
        return [" ".join(row) for row in zip(*(splits[split][c] for c in columns), strict=True)]

    vectorizer = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=2)
    features = vectorizer.fit_transform(texts("train"))
    model, name = {
        SINGLE: (LogisticRegression(C=10.0, max_iter=2000), "tfidf_logreg"),
        MULTI: (OneVsRestClassifier(LogisticRegression(C=10.0, max_iter=2000)), "tfidf_ovr_logreg"),
        REGRESSION: (Ridge(alpha=1.0), "tfidf_ridge"),
    }[task.problem_type]
    train_start = time.perf_counter()
    model.fit(features, splits["train"]["labels"])
    train_time = time.perf_counter() - train_start
    validation = vectorizer.transform(texts("validation"))
    if task.problem_type == REGRESSION:
        scores = model.predict(validation) * task.target_std + task.target_mean
    else:
        scores = model.predict_proba(validation)
    metrics = task_metrics(task.problem_type, scores, task.references(splits["validation"]["labels"]))
    estimators = getattr(model, "estimators_", [model])
    return {
        "strategy": name,
        **{f"eval_{k}": v for k, v in metrics.items()},
        "task": task.summary(),
        "trainable_params": int(sum(e.coef_.size + e.intercept_.size for e in estimators)),
        "wall_time_s": round(time.perf_counter() - start, 1),
        "train_runtime_s": round(train_time, 2),
        "train_samples_per_second": round(len(splits["train"]) / train_time, 1),
        "status": "ok",
    }


def table_metrics(rows: list[dict]) -> tuple[str, ...]:
    """The metrics to show: those of the problem type the rows report (single-label when none ran)."""
    problem_type = next((r["task"]["problem_type"] for r in rows if "task" in r), SINGLE)
    return TABLE_METRICS[problem_type]


def columns_for(rows: list[dict]) -> list[tuple[str, str, str]]:
    metrics = [(f"eval_{m}", m, "{:.4f}") for m in table_metrics(rows)]
    return [COLUMNS[0], *metrics, *COLUMNS[1:]]


def redact(argv: list[str]) -> list[str]:
    """The command line as written into comparison.md, without a --hub_token's value."""
    shown = []
    for i, token in enumerate(argv):
        hidden = token.startswith("--hub_token=") or (i and argv[i - 1] == "--hub_token")
        shown.append(("--hub_token=***" if "=" in token else "***") if hidden else token)
    return shown


def cell(value, fmt: str = "{:.4f}") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return fmt.format(value)


def write_table(rows: list[dict], out: Path, command: str) -> str:
    """comparison.md (with the machine and the command) and comparison.csv; returns the Markdown."""
    columns = columns_for(rows)
    header = [title for _, title, _ in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(row.get(key), fmt) for key, _, fmt in columns) + " |" for row in rows]
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"
    markdown = "\n".join([*lines, "", f"Machine: {machine}. Command: `{command}`", ""])
    write_text(out / "comparison.md", markdown)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=[key for key, _, _ in columns], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "comparison.csv", table.getvalue())
    return markdown


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy and wall time per strategy, side by side (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    done = [r for r in rows if r.get("status") == "ok"]
    if not done:
        return
    names = [r["strategy"] for r in done]
    metric = table_metrics(rows)[0]
    values = [r[f"eval_{metric}"] for r in done]
    fig, (acc, wall) = plt.subplots(1, 2, figsize=(11, 4.2))
    acc.barh(names, values, color="#4c72b0")
    limits = (max(0.0, min(values) - 0.02), 1.0) if greater_is_better(metric) else (0.0, max(values) * 1.15 or 1.0)
    acc.set(xlabel=f"validation {metric}" + ("" if greater_is_better(metric) else " (lower is better)"), xlim=limits)
    wall.barh(names, [r["wall_time_s"] for r in done], color="#dd8452")
    wall.set(xlabel="wall time (s)")
    wall.set_yticklabels([])
    for ax, key, fmt in ((acc, f"eval_{metric}", "{:.3f}"), (wall, "wall_time_s", "{:.0f}")):
        for i, r in enumerate(done):
            ax.text(r[key], i, " " + fmt.format(r[key]), va="center", fontsize=8)
    fig.suptitle("Transfer-learning strategies on the same data, seed and budget")
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=120)
    plt.close(fig)
    write_text(path, image.getvalue())


def main(argv: list[str] | None = None) -> None:
    parser = Parser(
        prog="finetune-recipes compare",
        description="Runs recipes one after another on the same data, seed and budget. Any other flag "
        "(--model_name_or_path, --train_file, --num_train_epochs, --seed, ...) goes to every recipe that "
        "takes it (--layer_decay to llrd and progressive_unfreezing only).",
        allow_abbrev=False,
    )
    parser.add_argument("--recipes", default=",".join(ORDER), help="comma-separated recipe names")
    parser.add_argument("--output_dir", default="outputs/compare")
    parser.add_argument("--overwrite_output_dir", action="store_true", help="replace an earlier comparison there")
    parser.add_argument("--no_baseline", action="store_true", help="skip the TF-IDF baseline row")
    known, rest = parser.parse_known_args(argv)
    recipes = [r for r in known.recipes.split(",") if r]
    unknown = [r for r in recipes if r not in list_recipes()]
    if unknown or not recipes:
        raise UserError(f"no recipe '{(unknown or [''])[0]}'; recipes: {', '.join(list_recipes())}")
    routes = route_flags(recipes, rest)
    # The baseline's share: the flags every recipe takes, so it reads the same data and split.
    shared = [t for name, tokens in flag_groups(rest) if name.removeprefix("no_") in SHARED_FLAGS for t in tokens]
    out = Path(known.output_dir)
    lock = claim_compare_dir(out, known.overwrite_output_dir)
    rows = [] if known.no_baseline else [tfidf_baseline(shared)]
    progress = tqdm(recipes, desc="compare", unit="recipe")
    for recipe in progress:
        progress.set_postfix_str(recipe)
        row = run_recipe(recipe, out, routes[recipe], known.overwrite_output_dir)
        rows.append(row)
        metric = table_metrics([row, *rows])[0]
        tqdm.write(f"{recipe}: {row['status']}, {metric} {cell(row.get(f'eval_{metric}'))}, {row['wall_time_s']} s")
    command = "finetune-recipes compare " + " ".join(redact(argv or []))
    print(write_table(rows, out, command.strip()))
    plot(rows, out / "comparison.png")
    os.close(lock)
    print(f"Wrote {out / 'comparison.md'}, comparison.csv and comparison.png")
