"""`finetune-recipes tune RECIPE`: an Optuna study over the search space the recipe file declares.

Each trial runs the recipe in a process of its own, as `compare` does: memory is freed between trials, a
crash fails one trial and not the study, a copied and edited recipe is tuned as it is, and a hopeless trial
can be stopped from outside while the recipe knows nothing of Optuna. A trial reports each evaluation with
`--report_to jsonl` (Accelerate's tracker interface, `metrics.jsonl`); this process reads those lines as they
come and hands them to Optuna's pruner. The study lives in `study.db` (SQLite), so the same command resumes
an interrupted study and Optuna's own tools can read it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from ..atomic import is_temporary
from ..catalog import (
    as_flags,
    caches_features,
    given_names,
    needed_flags,
    recipe_config,
    recipe_types,
    resolve_recipe,
)
from ..config import SHARED_TYPES, greater_is_better
from ..errors import Parser, UserError, listing, on_interrupt
from ..ownership import LOCK, MANIFEST, adopt_earlier, claim_tool_dir, write_manifest
from ..parsing import parse_config
from ..processes import PARENT
from .runs import error_line, flag_inputs, old_name, refuse_hub_flags, tool_dir, with_test_split
from .search_space import check_space, search_space, suggest
from .tune_report import plot_study, write_best_config, write_trials

STUDY = "study.db"
OUTPUTS = {STUDY, "best.yaml", "trials.csv", "trials.md", "tune.png", "logs", "feature_cache", MANIFEST, LOCK}
POLL_S = 0.5


def import_optuna():
    try:
        import optuna
    except ImportError:
        raise UserError("tune needs Optuna: pip install 'finetune-recipes[tune]' (or pip install optuna)") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


class Study:
    """One recipe's Optuna study in `directory`: claimed, locked, resumed, run trial by trial, written out."""

    def __init__(self, recipe: Path, flags: list, space: dict, directory: Path, metric: str, data: dict, options: dict):
        inputs = flag_inputs(recipe, flags)
        self.optuna = optuna = import_optuna()
        self.recipe, self.flags, self.space, self.dir, self.metric = recipe, flags, space, directory, metric
        self.data = data  # each split's digest: a study resumes on the data it began with
        self.types = (*SHARED_TYPES, *recipe_types(recipe))
        storage = f"sqlite:///{(directory / STUDY).resolve()}"
        if (directory / STUDY).is_file():  # checked before anything is written there
            names = optuna.get_all_study_names(storage)
            if recipe.stem not in names:
                raise UserError(f"{directory} holds a study of {listing(names)}; pass another --output_dir")
        adopt_earlier(
            directory,
            "tune",
            (STUDY, "trials.csv"),
            lambda n: n in OUTPUTS or n.startswith(".trial_") or is_temporary(n),
        )
        self.lock = claim_study_dir(directory, inputs)
        self.pruner_name = options["pruner"]
        self.study = optuna.create_study(
            storage=storage,
            study_name=recipe.stem,
            direction="maximize" if greater_is_better(self.metric) else "minimize",
            load_if_exists=True,
        )
        self.check_resumable()
        # TPE samples at random for its first trials: Optuna's 10 would leave a study of 8 a random search. Its
        # seed moves on with the trials so far, or a resumed study would draw its first trials' values again.
        self.study.sampler = optuna.samplers.TPESampler(
            seed=options["seed"] + len(self.study.trials), n_startup_trials=min(10, max(3, options["n_trials"] // 2))
        )

    def check_resumable(self) -> None:
        """A study resumes only with the recipe, flags, space and data it began with (the same command on a train
        file whose rows changed would rank trials trained on different data as one study); trials an interrupted
        session left running are marked failed, and their half-written folders removed."""
        attrs = self.study.user_attrs
        mine = {"recipe": self.recipe.stem, "flags": self.flags, "space": self.space, "metric": self.metric}
        mine["data"] = self.data
        if not attrs:
            for key, value in mine.items():
                self.study.set_user_attr(key, value)
            return
        if attrs.get("recipe") != self.recipe.stem:
            raise UserError(f"{self.dir} holds a study of {attrs.get('recipe')}; pass another --output_dir")
        changed = [k for k in ("flags", "space", "metric") if attrs.get(k) != mine[k]]
        attrs_data = attrs.get("data")
        if attrs_data is None:  # a study begun before data was fingerprinted: resumed on trust, fingerprinted now
            self.study.set_user_attr("data", mine["data"])
            attrs_data = mine["data"]
        splits = [k for k in sorted({*mine["data"], *attrs_data}) if attrs_data.get(k) != mine["data"].get(k)]
        if splits and not changed:
            raise UserError(
                f"{self.dir} holds a study begun on other data (its {' and '.join(splits)} split changed since); "
                "resume it on the same data, or pass another --output_dir"
            )
        if changed:
            raise UserError(
                f"{self.dir} holds a study begun with other {' and '.join(changed)} ({attrs.get(changed[0])}); "
                "resume it with the same ones, or pass another --output_dir"
            )
        interrupted = self.study.get_trials(states=(self.optuna.trial.TrialState.RUNNING,))
        for trial in interrupted:
            self.study.tell(trial.number, state=self.optuna.trial.TrialState.FAIL)  # its folder: claim_study_dir
        if interrupted:  # failed, but not by the recipe: they do not count towards --n_trials
            earlier = self.study.user_attrs.get("interrupted", [])
            self.study.set_user_attr("interrupted", [*earlier, *(t.number for t in interrupted)])

    def done(self) -> int:
        """Finished trials: complete, pruned, or failed in the recipe (not those a stopped session cut short)."""
        TrialState = self.optuna.trial.TrialState
        interrupted = set(self.study.user_attrs.get("interrupted", []))
        finished = self.study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
        return sum(t.number not in interrupted for t in finished)

    def optimize(self, n_trials: int, timeout: float | None) -> None:
        """Trials until the study holds `n_trials` finished ones (a resumed study counts its earlier trials) or
        `timeout` seconds have passed (the running trial finishes)."""
        start, done = time.monotonic(), self.done()
        if done >= n_trials:
            tqdm.write(f"{self.dir} already holds {done} finished trials (--n_trials {n_trials}): nothing to run")
        progress = tqdm(total=n_trials, initial=min(done, n_trials), desc=f"tune {self.recipe.stem}", unit="trial")
        while self.done() < n_trials and (timeout is None or time.monotonic() - start < timeout):
            self.study.pruner = self.pruner()
            trial = self.study.ask()
            params = suggest(trial, self.space)
            state, value, line = self.run_trial(trial, params)
            self.study.tell(
                trial, value if state == "COMPLETE" else None, state=getattr(self.optuna.trial.TrialState, state)
            )
            progress.update()
            best = self.best()
            progress.set_postfix_str(f"best {self.metric} {best.value:.4f}" if best else "no trial finished")
            tqdm.write(f"trial {trial.number}: {line}")
        progress.close()

    def pruner(self):
        """Optuna's median pruner, judging from the third trial on; or successive halving, or none (--pruner).
        `follow` asks it only in the second half of a trial's own run."""
        pruners = self.optuna.pruners
        if self.pruner_name == "halving":
            return pruners.SuccessiveHalvingPruner()
        if self.pruner_name == "none":
            return pruners.NopPruner()
        return pruners.MedianPruner(n_startup_trials=2)

    def run_trial(self, trial, params: dict) -> tuple[str, float | None, str]:
        """(state, value, a line for the log): the recipe on `params` in its own process, its evaluations
        reported to the pruner as they come; its folder removed whatever the outcome."""
        out, log = trial_dir(self.dir, trial.number), self.dir / "logs" / f"trial_{trial.number}.log"
        # Recorded before it exists (a killed tune's trial folder is removed on resume), with what tune writes at
        # the end, which the manifest keeps listing only while it is there or named again.
        write_manifest(self.dir, [out.name, *OUTPUTS], set())
        given = "feature_cache_dir" in given_names(self.flags)
        cache = ["--feature_cache_dir", str(self.dir / "feature_cache")] if caches_features(self.recipe) else []
        cmd = [sys.executable, str(self.recipe), *self.flags, *as_flags(params), *([] if given else cache)]
        cmd += ["--output_dir", str(out), "--report_to", "jsonl"]
        shown = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items())
        trial.set_user_attr("log", str(log))
        start = time.perf_counter()
        try:
            with log.open("w") as f:
                # In tune's process group: Ctrl-C, or a kill of the group, stops the trial too; a kill of tune alone
                # does through processes.die_with_launcher (Linux). The trial holds the study's lock as long as it
                # lives, so no resume can start beside a trial still training (on any platform).
                env = {**os.environ, PARENT: str(os.getpid())}
                process = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, pass_fds=(self.lock,))
                try:
                    pruned_at = self.follow(process, trial, out / "finetune_recipes" / "metrics.jsonl")
                except BaseException:  # KeyboardInterrupt, or a failure here: no trial left training alone
                    process.terminate()
                    process.wait()
                    raise
            wall = round(time.perf_counter() - start, 1)
            trial.set_user_attr("wall_time_s", wall)
            if pruned_at is not None:
                return "PRUNED", None, f"pruned at step {pruned_at} ({shown}), {wall} s"
            if process.returncode != 0:
                return "FAIL", None, f"failed ({process.returncode}: {error_line(log)}) ({shown})"
            try:
                results = json.loads((out / "results.json").read_text())
                value = float(results[f"eval_{self.metric}"])
            except (OSError, ValueError, KeyError, TypeError) as error:  # a recipe copy that saves otherwise
                return "FAIL", None, f"no eval_{self.metric} in its results.json ({error.__class__.__name__}) ({shown})"
            if not math.isfinite(value):  # diverged: Optuna refuses a NaN for a complete trial
                return "FAIL", None, f"{self.metric} {value} ({shown}), {wall} s"
            for key in ("train_runtime_s", "trainable_params", *(k for k in results if k.startswith("test_"))):
                if isinstance(results.get(key), int | float):
                    trial.set_user_attr(key, results[key])
            return "COMPLETE", value, f"{self.metric} {value:.4f} ({shown}), {wall} s"
        finally:
            shutil.rmtree(out, ignore_errors=True)

    def follow(self, process: subprocess.Popen, trial, metrics: Path) -> int | None:
        """Waits for `process`, reporting each evaluation of the metric to Optuna; stops the process and returns
        the step when the pruner says so."""
        read, total = 0, None
        while True:
            finished = process.poll() is not None
            if total is None and (metrics.parent / "config.json").exists():
                total = json.loads((metrics.parent / "config.json").read_text()).get("total_steps")
            if metrics.exists():
                with metrics.open("rb") as f:  # only what came since the last look
                    f.seek(read)
                    new = f.read()
                complete = new[: new.rfind(b"\n") + 1]  # whole lines only: the writer may be mid-line
                read += len(complete)
                for line in complete.decode().splitlines():
                    record = json.loads(line)
                    value = record.get(f"eval/{self.metric}")
                    if value is None or not math.isfinite(value):
                        continue
                    trial.report(value, record["step"])
                    # Judged only in the second half of its own run (warm-up and low rates start slowly and catch
                    # up, and a trial of more epochs is not held to a shorter one's final score), and never at its
                    # last evaluation: its result is in, nothing is saved by stopping it.
                    judged = total is not None and total / 2 < record["step"] < total
                    if not finished and judged and trial.should_prune():
                        process.terminate()
                        process.wait()
                        return record["step"]
            if finished:
                return None
            time.sleep(POLL_S)

    def best(self):
        try:
            return self.study.best_trial
        except ValueError:  # no complete trial yet
            return None

    def write(self, command: str) -> list[str]:
        """best.yaml (read back with --config), trials.csv, trials.md and tune.png; returns what was written."""
        written = [*write_trials(self.study, self.metric, self.dir, command)]
        best = self.best()
        if best is not None:
            write_best_config(self, best)
            written.insert(0, "best.yaml")
        if plot_study(self.study, self.metric, self.dir / "tune.png", self.optuna):
            written.append("tune.png")
        return written


