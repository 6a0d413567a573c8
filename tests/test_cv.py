"""`finetune-recipes cv` and `audit`: folds, out-of-fold predictions, resume, and the label audit."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import ROOT
from tiny import write_csv

from finetune_recipes.config import MULTI, REGRESSION, SINGLE
from finetune_recipes.errors import UserError
from finetune_recipes.reporting.predictions import prediction_rows, read_csv, scores_of, to_csv
from finetune_recipes.tools.cli import main as cli_main
from finetune_recipes.tools.cv import assign_folds, check_folds

CLI = str(Path(sys.executable).parent / "finetune-recipes")


def test_folds_hold_each_example_once_duplicates_together_and_classes_evenly():
    rng = random.Random(0)
    texts = [f"text {i % 70}" for i in range(100)]  # 30 texts appear twice
    labels = [int(t.split()[1]) % 3 for t in texts]
    folds = assign_folds(texts, labels, SINGLE, 5, seed=0)
    assert sorted(Counter(folds)) == [0, 1, 2, 3, 4] and len(folds) == 100
    by_text: dict[str, set] = {}
    for text, fold in zip(texts, folds, strict=True):
        by_text.setdefault(text, set()).add(int(fold))
    assert all(len(f) == 1 for f in by_text.values())  # a duplicate never trains the model that scores it
    groups = {t: labels[texts.index(t)] for t in by_text}
    for fold in range(5):
        per_class = Counter(groups[t] for t in groups if by_text[t] == {fold})
        assert max(per_class.values()) - min(per_class.values()) <= 1  # stratified over the distinct texts
    assert (assign_folds(texts, labels, SINGLE, 5, seed=0) == folds).all()
    assert not (assign_folds(texts, labels, SINGLE, 5, seed=1) == folds).all()
    multi = [[rng.random() < 0.3, rng.random() < 0.5, 1.0] for _ in range(100)]
    multi_folds = assign_folds([f"m {i}" for i in range(100)], multi, MULTI, 4, seed=0)
    for fold in range(4):
        held = np.asarray(multi, dtype=float)[multi_folds == fold]
        assert (held.sum(0) > 0).all()  # every label in every fold
    values = [float(i) for i in range(100)]
    reg_folds = assign_folds([f"r {i}" for i in range(100)], values, REGRESSION, 5, seed=0)
    for fold in range(5):  # rank bins: each fold spans the target's range
        held = np.asarray(values)[reg_folds == fold]
        assert held.min() < 10 and held.max() >= 90


def test_scores_read_back_for_label_names_with_spaces_and_colons():
    names = ["world news", "sci:tech", "x"]
    for kind, truth in ((SINGLE, [1]), (MULTI, [[0, 1, 1]])):
        (row,) = prediction_rows(kind, names, np.array([[0.25, 0.5, 0.25]]), np.array(truth), ["a text"])
        assert scores_of(row, names) == [0.25, 0.5, 0.25]
    with pytest.raises(UserError, match="do not list the run's labels"):
        scores_of(row, ["world", "news"])


def test_the_multi_label_audit_flags_label_sets_the_predictions_contradict():
    rng, names = np.random.default_rng(0), ["a", "bad|worse", "c"]  # a name holding the old list separator
    truth = rng.random((90, 3)) < 0.4
    probs = np.where(truth, rng.uniform(0.8, 0.99, truth.shape), rng.uniform(0.01, 0.2, truth.shape))
    given = truth.copy()
    given[[3, 17, 40]] = ~given[[3, 17, 40]]  # three label sets turned inside out
    oof = [
        {**row, "id": i}
        for i, row in enumerate(prediction_rows(MULTI, names, probs, given, [f"t{i}" for i in range(90)]))
    ]
    from finetune_recipes.tools.audit import issues_section, label_issues
    from finetune_recipes.tools.cv_report import references

    written = read_csv(to_csv(oof))  # as cv writes oof_predictions.csv and reads it back
    assert (references(written, MULTI, names) == given).all()  # each truth read back as it was
    plan = {"problem_type": MULTI, "label_names": names}
    issues = label_issues(oof, plan)
    assert {r["id"] for r in issues[:3]} == {3, 17, 40}
    suggested = json.loads(issues[0]["suggested"])
    assert suggested == [n for n, t in zip(names, truth[issues[0]["id"]], strict=True) if t]
    counted = issues_section(issues, plan).split("| flagged |")[1].split("\n\n")[0]  # per given label
    assert [line.split(" | ")[0] for line in counted.strip().splitlines()[1:]] == ["| a", "| bad\\|worse", "| c"]


def test_cv_never_writes_over_its_own_input(module_args, tmp_path, capsys):
    """Issue 39, item 1: a training file named as cv's own results table, inside cv's --output_dir."""
    folder = tmp_path / "u3"
    folder.mkdir()
    train = folder / "cv.csv"
    flags = [str(a) for a in module_args]
    train.write_text(Path(flags[flags.index("--train_file") + 1]).read_text())
    before = train.read_text()
    flags[flags.index("--train_file") + 1] = str(train)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["cv", "full_finetune", "--folds", "2", "--output_dir", str(folder), *flags])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and lines[-1] == (
        f"error: {train}, an input of this cv, is where cv writes in --output_dir {folder}; move it out of {folder} "
        "or pass another --output_dir"
    )
    assert train.read_text() == before and sorted(p.name for p in folder.iterdir()) == ["cv.csv"]


def test_folds_are_refused_by_distinct_texts_not_by_copies():
    task = SimpleNamespace(problem_type=SINGLE, label_names=["a", "b"])
    texts, labels = ["same a"] * 6 + [f"b {i}" for i in range(6)], [0] * 6 + [1] * 6
    check_folds(3, [f"a {i}" for i in range(6)] + texts[6:], labels, task)  # six distinct of each: fine
    with pytest.raises(UserError, match="class 'a' has 1 distinct example"):
        check_folds(3, texts, labels, task)  # six copies are one group: one fold would have no 'a'


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--folds", "1"], "--folds must be at least 2, not 1"),
        (["--folds", "1000"], "distinct text(s), fewer than --folds 1000"),  # train and validation pooled
        (["--folds", "60"], "distinct example(s), fewer than --folds 60; pass --folds"),  # about 42 a topic
        (["--max_eval_samples", "5"], "--max_eval_samples is not taken by cv: every held-out example is predicted"),
        (["--output_dir", ""], "--output_dir is empty; pass a folder, or drop it for outputs/cv/full_finetune"),
    ],
)
def test_bad_cv_input_is_one_line_and_writes_nothing(argv, message, module_args, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an empty --output_dir must not become the working directory either
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["cv", "full_finetune", "--output_dir", str(tmp_path / "cv"), *module_args, *argv])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and message in lines[-1], lines
    assert not (tmp_path / "cv").exists() and not (tmp_path / "outputs").exists() and not (tmp_path / "logs").exists()


def flipped_data(tiny_data, root: Path, share: float = 0.08) -> tuple[Path, set[int]]:
    """The tiny train split with a seeded share of its labels moved to another topic; the rows moved. Three texts
    hold a Windows line break, which cv's predictions files must give back as written."""
    rows = list(csv.DictReader(tiny_data["train"].open()))
    rng = random.Random(7)
    moved = set(rng.sample(range(len(rows)), round(share * len(rows))))
    topics = sorted({r["label"] for r in rows})
    for i in moved:
        rows[i]["label"] = topics[(topics.index(rows[i]["label"]) + 1) % len(topics)]
    for row in rows[:3]:
        row["text"] = row["text"].replace(" ", "\r\n", 1)
    return write_csv(root / "flipped.csv", rows), moved


