"""`finetune-recipes compare`: every strategy on the same data, model, seed and budget, in one table."""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import fields
from pathlib import Path

from tqdm.auto import tqdm

from ..atomic import is_temporary, remove
from ..catalog import (
    as_flags,
    flag_groups,
    given_names,
    list_recipes,
    needed_flags,
    problem_types,
    recipe_types,
    recipes_dir,
    resolve_recipe,
)
from ..config import SHARED_TYPES
from ..errors import Parser, UserError, listing, on_interrupt
from ..metrics import MULTI, REGRESSION, SINGLE, task_metrics
from ..ownership import LOCK, MANIFEST, adopt_earlier, claim_tool_dir, entries, owned_entries, write_manifest
from ..parsing import parse_config
from ..rendering import cell
from .compare_report import plot, reported_split, summarise, table_metrics, write_table
from .cv import run_recipe
from .runs import flag_inputs, refuse_hub_flags, tool_dir, with_test_split
from .search_space import check_space, search_space
from .tune import import_optuna, run_study

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


def claim_compare_dir(out: Path, overwrite: bool, planned: set[str], inputs: list[str]) -> int:
    """Refuses an output_dir holding anything but an earlier comparison (its manifest says), and that too without
    --overwrite_output_dir, or holding one of the runs' `inputs` where compare writes; locks it for this
    comparison. Nothing is removed here: each recipe's own overwrite removes only what its runs wrote, and the
    tables are replaced file by file."""
    earlier = (
        f"output_dir {out} holds an earlier comparison; pass --overwrite_output_dir to replace it "
        "(a recipe's folder loses only what its run wrote; tuning studies resume) or another --output_dir"
    )
    writes = [*OUTPUTS, *planned, "feature_cache"]  # feature_cache: what frozen weights computed, shared
    runs = {*list_recipes(), *(f"{r}_seed{s}" for r in list_recipes() for s in seeds_in(out, r))}
    named = lambda n: n in OUTPUTS or n in runs or n == "feature_cache" or is_temporary(n)  # noqa: E731
    adopt_earlier(out, "compare", ("comparison.md", "comparison.csv"), named)  # its rule before it kept a manifest
    return claim_tool_dir(out, "compare", writes, "" if overwrite else earlier, inputs)


def drop_earlier_runs(out: Path, planned: set[str]) -> None:
    """An earlier comparison's run folders this one does not write again (other recipes, other seeds) lose
    what their runs wrote, so the new table is not read beside stale runs; a user's file in one stays."""
    earlier = {*list_recipes(), *(f"{r}_seed{s}" for r in list_recipes() for s in seeds_in(out, r))}
    for name in sorted(earlier - planned):
        folder = out / name
        if not (folder / MANIFEST).is_file():
            continue
        for entry in (owned_entries(folder) & entries(folder)) - {LOCK}:
            remove(folder / entry)
        (folder / LOCK).unlink(missing_ok=True)
        if not any(folder.iterdir()):
            folder.rmdir()


def seeds_in(out: Path, recipe: str) -> list[str]:
    """The seeds of `recipe`_seed<N> folders an earlier comparison with --seeds left in `out`."""
    return [name.rsplit("_seed", 1)[1] for name in entries(out) if re.fullmatch(rf"{recipe}_seed\d+", name)]


