"""`finetune-recipes compare`: every strategy on the same data, model, seed and budget, in one table."""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path

from tqdm.auto import tqdm

from .catalog import CACHED_RECIPES, flag_groups, list_recipes, recipe_types, recipes_dir, resolve_recipe
from .config import SHARED_TYPES, Parser, UserError, listing, parse_config
from .metrics import MULTI, REGRESSION, SINGLE, greater_is_better, task_metrics
from .training.outputs import LOCK, MANIFEST, entries, lock_output_dir, write_text
from .tune import TEST_SPLIT_PERCENTAGE, as_flags, check_space, import_optuna, run_study, search_space

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
ORDER = [
    "static_embeddings",
    "feature_extraction",
    "frozen_base_pooler",
    "progressive_unfreezing",
    "full_finetune",
    "llrd",
    "lora",
]


DEFAULT_CONFIG = recipes_dir() / "configs" / "full_finetune.yaml"  # the baseline's defaults (data, seed)
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
    runs = {*list_recipes(), *(f"{r}_seed{s}" for r in list_recipes() for s in seeds_in(out, r))}
    foreign = [n for n in present if n not in OUTPUTS and n not in runs and n not in leftovers]
    if foreign:
        raise UserError(
            f"output_dir {out} holds '{foreign[0]}', which compare did not write; pass another --output_dir"
        )
    if present and not overwrite:
        raise UserError(
            f"output_dir {out} holds an earlier comparison; pass --overwrite_output_dir to replace it "
            "(a recipe's folder loses only what its run wrote; tuning studies resume) or another --output_dir"
        )
    (out / "logs").mkdir(parents=True, exist_ok=True)
    lock = lock_output_dir(out)
    for name in leftovers:
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    return lock


def seeds_in(out: Path, recipe: str) -> list[str]:
    """The seeds of `recipe`_seed<N> folders an earlier comparison with --seeds left in `out`."""
    return [name.rsplit("_seed", 1)[1] for name in entries(out) if re.fullmatch(rf"{recipe}_seed\d+", name)]


def run_recipe(recipe: str, out: Path, folder: str, flags: list[str], overwrite: bool) -> dict:
    """One recipe in its own process (clean memory peak, failures isolated); its results plus wall time."""
    log = out / "logs" / f"{folder}.log"
    with tempfile.TemporaryDirectory(dir=out, prefix=".feature_cache_") as cache:  # every encoding is paid for
        given = any(f.split("=")[0] == "--feature_cache_dir" for f in flags)  # the user's own cache is kept
        extra = ["--feature_cache_dir", cache] if recipe in CACHED_RECIPES and not given else []
        cmd = [sys.executable, str(recipes_dir() / f"{recipe}.py"), *flags, *extra, "--output_dir", str(out / folder)]
        cmd += ["--overwrite_output_dir"] if overwrite else []
        start = time.perf_counter()
        with log.open("w") as f:
            code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
        wall = round(time.perf_counter() - start, 1)
    if code != 0:
        return {"strategy": recipe, "wall_time_s": wall, "status": f"failed ({code}): see {log}"}
    results = json.loads((out / folder / "results.json").read_text())
    return {"strategy": recipe, **results, "wall_time_s": wall, "status": "ok"}


