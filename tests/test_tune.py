"""`finetune-recipes tune` and the evidence `compare` gives: studies, pruning, resume, seeds, held-out test."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import ROOT, run_inline, run_recipe, start_stoppable
from test_cli import replace_flag, snapshot
from test_distributed import TWO_PROCESSES
from test_stopping import gone_within

from finetune_recipes.catalog import list_recipes, recipe_namespace, recipe_types, resolve_recipe
from finetune_recipes.config import SHARED_TYPES
from finetune_recipes.ownership import write_manifest
from finetune_recipes.tools.cli import main
from finetune_recipes.tools.search_space import check_space, search_space

CLI = str(Path(sys.executable).parent / "finetune-recipes")


def learning(tiny_args: list) -> list[str]:
    """The tiny model learns this task in 8 epochs at a rate near 3e-3 (see test_recipes), not in 3."""
    return replace_flag(data_flags(tiny_args), "--num_train_epochs", "8")


def data_flags(tiny_args: list, drop: tuple[str, ...] = ("--output_dir", "--learning_rate")) -> list[str]:
    """The tiny run's flags without --output_dir (tune and compare set it) and --learning_rate (tuned)."""
    args = [str(a) for a in tiny_args]
    for flag in drop:
        i = args.index(flag)
        args = args[:i] + args[i + 2 :]
    return args


@pytest.mark.parametrize("recipe", sorted(list_recipes()))
def test_every_recipe_declares_a_search_space_its_parser_accepts(recipe):
    path = resolve_recipe(recipe)
    space = search_space(path)
    assert space and recipe_namespace(path)["SEARCH_SPACE"] is space
    check_space(space, (*SHARED_TYPES, *recipe_types(recipe)), set(), recipe)  # raises on a bad entry