def tfidf_baseline(shared: list[str]) -> dict:
    """TF-IDF and a linear model on exactly the recipes' train, validation and test texts (whole texts, never
    truncated): logistic regression (single-label), one-vs-rest logistic regression (multi-label), or ridge
    regression on the standardised target (regression); scored by the same metrics as the recipes."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.multiclass import OneVsRestClassifier

    from ..data import raw_splits

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


def parse_args(argv: list[str] | None):
    """compare's own flags, checked, and the rest of the command line (the recipes' flags)."""
    parser = Parser(
        prog="finetune-recipes compare",
        description="Runs recipes one after another on the same data, seed and budget. Any other flag "
        "(--model_name_or_path, --train_file, --num_train_epochs, --seed, ...) goes to every recipe that "
        "takes it (--layer_decay to llrd and progressive_unfreezing only). Without a test split in the data, "
        "10% of train is held out as test (--test_split_percentage) and the table reports on it.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--recipes",
        default=None,
        help="comma-separated recipe names (default: every one that takes the data's task, and distill only when "
        "--teacher is given)",
    )
    parser.add_argument("--output_dir", help="default outputs/compare; each strategy's runs in a folder of its own")
    parser.add_argument("--overwrite_output_dir", action="store_true", help="replace an earlier comparison there")
    parser.add_argument("--no_baseline", action="store_true", help="skip the TF-IDF baseline row")
    parser.add_argument("--seeds", type=int, default=1, help="runs per strategy (seeds --seed, --seed+1, ...)")
    parser.add_argument("--trials", type=int, default=0, help="tune each strategy first with this many trials")
    parser.add_argument("--folds", type=int, default=0, help="K-fold cross-validation of each strategy, not seeds")
    known, rest = parser.parse_known_args(argv)
    if known.seeds < 1:
        raise UserError(f"--seeds must be at least 1, not {known.seeds}")
    if known.folds and (known.folds < 2 or known.seeds > 1 or known.trials):
        raise UserError(
            f"--folds must be at least 2, not {known.folds}" if known.folds < 2 else
            "pass --folds (cross-validation) or --seeds/--trials, not both"
        )  # fmt: skip
    if known.trials < 0:
        raise UserError(f"--trials must be 0 (no tuning) or more, not {known.trials}")
    known.named = known.recipes is not None
    known.recipes = [r for r in (known.recipes or ",".join(list_recipes())).split(",") if r]
    unknown = [r for r in known.recipes if r not in list_recipes()]
    if unknown or not known.recipes:
        raise UserError(f"no recipe '{(unknown or [''])[0]}'; recipes: {', '.join(list_recipes())}")
    twice = sorted({r for r in known.recipes if known.recipes.count(r) > 1})
    if twice:
        raise UserError(f"--recipes names {twice[0]} twice; name each recipe once (--seeds repeats runs)")
    refuse_hub_flags(given_names(rest), "compare does not push its runs; push the one you keep with its recipe's")
    known.recipes = with_needed_flags(known.recipes, known.named, given_names(rest))
    return known, rest if known.folds else with_test_split(rest)  # folds: each held-out fold is the score


def main(argv: list[str] | None = None) -> None:
    known, rest = parse_args(argv)
    recipes, routes = known.recipes, route_flags(known.recipes, rest)
    if known.trials:
        import_optuna()  # before anything runs
        for recipe in recipes:
            check_space(search_space(resolve_recipe(recipe)), (*SHARED_TYPES, *recipe_types(recipe)),
                        given_names(routes[recipe]), recipe)  # fmt: skip
    # The baseline's share: the flags every recipe takes, so it reads the same data and split.
    shared = [t for name, tokens in flag_groups(rest) if name.removeprefix("no_") in SHARED_FLAGS for t in tokens]
    _, data_args, training = parse_config(*SHARED_TYPES, args=shared, default_config=DEFAULT_CONFIG, announce=False)
    seeds = [training.seed + i for i in range(known.seeds)]
    recipes = for_the_task(recipes, known.named, data_args, training.seed)
    out = tool_dir(known.output_dir, "compare", "")
    planned = {r if len(seeds) == 1 else f"{r}_seed{s}" for r in recipes for s in seeds}
    inputs = [path for recipe in recipes for path in flag_inputs(resolve_recipe(recipe), routes[recipe])]
    lock = claim_compare_dir(out, known.overwrite_output_dir, planned, inputs)
    drop_earlier_runs(out, planned)
    with on_interrupt(f"the finished runs are kept in {out}; add --overwrite_output_dir to compare again"):
        runs = compare_runs(recipes, routes, shared, known, out, seeds)
    rows = summarise(runs, reported_split(runs), table_metrics(runs))
    command = "finetune-recipes compare " + " ".join(argv or [])
    print(write_table(rows, runs, out, command.strip(), known.folds or len(seeds)))
    plot(rows, out / "comparison.png")
    write_manifest(
        out, ["comparison.md", "comparison.csv", "comparison.png"], set()
    )  # what was never written drops out
    os.close(lock)
    print(f"Wrote {out / 'comparison.md'}, comparison.csv and comparison.png")


def compare_runs(recipes: list[str], routes: dict, shared: list[str], known, out: Path, seeds: list[int]) -> list:
    """Every strategy's runs: over the same folds (--folds), else once per seed with the TF-IDF baseline."""
    if known.folds:
        return cross_validate(recipes, routes, shared, known, out)
    runs = [] if known.no_baseline else [tfidf_baseline(shared)]
    progress = tqdm(total=len(recipes) * len(seeds), desc="compare", unit="run")
    for recipe in recipes:
        runs += run_strategy(recipe, routes[recipe], seeds, known, out, progress, runs)
    progress.close()
    return runs


