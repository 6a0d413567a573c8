"""`finetune-recipes cv RECIPE --folds K`: k-fold cross-validation of a recipe, with out-of-fold predictions and,
with --find_label_issues (or `finetune-recipes audit` afterwards), a label audit of them.

The training data (train, and validation when the data has one: cross-validation replaces the fixed split) is
cut into K folds of exact-duplicate groups, stratified by label (iterative stratification for multi-label,
rank bins for regression). Fold k's run trains on the other K - 1 folds and takes fold k as its validation
split; its predictions there are fold k's out-of-fold predictions, so every training example is predicted
exactly once by a model that did not train on it. (Its validation split also calibrates the run and,
with --metric_for_best_model, picks its checkpoint.) A test split, when the data has one, is scored by every
fold model and by their averaged probabilities. Each fold runs the recipe in its own process, as `compare`
does; a killed cv resumes with the same command and does not train a finished fold again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..atomic import atomic_path, atomic_write, remove
from ..catalog import caches_features, given_names, list_recipes, recipe_types, recipes_dir, resolve_recipe
from ..config import MULTI, REGRESSION, SHARED_TYPES, SINGLE
from ..errors import Parser, UserError, on_interrupt, write_failure
from ..ownership import LOCK, MANIFEST, adopt_earlier, claim_tool_dir, entries, owned_entries
from ..parsing import parse_config
from ..processes import PARENT, die_with_parent
from ..readback import read_json
from .cv_report import CV_NAMES, written_before_manifests
from .runs import error_line, flag_inputs, old_name, refuse_hub_flags, tool_dir

PLAN = "cv.json"
RERUN = "run the same command again, with --overwrite_output_dir to start over"
# A run that ended on its own `error:` line (exit code 2 alone, 1 under accelerate launch) refused its input or met a
# full disk: the other folds, on the same flags and disk, would end the same way.
SAID = "(log: "
OUTPUTS = (*CV_NAMES, MANIFEST, LOCK)  # feature_cache among them: what frozen weights computed, shared by the folds
# + fold_0, fold_1, ...: each fold's run (its output_dir); folds/fold_K/ holds its train and validation files
DATA_FLAGS = ("train_file", "validation_file", "test_file", "dataset_name", "dataset_config_name")
REFUSED = {  # flags that would break "every example predicted once", with what to do instead
    "max_eval_samples": "every held-out example is predicted; drop --max_eval_samples",
    "validation_split_percentage": "each fold is the validation split of its run; drop it",
    "test_split_percentage": "cv holds no test out of train; pass --test_file to score one",
}


def parse_args(argv: list[str] | None):
    parser = Parser(
        prog="finetune-recipes cv",
        description="K-fold cross-validation of a recipe: one run per fold, out-of-fold predictions of every "
        "training example, each fold's metrics with mean, std and a 95% interval. Other flags go to the recipe.",
        allow_abbrev=False,
    )
    parser.add_argument("recipe", help=f"one of {', '.join(list_recipes())}")
    parser.add_argument("--folds", type=int, default=5, help="K: runs, each holding out one fold")
    parser.add_argument("--output_dir", help="default outputs/cv/RECIPE; fold K's run is its fold_K/; an unfinished "
                        "cv there resumes")  # fmt: skip
    parser.add_argument("--cv_dir", dest="output_dir", help=argparse.SUPPRESS)  # its 0.1 name: old_name() warns
    parser.add_argument("--overwrite_output_dir", action="store_true", help="replace an earlier cv of other data")
    parser.add_argument("--find_label_issues", action="store_true", help="audit the labels with cleanlab after")
    parser.add_argument("--accelerate_config", help="run each fold with `accelerate launch --config_file` this file")
    known, rest = parser.parse_known_args(old_name(argv, "--cv_dir"))
    if known.folds < 2:
        raise UserError(f"--folds must be at least 2, not {known.folds}")
    given = given_names(rest)
    for flag, why in REFUSED.items():
        if flag in given:
            raise UserError(f"--{flag} is not taken by cv: {why}")
    refuse_hub_flags(given, "cv does not push its fold models; push the run you keep with its recipe's")
    if known.recipe not in list_recipes():
        raise UserError(f"no recipe '{known.recipe}'; cv runs an installed recipe: {', '.join(list_recipes())}")
    known.recipe_file = resolve_recipe(known.recipe)
    if known.accelerate_config and not Path(known.accelerate_config).is_file():
        raise UserError(f"--accelerate_config {known.accelerate_config} is not a file; pass an accelerate config")
    known.output_dir = tool_dir(known.output_dir, "cv", known.recipe_file.stem)
    return known, rest


def pool_and_test(data_args, seed: int):
    """(the examples to fold, raw columns with label names as text; their encoded labels; the task; the test split
    or None). A seeded --max_train_samples sample of the pool keeps a quick cv quick."""
    from datasets import ClassLabel, DatasetDict, List, Value, concatenate_datasets

    from ..data import check_columns, drop_absent_test_labels, encode_task, load_raw_datasets

    raw = load_raw_datasets(data_args)
    if "train" not in raw:
        raise UserError(f"the data has no train split (splits: {', '.join(raw)}); pass --train_file")
    raw = drop_absent_test_labels(DatasetDict({k: raw[k] for k in ("train", "validation", "test") if k in raw}),
                                  data_args.label_sources)  # fmt: skip
    check_columns(raw, data_args)
    for split in raw:  # ClassLabel ids (and lists of them) back to names: fold files are read like any other file
        for column, feature in raw[split].features.items():
            if isinstance(feature, ClassLabel):
                raw[split] = raw[split].map(lambda r, c=column, f=feature: {c: f.int2str(r[c])})
            elif isinstance(getattr(feature, "feature", None), ClassLabel):  # multi-label: List(ClassLabel)
                names = feature.feature.names
                raw[split] = (
                    raw[split]
                    .cast_column(column, List(Value("string")))
                    .map(lambda r, c=column, n=names: {c: [n[int(i)] for i in r[c]]})
                )
    pool = concatenate_datasets([raw[s] for s in ("train", "validation") if s in raw])
    if data_args.max_train_samples and data_args.max_train_samples < len(pool):
        pool = pool.shuffle(seed=seed).select(range(data_args.max_train_samples))
    encoded, task = encode_task(DatasetDict({"train": pool}), data_args)
    return pool, encoded["train"]["labels"], task, raw.get("test")


def duplicate_groups(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(each example's group of exact-duplicate texts, each group's first example), groups in order of first
    appearance."""
    first: dict[str, int] = {}
    for i, text in enumerate(texts):
        first.setdefault(text, i)
    number = {text: g for g, text in enumerate(first)}
    return np.array([number[text] for text in texts]), np.array(list(first.values()))


