"""Distillation (issue 40): a static-vector student learns a trained teacher's scores on labelled and unlabelled
texts; the loss, the teacher's cached scores, the leakage refusal and every bad input."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_inline
from tiny import topic_rows, write_csv

from finetune_recipes import distillation
from finetune_recipes.config import MULTI, REGRESSION, SINGLE
from finetune_recipes.data import Task
from finetune_recipes.distillation import distillation_loss, read_teacher, teacher_scores
from finetune_recipes.errors import UserError


@pytest.fixture(scope="module")
def teacher(module_args, tmp_path_factory) -> Path:
    """full_finetune on the tiny train split, learnt well enough to be worth copying."""
    out = tmp_path_factory.mktemp("distill") / "teacher"
    run_inline("full_finetune", *module_args, "--num_train_epochs", "8", "--learning_rate", "3e-3", "--output_dir", out)
    return out


@pytest.fixture(scope="module")
def unlabeled(tmp_path_factory) -> Path:
    """48 texts of the same topics, with no label column."""
    rows = [{"text": r["text"]} for r in topic_rows(48, 7)]
    return write_csv(tmp_path_factory.mktemp("unlabeled") / "more.csv", rows)


def distill(module_args, teacher, out, *extra, check=True):
    test = module_args[module_args.index("--validation_file") + 1].replace("validation", "test")
    return run_inline(
        "distill", *module_args, "--test_file", test, "--teacher", teacher, "--output_dir", out,
        "--num_train_epochs", "4", "--logging_steps", "1", *extra, check=check,
    )  # fmt: skip


def read_rows(path) -> list[dict]:
    return list(csv.DictReader(Path(path).read_text().splitlines()))


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_the_loss_is_hintons_on_labelled_texts_and_the_teacher_term_alone_on_the_others():
    torch.manual_seed(0)
    task = Task(SINGLE, ["a", "b", "c"])
    student, teacher = torch.randn(4, 3), torch.randn(4, 3)
    labels, labeled = torch.tensor([0, 2, 1, 0]), torch.tensor([1, 1, 0, 0])
    T, a = 2.0, 0.3
    kl = (F.softmax(teacher / T, -1) * (F.log_softmax(teacher / T, -1) - F.log_softmax(student / T, -1))).sum(-1)
    ce = F.cross_entropy(student, labels, reduction="none")
    want = (a * T**2 * kl + (1 - a) * ce * labeled).mean()
    torch.testing.assert_close(distillation_loss(student, labels, teacher, labeled, task, T, a), want)
    # a = 0 on labelled texts is the task's own loss: the static recipe's.
    everything = torch.ones(4)
    torch.testing.assert_close(distillation_loss(student, labels, teacher, everything, task, T, 0.0), ce.mean())


def test_multi_label_and_regression_learn_the_teachers_probabilities_and_values():
    student, teacher = torch.randn(3, 2), torch.randn(3, 2)
    labels, labeled = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), torch.tensor([1, 0, 1])
    multi = Task(MULTI, ["x", "y"])
    soft = F.binary_cross_entropy_with_logits(student, teacher.sigmoid(), reduction="none").mean(-1)
    hard = F.binary_cross_entropy_with_logits(student, labels, reduction="none").mean(-1)
    want = (0.5 * soft + 0.5 * hard * labeled).mean()
    torch.testing.assert_close(distillation_loss(student, labels, teacher, labeled, multi, 2.0, 0.5), want)
    regression = Task(REGRESSION, ["score"])
    values, targets = student[:, :1], torch.tensor([0.5, -1.0, 2.0])
    want = (0.5 * (values[:, 0] - teacher[:, 0]) ** 2 + 0.5 * (values[:, 0] - targets) ** 2 * labeled).mean()
    got = distillation_loss(values, targets, teacher[:, :1], labeled, regression, 2.0, 0.5)
    torch.testing.assert_close(got, want)


def test_with_alpha_one_the_labels_play_no_part_and_with_zero_it_is_the_static_recipe(
    module_args, teacher, tiny_data, tmp_path
):
    shuffled = read_rows(tiny_data["train"])
    labels = [r["label"] for r in shuffled]
    for row, label in zip(shuffled, labels[5:] + labels[:5], strict=True):
        row["label"] = label
    wrong = write_csv(tmp_path / "wrong.csv", shuffled)
    distill(module_args, teacher, tmp_path / "a1", "--distill_alpha", "1")
    distill(module_args, teacher, tmp_path / "a1wrong", "--distill_alpha", "1", "--train_file", wrong)
    losses = [h["loss"] for h in results(tmp_path / "a1")["loss_history"]]
    assert losses == [h["loss"] for h in results(tmp_path / "a1wrong")["loss_history"]]
    distill(module_args, teacher, tmp_path / "a0", "--distill_alpha", "0")
    cache = ["--feature_cache_dir", tmp_path / "cache"]
    test = module_args[module_args.index("--validation_file") + 1].replace("validation", "test")
    run_inline("static_embeddings", *module_args, "--test_file", test, "--output_dir", tmp_path / "static",
               "--num_train_epochs", "4", "--logging_steps", "1", *cache)  # fmt: skip
    static = [h["loss"] for h in results(tmp_path / "static")["loss_history"]]
    assert [h["loss"] for h in results(tmp_path / "a0")["loss_history"]] == pytest.approx(
        static, abs=2e-6
    )  # 6 decimals


def test_the_student_learns_unlabelled_texts_and_its_card_says_from_whom(module_args, teacher, unlabeled, tmp_path):
    out = tmp_path / "student"
    log = distill(module_args, teacher, out, "--unlabeled_file", unlabeled).stderr
    got = results(out)
    assert got["distillation"]["unlabeled_texts"] == 48 and got["distillation"]["teacher"] == str(teacher)
    assert got["steps"] == 4 * -(-(96 + 48) // 8)  # the 48 unlabelled texts are training examples too
    assert "The teacher scores" in log
    assert 0 <= got["distillation"]["test_agreement"] <= 1
    card = (out / "README.md").read_text()
    assert f"Distilled from `{teacher}` (validation accuracy {results(teacher)['eval_accuracy']:.4f})" in card
    assert "and 48 unlabelled texts" in card and "of the texts." in card


def test_the_teacher_scores_each_text_once_for_every_later_student(teacher, tmp_path, monkeypatch):
    texts = ["market bank profit", "goal team win", "chip robot code"]
    first = teacher_scores(read_teacher(str(teacher)), texts, ["business", "sport", "tech"], str(tmp_path), 8)
    monkeypatch.setattr(distillation, "trained_logits", lambda *a, **k: pytest.fail("the teacher ran again"))
    again = teacher_scores(read_teacher(str(teacher)), texts[::-1], ["tech", "sport", "business"], str(tmp_path), 8)
    np.testing.assert_allclose(again, first[::-1, ::-1])  # cached per text; columns in the asked label order
    assert len(list(tmp_path.glob("teacher-*.npz"))) == 1


def test_a_teacher_that_trained_on_the_validation_texts_is_refused(module_args, tiny_data, tmp_path):
    """A teacher trained on train + validation would have seen every validation text: the student's validation
    score would leak. Refused before training, naming what to pass."""
    rows = [*read_rows(tiny_data["train"]), *read_rows(tiny_data["validation"])]
    both = write_csv(tmp_path / "both.csv", rows)
    args = [*module_args, "--train_file", both]
    run_inline("static_embeddings", *args, "--output_dir", tmp_path / "leaky", "--feature_cache_dir", tmp_path / "c")
    proc = distill(module_args, tmp_path / "leaky", tmp_path / "out", check=False)
    assert proc.returncode == 2 and not (tmp_path / "out" / "results.json").exists()
    assert "trained on 30 of the validation texts" in proc.stderr.strip().splitlines()[-1]


def test_a_validation_text_the_students_own_train_split_holds_is_the_datas_overlap_not_the_teachers(
    module_args, tiny_data, tmp_path
):
    """Both trained on a train file that repeats one validation text: loading warns about that overlap, and the
    teacher, which saw no more than the student does, is not refused for it."""
    validation = read_rows(tiny_data["validation"])
    train = write_csv(tmp_path / "train.csv", [*read_rows(tiny_data["train"]), validation[0]])
    args = [*module_args, "--train_file", train]
    run_inline("static_embeddings", *args, "--output_dir", tmp_path / "teacher", "--feature_cache_dir", tmp_path / "c")
    proc = distill(args, tmp_path / "teacher", tmp_path / "out")
    assert "1 of 30 validation texts also occur in train" in proc.stderr
    assert (tmp_path / "out" / "results.json").is_file()


def test_a_teacher_whose_data_cannot_be_read_back_is_a_warning(module_args, tiny_data, teacher, tmp_path):
    moved = tmp_path / "teacher"
    moved.mkdir()
    for file in teacher.iterdir():
        if file.is_file():
            (moved / file.name).write_bytes(file.read_bytes())
    saved = (moved / "recipe_config.yaml").read_text()
    (moved / "recipe_config.yaml").write_text(saved.replace(str(tiny_data["train"]), str(tmp_path / "gone.csv")))
    proc = distill(module_args, moved, tmp_path / "out")
    assert "Cannot read back what --teacher" in proc.stderr and (tmp_path / "out" / "results.json").exists()


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_teacher", "distill needs --teacher DIR, a trained output"),
        ("not_an_output", "holds no saved model (no config.json); pass --teacher a recipe's output_dir"),
        ("other_labels", "predicts business, sport and the data labels business, sport, tech (differing: tech)"),
        ("no_text_column", "has no column 'text' (columns: body); name its text column with --text_column"),
        ("empty_unlabeled", "the unlabeled split is empty"),
        ("blank_unlabeled", "row 2 has no text; fill it in or drop the row"),
        ("pairs", "distill reads single texts; drop --text_pair_column"),
        ("alpha", "distill_alpha is 1.5; pass a value between 0 and 1"),
    ],
)
def test_bad_input_is_one_line_before_training(case, message, module_args, teacher, tiny_data, tmp_path):
    extra: list = []
    chosen = teacher
    if case == "no_teacher":
        chosen = ""
    elif case == "not_an_output":
        chosen = tmp_path / "empty"
        chosen.mkdir()
    elif case == "other_labels":  # a teacher of two of the three topics
        rows = [r for r in read_rows(tiny_data["train"]) if r["label"] != "tech"]
        two = write_csv(tmp_path / "two.csv", rows)
        chosen = tmp_path / "two"
        flags = ["--train_file", two, "--validation_file", two, "--num_train_epochs", "1"]
        run_inline("static_embeddings", *module_args, *flags, "--output_dir", chosen, "--feature_cache_dir", tmp_path)
    elif case in ("no_text_column", "empty_unlabeled", "blank_unlabeled"):
        rows = {"no_text_column": [{"body": "market"}], "empty_unlabeled": [],
                "blank_unlabeled": [{"text": "market"}, {"text": " "}]}[case]  # fmt: skip
        path = tmp_path / "u.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        extra = ["--unlabeled_file", path]
    elif case == "pairs":
        extra = ["--text_pair_column", "text"]
    elif case == "alpha":
        extra = ["--distill_alpha", "1.5"]
    proc = distill(module_args, chosen, tmp_path / "out", *extra, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out" / "results.json").exists()


def test_check_teacher_refuses_another_problem_type(teacher):
    with pytest.raises(UserError, match="is a single_label_classification model and the data is regression"):
        distillation.check_teacher(read_teacher(str(teacher)), Task(REGRESSION, ["score"]))


def test_predict_serves_the_student_with_numpy_alone(module_args, teacher, tmp_path):
    """A real process: `finetune-recipes predict` on the student gives the predictions file's scores, and neither
    torch nor transformers is imported (they are most of a short job's time)."""
    out = tmp_path / "student"
    distill(module_args, teacher, out)
    rows = read_rows(out / "predictions_validation.csv")
    texts = tmp_path / "texts.txt"
    texts.write_text("".join(r["text"] + "\n" for r in rows))
    code = (
        "import sys\nfrom finetune_recipes.tools.cli import main\n"
        f"main(['predict', '--model', {str(out)!r}, '--file', {str(texts)!r}, '--format', 'jsonl'])\n"
        "print(sorted({'torch', 'transformers'} & set(sys.modules)), file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stderr.strip().splitlines()[-1] == "[]"
    served = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [s["label"] for s in served] == [r["predicted"] for r in rows]
    assert [s["score"] for s in served] == pytest.approx([float(r["score"]) for r in rows], abs=1e-4)