def cv_flags(module_args: list, train: Path, test: Path) -> list[str]:
    flags = [str(a) for a in module_args]
    flags[flags.index("--train_file") + 1] = str(train)
    i = flags.index("--validation_file")
    del flags[i : i + 2]
    return [*flags, "--test_file", str(test), "--num_train_epochs", "15", "--learning_rate", "3e-3"]


@pytest.fixture(scope="module")
def audited(module_args, tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("cv")
    train, moved = flipped_data(tiny_data, root)
    flags = cv_flags(module_args, train, tiny_data["test"])
    cli_main(["cv", "full_finetune", "--folds", "3", "--output_dir", str(root / "cv"), "--find_label_issues", *flags])
    return root / "cv", moved, flags


def test_every_example_is_predicted_once_by_the_model_that_did_not_train_on_it(audited):
    cv, _, _ = audited
    plan = json.loads((cv / "cv.json").read_text())
    oof = list(csv.DictReader((cv / "oof_predictions.csv").open()))
    assert [int(r["id"]) for r in oof] == list(range(96))
    assert [int(r["fold"]) for r in oof] == plan["fold_of"]
    for fold in range(3):
        trained_on = {json.loads(line)["text"] for line in (cv / "folds" / f"fold_{fold}" / "train.jsonl").open()}
        assert not trained_on & {r["text"] for r in oof if int(r["fold"]) == fold}
    accuracy = np.mean([r["predicted"] == r["label"] for r in oof])
    assert accuracy > 0.8  # it learned: what the audit reads is not noise
    table = (cv / "cv.md").read_text()
    assert "| mean ± std |" in table and "| 95% interval |" in table and "averaged probabilities: accuracy" in table
    assert (cv / "cv.png").read_bytes().startswith(b"\x89PNG")
    rows = list(csv.DictReader((cv / "cv.csv").open()))
    assert [r["fold"] for r in rows] == ["0", "1", "2"] and all(float(r["eval_accuracy"]) > 0.6 for r in rows)


def test_the_audit_ranks_the_planted_wrong_labels_first(audited):
    cv, moved, _ = audited
    issues = list(csv.DictReader((cv / "label_issues.csv").open()))
    top = {int(r["id"]) for r in issues[: len(moved)]}
    ranks = {int(r["id"]): int(r["rank"]) for r in issues}
    assert len(top & moved) >= 0.75 * len(moved), ({i: ranks.get(i) for i in moved}, len(issues))
    assert [int(r["rank"]) for r in issues] == list(range(1, len(issues) + 1))
    assert "## Label issues:" in (cv / "cv.md").read_text()


def test_audit_of_a_finished_cv_writes_the_same_issues(audited, tmp_path, capsys):
    import shutil

    cv, _, _ = audited
    copy = tmp_path / "copy"
    shutil.copytree(cv, copy)
    (copy / "label_issues.csv").unlink()
    cli_main(["audit", str(copy)])
    assert (copy / "label_issues.csv").read_text() == (cv / "label_issues.csv").read_text()
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["audit", str(tmp_path)])
    assert exit_info.value.code == 2 and "holds no cv (no cv.json)" in capsys.readouterr().err


