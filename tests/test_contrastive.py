"""The contrastive recipe (SetFit's method): its pairs, the pooling it reads from the model, the encoder it tunes
on planted data, the classifier it saves, and its refusals through the command line."""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FP32, run_inline
from tiny import FILLER, TOPICS, write_csv, write_sentence_pooling
from transformers import AutoModel, AutoTokenizer, pipeline

from finetune_recipes.config import MULTI, SINGLE
from finetune_recipes.errors import UserError
from finetune_recipes.sentence import SentenceClassifier, embed, sentence_pairs, sentence_pooling
from finetune_recipes.tools.predict import predict


def test_pairs_are_balanced_seeded_of_the_right_kind_and_never_of_an_example_with_itself():
    labels = [0] * 5 + [1] * 5 + [2] * 4
    pairs = sentence_pairs(labels, SINGLE, num_iterations=3, seed=0)
    assert len(pairs) == 2 * 3 * len(labels)  # one alike and one unlike per example and round
    assert Counter(t for _, _, t in pairs) == {1.0: 42, 0.0: 42}
    assert Counter(i for i, _, _ in pairs) == {i: 6 for i in range(len(labels))}
    assert all(i != j and (labels[i] == labels[j]) == (t == 1.0) for i, j, t in pairs)
    assert sentence_pairs(labels, SINGLE, 3, seed=0) == pairs and sentence_pairs(labels, SINGLE, 3, seed=1) != pairs
    sets = [[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]]  # multi-label: alike when a label is shared
    multi = sentence_pairs(sets, MULTI, num_iterations=2, seed=0)
    share = lambda i, j: any(a and b for a, b in zip(sets[i], sets[j], strict=True))  # noqa: E731
    assert all(i != j and share(i, j) == (t == 1.0) for i, j, t in multi)
    assert not [p for p in multi if p[0] == 4 and p[2] == 0.0]  # [1, 1, 1] shares a label with every other
    assert len(multi) == 2 * (5 + 4)


def test_multi_label_partners_are_uniform_over_their_kind_without_a_table_of_every_pair():
    """Drawn by rejection (10,000 examples would make a table of 10^8 pairs): an alike partner uniformly among the
    examples sharing a label, an unlike one among those sharing none, never the example itself."""
    sets = [[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1], [0, 0, 0]]  # the last has no label
    pairs = sentence_pairs(sets, MULTI, num_iterations=3000, seed=0)
    drawn = Counter((i, j) for i, j, _ in pairs)
    for i, kind, expected in [
        (0, 1.0, {1, 4}),  # shares label 0 with these two
        (4, 1.0, {0, 1, 2, 3}),  # shares a label with every labelled example
        (5, 0.0, {0, 1, 2, 3, 4}),  # no label: unlike everyone else, never itself
        (3, 0.0, {0, 1, 2, 5}),
    ]:
        partners = Counter(j for a, j, t in pairs if a == i and t == kind)
        assert set(partners) == expected, (i, kind)
        assert max(abs(c / 3000 - 1 / len(expected)) for c in partners.values()) < 0.03, (i, kind, partners)
    assert not [p for p in pairs if p[0] == 5 and p[2] == 1.0]  # no label: no alike partner
    assert drawn[(5, 5)] == 0
    many = [[int(i % 7 == k) for k in range(7)] for i in range(20_000)]  # 7 disjoint labels
    few = [[1] * 7] * 19_990 + [[0] * 7] * 10  # all but the 10 unlabelled ones overlap the first
    assert len(sentence_pairs(many, MULTI, 1, seed=0)) == 40_000
    unlike_of_first = [j for i, j, t in sentence_pairs(few, MULTI, 1, seed=0) if i == 0 and t == 0.0]
    assert len(unlike_of_first) == 1 and unlike_of_first[0] >= 19_990  # listed: rejection would take 2,000 draws


def test_pairs_refuse_what_cannot_be_paired():
    with pytest.raises(UserError, match="1 class\\(es\\) have one training example"):
        sentence_pairs([0, 0, 1], SINGLE, 1, 0)
    with pytest.raises(UserError, match="--num_iterations must be at least 1, not 0"):
        sentence_pairs([0, 0, 1, 1], SINGLE, 0, 0)
    with pytest.raises(UserError, match="the training data has one class"):
        sentence_pairs([2, 2, 2], SINGLE, 1, 0)
    with pytest.raises(UserError, match="makes 20,002,000 pairs, .* pass at most --num_iterations 999"):
        sentence_pairs([0, 1] * 5_000 + [0], SINGLE, 1000, 0)  # refused before a pair is drawn


def test_the_pooling_is_read_from_the_model_folder(tmp_path):
    for mode in ("cls", "mean"):
        (tmp_path / mode).mkdir()
        write_sentence_pooling(tmp_path / mode, mode)
        assert sentence_pooling(str(tmp_path / mode), None) == (mode, False)
        assert sentence_pooling(str(tmp_path / mode), "cls") == ("cls", False)  # --pooling wins
    modules = json.loads((tmp_path / "mean" / "modules.json").read_text())
    modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (tmp_path / "mean" / "modules.json").write_text(json.dumps(modules))
    assert sentence_pooling(str(tmp_path / "mean"), None) == ("mean", True)
    with pytest.raises(UserError, match="pass --pooling mean or --pooling cls"):
        sentence_pooling(str(tmp_path), None)