def trial_dir(directory: Path, number: int) -> Path:
    return directory / f".trial_{number}"


def claim_study_dir(directory: Path, inputs: list[str]) -> int:
    """Refuses an output_dir holding what tune did not write; locks it; removes a killed session's trial folders."""
    return claim_tool_dir(directory, "tune", OUTPUTS, inputs=inputs, leftover=lambda n: n.startswith(".trial_"))


def objective_metric(types: tuple[type, ...], flags: list[str], recipe: Path) -> tuple[str, dict[str, str]]:
    """--metric_for_best_model, else the task's primary metric (accuracy, micro-F1 or MSE), read from the data,
    which is checked here, before the first trial, with the flags every trial gets; and each split's digest."""
    from ..data import raw_splits

    _, data_args, args, *_ = parse_config(*types, args=flags, default_config=recipe_config(recipe))
    splits, task = raw_splits(data_args, args.seed)
    if task.held_out_test:
        print(
            f"The data has no test split: {task.held_out_test:g}% of train ({len(splits['test'])} texts) is held out "
            "as test, stratified; no trial trains or chooses on it",
            file=sys.stderr,
        )
    digests = {}
    for split, ds in splits.items():  # the texts and labels in order: what every trial trains and is scored on
        digest = hashlib.sha256()
        columns = [c for c in (data_args.text_column, data_args.text_pair_column, "labels") if c in ds.column_names]
        for row in ds.select_columns(columns):
            digest.update(json.dumps(row, sort_keys=True, default=str).encode())
        digests[split] = digest.hexdigest()[:24]
    return args.metric_for_best_model or task.primary_metric, digests


