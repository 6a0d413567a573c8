"""Data: file formats, label encoding, leak-free stratified splits, clear errors, dynamic padding, length grouping."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from tiny import TOPICS, topic_rows, write_csv

from finetune_recipes.config import DataArguments, ModelArguments
from finetune_recipes.data import (
    build_dataloader,
    build_datasets,
    build_tokenizer,
    encode_task,
    labelled,
    load_bbc_news,
    load_raw_datasets,
    split_validation,
    tokenize,
    train_sampler,
)
from finetune_recipes.errors import UserError

BBC_TOPICS = ["business", "entertainment", "politics", "sports", "tech"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return build_tokenizer(ModelArguments(model_name_or_path=str(tiny_model)), DataArguments(max_length=64))


def build(tokenizer, seed: int = 0, **kw):
    args = DataArguments(**{k: str(v) if isinstance(v, Path) else v for k, v in kw.items()})
    return build_datasets(args, tokenizer, seed)


def texts(tokenizer, ds: Dataset) -> list[str]:
    """The texts back from their ids: every word of the tiny data is a whole word of the tiny vocabulary."""
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in ds["input_ids"]]


def unique_rows(counts: dict[str, int], seed: int = 0) -> list[dict[str, str]]:
    """Distinct texts of in-vocabulary words, `counts[label]` of each label."""
    rng = random.Random(seed)
    rows = []
    for label, n in counts.items():
        words, seen = TOPICS[label].split(), set()
        while len(seen) < n:
            seen.add(" ".join(rng.sample(words, rng.randint(3, 8))))
        rows += [{"text": t, "label": label} for t in sorted(seen)]
    return rows


# --- the bundled corpus ------------------------------------------------------------------------------------------


def test_load_bbc_news():
    raw = load_bbc_news()
    assert list(raw) == ["train"]
    train = raw["train"]
    assert len(train) == 2225
    counts = Counter(train["label"])
    assert sorted(counts) == BBC_TOPICS
    assert counts["sports"] == 511 and counts["business"] == 510
    assert all(t and t == t.strip() for t in train["text"])
    assert not any("\ufffd" in t for t in train["text"][:50])


def test_bbc_default_builds(tokenizer):
    data = build(tokenizer, max_length=16, max_train_samples=40, max_eval_samples=20)  # dataset_name: bbc_news
    assert data.label_names == BBC_TOPICS
    assert data.test is None
    assert (len(data.train), len(data.validation)) == (40, 20)
    assert max(len(ids) for ids in data.train["input_ids"]) == 16


def test_bbc_split_drops_duplicates_then_holds_out_ten_percent():
    raw, task = encode_task(load_bbc_news(), DataArguments())
    names = task.label_names
    train, val = split_validation(raw["train"], ["text"], DataArguments(), 0, task.problem_type)
    unique = len(set(raw["train"]["text"]))
    assert unique < 2225  # the corpus has exact duplicates
    assert len(train) + len(val) == unique
    assert len(val) == pytest.approx(unique / 10, abs=1)
    assert not set(train["text"]) & set(val["text"])
    counts = Counter(names[i] for i in val["labels"])
    assert sorted(counts) == BBC_TOPICS


# --- labels ------------------------------------------------------------------------------------------------------


def test_string_labels_become_sorted_ids(tokenizer, tmp_path):
    train = write_csv(
        tmp_path / "train.csv", [{"text": f"goal {w}", "label": w} for w in ["tech", "sport", "business"]]
    )
    val = write_csv(tmp_path / "val.csv", [{"text": "phone", "label": "tech"}])
    data = build(tokenizer, train_file=train, validation_file=val)
    assert data.label_names == ["business", "sport", "tech"]
    assert data.train["labels"] == [2, 1, 0]
    assert data.validation["labels"] == [2]
    assert data.train.features["labels"] == ClassLabel(names=["business", "sport", "tech"])


def test_integer_labels_sort_numerically(tokenizer, tmp_path):
    rows = [{"text": w, "label": n} for w, n in [("goal", 10), ("match", 2), ("team", 7), ("win", 10)]]
    train = write_csv(tmp_path / "train.csv", rows)
    val = write_csv(tmp_path / "val.csv", [{"text": "cup", "label": 7}])
    data = build(tokenizer, train_file=train, validation_file=val)
    assert data.label_names == ["2", "7", "10"]  # numeric order, not "10" < "2"
    assert data.train["labels"] == [2, 0, 1, 2]
    assert data.validation["labels"] == [1]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_labels_are_read_as_written(tokenizer, tmp_path, suffix):
    """Labels 01, 1 and 10 are three classes in a CSV as in JSON Lines; 'NA' and 'None' are labels, not missing."""
    labels = ["01", "1", "10", "NA", "None", "2"]
    rows = [{"text": f"{w} {label}", "label": label} for label in labels for w in ("goal", "match")]
    frame = pd.DataFrame(rows)
    train = write_frame(frame, tmp_path / f"train{suffix}")
    val = write_frame(
        pd.DataFrame([{"text": "NA", "label": "01"}, {"text": "None", "label": "NA"}]), tmp_path / f"v{suffix}"
    )
    data = build(tokenizer, train_file=train, validation_file=val)
    # A CSV's numbers by value (as pandas' numbers sorted before), then the names; JSON's strings as strings.
    assert data.label_names == (["01", "1", "2", "10"] if suffix == ".csv" else ["01", "1", "10", "2"]) + ["NA", "None"]
    assert [data.label_names[i] for i in data.validation["labels"]] == ["01", "NA"]
    assert data.raw["validation"]["text"] == ["NA", "None"]  # texts too


def test_decimal_labels_in_a_csv_are_a_regression(tokenizer, tmp_path):
    rows = [{"text": f"goal {i}", "label": f"{i / 4:.2f}"} for i in range(8)]
    data = build(
        tokenizer,
        train_file=write_csv(tmp_path / "train.csv", rows),
        validation_file=write_csv(tmp_path / "v.csv", rows[:2]),
    )
    assert data.task.problem_type == "regression"
    assert data.task.target_mean == pytest.approx(sum(i / 4 for i in range(8)) / 8)


def test_class_label_feature_keeps_its_names(tokenizer, tmp_path):
    features = Features({"text": Value("string"), "label": ClassLabel(names=["zebra", "apple"])})
    Dataset.from_dict({"text": ["goal", "chip", "bank"], "label": [1, 0, 1]}, features=features).to_parquet(
        tmp_path / "train.parquet"
    )
    Dataset.from_dict({"text": ["win"], "label": [0]}, features=features).to_parquet(tmp_path / "val.parquet")
    data = build(tokenizer, train_file=tmp_path / "train.parquet", validation_file=tmp_path / "val.parquet")
    assert data.label_names == ["zebra", "apple"]  # the feature's order, not sorted
    assert data.train["labels"] == [1, 0, 1] and data.validation["labels"] == [0]


def test_label_column_under_another_name(tokenizer, tmp_path):
    rows = [{"text": r["text"], "topic": r["label"]} for r in topic_rows(12, 0)]
    train = write_csv(tmp_path / "train.csv", rows)
    val = write_csv(tmp_path / "val.csv", rows[:3])
    with pytest.raises(
        UserError, match=r"column 'label' not in the train split \(.*train.csv\), whose columns are text, topic"
    ):
        build(tokenizer, train_file=train, validation_file=val)
    data = build(tokenizer, train_file=train, validation_file=val, label_column="topic")
    assert data.label_names == ["business", "sport", "tech"]
    assert len(data.train) == 12


def test_validation_label_unseen_in_train(tokenizer, tmp_path):
    train = write_csv(tmp_path / "train.csv", topic_rows(9, 0))
    val = write_csv(tmp_path / "val.csv", [{"text": "goal", "label": "sport"}, {"text": "rain", "label": "weather"}])
    with pytest.raises(UserError, match=r"label 'weather' of the validation split never occurs in train"):
        build(tokenizer, train_file=train, validation_file=val)


# --- text pairs, formats, test split -----------------------------------------------------------------------------


def test_text_pairs_give_two_segments(tokenizer, tmp_path):
    rows = [{"premise": "market bank", "hypothesis": "goal match team", "label": "no"}] * 2
    rows[1] = {"premise": "phone chip", "hypothesis": "software code", "label": "yes"}
    train = write_csv(tmp_path / "train.csv", rows)
    data = build(
        tokenizer, train_file=train, validation_file=train, text_column="premise", text_pair_column="hypothesis"
    )
    ids, types = data.train[0]["input_ids"], data.train[0]["token_type_ids"]
    assert ids.count(tokenizer.sep_token_id) == 2
    first = [i for i, t in zip(ids, types, strict=True) if t == 0]
    second = [i for i, t in zip(ids, types, strict=True) if t == 1]
    assert tokenizer.decode(first, skip_special_tokens=True) == "market bank"
    assert tokenizer.decode(second, skip_special_tokens=True) == "goal match team"


def test_text_pair_column_missing(tokenizer, tmp_path):
    train = write_csv(tmp_path / "train.csv", topic_rows(6, 0))
    with pytest.raises(
        UserError, match=r"column 'hypothesis' not in the train split \(.*train.csv\), whose columns are text, label"
    ):
        build(tokenizer, train_file=train, validation_file=train, text_pair_column="hypothesis")


def write_frame(frame: pd.DataFrame, path: Path) -> Path:
    suffix = path.suffix
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".json":
        frame.to_json(path, orient="records")  # one JSON array
    elif suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl", ".parquet"])
def test_file_formats(tokenizer, tmp_path, suffix):
    files = {
        split: write_frame(pd.DataFrame(topic_rows(n, seed)), tmp_path / f"{split}{suffix}")
        for split, n, seed in [("train", 12, 0), ("validation", 6, 1), ("test", 4, 2)]
    }
    data = build(tokenizer, train_file=files["train"], validation_file=files["validation"], test_file=files["test"])
    assert data.label_names == ["business", "sport", "tech"]
    assert (len(data.train), len(data.validation), len(data.test)) == (12, 6, 4)
    assert texts(tokenizer, data.train) == [r["text"] for r in topic_rows(12, 0)]  # file order kept


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_test_split_needs_no_labels(tokenizer, tmp_path, suffix):
    frame = pd.DataFrame(topic_rows(6, 0))
    train = write_frame(frame, tmp_path / f"train{suffix}")
    test = write_frame(pd.DataFrame({"text": ["goal match", "phone"]}), tmp_path / f"test{suffix}")
    data = build(tokenizer, train_file=train, validation_file=train, test_file=test)
    assert "labels" not in data.test.column_names and len(data.test) == 2
    assert "labels" in data.validation.column_names
    assert labelled(data.test) is None and labelled(data.validation) is data.validation


def test_labelled_test_split_is_encoded(tokenizer, tmp_path):
    train = write_csv(tmp_path / "train.csv", topic_rows(6, 0))
    test = write_csv(tmp_path / "test.csv", [{"text": "phone", "label": "tech"}, {"text": "bank", "label": ""}])
    with pytest.raises(UserError, match="example 1 .* of the test split has no 'label'"):
        build(tokenizer, train_file=train, validation_file=train, test_file=test)
    test = write_csv(tmp_path / "test.csv", [{"text": "phone", "label": "tech"}])
    assert build(tokenizer, train_file=train, validation_file=train, test_file=test).test["labels"] == [2]


# --- errors ------------------------------------------------------------------------------------------------------


def test_mixed_extensions(tmp_path):
    train = write_csv(tmp_path / "train.csv", topic_rows(3, 0))
    val = write_frame(pd.DataFrame(topic_rows(3, 1)), tmp_path / "val.parquet")
    with pytest.raises(UserError, match=r"^data files must all be one of \.csv, \.json, \.jsonl, \.parquet; got "):
        load_raw_datasets(DataArguments(train_file=str(train), validation_file=str(val)))


def test_json_and_jsonl_mix(tmp_path):
    frame = pd.DataFrame(topic_rows(3, 0))
    train, val = write_frame(frame, tmp_path / "train.json"), write_frame(frame, tmp_path / "val.jsonl")
    raw = load_raw_datasets(DataArguments(train_file=str(train), validation_file=str(val)))
    assert raw["train"]["text"] == raw["validation"]["text"]


def test_unsupported_extension(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("hello\n")
    with pytest.raises(UserError, match="must all be one of"):
        load_raw_datasets(DataArguments(train_file=str(path)))


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"^data file .*nope\.csv does not exist; check --train_file"):
        load_raw_datasets(DataArguments(train_file=str(tmp_path / "nope.csv")))


@pytest.mark.parametrize(
    ("name", "content"),
    [("bad.parquet", b"PAR1 not really parquet \x00\x01\x02" * 20), ("bad.json", b"{not json\n"), ("e.csv", b"")],
)
def test_unreadable_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError, match=r"^cannot read .*\(\w+: .*\); check the file and its format$") as info:
        load_raw_datasets(DataArguments(train_file=str(path)))
    assert "An error occurred while generating" not in str(info.value)  # the cause, not the wrapper
    assert "\n" not in str(info.value)


def test_no_data_source():
    with pytest.raises(UserError, match="no data"):
        load_raw_datasets(DataArguments(dataset_name=None))


def test_no_train_split(tokenizer, tmp_path):
    val = write_csv(tmp_path / "val.csv", topic_rows(3, 0))
    with pytest.raises(UserError, match="no train split"):
        build(tokenizer, validation_file=val)


def test_missing_text_column_lists_columns(tokenizer, tmp_path):
    train = write_csv(tmp_path / "train.csv", [{"body": "goal", "label": "sport"}])
    with pytest.raises(
        UserError, match=r"column 'text' not in the train split \(.*train.csv\), whose columns are body, label"
    ):
        build(tokenizer, train_file=train)


@pytest.mark.parametrize(("suffix", "content"), [(".csv", "text,label\n"), (".jsonl", "")])
def test_empty_split(tokenizer, tmp_path, suffix, content):
    train = write_frame(pd.DataFrame(topic_rows(6, 0)), tmp_path / f"train{suffix}")
    val = tmp_path / f"val{suffix}"
    val.write_text(content)
    with pytest.raises(UserError, match=rf"^the validation split is empty \(.*val\{suffix} has no rows\); give it"):
        build(tokenizer, train_file=train, validation_file=val)


def test_empty_split_in_memory():
    from finetune_recipes.data import check_columns

    raw = DatasetDict({"train": Dataset.from_dict({"text": [], "label": []})})
    with pytest.raises(UserError, match="the train split is empty"):
        check_columns(raw, DataArguments())


@pytest.mark.parametrize("column", ["text", "label"])
def test_missing_value(tokenizer, tmp_path, column):
    rows = topic_rows(6, 0)
    rows[2][column] = ""  # an empty CSV cell reads as None
    train = write_csv(tmp_path / "train.csv", rows)
    with pytest.raises(UserError, match=f"example 2 .* of the train split has no '{column}'"):
        build(tokenizer, train_file=train)


# --- held-out validation -----------------------------------------------------------------------------------------


COUNTS = {"business": 120, "sport": 60, "tech": 20}


@pytest.fixture(scope="module")
def pool_csv(tmp_path_factory) -> Path:
    """200 distinct texts (120/60/20 by label), each written three times, shuffled."""
    rows = unique_rows(COUNTS) * 3
    random.Random(0).shuffle(rows)
    return write_csv(tmp_path_factory.mktemp("pool") / "train.csv", rows)


def test_stratified_split_proportions(tokenizer, pool_csv):
    data = build(tokenizer, train_file=pool_csv, validation_split_percentage=10)
    counts = Counter(data.label_names[i] for i in data.validation["labels"])
    for label, n in COUNTS.items():
        assert abs(counts[label] - n / 10) <= 1, counts
    assert len(data.train) + len(data.validation) == sum(COUNTS.values())


def test_no_text_in_both_train_and_validation(tokenizer, pool_csv):
    data = build(tokenizer, train_file=pool_csv, validation_split_percentage=20)
    train, val = texts(tokenizer, data.train), texts(tokenizer, data.validation)
    assert not set(train) & set(val)
    assert len(set(train)) == len(train)  # duplicates were dropped, not just kept on one side


def test_split_depends_on_the_seed(tokenizer, pool_csv):
    def val(seed):
        return texts(tokenizer, build(tokenizer, seed=seed, train_file=pool_csv).validation)

    assert val(1) == val(1)
    assert val(1) != val(2)


def test_split_validation_on_raw_text_pairs():
    rows = {"a": ["x", "x", "y", "y", "z"] * 8, "b": [str(i % 8) for i in range(40)], "labels": [0, 1] * 20}
    ds = Dataset.from_dict(rows).cast_column("labels", ClassLabel(names=["n", "p"]))
    args = DataArguments(validation_split_percentage=25)
    train, val = split_validation(ds, ["a", "b"], args, 0, "single_label_classification")
    pairs = {(r["a"], r["b"]) for r in train}
    assert not pairs & {(r["a"], r["b"]) for r in val}
    assert len(train) + len(val) == len({(a, b) for a, b in zip(rows["a"], rows["b"], strict=True)})


def test_unsplittable_pool(tokenizer, tmp_path):
    rows = unique_rows({"business": 20, "sport": 1})
    train = write_csv(tmp_path / "train.csv", rows)
    with pytest.raises(UserError, match="class 'sport' has one unique training example, .*: add examples of 'sport', "
                       "or pass --validation_file"):  # fmt: skip
        build(tokenizer, train_file=train)
    few = write_csv(tmp_path / "few.csv", unique_rows({"business": 6, "sport": 6, "tech": 6}))
    with pytest.raises(UserError, match="--validation_split_percentage 5 holds out 1 of 18 unique examples, fewer than "
                       "the 3 classes; pass --validation_split_percentage 17 or more"):  # fmt: skip
        build(tokenizer, train_file=few, validation_split_percentage=5)
    with pytest.raises(UserError, match="cannot hold out 0"):
        build(tokenizer, train_file=write_csv(tmp_path / "t2.csv", unique_rows(COUNTS)), validation_split_percentage=0)


def test_max_samples(tokenizer, tiny_data):
    files = dict(train_file=tiny_data["train"], validation_file=tiny_data["validation"])
    data = build(tokenizer, max_train_samples=10, max_eval_samples=5, **files)
    assert (len(data.train), len(data.validation)) == (10, 5)
    data = build(tokenizer, max_train_samples=1000, max_eval_samples=1000, **files)
    assert (len(data.train), len(data.validation)) == (96, 30)


# --- tokenizer and max_length ------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_length", [65, 512])
def test_max_length_outside_model_limit(tiny_model, max_length):
    with pytest.raises(UserError, match=rf"max_length {max_length} is outside 1\.\.64"):
        build_tokenizer(ModelArguments(model_name_or_path=str(tiny_model)), DataArguments(max_length=max_length))
    with pytest.raises(UserError, match="max_length is 0; pass a value at least 1"):
        DataArguments(max_length=0)


def test_max_length_truncates(tokenizer, tiny_data):
    data = build(tokenizer, train_file=tiny_data["train"], validation_file=tiny_data["validation"], max_length=8)
    lengths = [len(ids) for ids in data.train["input_ids"]]
    assert max(lengths) == 8 and min(lengths) < 8  # truncated, and not padded


def test_missing_tokenizer(tiny_model, tmp_path):
    args = ModelArguments(model_name_or_path=str(tiny_model), tokenizer_name=str(tmp_path / "none"))
    with pytest.raises(UserError, match=r"tokenizer path .*none does not exist; pass --tokenizer_name"):
        build_tokenizer(args, DataArguments(max_length=32))


# --- dataloaders -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def varied(tokenizer) -> Dataset:
    """400 texts of 1 to 40 words, in random order of length."""
    rng = random.Random(0)
    words = TOPICS["sport"].split()
    rows = [" ".join(rng.choices(words, k=rng.randint(1, 40))) for _ in range(400)]
    raw = Dataset.from_dict({"text": rows, "labels": [i % 3 for i in range(400)]})
    return tokenize(DatasetDict({"train": raw}), tokenizer, DataArguments(max_length=64))["train"]


def test_dynamic_padding(tokenizer, varied):
    loader = build_dataloader(varied, tokenizer, batch_size=8)
    for i, batch in enumerate(loader):
        lengths = [len(ids) for ids in varied[i * 8 : i * 8 + 8]["input_ids"]]
        assert batch["input_ids"].shape == (len(lengths), max(lengths))  # to the longest, not to max_length
        assert batch["attention_mask"].sum(1).tolist() == lengths
        assert (batch["input_ids"][batch["attention_mask"] == 0] == tokenizer.pad_token_id).all()
        assert batch["labels"].dtype == torch.long and batch["labels"].shape == (len(lengths),)


def test_pad_to_multiple_of_8(tokenizer, varied):
    loader = build_dataloader(varied, tokenizer, batch_size=8, pad_to_multiple_of=8)
    for batch in loader:
        longest = int(batch["attention_mask"].sum(1).max())
        assert batch["input_ids"].shape[1] % 8 == 0 and 0 <= batch["input_ids"].shape[1] - longest < 8


def spread(loader) -> float:
    """Mean over batches of longest minus shortest text."""
    gaps = [float(m.max() - m.min()) for m in (b["attention_mask"].sum(1) for b in loader)]
    return sum(gaps) / len(gaps)


def test_group_by_length_batches_similar_lengths(tokenizer, varied):
    torch.manual_seed(0)
    shuffled = spread(build_dataloader(varied, tokenizer, batch_size=8, shuffle=True))
    sampler = train_sampler(varied, "random", True, 8, 0)
    grouped = spread(build_dataloader(varied, tokenizer, batch_size=8, shuffle=True, sampler=sampler))
    assert grouped < shuffled / 3


def order(loader, epoch: int | None = None) -> list[int]:
    if epoch is not None:
        loader.sampler.set_epoch(epoch)
    return list(loader.sampler)


def test_group_by_length_order_depends_on_seed_and_epoch(tokenizer, varied):
    def loader(seed):
        sampler = train_sampler(varied, "random", True, 8, seed)
        return build_dataloader(varied, tokenizer, batch_size=8, shuffle=True, sampler=sampler, seed=seed)

    a, b = loader(3), loader(3)
    assert sorted(order(a, 0)) == list(range(len(varied)))
    torch.manual_seed(123)  # the global RNG plays no part
    assert order(a, 0) == order(b, 0)
    assert order(a, 1) == order(b, 1) != order(a, 0)
    assert order(a, 1) == order(a)  # iterating again in the same epoch repeats the order
    assert order(a, 0) == order(loader(3))  # a fresh loader starts at epoch 0
    assert order(loader(4), 0) != order(b, 0)


def test_no_shuffle_keeps_order(tokenizer, varied):
    loader = build_dataloader(varied, tokenizer, batch_size=8)
    assert list(loader.sampler) == list(range(len(varied)))


def test_a_text_with_conflicting_labels_in_train_is_said(tokenizer, tmp_path, caplog):
    """Issue 39, item 10: 20 copies of one text under two labels trained without a word."""
    rows = unique_rows({"business": 10, "sport": 10}) + [{"text": "goal bank", "label": ("sport", "business")[i % 2]}
                                                           for i in range(20)]  # fmt: skip
    build(
        tokenizer,
        train_file=write_csv(tmp_path / "t.csv", rows),
        validation_file=write_csv(tmp_path / "v.csv", rows[:4]),
    )
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "1 text(s) of the train split occur with different labels (the first: 'goal bank')" in " ".join(said)


def test_validation_texts_also_in_train_are_counted_in_a_warning(tokenizer, tmp_path, caplog):
    rows = unique_rows({"business": 6, "sport": 6})
    train = write_csv(tmp_path / "train.csv", rows)
    flipped = {"business": "sport", "sport": "business"}
    overlap = [
        rows[0],
        {**rows[1], "label": flipped[rows[1]["label"]]},
        {"text": "a text train never saw", "label": "sport"},
    ]
    validation = write_csv(tmp_path / "validation.csv", overlap)
    with caplog.at_level("WARNING"):
        build(tokenizer, train_file=train, validation_file=validation)
    said = [r.getMessage() for r in caplog.records if "also occur in train" in r.getMessage()]
    assert said and said[0].startswith("2 of 3 validation texts also occur in train, 1 of them with another label")


def test_a_list_column_is_refused_not_read_as_text_pairs(tokenizer, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"text": ["market", "bank"], "label": "business"}\n{"text": ["goal", "cup"], "label": "sport"}\n')
    with pytest.raises(UserError, match="holds lists, not text.*--text_pair_column"):
        build(tokenizer, train_file=path, validation_file=path)


def test_validation_file_columns_take_the_train_files_types(tokenizer, tmp_path):
    """Each file is read on its own: labels 1, 2 in train and "1", "2" in validation, or texts that read as
    numbers in one file only, must still agree."""
    train = tmp_path / "train.jsonl"
    train.write_text("".join(f'{{"text": "market bank {i}", "label": {1 + i % 2}}}\n' for i in range(8)))
    validation = tmp_path / "validation.jsonl"
    validation.write_text('{"text": "123", "label": "1"}\n{"text": "456", "label": "2"}\n')
    data = build(tokenizer, train_file=train, validation_file=validation)
    assert data.label_names == ["1", "2"] and data.validation["labels"] == [0, 1]


def test_a_regression_csv_with_a_cell_that_is_no_number_is_refused_not_made_classes(tokenizer, tmp_path):
    """Reading a CSV as written must not turn a score column with one 'NA' into 9 classes."""
    rows = [{"text": f"goal {i}", "label": f"{i / 4:.2f}"} for i in range(8)] + [{"text": "bank", "label": "NA"}]
    with pytest.raises(UserError, match=r"holds numbers such as 0.25 and 'NA' \(example 8 of the train split\)"):
        build(tokenizer, train_file=write_csv(tmp_path / "t.csv", rows))


def test_json_labels_keep_their_order_and_kind(tokenizer, tmp_path):
    """Strings in JSON are strings: "1".."10" sort as before (ids unchanged), "0.5" is a class."""
    rows = [{"text": f"goal {w}", "label": label} for label in ["1", "2", "10", "0.5"] for w in ("win", "cup")]
    train = write_frame(pd.DataFrame(rows), tmp_path / "t.jsonl")
    data = build(tokenizer, train_file=train, validation_file=train)
    assert data.task.problem_type == "single_label_classification" and data.label_names == ["0.5", "1", "10", "2"]