@pytest.mark.parametrize(
    "space, argv, message",
    [
        (None, ["tune", "no_such_recipe"], "no recipe 'no_such_recipe'"),
        (None, ["tune", "full_finetune", "--n_trials", "0"], "--n_trials must be at least 1, not 0"),
        ({"lora_r": {"low": 2, "high": 8}}, [], "names --lora_r, which full_finetune does not take"),
        ({"learning_rate": {"low": 1e-3, "high": 1e-3}}, [], "learning_rate is empty (low 0.001, high 0.001)"),
        ({"learning_rate": {"low": 1e-2, "high": 1e-4}}, [], "learning_rate is inverted (low 0.01, high 0.0001)"),
        ({"learning_rate": {"low": 0, "high": 1e-2, "log": True}}, [], "log scale, so low must be above 0"),
        (
            {"warmup_ratio": {"low": 0.0, "high": 2.0}},
            [],
            "entry warmup_ratio: warmup_ratio is 2.0; pass a value between 0 and 1",
        ),
        ({"num_train_epochs": {"choices": []}}, [], "num_train_epochs has no choices"),
        ({"learning_rate": {"low": "1e-5", "high": 1e-3}}, [], "not '1e-5', 0.001 (YAML reads 1e-5 as text"),
        ({"learning_rate": {"low": 1e-5, "high": 1e-3}}, ["--learning_rate", "1e-4"], "--learning_rate is in the"),
        ({"output_dir": {"choices": ["a", "b"]}}, [], "names --output_dir, which tune sets for each trial"),
        ({"learning_rate": {"lo": 1e-5, "high": 1e-3}}, [], "entry learning_rate has 'lo'; write low, high"),
        ({"learning_rate": {"low": -1e-3, "high": 1e-3}}, [], "learning_rate is -0.001; pass a rate above 0"),
        (None, ["compare", "--recipes", "llrd,llrd"], "--recipes names llrd twice"),
        (None, ["compare", "--seeds", "0"], "--seeds must be at least 1, not 0"),
        (None, ["compare", "--trials", "-1"], "--trials must be 0 (no tuning) or more, not -1"),
        (None, ["tune", "llrd", "--push_to_hub", "--hub_model_id", "me/x"], "--hub_model_id is not taken here: tune"),
        (None, ["compare", "--hub_token", "hf_secret"], "--hub_token is not taken here: compare does not push"),
    ],
)
def test_bad_tune_and_compare_input_is_one_line_and_writes_nothing(space, argv, message, tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("mine")
    if space is not None:
        (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
        argv = ["tune", "full_finetune", "--search_space", str(tmp_path / "space.yaml"), *argv]
    argv = [*argv, "--output_dir", str(tmp_path / "out")]
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and message in err[0], err
    assert snapshot(tmp_path) == before


def test_a_study_of_another_recipe_or_a_users_folder_is_refused(tiny_args, tmp_path, capsys):
    (tmp_path / "study").mkdir()
    llrd = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study' / 'study.db'}", study_name="llrd")
    llrd.set_user_attr("recipe", "llrd")
    (tmp_path / "yours").mkdir()
    (tmp_path / "yours" / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    for folder, message in (("study", "holds a study of llrd"), ("yours", "holds 'notes.txt', which tune did not")):
        with pytest.raises(SystemExit) as exit_info:
            main(["tune", "feature_extraction", "--output_dir", str(tmp_path / folder), *data_flags(tiny_args)])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and message in err[-1], err
    assert snapshot(tmp_path) == before


def test_eval_steps_beyond_the_run_is_refused_before_anything_is_written(tiny_args, tmp_path):
    proc = run_inline("full_finetune", *tiny_args, "--eval_strategy", "steps", "--eval_steps", "1000", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: eval_steps 1000 is more than the run's 36")
    assert not (tmp_path / "out").exists()


def tune_learning_rate(low: float, high: float, study: Path, tiny_args: list, *argv: str) -> None:
    """`finetune-recipes tune full_finetune` over the learning rate alone (log scale), on the tiny task; in this
    process (its trials are processes of their own)."""
    space = study.parent / "space.yaml"
    space.write_text(yaml.safe_dump({"learning_rate": {"low": low, "high": high, "log": True}}))
    main(
        ["tune", "full_finetune", "--output_dir", str(study), "--search_space", str(space), *argv, *learning(tiny_args)]
    )


@pytest.mark.slow
def test_a_study_prunes_a_hopeless_trial_and_its_best_yaml_reproduces_the_best(tiny_args, tmp_path):
    """Two trials at 3e-3, where the tiny model learns in 8 epochs, then one at 1e-7, which cannot move: the
    median pruner stops it at its first evaluation past the halfway mark; the best trial's YAML trains the same
    model again. (The trials are queued: a random start of three would leave the outcome to the seed.)"""
    study_dir = tmp_path / "study"
    study_dir.mkdir()
    study = optuna.create_study(
        storage=f"sqlite:///{study_dir / 'study.db'}", study_name="full_finetune", direction="maximize"
    )
    for lr in (3e-3, 3e-3, 1e-7):  # two that learn, then one that cannot move in eight epochs
        study.enqueue_trial({"learning_rate": lr})
    write_manifest(study_dir, ["study.db"], set())  # as an earlier tune there would have
    tune_learning_rate(1e-7, 1e-2, study_dir, tiny_args, "--n_trials", "3", "--pruner", "median")
    assert sorted(p.name for p in study_dir.iterdir()) == [
        ".finetune_recipes.json",
        ".finetune_recipes.lock",
        "best.yaml",
        "logs",
        "study.db",
        "trials.csv",
        "trials.md",
        "tune.png",
    ]  # fmt: skip: no trial's folder left behind
    trials = list(csv.DictReader((study_dir / "trials.csv").open()))
    assert [t["state"] for t in trials] == ["complete", "complete", "pruned"]
    assert 48 < int(trials[2]["pruned at step"]) < 96  # judged in the second half of its 96 steps only
    best = max(trials[:2], key=lambda t: float(t["validation accuracy"]))
    assert float(best["validation accuracy"]) > 0.5  # chance is 1/3
    assert best["test accuracy"]  # the test file's metrics, never used to choose
    # The best YAML, read back with --config, trains the best trial's model again: the same score.
    config = yaml.safe_load((study_dir / "best.yaml").read_text())
    assert config["learning_rate"] == pytest.approx(float(best["learning_rate"]))
    run_inline("full_finetune", "--config", study_dir / "best.yaml", "--output_dir", tmp_path / "again")
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again["eval_accuracy"] == pytest.approx(float(best["validation accuracy"]), abs=1e-9)
    assert (study_dir / "tune.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
@pytest.mark.parametrize(
    "stop",
    [
        pytest.param(signal.SIGKILL, id="kill", marks=pytest.mark.skipif(
            not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")),
        pytest.param(signal.SIGINT, id="ctrl_c"),
    ],
)  # fmt: skip
def test_an_interrupted_study_resumes_with_the_same_command(stop, tiny_args, tmp_path, capsys):
    study = tmp_path / "study"
    cmd = [CLI, "tune", "static_embeddings", "--n_trials", "2", "--output_dir", str(study), *data_flags(tiny_args)]
    process = start_stoppable(cmd)
    deadline = time.monotonic() + 600
    while not (study / ".trial_1").exists() and time.monotonic() < deadline:  # trial 1 has begun writing
        time.sleep(0.2)
    # Ctrl-C reaches the group in the middle of trial 1; SIGKILL, the harsher case, reaches tune alone: its
    # trial must not train on (the parent-death signal), nor keep the study's lock from the resume.
    (os.killpg if stop == signal.SIGINT else os.kill)(process.pid, stop)
    stderr = process.communicate(timeout=120)[1]
    if stop == signal.SIGKILL:
        assert gone_within(str(study / ".trial_1"), 20) == []  # no trial left training into .trial_1
    if stop == signal.SIGINT:
        assert process.returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
        assert stderr.strip().splitlines()[-1] == (
            f"error: interrupted (Ctrl-C); the finished trials are kept in {study}; the same command resumes the study"
        )
    # Killed, the cut trial's folder stays for the resume to remove; interrupted, tune removes it itself.
    assert any(p.name.startswith(".trial_") for p in study.iterdir()) == (stop == signal.SIGKILL)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = list(csv.DictReader((study / "trials.csv").open()))
    # Trial 1 was cut short (failed, not counted); trial 2 replaced it.
    assert [t["state"] for t in trials] == ["complete", "fail", "complete"]
    assert not any(p.name.startswith(".trial_") for p in study.iterdir())
    if stop == signal.SIGINT:  # running it again has nothing left to do (the same after a kill: checked once)
        main(cmd[1:])
        assert "already holds 2 finished trials" in capsys.readouterr().out


@pytest.mark.slow
def test_compare_with_seeds_reports_mean_std_on_a_held_out_test_split(tiny_args, tmp_path):
    flags = data_flags(tiny_args, drop=("--output_dir", "--test_file"))  # no test split: compare holds one out
    out = tmp_path / "cmp"
    main(["compare", "--recipes", "feature_extraction", "--seeds", "2", "--output_dir", str(out), *flags])
    assert {"feature_extraction_seed42", "feature_extraction_seed43"} <= {p.name for p in out.iterdir()}
    table = (out / "comparison.md").read_text()
    assert "| strategy | test accuracy (mean ± std) | test f1_macro (mean ± std) | 95% CI of accuracy |" in table
    assert "| feature_extraction | 0." in table and " ± 0." in table.split("| feature_extraction |")[1]
    assert "10% of train held out before training" in table
    assert "Best on test accuracy: feature_extraction (0." in table  # the only strategy: nothing to test against
    runs = list(csv.DictReader((out / "comparison.csv").open()))
    assert [(r["strategy"], r["seed"]) for r in runs] == [
        ("tfidf_logreg", ""), ("feature_extraction", "42"), ("feature_extraction", "43"),
    ]  # fmt: skip
    assert all(r["eval_accuracy"] and r["test_accuracy"] for r in runs)
    # 96 training texts, 10 of them held out as test (stratified): each run is tested on the same 10.
    results = [json.loads((out / f"feature_extraction_seed{s}" / "results.json").read_text()) for s in (42, 43)]
    assert [r["test_samples"] for r in results] == [10, 10]
    assert results[0]["task"]["held_out_test"] == 10.0


@pytest.mark.slow
def test_eval_steps_on_two_processes_counts_every_example_once_and_streams_metrics(tiny_args, tmp_path):
    run_recipe(
        "full_finetune", *tiny_args, "--eval_strategy", "steps", "--eval_steps", "5", "--report_to", "jsonl",
        launcher=TWO_PROCESSES,
    )  # fmt: skip
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    steps = results["steps"]
    assert [h["step"] for h in results["history"]] == [*range(5, steps + 1, 5), *([steps] if steps % 5 else [])]
    assert all(h["samples"] == 30 for h in results["history"])  # 30 validation texts, none twice
    lines = (tmp_path / "out" / "finetune_recipes" / "metrics.jsonl").read_text().splitlines()
    evaluations = [json.loads(line) for line in lines if "eval/accuracy" in line]
    assert [e["step"] for e in evaluations] == [h["step"] for h in results["history"]]


def test_the_verdict_names_the_best_those_within_its_noise_the_cheapest_and_the_baseline():
    from finetune_recipes.tools.compare_report import summarise, verdict

    task = {"problem_type": "single_label_classification"}
    runs = [{"strategy": "tfidf_logreg", "test_accuracy": 0.8, "wall_time_s": 1.0, "status": "ok", "task": task}]
    for name, values, wall in (
        ("a", [0.90, 0.91, 0.92], 50.0),
        ("b", [0.905, 0.915, 0.925], 90.0),
        ("c", [0.5, 0.51, 0.52], 5.0),
    ):
        runs += [
            {"strategy": name, "test_accuracy": v, "wall_time_s": wall, "status": "ok", "task": task} for v in values
        ]
    rows = summarise(runs, "test", ("accuracy",))
    b = next(r for r in rows if r["strategy"] == "b")
    assert b["test_accuracy"] == pytest.approx(0.915) and b["std_accuracy"] == pytest.approx(0.01)
    assert b["ci95_accuracy"] == pytest.approx(4.302653 * 0.01 / 3**0.5, rel=1e-5)  # t(0.975, 2 df)
    text = verdict(rows, "test", "accuracy", seeds=3)
    assert text.startswith("Best on test accuracy: b (0.9150 ± 0.0100).")
    assert "Within the noise of it at 3 seeds (Welch's t-test, p ≥ 0.05): a." in text  # not c
    assert "The cheapest of these: a, 50 s a run (the best took 90 s)." in text
    assert text.endswith("The TF-IDF baseline scores 0.8000: 2 of 3 strategies do better.")
    lone = [*runs[:4], runs[6]]  # the best, b, with one finished run of three: nothing is tested against it
    text = verdict(summarise(lone, "test", ("accuracy",)), "test", "accuracy", seeds=3)
    assert "b (0.9250)" in text and "fewer than 2 finished runs, so nothing can be told apart" in text
    text = verdict(summarise([*runs[:7], runs[7]], "test", ("accuracy",)), "test", "accuracy", seeds=3)
    assert "Not tested, with fewer than 2 finished runs: c." in text and "beyond the noise" not in text
    assert "One seed gives no estimate of the noise" in verdict(
        summarise(runs[:5:3], "test", ("accuracy",)), "test", "accuracy", 1
    )


def test_best_yaml_keeps_what_the_users_config_file_set(tiny_args, tmp_path):
    """--config replaces the recipe's YAML, so best.yaml must carry that file's settings, not only the flags."""
    from types import SimpleNamespace

    from finetune_recipes.tools.tune import write_best_config

    args = data_flags(tiny_args)
    mine = {args[i][2:]: args[i + 1] for i in range(0, len(args), 2)}
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(mine))
    recipe = resolve_recipe("full_finetune")
    study = SimpleNamespace(
        recipe=recipe, flags=["--config", str(tmp_path / "mine.yaml"), "--seed", "7"], dir=tmp_path,
        types=(*SHARED_TYPES, *recipe_types(recipe)), metric="accuracy", study=SimpleNamespace(trials=[0, 1]),
    )  # fmt: skip
    write_best_config(study, SimpleNamespace(params={"learning_rate": 2e-3}, number=1, value=0.75))
    best = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert all(str(best[k]) == v or float(best[k]) == float(v) for k, v in mine.items()), best
    assert best["seed"] == 7 and best["learning_rate"] == 2e-3


def test_a_study_resumes_only_on_the_data_it_began_with(tiny_args, tiny_data, tmp_path):
    import os

    from finetune_recipes.errors import UserError
    from finetune_recipes.tools.tune import Study, objective_metric

    recipe = resolve_recipe("full_finetune")
    types = (*SHARED_TYPES, *recipe_types(recipe))
    train = tmp_path / "train.csv"
    train.write_text(tiny_data["train"].read_text())
    flags = [str(train) if str(a) == str(tiny_data["train"]) else str(a) for a in tiny_args]
    flags = flags[: flags.index("--output_dir")] + flags[flags.index("--output_dir") + 2 :]
    space = {"learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}}
    options = {"pruner": "median", "seed": 0, "n_trials": 2}
    metric, data = objective_metric(types, flags, recipe)
    os.close(Study(recipe, flags, space, tmp_path / "study", metric, data, options).lock)
    os.close(Study(recipe, flags, space, tmp_path / "study", metric, data, options).lock)  # the same data: resumes
    train.write_text(train.read_text().replace("market", "stock"))  # the same command, the file's rows changed
    _, changed = objective_metric(types, flags, recipe)
    assert changed["train"] != data["train"] and changed["validation"] == data["validation"]
    with pytest.raises(UserError, match="begun on other data \\(its train split changed since\\)"):
        Study(recipe, flags, space, tmp_path / "study", metric, changed, options)


def test_the_verdict_says_when_strategies_finished_without_the_ranked_score():
    from finetune_recipes.tools.compare_report import verdict

    rows = [{"strategy": "tfidf_logreg", "status": "ok", "test_accuracy": 0.7}, {"strategy": "llrd", "status": "ok"}]
    assert (
        verdict(rows, "test", "accuracy", 1)
        == "No strategy reports test accuracy (llrd finished): read their results.json."
    )
    rows[1]["status"] = "failed (1): see logs/llrd.log"
    assert verdict(rows, "test", "accuracy", 1) == "No strategy finished: read the logs in logs/."


def test_the_data_digest_takes_a_test_split_without_labels(tiny_args, tiny_data, tmp_path):
    from finetune_recipes.tools.tune import objective_metric

    unlabelled = tmp_path / "test.csv"
    unlabelled.write_text(
        "text\n" + "".join(f"{line.split(',')[0]}\n" for line in tiny_data["test"].read_text().splitlines()[1:])
    )
    flags = [str(unlabelled) if str(a) == str(tiny_data["test"]) else str(a) for a in tiny_args]
    recipe = resolve_recipe("full_finetune")
    metric, data = objective_metric((*SHARED_TYPES, *recipe_types(recipe)), flags, recipe)
    assert metric == "accuracy" and {"train", "validation"} <= set(data)


def test_tune_refuses_an_input_of_its_runs_where_it_writes(tiny_args, tmp_path, capsys):
    """Issue 39, item 1, for tune: its inputs are read from the recipe's flags before anything runs."""
    study = tmp_path / "study"
    (study / "logs").mkdir(parents=True)
    train = study / "logs" / "train.csv"
    flags = data_flags(tiny_args)
    train.write_text(Path(flags[flags.index("--train_file") + 1]).read_text())
    flags[flags.index("--train_file") + 1] = str(train)
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}}))
    with pytest.raises(SystemExit) as exit_info:
        main(["tune", "full_finetune", "--output_dir", str(study), "--search_space", str(space), *flags])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and last == (
        f"error: {train}, an input of this tune, is where tune writes in --output_dir {study}; move it out of "
        f"{study} or pass another --output_dir"
    )
    assert sorted(p.name for p in study.rglob("*")) == ["logs", "train.csv"]