def main(argv: list[str] | None = None) -> None:
    parser = Parser(
        prog="finetune-recipes tune",
        description="Searches a recipe's declared SEARCH_SPACE with Optuna (TPE, pruning on each evaluation). Any "
        "other flag goes to the recipe and stays fixed. With no test split in the data, 10% of train is held out "
        "as test (--test_split_percentage), so what the study reports was never used to choose. A recipe that "
        "needs a flag (distill's --teacher) is tuned only with it.",
        allow_abbrev=False,
    )
    parser.add_argument("recipe", help="a recipe name (finetune-recipes ls) or the path of a recipe file")
    parser.add_argument("--n_trials", type=int, default=8, help="finished trials the study should hold")
    parser.add_argument("--timeout", type=float, help="seconds; no trial starts after them")
    parser.add_argument("--output_dir", help="default outputs/tune/RECIPE; trial N's run is its .trial_N/ while it "
                        "runs; an existing study there resumes")  # fmt: skip
    parser.add_argument("--study_dir", dest="output_dir", help=argparse.SUPPRESS)  # its 0.1 name: old_name() warns
    parser.add_argument("--pruner", choices=["median", "halving", "none"], default="median")
    parser.add_argument("--search_space", help="YAML file replacing the recipe's SEARCH_SPACE")
    parser.add_argument("--study_seed", type=int, default=0, help="the TPE sampler's seed")
    known, rest = parser.parse_known_args(old_name(argv, "--study_dir"))
    best = run_study(
        known.recipe, rest, known.n_trials, known.timeout, known.output_dir, known.pruner, known.search_space,
        known.study_seed, command="finetune-recipes tune " + " ".join(argv or []),
    )  # fmt: skip
    if best is None:
        raise UserError("no trial finished; read the trial logs in the study's logs/ folder")


