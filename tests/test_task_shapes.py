"""Every task shape through the builders and every recipe: multi-label, regression, imbalanced classes, long
documents (windows), with their metrics, saved outputs, predictions and bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_inline, run_recipe
from datasets import Dataset, DatasetDict
from sklearn.metrics import f1_score
from test_distributed import TWO_PROCESSES
from test_recipes import RECIPES, replace, same_file
from test_reporting import assert_card_matches_results
from tiny import long_document_rows, multi_label_rows, regression_rows, write_csv, write_jsonl
from transformers import AutoTokenizer, pipeline

from finetune_recipes.catalog import problem_types
from finetune_recipes.config import DataArguments
from finetune_recipes.data import EpochWeightedSampler, aggregate_windows, encode_task, split_validation, tokenize
from finetune_recipes.data.tasks import Task, fit_task, problem_type_of
from finetune_recipes.data.weights import class_weights
from finetune_recipes.errors import UserError
from finetune_recipes.metrics import (
    MULTI,
    REGRESSION,
    SINGLE,
    multi_label_metrics,
    per_class_report,
    regression_metrics,
    tune_thresholds,
)
from finetune_recipes.modeling import target_head
from finetune_recipes.tools.predict import predict
from finetune_recipes.training.save import fold_into


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """train / validation / test files per shape: multi-label (JSONL lists), regression (CSV), long documents."""
    root = tmp_path_factory.mktemp("shapes")
    splits = [("train", 120, 0), ("validation", 40, 1), ("test", 40, 2)]
    return {
        "multi": {s: write_jsonl(root / "multi" / f"{s}.jsonl", multi_label_rows(n, seed)) for s, n, seed in splits},
        "regression": {s: write_csv(root / "reg" / f"{s}.csv", regression_rows(n, seed)) for s, n, seed in splits},
        "long": {s: write_csv(root / "long" / f"{s}.csv", long_document_rows(n, seed)) for s, n, seed in splits},
    }


def shape_args(tiny_args: list, files: dict[str, Path], *extra: str) -> list[str]:
    args = [str(a) for a in tiny_args]
    for split, path in files.items():
        args = replace(args, f"--{split}_file", str(path))
    return [*args, *extra]


SHAPE_FLAGS = {
    "multi": ["--label_column", "labels"],
    "regression": ["--label_column", "score"],
    "long": ["--long_documents", "windows", "--window_stride", "8"],
}


# Builders -----------------------------------------------------------------------------------------------


def ds(**columns) -> Dataset:
    return Dataset.from_dict(columns)


def test_problem_type_is_read_from_the_labels():
    assert problem_type_of(ds(label=[["a"], ["b", "c"]]), DataArguments()) == MULTI
    assert problem_type_of(ds(label=["a|b", "c"]), DataArguments(label_delimiter="|")) == MULTI
    assert problem_type_of(ds(label=[0.5, 1.25]), DataArguments()) == REGRESSION
    assert problem_type_of(ds(label=[1.0, 2.0]), DataArguments()) == SINGLE  # whole numbers: classes
    assert problem_type_of(ds(label=[1, 2]), DataArguments(problem_type="regression")) == REGRESSION
    assert problem_type_of(ds(a=[0, 1], b=[1, 1]), DataArguments(label_columns="a,b")) == MULTI
    with pytest.raises(UserError, match="makes a multi-label task; drop --problem_type single_label"):
        problem_type_of(ds(label=[["a"], ["b"]]), DataArguments(problem_type="single_label"))


def multi_hot(**kwargs) -> tuple[list, list]:
    raw, task = encode_task(DatasetDict({"train": Dataset.from_dict(kwargs.pop("rows"))}), DataArguments(**kwargs))
    return raw["train"]["labels"], task.label_names


def test_multi_label_lists_delimiters_and_columns_encode_alike():
    expected = ([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]], ["a", "b", "c"])
    assert multi_hot(rows={"text": ["x", "y", "z"], "label": [["c", "a"], ["b"], []]}) == expected
    assert multi_hot(rows={"text": ["x", "y", "z"], "label": ["c|a", "b", ""]}, label_delimiter="|") == expected
    columns = {"text": ["x", "y", "z"], "c": [1, 0, 0], "a": [1, 0, 0], "b": [0, 1, 0]}
    assert multi_hot(rows=columns, label_columns="c,a,b") == expected


def test_hub_style_lists_of_class_ids_are_read_as_names():
    from datasets import ClassLabel, Features, List, Value

    features = Features({"text": Value("string"), "label": List(ClassLabel(names=["joy", "anger", "fear"]))})
    train = Dataset.from_dict({"text": ["x", "y"], "label": [[0, 2], [1]]}, features=features)
    raw, task = encode_task(DatasetDict({"train": train}), DataArguments())
    assert task.label_names == ["anger", "fear", "joy"] and raw["train"]["labels"] == [[0, 1, 1], [1, 0, 0]]


def test_regression_targets_are_standardised_and_read_back_in_their_units():
    rows = {"text": ["a", "b", "c", "d"], "label": [1.5, 2.5, 3.5, 4.5]}
    raw, task = encode_task(DatasetDict({"train": Dataset.from_dict(rows)}), DataArguments())
    raw = fit_task(raw, task, DataArguments())  # once the training split is final
    assert task.problem_type == REGRESSION and task.num_labels == 1
    assert np.mean(raw["train"]["labels"]) == pytest.approx(0, abs=1e-6)
    assert np.std(raw["train"]["labels"]) == pytest.approx(1, abs=1e-6)
    assert task.references(raw["train"]["labels"]) == pytest.approx(rows["label"], abs=1e-5)


def test_balanced_class_weights_follow_train_frequencies(tmp_path):
    single = Task(SINGLE, ["a", "b"])
    assert class_weights([0, 0, 0, 1], single, "balanced") == pytest.approx([4 / 6, 4 / 2])
    multi = Task(MULTI, ["a", "b"])
    assert class_weights([[1, 0], [1, 1], [0, 0], [1, 0]], multi, "balanced") == pytest.approx([1 / 3, 3.0])
    (tmp_path / "w.json").write_text('{"b": 5}')
    assert class_weights([0, 1], single, str(tmp_path / "w.json")) == [1.0, 5.0]


def test_the_criterion_weights_classes_and_fits_each_shape():
    logits, labels = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
    per_example = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    weighted = Task(SINGLE, ["a", "b"], class_weights=[1.0, 3.0]).loss(logits, labels)
    assert weighted == pytest.approx((per_example[0] + 3 * per_example[1]) / 4)  # torch's weighted mean
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pos = Task(MULTI, ["a", "b"], class_weights=[1.0, 4.0]).loss(logits, targets)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, targets, pos_weight=torch.tensor([1.0, 4.0])
    )
    assert pos == pytest.approx(expected)
    assert Task(REGRESSION, ["y"]).loss(torch.tensor([[1.0], [3.0]]), torch.tensor([1.0, 1.0])) == 2.0


def test_multi_label_split_keeps_every_label_on_both_sides():
    rows = [[1.0, 0.0, 0.0]] * 40 + [[0.0, 1.0, 0.0]] * 40 + [[0.0, 0.0, 1.0]] * 2  # c has two examples
    pool = Dataset.from_dict({"text": [str(i) for i in range(len(rows))], "labels": rows})
    train, validation = split_validation(pool, ["text"], DataArguments(validation_split_percentage=10), 0, MULTI)
    assert len(train) + len(validation) == len(rows)
    for part in (train, validation):
        assert (np.asarray(part["labels"]).sum(0) > 0).all()
    assert not set(train["text"]) & set(validation["text"])


def test_regression_split_is_stratified_by_target_bins():
    pool = Dataset.from_dict({"text": [str(i) for i in range(100)], "labels": [float(i) for i in range(100)]})
    _, validation = split_validation(pool, ["text"], DataArguments(), 0, REGRESSION)
    assert sorted(int(v) // 10 for v in validation["labels"]) == list(range(10))  # one per decile


def test_windows_cover_a_document_and_aggregate_back(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    raw = DatasetDict({"train": Dataset.from_dict({"text": ["goal " * 50, "bank"], "labels": [1, 0]})})
    args = DataArguments(max_length=16, long_documents="windows", window_stride=4)
    windows = tokenize(raw, tokenizer, args)["train"]
    assert windows["document"] == [0] * windows["document"].count(0) + [1]
    assert windows["document"].count(0) == 5  # 50 tokens, 14 per window, advancing 10 at a time
    assert all(len(ids) <= 16 for ids in windows["input_ids"]) and windows["labels"][:5] == [1] * 5
    capped = tokenize(raw, tokenizer, DataArguments(**{**vars(args), "max_windows_per_document": 2}))["train"]
    assert capped["document"] == [0, 0, 1]
    logits = torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.0, 5.0]])
    mean, labels = aggregate_windows(logits, torch.tensor([1, 1, 0]), torch.tensor([0, 0, 1]), "mean")
    assert mean.tolist() == [[2.0, 1.0], [0.0, 5.0]] and labels.tolist() == [1, 0]
    top, _ = aggregate_windows(logits, torch.tensor([1, 1, 0]), torch.tensor([0, 0, 1]), "max")
    assert top.tolist() == [[3.0, 2.0], [0.0, 5.0]]


def test_windows_need_a_fast_tokenizer(tiny_model):
    from finetune_recipes.data.windows import check_windows

    class PythonTokenizer:  # transformers 5 backs most models' tokenizers with `tokenizers`; some still are not
        is_fast = False

    args = DataArguments(max_length=32, long_documents="windows", window_stride=8)
    with pytest.raises(UserError, match="needs a fast tokenizer, and PythonTokenizer is not one"):
        check_windows(PythonTokenizer(), args)
    check_windows(AutoTokenizer.from_pretrained(tiny_model), args)


def test_weighted_sampler_draws_classes_evenly_and_repeats_per_seed_and_epoch():
    labels = [0] * 95 + [1] * 5
    sampler = EpochWeightedSampler(labels, seed=3)
    drawn = [labels[i] for _ in range(20) for i in sampler]
    assert 0.4 < np.mean(drawn) < 0.6
    again = EpochWeightedSampler(labels, seed=3)
    torch.manual_seed(123)  # the global RNG plays no part
    assert list(sampler) == list(again)
    sampler.set_epoch(1)
    assert list(sampler) != list(again) and list(sampler) == list(sampler)


def test_multi_label_and_regression_metrics_and_thresholds():
    refs = np.array([[1, 0], [1, 1], [0, 1], [0, 0]])
    scores = np.array([[0.4, 0.1], [0.3, 0.9], [0.1, 0.8], [0.2, 0.2]])
    at_half = multi_label_metrics(scores, refs)
    assert at_half["f1_micro"] < 1
    thresholds = tune_thresholds(scores, refs)
    assert multi_label_metrics(scores, refs, thresholds)["subset_accuracy"] == 1.0
    assert 0.2 < thresholds[0] < 0.3
    rng = np.random.default_rng(0)  # against a brute-force search: the same F1 at every label
    scores, refs = rng.random((200, 3)), rng.random((200, 3)) < 0.3
    for j, cut in enumerate(tune_thresholds(scores, refs)):
        brute = max(f1_score(refs[:, j], scores[:, j] >= t) for t in np.unique(scores[:, j]))
        assert f1_score(refs[:, j], scores[:, j] >= cut) == pytest.approx(brute)
    metrics = regression_metrics([1.0, 2.0, 3.0], [1.0, 2.0, 4.0])
    assert metrics["mse"] == pytest.approx(1 / 3) and metrics["spearman"] == pytest.approx(1.0)
    report = per_class_report(SINGLE, np.eye(3)[[0, 1, 1]], [0, 1, 2], ["a", "b", "c"])
    assert report["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [0, 1, 0]]
    assert report["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_the_target_scale_is_folded_into_the_saved_copy_not_the_trained_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
    x = torch.randn(5, 4)
    before = model(x)
    state = model.state_dict()
    fold_into(state, target_head(model), mean=10.0, std=2.0)
    assert torch.equal(model(x), before)  # the live model is as it trained
    saved = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
    saved.load_state_dict(state)
    assert torch.allclose(saved(x), before * 2 + 10, atol=1e-5)


# Recipes --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("shape", ["multi", "regression", "long"])
def test_every_recipe_runs_every_shape(recipe, shape, shapes, tiny_args, tmp_path):
    args = shape_args(tiny_args, shapes[shape], *SHAPE_FLAGS[shape], "--max_train_steps", "3")
    kind = {"multi": MULTI, "regression": REGRESSION, "long": SINGLE}[shape]
    if kind not in problem_types(recipe):  # declared in the recipe (PROBLEM_TYPES): refused in one line
        proc = run_inline(recipe, *args, check=False)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: "), proc.stderr
        assert not (tmp_path / "out").exists()
        return
    run_inline(recipe, *args)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["task"]["problem_type"] == kind
    assert results["eval_samples"] == results["test_samples"] == 40  # documents, not windows
    assert (tmp_path / "out" / "thresholds.json").exists() == (shape == "multi")
    (row,) = predict(tmp_path / "out", ["goal goal win " * 30])
    assert {"multi": "labels", "regression": "value", "long": "label"}[shape] in row
    picture = {"multi": "per_label_scores.png", "regression": "predicted_vs_true.png", "long": "confusion_matrix.png"}
    assert (tmp_path / "out" / picture[shape]).read_bytes().startswith(b"\x89PNG")
    rows = list(csv.DictReader((tmp_path / "out" / "predictions_test.csv").open()))
    assert len(rows) == 40  # one row per document
    # What evaluation scored is what the saved model predicts: the same labels, windows aggregated alike.
    predicted = predict(tmp_path / "out", [r["text"] for r in rows])
    thresholds = json.loads((tmp_path / "out" / "thresholds.json").read_text()) if shape == "multi" else {}
    for row, prediction in zip(rows, predicted, strict=True):
        if shape == "multi":
            # The temperature is folded into float32 weights, which moves a logit by float32 rounding: after 3
            # steps a label's scores can sit within 1e-5 of its threshold, where that decides. Elsewhere: equal.
            scores = dict(pair.split(":") for pair in row["scores"].split())
            clear = {n for n, t in thresholds.items() if abs(float(scores[n]) - t) > 1e-4}
            assert set(json.loads(row["predicted"])) & clear == set(prediction["labels"]) & clear
        elif shape == "regression":
            assert float(row["predicted"]) == pytest.approx(prediction["value"], abs=1e-3)
        else:
            assert row["predicted"] == prediction["label"]
    assert_card_matches_results(tmp_path / "out")


def test_multi_label_learns_its_labels_and_predicts_with_tuned_thresholds(shapes, tiny_args, tmp_path):
    args = shape_args(tiny_args, shapes["multi"], "--label_column", "labels", "--learning_rate", "3e-3")
    run_inline("full_finetune", *replace(args, "--num_train_epochs", "15"))
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    assert results["eval_f1_micro"] > 0.9 and results["test_f1_micro_tuned"] > 0.9
    thresholds = json.loads((out / "thresholds.json").read_text())
    assert set(thresholds) == {"business", "sport", "tech"} and results["task"]["thresholds"] == thresholds
    assert set(results["report"]["test"]["per_class"]) == {"business", "sport", "tech"}
    texts = ["goal match team win score", "goal match win phone software chip code"]
    (sport, both) = predict(out, texts)
    assert "sport" in sport["labels"] and {"sport", "tech"} <= set(both["labels"])
    piped = pipeline("text-classification", model=str(out), top_k=None)(texts)
    for row, scores in zip((sport, both), piped, strict=True):
        assert len(scores) == 3  # sigmoid per label (their sum is free): predict reads them the same way
        over = {s["label"] for s in scores if s["score"] >= thresholds[s["label"]]}
        assert set(row["labels"]) == over  # predict cuts each label at its tuned threshold
    assert sum(s["score"] for s in piped[1]) > 1.5  # two labels near 1: a sigmoid each, not a softmax


def test_regression_learns_a_function_of_the_text_in_its_units(shapes, tiny_args, tmp_path):
    args = shape_args(tiny_args, shapes["regression"], "--label_column", "score", "--learning_rate", "3e-3")
    run_inline("full_finetune", *replace(args, "--num_train_epochs", "8"))
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    assert results["eval_pearson"] > 0.9 and results["test_r2"] > 0.7
    texts = ["goal match team win score cup", "phone software chip code data robot"]
    values = [r["value"] for r in predict(out, texts)]
    assert values[0] > 7 and values[1] < 3  # share of sport words, 0..10: the user's units, not standardised
    piped = pipeline("text-classification", model=str(out), function_to_apply="none")(texts)
    assert [p["score"] for p in piped] == pytest.approx(values, abs=1e-3)


def test_windows_find_a_word_truncation_never_reads(shapes, tiny_args, tmp_path):
    args = shape_args(tiny_args, shapes["long"], "--learning_rate", "3e-3", "--num_train_epochs", "15")
    windows = ["--long_documents", "windows", "--window_stride", "8", "--window_aggregation", "max"]
    run_inline("full_finetune", *replace(args, "--output_dir", str(tmp_path / "cut")))
    run_inline("full_finetune", *replace(args, "--output_dir", str(tmp_path / "win")), *windows)
    cut = json.loads((tmp_path / "cut" / "results.json").read_text())
    win = json.loads((tmp_path / "win" / "results.json").read_text())
    assert cut["test_accuracy"] < 0.5 < 0.8 < win["test_accuracy"]
    document = long_document_rows(1, seed=9)[0]
    assert predict(tmp_path / "win", [document["text"]])[0]["label"] == document["label"]


def test_class_weights_and_weighted_sampler_are_reported(tiny_args, tmp_path):
    args = [*map(str, tiny_args), "--class_weights", "balanced", "--sampler", "weighted", "--max_train_steps", "3"]
    run_inline("full_finetune", *args)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["task"]["class_weights"] == pytest.approx({"business": 1.0, "sport": 1.0, "tech": 1.0})
    assert len(results["report"]["validation"]["confusion_matrix"]) == 3


@pytest.mark.slow
def test_two_processes_score_each_document_once(shapes, tiny_args, tmp_path):
    args = shape_args(tiny_args, shapes["long"], *SHAPE_FLAGS["long"], "--max_train_steps", "2")
    run_recipe("full_finetune", *args, launcher=TWO_PROCESSES)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["eval_samples"] == results["test_samples"] == 40  # 240 windows over 2 processes


# Bad input ------------------------------------------------------------------------------------------------


def bad_shapes(tmp: Path, shapes: dict) -> dict[str, tuple[list, str]]:
    """case → (flags added to the tiny args, what the error line must say)."""
    multi = shapes["multi"]
    write_jsonl(tmp / "unseen.jsonl", [{"text": "goal", "labels": ["sport", "weather"]}])
    write_jsonl(tmp / "empty_list.jsonl", [{"text": "goal", "labels": ["sport"]}, {"text": "bank", "labels": []}])
    write_csv(tmp / "na.csv", [{"text": "goal", "score": "1.5"}, {"text": "bank", "score": "high"}])
    write_csv(tmp / "nan.csv", [{"text": "goal", "score": "1.5"}, {"text": "bank", "score": "inf"}])
    write_csv(tmp / "huge.csv", [{"text": "goal", "score": "1.5"}, {"text": "bank", "score": "1e300"}])
    write_csv(tmp / "cols.csv", [{"text": "goal", "a": "1", "b": "2"}, {"text": "bank", "a": "0", "b": "1"}])
    (tmp / "weights.json").write_text('{"weather": 2}')
    (tmp / "bool_weights.json").write_text('{"sport": true}')
    write_csv(tmp / "never.csv", [{"text": "goal", "a": "1", "b": "0"}, {"text": "bank", "a": "0", "b": "0"}])
    files = [
        ("--train_file", multi["train"]),
        ("--validation_file", multi["validation"]),
        ("--test_file", multi["test"]),
    ]
    reg = shapes["regression"]
    regression = [
        ("--train_file", reg["train"]),
        ("--validation_file", reg["validation"]),
        ("--test_file", reg["test"]),
    ]
    return {
        "unseen multi-label": ([*files[:1], ("--validation_file", tmp / "unseen.jsonl"), *files[2:],
                                "--label_column", "labels"], "label 'weather' of the validation split never occurs"),
        "empty label list refused": ([*files, ("--validation_file", tmp / "empty_list.jsonl"), "--label_column",
                                      "labels", "--allow_empty_labels", "false"], "has no label, and --allow_empty"),
        "non-numeric target": ([*same_file(tmp / "na.csv"), "--label_column", "score",
                                "--problem_type", "regression"], "label 'high' (example 1 of the train split"),
        "nan target": ([*same_file(tmp / "nan.csv"), "--label_column", "score"], "is not finite"),
        "a target beyond float32": ([*same_file(tmp / "huge.csv"), "--label_column", "score"],
                                    "target '1e300' (example 1 of the train split"),
        "regression of strings": (["--problem_type", "regression"], "label 'business' (example 0"),
        "missing label column": (["--label_columns", "sport,weather"], "column 'sport' not in the train split"),
        "non 0/1 column": ([*same_file(tmp / "cols.csv"), "--label_columns", "a,b"], "holds 2, not 0 or 1"),
        "unknown class weight": (["--class_weights", str(tmp / "weights.json")], "names 'weather', which is not"),
        "a true class weight": (["--class_weights", str(tmp / "bool_weights.json")], "sport' in" ),
        "a label column named twice": (["--label_columns", "a,a,b"], "--label_columns names 'a' twice"),
        "label_column and label_columns": (["--label_columns", "a,b", "--label_column", "x"], "--label_column (one"),
        "a label column train never has": ([*same_file(tmp / "never.csv"), "--label_columns", "a,b"],
                                           "label column 'b' has no positive example in the train split"),
        "class weights file missing": (["--class_weights", "nope.json"], "is not none, balanced or an existing"),
        "stride over max_length": (["--long_documents", "windows", "--window_stride", "40"], "window_stride 40 is not"),
        "stride over room": (["--long_documents", "windows", "--window_stride", "31"], "leaves windows no new tokens"),
        "weighted sampler for regression": ([*regression, "--label_column", "score", "--sampler", "weighted"],
                                            "regression has none"),
        "metric of another task": (["--metric_for_best_model", "mse"], "is not computed for a single-label task"),
        "bad problem type": (["--problem_type", "ordinal"], "problem_type 'ordinal' is not one of"),
        "windows over text pairs": (["--long_documents", "windows", "--text_pair_column", "label"], "text pair"),
    }  # fmt: skip


CASES = [
    "unseen multi-label", "empty label list refused", "non-numeric target", "nan target",
    "a target beyond float32", "regression of strings",
    "missing label column", "non 0/1 column", "unknown class weight", "a true class weight",
    "a label column named twice", "label_column and label_columns", "a label column train never has",
    "class weights file missing",
    "stride over max_length", "stride over room", "weighted sampler for regression", "metric of another task",
    "bad problem type", "windows over text pairs",
]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_bad_task_input_is_one_line_exit_2_nothing_written(case, shapes, tiny_args, tmp_path):
    change, expected = bad_shapes(tmp_path, shapes)[case]
    args = [str(a) for a in tiny_args]
    for item in change:
        args = replace(args, item[0], str(item[1])) if isinstance(item, tuple) else args
    args += [str(c) for c in change if not isinstance(c, tuple)]
    proc = run_inline("full_finetune", *args, check=False)
    code, err = proc.returncode, proc.stderr
    last = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err
    assert last.startswith("error: ") and expected in last, err
    assert len(last) < 600 and "usage:" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("shape", "baseline", "columns"),
    [
        ("multi", "tfidf_ovr_logreg", "| strategy | test f1_micro | test f1_macro |"),
        ("regression", "tfidf_ridge", "| strategy | test mse | test r2 |"),
    ],
)
def test_compare_reports_each_shape_with_its_baseline_and_metrics(
    shape, baseline, columns, shapes, tiny_args, tmp_path
):
    from finetune_recipes.tools.compare import main as compare

    args = shape_args(tiny_args, shapes[shape], *SHAPE_FLAGS[shape], "--max_train_steps", "2")
    args = [a for a in args if a != str(tmp_path / "out")]
    args.remove("--output_dir")
    compare(["--recipes", "feature_extraction", "--output_dir", str(tmp_path / "cmp"), *args])
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert table.startswith(columns) and f"| {baseline} |" in table and "| feature_extraction |" in table
    assert (tmp_path / "cmp" / "comparison.png").read_bytes().startswith(b"\x89PNG")


def test_an_unseen_label_among_numbers_points_to_regression():
    from finetune_recipes.data.tasks import _refuse_unseen

    with pytest.raises(UserError, match="label '1e30' of the validation split never occurs.*--problem_type regression"):
        _refuse_unseen({"1", "1e30"}, ["1", "2", "3"], "validation")
    with pytest.raises(UserError) as words:
        _refuse_unseen({"weather"}, ["sport", "tech"], "validation")
    assert "regression" not in str(words.value)


def test_correlations_and_r2_are_undefined_not_zero_on_a_constant_side():
    flat_refs = regression_metrics([1.0, 2.0, 3.0], [5.0, 5.0, 5.0])
    assert flat_refs["pearson"] is flat_refs["spearman"] is flat_refs["r2"] is None
    assert flat_refs["mse"] == pytest.approx((16 + 9 + 4) / 3)
    flat_preds = regression_metrics([2.0, 2.0, 2.0], [1.0, 2.0, 3.0])
    assert flat_preds["pearson"] is flat_preds["spearman"] is None
    assert flat_preds["r2"] == pytest.approx(0.0)  # defined: the mean's own score


def test_a_constant_validation_target_reports_undefined_and_refuses_to_rank_by_it(shapes, tiny_args, tmp_path):
    flat = tmp_path / "flat.csv"
    rows = list(csv.DictReader(shapes["regression"]["validation"].open()))
    write_csv(flat, [{**r, "score": "4.5"} for r in rows])
    args = shape_args(tiny_args, {**shapes["regression"], "validation": flat}, "--label_column", "score")
    refused = run_inline("full_finetune", *args, "--metric_for_best_model", "pearson", check=False)
    assert refused.returncode == 2 and not (tmp_path / "out").exists()
    assert refused.stderr.strip().splitlines()[-1] == (
        "error: every validation target has one value, so pearson is undefined there; pass "
        "--metric_for_best_model mse or mae, or a validation split whose targets vary"
    )
    run = run_inline("full_finetune", *replace(args, "--num_train_epochs", "1"))
    assert "every validation target is 4.5: Pearson, Spearman and R² are undefined there" in run.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["eval_pearson"] is results["eval_r2"] is None and results["eval_mse"] > 0
    assert results["test_pearson"] is not None  # the test split's targets vary
    assert_card_matches_results(tmp_path / "out")