def assign_folds(texts: list[str], labels: list, problem_type: str, k: int, seed: int) -> np.ndarray:
    """The fold of each example: groups of exact-duplicate texts go to one fold whole; the groups are stratified
    by their first example's label (multi-label: iterative stratification over the label sets; regression:
    the target's rank in ten bins)."""
    from sklearn.model_selection import KFold, StratifiedKFold

    group, heads = duplicate_groups(texts)
    y = np.asarray(labels, dtype=np.int64 if problem_type == SINGLE else np.float64)[heads]
    if problem_type == MULTI:
        from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

        splitter = MultilabelStratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        y = np.stack(y).astype(int)
    elif problem_type == REGRESSION:
        ranks = np.argsort(np.argsort(y, kind="stable"), kind="stable")
        y = np.minimum(ranks * 10 // len(y), 9)
        splitter = (
            StratifiedKFold(k, shuffle=True, random_state=seed)
            if len(y) >= 10 * k
            else KFold(k, shuffle=True, random_state=seed)
        )
    else:
        splitter = StratifiedKFold(k, shuffle=True, random_state=seed)
    fold_of_group = np.empty(len(heads), dtype=int)
    for fold, (_, held) in enumerate(splitter.split(np.zeros(len(heads)), y)):
        fold_of_group[held] = fold
    return fold_of_group[group]


def check_folds(k: int, texts: list[str], labels: list, task) -> None:
    """Every fold needs an example of every class to train on and to score, and exact duplicates share a fold:
    refused when there are fewer distinct texts, overall or of a class, than folds."""
    _, heads = duplicate_groups(texts)
    if len(heads) < k:
        raise UserError(f"the training data has {len(heads)} distinct text(s), fewer than --folds {k}")
    if task.problem_type == REGRESSION:
        return
    labels = np.asarray(labels)[heads]
    if task.problem_type == SINGLE:
        counts = np.bincount(labels.astype(int), minlength=len(task.label_names))
    else:
        counts = np.stack(labels).round().sum(0).astype(int)
    rarest = int(counts.argmin())
    if counts[rarest] < k:
        name, n = task.label_names[rarest], int(counts[rarest])
        raise UserError(
            f"class '{name}' has {n} distinct example(s), fewer than --folds {k}; pass --folds {max(2, n)} or fewer"
        )


def fold_files(pool, folds: np.ndarray, test) -> dict[str, str]:
    """Each fold's train and validation file (and the test split once): JSON Lines of the raw columns, by their
    path in the cv folder."""
    jsonl = lambda ds: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ds.to_list())  # noqa: E731
    files = {}
    for k in range(int(folds.max()) + 1):
        files[f"folds/fold_{k}/train.jsonl"] = jsonl(pool.select(np.flatnonzero(folds != k)))
        files[f"folds/fold_{k}/validation.jsonl"] = jsonl(pool.select(np.flatnonzero(folds == k)))
    if test is not None:
        files["folds/test.jsonl"] = jsonl(test)
    return files