def test_a_cv_of_other_data_or_broken_folds_is_refused_not_mixed_in(audited, tmp_path, capsys):
    import shutil

    cv, _, flags = audited
    copy, train = tmp_path / "copy", tmp_path / "train.csv"
    shutil.copytree(cv, copy)
    rows = list(csv.DictReader(Path(flags[flags.index("--train_file") + 1]).read_text().splitlines()))
    rows[0]["label"] = rows[1]["label"] if rows[0]["label"] != rows[1]["label"] else rows[2]["label"]
    write_csv(train, rows)  # one label changed: the same flags, other data
    flags = [str(train) if f == flags[flags.index("--train_file") + 1] else f for f in flags]
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file() and p.name != ".lock"}
    for argv, message in (
        (["cv", "full_finetune", "--folds", "3", "--output_dir", str(copy), *flags], "holds a cv of other data"),
        (["audit", str(copy / "missing")], "holds no cv"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli_main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert {p: p.read_bytes() for p in before} == before
    held = copy / "fold_1" / "predictions_validation.csv"
    predicted = list(csv.DictReader(held.open()))
    write_csv(held, [{**predicted[0], "text": "another text"}, *predicted[1:]])  # a fold run on other examples
    (copy / "fold_2" / "predictions_test.csv").unlink()
    for broken, message in ((held, "fold 1's run predicted other examples"), (None, "predictions_test.csv is missing")):
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["audit", str(copy)])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err.strip().splitlines()[-1]
        if broken is not None:
            shutil.copy(cv / "fold_1" / "predictions_validation.csv", held)


@pytest.mark.slow  # three 2-process runs: 50 s
def test_a_two_process_cv_predicts_each_example_once_and_encodes_the_pool_once(audited, tmp_path):
    _, _, flags = audited
    config = str(ROOT / "accelerate_configs" / "cpu_2proc.yaml")
    cv = tmp_path / "cv"
    cli_main(
        ["cv", "feature_extraction", "--folds", "2", "--output_dir", str(cv), "--accelerate_config", config, *flags]
    )  # 2 folds: a later fold that would encode again, at the cost of two 2-process runs
    oof = list(csv.DictReader((cv / "oof_predictions.csv").open()))
    assert sorted(int(r["id"]) for r in oof) == list(range(96))  # none twice, though 48 rows split into 2 × 24
    logs = [(cv / "logs" / f"fold_{k}.log").read_text() for k in range(2)]
    assert all("on 2 process(es) (MULTI_CPU)" in log for log in logs)
    assert "encode train" in logs[0] and "encode test" in logs[0]
    assert not any("encode" in log.replace("encoder", "") for log in logs[1:]), "a later fold encoded again"
    assert all("from cache" in log for log in logs[1:])


@pytest.mark.slow
def test_a_killed_cv_resumes_without_training_a_finished_fold_again(audited, tmp_path, capsys):
    cv, _, flags = audited
    cmd = [
        CLI,
        "cv",
        "full_finetune",
        "--folds",
        "3",
        "--output_dir",
        str(tmp_path / "cv"),
        "--find_label_issues",
        *flags,
    ]
    process = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while not (tmp_path / "cv" / "fold_1" / "recipe_config.yaml").exists() and time.monotonic() < deadline:
        time.sleep(0.1)  # fold 0 is saved, fold 1 is training
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = (tmp_path / "cv" / "fold_0" / "model.safetensors").stat().st_mtime_ns
    cli_main(cmd[1:])  # the same command, resumed (in this process: its folds are processes of their own)
    assert "fold 0: ok (finished earlier)" in capsys.readouterr().out
    assert (tmp_path / "cv" / "fold_0" / "model.safetensors").stat().st_mtime_ns == finished
    for name in ("oof_predictions.csv", "label_issues.csv"):
        assert (tmp_path / "cv" / name).read_text() == (cv / name).read_text()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--folds", "1"], "--folds must be at least 2, not 1"),
        (["--folds", "3", "--seeds", "2"], "pass --folds (cross-validation) or --seeds/--trials, not both"),
    ],
)
def test_bad_compare_folds_are_one_line(argv, message, module_args, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(
            ["compare", "--recipes", "feature_extraction", "--output_dir", str(tmp_path / "c"), *argv, *module_args]
        )
    assert exit_info.value.code == 2 and message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "c").exists()


