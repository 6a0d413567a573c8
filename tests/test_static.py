"""The static-embedding recipe: vectors files read and refused, the classifier's padding invariance, and the
recipe end to end on planted vectors (frozen and fine-tuned), through predict and pipeline()."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_inline
from safetensors.torch import load_file
from test_cli import snapshot
from tiny import FILLER, TOPICS
from transformers import AutoModelForSequenceClassification, pipeline

import finetune_recipes.static as static
from finetune_recipes.tools.predict import predict

DIM = 8


def planted_vectors(missing: frozenset[str] = frozenset()) -> dict[str, list[float]]:
    """A vector per topic word pointing along its topic's axis, fillers near zero, and 200 words the data
    never uses: the label follows the words' vectors."""
    generator = torch.Generator().manual_seed(0)
    vectors = {}
    for axis, topic in enumerate(sorted(TOPICS)):
        for word in TOPICS[topic].split():
            vector = torch.randn(DIM, generator=generator) * 0.1
            vector[axis] += 1.0
            vectors[word] = vector
    for word in [*FILLER, *(f"unused{i}" for i in range(200))]:
        vectors[word] = torch.randn(DIM, generator=generator) * 0.1
    return {w: [round(x, 5) for x in v.tolist()] for w, v in vectors.items() if w not in missing}