def write_folds(out: Path, files: dict[str, str]) -> None:
    """The fold files (`files`: by their path under folds/), all or none: written under a temporary name and moved
    into place whole; a full disk is one line and leaves none of them."""
    remove(out / "folds")  # an earlier session's: the same plan, so the same content
    try:
        with atomic_path(out / "folds") as staging:
            for path, text in files.items():
                target = staging / Path(path).relative_to("folds")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text, encoding="utf-8")
    except OSError as error:
        if (reason := write_failure(error)) is None:
            raise
        raise UserError(
            f"cannot write the folds' files into {out} ({reason}); none was kept: free space, then run the same "
            "command again"
        ) from None


def digest_of(files: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for path, text in sorted(files.items()):
        digest.update(f"{path}\n{text}".encode())
    return digest.hexdigest()


def fold_flags(flags: list[str], out: Path, k: int, has_test: bool) -> list[str]:
    """The recipe's flags for fold k: the user's, less where the data came from, plus the fold's files."""
    from ..catalog import flag_groups

    kept = [t for name, tokens in flag_groups(flags) if name not in DATA_FLAGS for t in tokens]
    files = ["--train_file", str(out / "folds" / f"fold_{k}" / "train.jsonl"),
             "--validation_file", str(out / "folds" / f"fold_{k}" / "validation.jsonl")]  # fmt: skip
    return [*kept, *files, *(["--test_file", str(out / "folds" / "test.jsonl")] if has_test else [])]


def claim_cv_dir(out: Path, plan: dict, overwrite: bool, inputs: list[str]) -> tuple[int, bool]:
    """Locks the cv folder (refusing what cv did not write); (the lock, whether an earlier cv of the same plan,
    data and folds included, is there to resume). An earlier cv of another plan needs --overwrite_output_dir,
    and then everything it wrote but the bookkeeping is removed first, so no fold of it is read back."""
    try:
        fix = "pass --overwrite_output_dir to run the cv again there, or another --output_dir"
        earlier = read_json(out / PLAN, fix) if (out / PLAN).is_file() else None
    except UserError:
        if not overwrite:
            raise
        earlier = {}  # damaged: replaced like a cv of another plan
    same = earlier is not None and {k: earlier.get(k) for k in plan} == plan
    if earlier is not None and not same and not overwrite:  # refused before anything is written
        raise UserError(
            f"--output_dir {out} holds a cv of other data, folds or flags; pass --overwrite_output_dir to "
            "replace it or another --output_dir"
        )
    writes = [*OUTPUTS, *(f"fold_{k}" for k in range(plan["folds"]))]
    adopt_earlier(out, "cv", (PLAN, "folds"), written_before_manifests)
    lock = claim_tool_dir(out, "cv", writes, inputs=inputs)
    if earlier is not None and not same:
        for name in sorted((owned_entries(out) & entries(out)) - {MANIFEST, LOCK, "logs"}):
            remove(out / name)
    return lock, same


def main(argv: list[str] | None = None) -> None:
    known, flags = parse_args(argv)
    if known.find_label_issues:
        from .audit import import_cleanlab

        import_cleanlab()  # before anything runs
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", known.accelerate_config]
    written = run_cv(known.recipe_file, flags, known.output_dir, known.folds, known.overwrite_output_dir,
                     known.find_label_issues, launcher if known.accelerate_config else ())[1]  # fmt: skip
    print(f"Wrote {', '.join(written)} in {known.output_dir}")


def run_cv(
    recipe: Path, flags: list[str], out: Path, k: int, overwrite: bool, find_label_issues: bool = False, launcher=()
) -> tuple[list[dict], list[str]]:
    """The cv of `recipe` with `flags` in `out`, each fold under `launcher` when given: (each fold's results row,
    the names of the files written). `compare --folds` calls this once per strategy."""
    config = recipe.parent / "configs" / f"{recipe.stem}.yaml"
    model_args, data_args, training_args, *_ = parse_config(
        *SHARED_TYPES, *recipe_types(recipe), args=flags, default_config=config, announce=False
    )
    for flag, value in (
        ("max_eval_samples", data_args.max_eval_samples),
        ("test_split_percentage", data_args.test_split_percentage or None),
    ):  # a YAML's too
        if value is not None:
            raise UserError(f"{flag}: {value} is not taken by cv: {REFUSED[flag]}")
    pool, labels, task, test = pool_and_test(data_args, training_args.seed)
    texts = pool[data_args.text_column]
    check_folds(k, texts, labels, task)
    folds = assign_folds(texts, labels, task.problem_type, k, training_args.seed)
    files = fold_files(pool, folds, test)
    plan = {"recipe": recipe.stem, "folds": k, "flags": flags, "problem_type": task.problem_type,
            "label_names": task.label_names, "seed": training_args.seed, "data": digest_of(files),
            "fold_of": folds.tolist(), "text_column": data_args.text_column}  # fmt: skip
    lock, resume = claim_cv_dir(out, plan, overwrite, flag_inputs(recipe, flags))
    try:
        write_folds(out, files)
        atomic_write(out / PLAN, json.dumps(plan, indent=1) + "\n")
        with on_interrupt(f"the finished folds are kept in {out}; the same command resumes the cv"):
            runs = run_folds(recipe, flags, out, k, test is not None, resume and not overwrite, launcher)
        from .audit import audit
        from .cv_report import write_outputs

        return runs, write_outputs(out, plan, runs, audit=audit if find_label_issues else None)
    finally:
        os.close(lock)


def run_folds(recipe: Path, flags: list[str], out: Path, k: int, has_test: bool, resume: bool, launcher) -> list[dict]:
    """Each fold's run (a finished one of the same plan is read back, not trained again); their rows. A recipe
    that caches what frozen weights compute shares one cache over the folds: the first fold encodes the pool
    and the test split, the others read them."""
    shared = [] if "feature_cache_dir" in given_names(flags) or not caches_features(recipe) else [
        "--feature_cache_dir", str(out / "feature_cache")]  # fmt: skip
    rows = []
    progress = tqdm(total=k, desc=f"cv {recipe.stem}", unit="fold")
    for fold in range(k):
        folder = out / f"fold_{fold}"
        if resume and (folder / "results.json").is_file():
            row = {"strategy": recipe.stem, **read_json(folder / "results.json", RERUN), "status": "ok"}
            row["resumed"] = True
        else:
            progress.set_postfix_str(f"fold {fold}")
            fold_args = [*fold_flags(flags, out, fold, has_test), *shared]
            row = run_recipe(recipe.stem, out, f"fold_{fold}", fold_args, True, launcher)
        rows.append({**row, "fold": fold})
        progress.update()
        tqdm.write(f"fold {fold}: {row['status']}" + (" (finished earlier)" if row.get("resumed") else ""))
        if SAID in row["status"]:
            break
    progress.close()
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        raise UserError(f"fold {failed[0]['fold']} {failed[0]['status']}; fix it and run the same command again")
    return rows


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


def run_recipe(recipe: str, out: Path, folder: str, flags: list[str], overwrite: bool, launcher=()) -> dict:
    """One recipe in its own process (clean memory peak, failures isolated), or under `launcher` (`accelerate
    launch --config_file ...`); its results plus wall time."""
    log = out / "logs" / f"{folder}.log"
    # Every encoding is paid for; a killed run's cache has a temporary name (atomic.is_temporary) a later claim removes.
    with tempfile.TemporaryDirectory(dir=out, prefix=".feature_cache_", suffix=".tmp") as cache:
        given = "feature_cache_dir" in given_names(flags)  # the user's own cache is kept
        extra = ["--feature_cache_dir", cache] if caches_features(recipe) and not given else []
        cmd = [*(launcher or [sys.executable]), str(recipes_dir() / f"{recipe}.py"), *flags, *extra]
        cmd += ["--output_dir", str(out / folder)]
        cmd += ["--overwrite_output_dir"] if overwrite else []
        start = time.perf_counter()
        with log.open("w") as f:
            env = {**os.environ, PARENT: str(os.getpid())}  # the run ends with compare: processes.die_with_launcher
            code = subprocess.run(
                cmd, stdout=f, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent
            ).returncode
        wall = round(time.perf_counter() - start, 1)
    if code != 0:
        cause = error_line(log)  # the run's own one line, else "see LOG"
        status = f"failed ({code}): " + (f"{cause[7:]} {SAID}{log})" if cause.startswith("error: ") else cause)
        return {"strategy": recipe, "wall_time_s": wall, "status": status}
    results = read_json(out / folder / "results.json", RERUN)
    return {"strategy": recipe, **results, "wall_time_s": wall, "status": "ok"}