@pytest.mark.slow  # 9 runs in their own processes: 40 s
def test_compare_with_folds_ranks_strategies_over_the_same_held_out_folds(module_args, tmp_path):
    out = tmp_path / "cmp"
    flags = [*map(str, module_args), "--num_train_epochs", "2"]
    cli_main(
        [
            "compare",
            "--recipes",
            "feature_extraction,static_embeddings",
            "--folds",
            "2",
            "--output_dir",
            str(out),
            *flags,
        ]
    )  # fmt: skip  (2 folds show the same folds for both strategies as 3, in two runs fewer)
    plans = [json.loads((out / r / "cv.json").read_text()) for r in ("feature_extraction", "static_embeddings")]
    assert plans[0]["fold_of"] == plans[1]["fold_of"]  # the same folds for every strategy
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert Counter(r["strategy"] for r in rows) == {"tfidf_logreg": 2, "feature_extraction": 2, "static_embeddings": 2}
    table = (out / "comparison.md").read_text()
    assert "validation accuracy (mean ± std)" in table and "| feature_extraction | " in table


# Issue 39, items 7 and 10: a damaged plan, an unwritable or full folder, a failing fold: one line each.
def one_line(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and lines[-1].startswith("error: ") and "Traceback" not in "\n".join(lines)
    return lines[-1]


def test_a_truncated_plan_is_one_line_for_audit_and_cv(audited, tmp_path, capsys):
    import shutil

    cv, _, flags = audited
    copy = tmp_path / "copy"
    shutil.copytree(cv, copy)
    plan = copy / "cv.json"
    plan.write_text(plan.read_text()[:100])
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file() and p.name != ".finetune_recipes.lock"}
    last = one_line(["audit", str(copy)], capsys)
    assert last.startswith(f"error: {plan} is damaged (") and last.endswith("with --overwrite_output_dir)")
    last = one_line(["cv", "full_finetune", "--folds", "3", "--output_dir", str(copy), *flags], capsys)
    assert last.startswith(f"error: {plan} is damaged (") and "pass --overwrite_output_dir" in last
    assert {p: p.read_bytes() for p in before} == before