def run_study(
    recipe_name: str,
    flags: list[str],
    n_trials: int = 8,
    timeout: float | None = None,
    output_dir: str | None = None,
    pruner: str = "median",
    space_file: str | None = None,
    study_seed: int = 0,
    command: str = "",
) -> dict | None:
    """Runs (or resumes) a study; writes its outputs; returns the best trial's params, or None."""
    if n_trials < 1:
        raise UserError(f"--n_trials must be at least 1, not {n_trials}")
    if timeout is not None and not timeout > 0:
        raise UserError(f"--timeout must be a positive number of seconds, not {timeout}")
    recipe = resolve_recipe(recipe_name)
    flags = with_test_split(flags)
    types = (*SHARED_TYPES, *recipe_types(recipe))
    given = given_names(flags)
    if "report_to" in given:
        raise UserError("tune sets each trial's --report_to (its metrics drive the pruning); drop --report_to")
    refuse_hub_flags(given, f"tune's trials do not push; push the best with python {recipe.name} --config best.yaml")
    missing = [name for name in needed_flags(recipe) if name not in given]
    if missing:
        raise UserError(
            f"{recipe.stem} needs --{missing[0]} for every trial; pass it (tune {recipe.stem} --{missing[0]} ...)"
        )
    space = search_space(recipe, space_file)
    check_space(space, types, given, recipe.stem)
    metric, data = objective_metric(types, flags, recipe)
    directory = tool_dir(output_dir, "tune", recipe.stem)
    options = {"pruner": pruner, "seed": study_seed, "n_trials": n_trials}
    study = Study(recipe, flags, space, directory, metric, data, options)
    try:
        with on_interrupt(f"the finished trials are kept in {directory}; the same command resumes the study"):
            study.optimize(n_trials, timeout)
        written = study.write(command.strip())
        write_manifest(directory, written, set())  # names listed ahead and never written drop out
    finally:
        os.close(study.lock)
    best = study.best()
    if best is not None:
        print(f"best: trial {best.number}, validation {study.metric} {best.value:.4f}: {best.params}")
    print(f"wrote {', '.join(written)} in {directory}")
    return None if best is None else best.params