def tfidf_baseline(shared: list[str]) -> dict:
    """TF-IDF and a linear model on exactly the recipes' train, validation and test texts (whole texts, never
    truncated): logistic regression (single-label), one-vs-rest logistic regression (multi-label), or ridge
    regression on the standardised target (regression); scored by the same metrics as the recipes."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.multiclass import OneVsRestClassifier

    from .data import raw_splits

    _, data_args, args = parse_config(*SHARED_TYPES, args=shared, default_config=DEFAULT_CONFIG, announce=False)
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
    metrics = {}
    for split, prefix in (("validation", "eval"), ("test", "test")):
        if split not in splits or "labels" not in splits[split].column_names:
            continue
        inputs = vectorizer.transform(texts(split))
        if task.problem_type == REGRESSION:
            scores = model.predict(inputs) * task.target_std + task.target_mean
        else:
            scores = model.predict_proba(inputs)
        references = task.references(splits[split]["labels"])
        metrics |= {f"{prefix}_{k}": v for k, v in task_metrics(task.problem_type, scores, references).items()}
    estimators = getattr(model, "estimators_", [model])
    return {
        "strategy": name,
        **metrics,
        "task": task.summary(),
        "trainable_params": int(sum(e.coef_.size + e.intercept_.size for e in estimators)),
        "wall_time_s": round(time.perf_counter() - start, 1),
        "train_runtime_s": round(train_time, 2),
        "train_samples_per_second": round(len(splits["train"]) / train_time, 1),
        "status": "ok",
    }


def table_metrics(rows: list[dict]) -> tuple[str, ...]:
    """The metrics to show: those of the problem type the rows report (single-label when none ran)."""
    problem_type = next((r["task"]["problem_type"] for r in rows if r.get("task")), SINGLE)
    return TABLE_METRICS[problem_type]


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
            values = [r[f"{prefix}_{metric}"] for r in ok if f"{prefix}_{metric}" in r]
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
    else:

        def same(row: dict) -> bool:
            a, b = best[f"values_{metric}"], row[f"values_{metric}"]
            if len(b) < 2 or statistics.pvariance(a) + statistics.pvariance(b) == 0:
                return a == b
            return bool(stats.ttest_ind(a, b, equal_var=False).pvalue >= 0.05)

        tied = [best, *(r for r in ranked[1:] if same(r))]
        others = [r["strategy"] for r in tied[1:]]
        if others:
            lines.append(f"Within the noise of it at {seeds} seeds (Welch's t-test, p ≥ 0.05): {', '.join(others)}.")
        else:
            lines.append(f"Every other strategy is below it beyond the noise of {seeds} seeds (Welch's t-test).")
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
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["strategy"], *(mean_cell(row, prefix, m) for m in metrics)]
        if seeds > 1:
            mean, half = row.get(f"{prefix}_{metrics[0]}"), row.get(f"ci95_{metrics[0]}")
            low, high = (0.0, 1.0) if metrics[0] in BOUNDED else (-math.inf, math.inf)  # a share cannot leave [0, 1]
            interval = f"{max(low, mean - half):.4f} to {min(high, mean + half):.4f}" if half is not None else "–"
            cells.append(interval)
        cells += [cell(row.get(key), fmt) for key, _, fmt in COLUMNS[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"
    text = [*lines, "", verdict(rows, prefix, metrics[0], seeds), "", split_note(rows, prefix), ""]
    markdown = "\n".join([*text, f"Machine: {machine}. Command: `{command}`", ""])
    write_text(out / "comparison.md", markdown)
    keys = [
        "strategy",
        "seed",
        *(f"{p}_{m}" for p in ("eval", "test") for m in metrics),
        *(k for k, _, _ in COLUMNS[1:]),
    ]
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(runs)
    write_text(out / "comparison.csv", table.getvalue())
    return markdown


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


def plot(rows: list[dict], path: Path) -> None:
    """The reported metric (with its standard deviation over seeds) and wall time per strategy, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        "takes it (--layer_decay to llrd and progressive_unfreezing only). Without a test split in the data, "
        "10%% of train is held out as test (--test_split_percentage) and the table reports on it.",
        allow_abbrev=False,
    )
    parser.add_argument("--recipes", default=",".join(ORDER), help="comma-separated recipe names")
    parser.add_argument("--output_dir", default="outputs/compare")
    parser.add_argument("--overwrite_output_dir", action="store_true", help="replace an earlier comparison there")
    parser.add_argument("--no_baseline", action="store_true", help="skip the TF-IDF baseline row")
    parser.add_argument("--seeds", type=int, default=1, help="runs per strategy (seeds --seed, --seed+1, ...)")
    parser.add_argument("--trials", type=int, default=0, help="tune each strategy first with this many trials")
    known, rest = parser.parse_known_args(argv)
    if known.seeds < 1:
        raise UserError(f"--seeds must be at least 1, not {known.seeds}")
    if known.trials < 0:
        raise UserError(f"--trials must be 0 (no tuning) or more, not {known.trials}")
    recipes = [r for r in known.recipes.split(",") if r]
    unknown = [r for r in recipes if r not in list_recipes()]
    if unknown or not recipes:
        raise UserError(f"no recipe '{(unknown or [''])[0]}'; recipes: {', '.join(list_recipes())}")
    if not any(f.split("=")[0] == "--test_split_percentage" for f in rest):
        rest = [*rest, "--test_split_percentage", str(TEST_SPLIT_PERCENTAGE)]
    routes = route_flags(recipes, rest)
    if known.trials:
        import_optuna()  # before anything runs
        for recipe in recipes:
            check_space(search_space(resolve_recipe(recipe)), (*SHARED_TYPES, *recipe_types(recipe)),
                        {n.removeprefix("no_") for n, _ in flag_groups(routes[recipe])}, recipe)  # fmt: skip
    # The baseline's share: the flags every recipe takes, so it reads the same data and split.
    shared = [t for name, tokens in flag_groups(rest) if name.removeprefix("no_") in SHARED_FLAGS for t in tokens]
    first_seed = parse_config(*SHARED_TYPES, args=shared, default_config=DEFAULT_CONFIG, announce=False)[2].seed
    seeds = [first_seed + i for i in range(known.seeds)]
    out = Path(known.output_dir)
    lock = claim_compare_dir(out, known.overwrite_output_dir)
    runs = [] if known.no_baseline else [tfidf_baseline(shared)]
    progress = tqdm(total=len(recipes) * len(seeds), desc="compare", unit="run")
    for recipe in recipes:
        tuned: dict = {}
        if known.trials:
            progress.set_postfix_str(f"{recipe}: tuning")
            study = out / "studies" / recipe
            tuned = run_study(recipe, routes[recipe], known.trials, study_dir=str(study)) or {}
            if not tuned:
                runs += [
                    {"strategy": recipe, "seed": s, "status": f"no trial finished: see {study}/logs"} for s in seeds
                ]
                progress.update(len(seeds))
                continue
        for seed in seeds:
            progress.set_postfix_str(f"{recipe}, seed {seed}")
            folder = recipe if len(seeds) == 1 else f"{recipe}_seed{seed}"
            flags = [*routes[recipe], *as_flags(tuned), "--seed", str(seed)]
            row = {**run_recipe(recipe, out, folder, flags, known.overwrite_output_dir), "seed": seed}
            runs.append(row)
            progress.update()
            metric = table_metrics([row, *runs])[0]
            prefix = reported_split([row])
            shown = cell(row.get(f"{prefix}_{metric}"))
            tqdm.write(f"{recipe} (seed {seed}): {row['status']}, {metric} {shown}, {row['wall_time_s']} s")
    progress.close()
    rows = summarise(runs, reported_split(runs), table_metrics(runs))
    command = "finetune-recipes compare " + " ".join(redact(argv or []))
    print(write_table(rows, runs, out, command.strip(), len(seeds)))
    plot(rows, out / "comparison.png")
    os.close(lock)
    print(f"Wrote {out / 'comparison.md'}, comparison.csv and comparison.png")