def test_an_audit_on_a_full_disk_is_one_line(audited, tmp_path, capsys, monkeypatch):
    import errno
    import shutil

    from finetune_recipes.tools import cv_report

    cv, _, _ = audited
    copy = tmp_path / "copy"
    shutil.copytree(cv, copy)

    def full_disk(path, content):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(cv_report, "atomic_write", full_disk)
    last = one_line(["audit", str(copy)], capsys)
    assert last == f"error: {copy / 'oof_predictions.csv'}: No space left on device; free space or fix permissions, " \
        "then run the same command again"  # fmt: skip


def test_cv_on_an_unwritable_or_full_folder_is_one_line_before_training(module_args, tmp_path, capsys, monkeypatch):
    import errno

    from finetune_recipes import ownership

    out = tmp_path / "cv"
    argv = ["cv", "full_finetune", "--folds", "2", "--output_dir", str(out), *module_args]
    with monkeypatch.context() as patch:  # an immutable folder or a read-only file system, as root cannot make one
        patch.setattr(
            ownership, "lock_output_dir", lambda *a: (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
        )
        last = one_line(argv, capsys)
    assert last == f"error: cannot write in --output_dir {out} (Permission denied); fix its permissions or pass " \
        "another --output_dir"  # fmt: skip
    write_text = Path.write_text

    def full_at_fold_1(path, *args, **kwargs):
        if "fold_1" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return write_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_at_fold_1)
    last = one_line(argv, capsys)
    assert last == f"error: cannot write the folds' files into {out} (No space left on device); none was kept: free " \
        "space, then run the same command again"  # fmt: skip
    assert not [p.name for p in out.iterdir() if "folds" in p.name]  # fold_0's files went with the rest
    assert not (out / "logs" / "fold_0.log").exists()  # no fold ran


def test_a_fold_refused_by_its_recipe_says_why_and_stops_the_cv(module_args, tmp_path, capsys):
    out = tmp_path / "cv"
    argv = ["cv", "full_finetune", "--folds", "3", "--output_dir", str(out), *module_args]
    last = one_line([*argv, "--eval_strategy", "steps", "--eval_steps", "1000"], capsys)
    assert last.startswith("error: fold 0 failed (2): eval_steps 1000 is more than the run's ")
    assert f"(log: {out / 'logs' / 'fold_0.log'}); fix it and run the same command again" in last
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["fold_0.log"]  # folds 1 and 2 never started


def test_a_folder_of_the_users_named_like_cvs_outputs_is_refused(module_args, tmp_path, capsys):
    """Issue 39, item 1: cv decided by name, and took over a folder holding the user's cv.md and logs/mine.log."""
    folder = tmp_path / "mine"
    (folder / "logs").mkdir(parents=True)
    (folder / "cv.md").write_text("my notes")
    (folder / "logs" / "mine.log").write_text("my log")
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    last = one_line(["cv", "full_finetune", "--folds", "2", "--output_dir", str(folder), *module_args], capsys)
    assert f"output_dir {folder} holds 'cv.md', which cv did not write" in last
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