def with_needed_flags(recipes: list[str], named: bool, given: set[str]) -> list[str]:
    """The recipes whose needed flags (catalog.needed_flags: distill's --teacher) the command gives: one that
    lacks them is refused when --recipes names it, and left out, saying so, from the default list."""
    kept = []
    for recipe in recipes:
        missing = [name for name in needed_flags(recipe) if name not in given]
        if missing and named:
            raise UserError(f"{recipe} needs --{missing[0]}; pass it, or leave {recipe} out of --recipes")
        if missing:
            tqdm.write(f"compare: {recipe} left out: it needs --{missing[0]} (pass it to compare {recipe} too)")
        else:
            kept.append(recipe)
    return kept


def for_the_task(recipes: list[str], named: bool, data_args, seed: int) -> list[str]:
    """The recipes that take the data's task shape (a recipe's PROBLEM_TYPES): one that does not is refused when
    --recipes names it, and left out, saying so, from the default list."""
    from ..data import raw_splits

    _, task = raw_splits(data_args, seed)
    misfits = {r: problem_types(r) for r in recipes if task.problem_type not in problem_types(r)}
    for recipe, takes in misfits.items():
        if named:
            raise UserError(
                f"{recipe} takes {' or '.join(takes)} data, and this data is {task.problem_type}: "
                "leave it out of --recipes"
            )
        tqdm.write(f"compare: {recipe} left out: it takes {' or '.join(takes)}; this data is {task.problem_type}")
    return [r for r in recipes if r not in misfits]


def cross_validate(recipes: list[str], routes: dict, shared: list[str], known, out: Path) -> list[dict]:
    """--folds K: each strategy's cv in out/RECIPE (the same folds for all: same data, seed and K), a row per
    fold scored on its held-out fold (and on the test split when one is given); the TF-IDF baseline on the
    same folds."""
    from .cv import fold_flags, run_cv

    runs: list[dict] = []
    for recipe in recipes:
        tqdm.write(f"{recipe}: {known.folds}-fold cross-validation")
        folds, _ = run_cv(resolve_recipe(recipe), routes[recipe], out / recipe, known.folds, known.overwrite_output_dir)
        runs += [{**row, "strategy": recipe, "seed": row["fold"]} for row in folds]
    if not known.no_baseline:
        has_test = (out / recipes[0] / "folds" / "test.jsonl").is_file()
        runs = [
            {**tfidf_baseline(fold_flags(shared, out / recipes[0], k, has_test)), "seed": k} for k in range(known.folds)
        ] + runs
    return runs


def run_strategy(recipe: str, flags: list[str], seeds: list[int], known, out: Path, progress, earlier: list) -> list:
    """One strategy's runs, a seed each, after its study with --trials; their rows."""
    tuned: dict = {}
    if known.trials:
        progress.set_postfix_str(f"{recipe}: tuning")
        study = out / "studies" / recipe
        tuned = run_study(recipe, flags, known.trials, output_dir=str(study)) or {}
        if not tuned:
            progress.update(len(seeds))
            return [{"strategy": recipe, "seed": s, "status": f"no trial finished: see {study}/logs"} for s in seeds]
    rows = []
    for seed in seeds:
        progress.set_postfix_str(f"{recipe}, seed {seed}")
        folder = recipe if len(seeds) == 1 else f"{recipe}_seed{seed}"
        row = {**run_recipe(recipe, out, folder, [*flags, *as_flags(tuned), "--seed", str(seed)],
                            known.overwrite_output_dir), "seed": seed}  # fmt: skip
        rows.append(row)
        progress.update()
        metric, prefix = table_metrics([row, *earlier])[0], reported_split([row])
        shown = cell(row.get(f"{prefix}_{metric}"))
        tqdm.write(f"{recipe} (seed {seed}): {row['status']}, {metric} {shown}, {row['wall_time_s']} s")
    return rows