def planted_rows(n: int, seed: int) -> list[dict]:
    """Texts of five filler words and one of three words of their topic: before training, texts of one topic
    are no more alike than texts of two (the filler is the same mix, and two texts rarely share the word)."""
    rng, rows = random.Random(seed), []
    for i in range(n):
        label = sorted(TOPICS)[i % len(TOPICS)]
        words = [rng.choice(TOPICS[label].split()[:3]), *rng.choices(FILLER, k=5)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def alike_minus_unlike(encoder, tokenizer, rows: list[dict], normalize: bool = False) -> float:
    """Mean cosine similarity of same-topic pairs less that of different-topic pairs."""
    batch = tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")
    with torch.inference_mode():
        vectors = torch.nn.functional.normalize(embed(encoder.eval(), dict(batch), "mean", normalize), dim=-1)
    similarity = (vectors @ vectors.T).numpy()
    labels = np.array([r["label"] for r in rows])
    same, off = labels[:, None] == labels[None, :], ~np.eye(len(rows), dtype=bool)
    return float(similarity[same & off].mean() - similarity[~same].mean())


@pytest.fixture(scope="module")
def tuned(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("contrastive")
    files = {s: write_csv(root / f"{s}.csv", planted_rows(n, seed)) for s, n, seed in
             [("train", 30, 0), ("validation", 30, 1), ("test", 30, 2)]}  # fmt: skip
    out = root / "out"
    proc = run_inline(
        "contrastive", "--model_name_or_path", tiny_model, "--train_file", files["train"], "--validation_file",
        files["validation"], "--test_file", files["test"], "--output_dir", out, "--max_length", "16",
        "--num_iterations", "10", "--num_train_epochs", "3", "--learning_rate", "3e-3",
        "--per_device_train_batch_size", "8", *FP32,
    )  # fmt: skip
    return out, proc, planted_rows(45, 3)


def test_pairs_tune_the_encoder_so_same_label_texts_come_closer(tuned, tiny_model):
    out, _, held_out = tuned
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    before = alike_minus_unlike(AutoModel.from_pretrained(tiny_model), tokenizer, held_out)
    after = alike_minus_unlike(SentenceClassifier.from_pretrained(out).encoder, tokenizer, held_out)
    assert abs(before) < 0.05 and after > 0.5, (before, after)  # no topic structure before; learned from the pairs
    results = json.loads((out / "results.json").read_text())
    assert results["eval_accuracy"] > 0.8 and results["test_accuracy"] > 0.8  # chance is 1/3
    assert results["steps"] == 3 * 2 * 10 * 30 // 8  # epochs x pairs (2 an example and round) / batch


def test_the_saved_classifier_loads_in_pipeline_and_predict_alike(tuned):
    out, _, held_out = tuned
    texts = [r["text"] for r in held_out[:9]]
    classify = pipeline("text-classification", model=str(out), top_k=None)
    piped = [max(scores, key=lambda p: p["score"]) for scores in classify(texts)]
    predicted = predict(out, texts, bf16=False)
    assert [p["label"] for p in piped] == [p["label"] for p in predicted]
    assert [p["score"] for p in piped] == pytest.approx([p["score"] for p in predicted], abs=1e-4)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "finetune_recipes_sentence" and config["pooling"] == "mean"
    assert "import finetune_recipes.sentence  # registers its model class" in (out / "README.md").read_text()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--num_iterations", "0"], "num_iterations is 0; pass a value between 1 and 1,000"),
        (["--num_iterations", "1000000000"], "num_iterations is 1000000000; pass a value between 1 and 1,000"),
        (["--label_column", "score"], "a regression target has none; run full_finetune"),
        (["--pooling", "max"], "pooling 'max' is not one of cls, mean"),
        (["lonely"], "1 class(es) have one training example"),
        (["bare"], "names no cls or mean pooling"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(extra, message, tiny_args, tiny_model, tmp_path):
    args = [str(a) for a in tiny_args]
    if extra == ["lonely"]:  # a class seen once: no pair of the same label
        rows = planted_rows(12, 0) + [{"text": "robot code", "label": "gadgets"}]
        args[args.index("--train_file") + 1], extra = str(write_csv(tmp_path / "lonely.csv", rows)), []
    elif extra == ["bare"]:  # a model folder with no sentence-transformers files and no --pooling
        bare = Path(shutil.copytree(tiny_model, tmp_path / "bare"))
        (bare / "modules.json").unlink()
        args[args.index("--model_name_or_path") + 1], extra = str(bare), []
    elif extra[:1] == ["--label_column"]:
        rows = [{"text": r["text"], "score": str(i / 10)} for i, r in enumerate(planted_rows(30, 0))]
        args[args.index("--train_file") + 1] = str(write_csv(tmp_path / "scores.csv", rows))
        args[args.index("--validation_file") + 1] = args[args.index("--train_file") + 1]
        args[args.index("--test_file") + 1] = args[args.index("--train_file") + 1]
    proc = run_inline("contrastive", *args, *extra, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and message in lines[-1] and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()