def write_vectors(path: Path, vectors: dict[str, list[float]], header: bool = False) -> Path:
    lines = [f"{len(vectors)} {DIM}"] if header else []
    lines += [
        " ".join([word.upper() if i % 7 == 0 else word, *map(str, v)]) for i, (word, v) in enumerate(vectors.items())
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def glove(tmp_path) -> Path:
    return write_vectors(tmp_path / "planted.txt", planted_vectors())


def static_args(tiny_args, tmp_path, *extra) -> list:
    return [*tiny_args, "--feature_cache_dir", tmp_path / "cache", *extra]


def test_reads_glove_and_vec_files_keeping_only_the_words_asked_for(tmp_path):
    vectors = planted_vectors()
    for header in (False, True):
        path = write_vectors(tmp_path / f"v{header}.vec", vectors, header)
        found, dim = static.read_vectors(path, {"goal", "market", "absent"}, lowercase=True)
        assert dim == DIM
        assert found.keys() == {"goal", "market"}
        assert found["goal"] == vectors["goal"]


@pytest.mark.parametrize("encoder", ["bag", "lstm"])
def test_a_text_gives_the_same_logits_alone_and_padded_in_a_batch(encoder):
    config = static.StaticConfig(vocab_size=30, embedding_dim=DIM, encoder=encoder, lstm_hidden_size=6, num_labels=3)
    model = static.StaticEmbeddingsForSequenceClassification(config).eval()
    text = torch.tensor([[5, 9, 3, 12]])
    batch = torch.tensor([[5, 9, 3, 12, 0, 0, 0], [4, 4, 8, 21, 22, 23, 7]])
    mask = (batch != 0).long()
    alone = model(input_ids=text, attention_mask=torch.ones_like(text)).logits
    padded = model(input_ids=batch, attention_mask=mask).logits
    assert torch.allclose(alone[0], padded[0], atol=1e-6)


def test_the_recipe_learns_planted_vectors_frozen_and_serves_them(glove, tiny_args, tmp_path):
    args = static_args(
        tiny_args, tmp_path, "--embeddings_file", glove, "--num_train_epochs", "10", "--learning_rate", "1e-2",
        "--head_hidden_size", "0",
    )  # fmt: skip
    proc = run_inline("static_embeddings", *args)
    # 40 words in the data (30 topic words, 10 fillers), all in the file: every token is covered.
    assert "planted.txt covers 100.0% of the training tokens and 100.0% of their 40 distinct words" in proc.stdout
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    assert results["eval_accuracy"] >= 0.9 and results["test_accuracy"] >= 0.9
    saved = load_file(out / "model.safetensors")["embeddings.weight"]
    tokenizer = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    assert torch.allclose(saved[tokenizer["goal"]], torch.tensor(planted_vectors()["goal"]))  # frozen: the file's
    assert results["trainable_params"] == DIM * 3 + 3  # the linear head alone
    texts = ["goal match team win the", "market bank profit of a", "phone chip robot code and"]
    predicted = [p["label"] for p in predict(out, texts)]
    assert predicted == ["sport", "business", "tech"]
    classify = pipeline("text-classification", model=str(out))  # registered by importing finetune_recipes.static
    assert [p["label"] for p in classify(texts)] == predicted
    # The reduced table is cached: a second run reads it instead of the file.
    cached = list((tmp_path / "cache").glob("vectors-*.safetensors"))
    assert len(cached) == 1


def test_fine_tuning_changes_the_vectors_freezing_does_not(glove, tiny_args, tmp_path):
    args = static_args(
        tiny_args, tmp_path, "--embeddings_file", glove, "--encoder", "lstm", "--freeze_embeddings", "false"
    )
    run_inline("static_embeddings", *args)
    out = tmp_path / "out"
    saved = load_file(out / "model.safetensors")["embeddings.weight"]
    vocab = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    assert not torch.allclose(saved[vocab["goal"]], torch.tensor(planted_vectors()["goal"]))
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.encoder == "lstm" and model.lstm is not None


def test_missing_words_get_random_vectors_and_the_coverage_line_counts_them(tiny_args, tmp_path):
    missing = frozenset(TOPICS["tech"].split()[:5])  # 5 of the 40 words
    path = write_vectors(tmp_path / "partial.vec", planted_vectors(missing), header=True)
    proc = run_inline("static_embeddings", *static_args(tiny_args, tmp_path, "--embeddings_file", path))
    line = next(line for line in proc.stdout.splitlines() if "covers" in line)
    assert "of their 40 distinct words; the others get random vectors" in line
    assert "87.5% of their" in line  # 35 of 40
    share = float(line.split("covers ")[1].split("%")[0])
    assert 75 < share < 95  # the missing words' share of the training tokens


def bad_vectors(tmp: Path) -> dict[str, tuple[list, str]]:
    vectors = planted_vectors()
    files = {
        "empty": tmp / "empty.txt",
        "latin1": tmp / "latin1.txt",
        "ragged": tmp / "ragged.txt",
        "words": tmp / "words.txt",
        "sparse": tmp / "sparse.txt",
        "nan": tmp / "nan.txt",
        "huge": tmp / "huge.txt",
    }
    files["nan"].write_text("goal 1 2 3\nmatch 1 nan 3\n")
    files["huge"].write_text("goal 1 2 3\nmatch 1 1e39 3\n")
    files["header"] = tmp / "header.vec"
    files["header"].write_text("2 300\ngoal 1 2 3\nmatch 1 2 3\n")
    files["gzip"] = tmp / "vectors.txt.gz"
    files["gzip"].write_bytes(gzip.compress(b"goal 1 2 3\n"))
    files["empty"].write_text("")
    files["latin1"].write_bytes("goal 1 2 3\ncaf\xe9 1 2 3\n".encode("latin-1"))
    files["ragged"].write_text("goal 1 2 3\nmatch 1 2\n")
    files["words"].write_text("goal 1 2 x\n")
    write_vectors(files["sparse"], {w: v for w, v in vectors.items() if w in FILLER or w.startswith("unused")})
    return {
        "missing file": (["--embeddings_file", tmp / "nope.txt"], "embeddings_file"),
        "empty file": (["--embeddings_file", files["empty"]], "holds no vectors"),
        "not UTF-8": (["--embeddings_file", files["latin1"]], "line 2 is not UTF-8"),
        "ragged rows": (["--embeddings_file", files["ragged"]], "line 2 has 2 values, the first row 3"),
        "not numbers": (["--embeddings_file", files["words"]], "line 1 has a value that is not a number"),
        "a nan value": (["--embeddings_file", files["nan"]], "line 2 has a value that is nan, inf or beyond float32"),
        "beyond float32": (["--embeddings_file", files["huge"]], "line 2 has a value that is nan, inf or beyond"),
        "a wrong header": (["--embeddings_file", files["header"]], "line 2 has 3 values, but its header says 300"),
        "gzip": (["--embeddings_file", files["gzip"]], "is gzip-compressed; decompress it first"),
        "low coverage": (["--embeddings_file", files["sparse"]], "below --min_coverage 0.5"),
        "bad encoder": (["--encoder", "gru"], "encoder 'gru' is not one of bag, lstm"),
        "distill without model2vec": (["--embeddings", "distill"], "--embeddings distill needs model2vec"),
    }


BAD = [
    "missing file",
    "empty file",
    "not UTF-8",
    "ragged rows",
    "not numbers",
    "a nan value",
    "beyond float32",
    "a wrong header",
    "gzip",
    "low coverage",
    "bad encoder",
    "distill without model2vec",
]


@pytest.mark.parametrize("case", BAD)
def test_bad_vectors_input_is_one_line_exit_2_nothing_written(case, tiny_args, tmp_path, monkeypatch):
    flags, message = bad_vectors(tmp_path)[case]
    monkeypatch.setitem(sys.modules, "model2vec", None)  # `import model2vec` fails, as where it is missing
    before = snapshot(tmp_path)
    proc = run_inline("static_embeddings", *static_args(tiny_args, tmp_path, *flags), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0] and proc.stderr.strip().endswith(errors[0]), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert snapshot(tmp_path) == before  # no output_dir, no cache entry


def test_the_card_and_predict_find_the_module_of_each_own_model_type_by_its_name():
    from finetune_recipes import sentence, static
    from finetune_recipes.reporting.card import OWN_MODEL_TYPES

    for module in (static, sentence):  # predict and the card import finetune_recipes.<the rest of the type>
        assert OWN_MODEL_TYPES + module.__name__.rsplit(".", 1)[1] == module.MODEL_TYPE
