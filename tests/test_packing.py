"""Packed batches (--pack_sequences): the collator's rows, logits per text against the padded path for every
architecture layer discovery supports, a training step's gradients, the probe that refuses what packing cannot
serve, and a recipe run end to end."""

from __future__ import annotations

import csv
import json
import random
from types import SimpleNamespace

import pytest
import torch
from conftest import run_inline
from peft import LoraConfig, get_peft_model
from tiny import tiny_configs
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from finetune_recipes import packing
from finetune_recipes.errors import UserError
from finetune_recipes.packing import PackedCollator, accept_packed, check_packable, first_fit_decreasing
from finetune_recipes.reporting.predictions import scores_of

CONFIGS = tiny_configs()
REFUSED = {"deberta-v2"}  # relative attention that does not take the block mask: the probe refuses it


def random_texts(n: int, seed: int, vocab: int = 100, longest: int = 30, pair: bool = False) -> list[dict]:
    """Token ids of n texts of 1..longest random tokens (no special id below 5), with labels and a document id."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        length = rng.randint(1, longest)
        first = rng.randint(0, length) if pair else length
        rows.append({
            "input_ids": [rng.randrange(5, vocab) for _ in range(length)],
            "token_type_ids": [0] * first + [1] * (length - first),
            "labels": i % 3,
            "document": i,
        })  # fmt: skip
    return rows


def padded_batch(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(f["input_ids"]) for f in features)
    batch = {"input_ids": [], "token_type_ids": [], "attention_mask": []}
    for f in features:
        n = len(f["input_ids"])
        batch["input_ids"].append(f["input_ids"] + [pad_id] * (width - n))
        batch["token_type_ids"].append(f["token_type_ids"] + [0] * (width - n))
        batch["attention_mask"].append([1] * n + [0] * (width - n))
    return {k: torch.tensor(v) for k, v in batch.items()}


def model_inputs(batch: dict, model) -> dict:
    """What the recipes pass: every key but the labels and a window's document; no token types where the model
    takes none (DistilBERT)."""
    keep = {k: v for k, v in batch.items() if k not in ("labels", "document")}
    if "token_type_ids" not in model.forward.__code__.co_varnames:
        keep.pop("token_type_ids", None)
    return keep


def test_rows_hold_every_text_once_within_their_capacity():
    rng = random.Random(0)
    lengths = [rng.randint(1, 40) for _ in range(200)] + [55]
    rows = first_fit_decreasing(lengths, 48)
    assert sorted(i for row in rows for i in row) == list(range(201))
    assert [200] in rows  # longer than a row: a row of its own
    assert all(sum(lengths[i] for i in row) <= 48 for row in rows if row != [200])
    fewest = -(-sum(lengths[:200]) // 48)
    assert len(rows) - 1 <= 11 / 9 * fewest + 1  # first-fit decreasing's bound
    assert rows == first_fit_decreasing(lengths, 48)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def test_the_collator_lays_texts_end_to_end_and_keeps_one_label_per_text(tokenizer):
    features = random_texts(24, seed=0, vocab=len(tokenizer), pair=True)
    batch = PackedCollator(tokenizer, 32)(features)
    sequence_ids = batch["sequence_ids"]
    assert batch["labels"].tolist() == [i % 3 for i in range(24)]
    assert batch["document"].tolist() == list(range(24))
    for i, f in enumerate(features):
        assert batch["input_ids"][sequence_ids == i].tolist() == f["input_ids"]
        assert batch["token_type_ids"][sequence_ids == i].tolist() == f["token_type_ids"]
    assert (batch["input_ids"][sequence_ids < 0] == tokenizer.pad_token_id).all()
    assert "attention_mask" not in batch and sequence_ids.shape[1] <= 32
    padded = DataCollatorWithPadding(tokenizer)([{"input_ids": f["input_ids"]} for f in features])
    assert sequence_ids.numel() < 0.85 * padded["input_ids"].numel()
    assert PackedCollator(tokenizer, 30, pad_to_multiple_of=8)(features)["input_ids"].shape[1] % 8 == 0


def test_positions_restart_with_each_text_and_first_tokens_follow_the_batch_order():
    sequence_ids = torch.tensor([[2, 2, 0, 0, 0, -1], [1, 1, 1, 3, -1, -1]])
    assert packing.positions(sequence_ids).tolist() == [[0, 1, 0, 1, 2, 0], [0, 1, 2, 0, 0, 1]]
    assert packing.first_tokens(sequence_ids).tolist() == [2, 6, 0, 9]


def tiny_classifier(name: str, impl: str = "sdpa", **overrides):
    torch.manual_seed(0)
    config = CONFIGS[name].__class__.from_dict({**CONFIGS[name].to_dict(), **overrides})
    try:
        return AutoModelForSequenceClassification.from_config(config, attn_implementation=impl).eval()
    except ValueError:
        pytest.skip(f"{name} has no {impl} attention")


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_packed_logits_are_the_padded_ones(name, impl):
    model = tiny_classifier(name, impl)
    if name in REFUSED:
        with pytest.raises(UserError, match="--pack_sequences"):
            check_packable(model)
        return
    check_packable(model)
    pad_id = model.config.pad_token_id or 0
    features = random_texts(12, seed=1, longest=30, pair=name == "bert")
    with torch.no_grad():
        expected = model(**model_inputs(padded_batch(features, pad_id), model)).logits
        accept_packed(model)
        batch = PackedCollator(SimpleNamespace(pad_token_id=pad_id), 40)(features)
        got = model(**model_inputs(batch, model)).logits
        assert batch["input_ids"].shape[0] < len(features)  # texts did share rows
        again = model(**model_inputs(padded_batch(features, pad_id), model)).logits  # hooks leave padded batches be
    assert (got - expected).abs().max().item() <= 1e-4
    assert torch.equal(again, expected)


def lora(model):
    config = LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"], lora_dropout=0.0)
    return get_peft_model(model, config)


@pytest.mark.parametrize("name", ["bert", "roberta", "bert+lora"])
def test_a_packed_training_step_is_the_padded_one(name):
    """The same loss and gradients: packing changes how the batch is laid out, not what is learnt."""
    base, _, adapter = name.partition("+")
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    models = [tiny_classifier(base, **no_dropout).train() for _ in range(2)]  # seeded: the same weights
    if adapter:
        models = [lora(tiny_classifier(base, **no_dropout)) for _ in range(2)]  # each adapter after its model's seed
    pad_id = models[0].config.pad_token_id or 0
    features = random_texts(16, seed=2)
    labels = torch.tensor([f["labels"] for f in features])
    accept_packed(models[1])
    batches = [padded_batch(features, pad_id), PackedCollator(SimpleNamespace(pad_token_id=pad_id), 40)(features)]
    losses = []
    for model, batch in zip(models, batches, strict=True):
        loss = torch.nn.functional.cross_entropy(model(**model_inputs(batch, model)).logits, labels)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in models]
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 4
    worst = max((grads[0][n] - grads[1][n]).abs().max().item() for n in grads[0])
    largest = max(g.abs().max().item() for g in grads[0].values())
    assert worst <= 1e-5 * max(largest, 1.0)


def test_the_probe_refuses_positions_from_zero_for_roberta(monkeypatch):
    model = tiny_classifier("roberta")
    rng = torch.get_rng_state()
    check_packable(model)
    assert torch.equal(torch.get_rng_state(), rng)  # the probe's seed is its own: the run's dropout is untouched
    monkeypatch.setattr(packing, "position_offset", lambda model: 0)  # DataCollatorWithFlattening's positions
    with pytest.raises(UserError, match=r"RobertaForSequenceClassification \(sdpa attention\) gives packed logits"):
        check_packable(model)


def test_the_probe_refuses_a_mask_that_lets_texts_see_each_other(monkeypatch):
    model = tiny_classifier("bert")
    monkeypatch.setattr(
        "transformers.masking_utils.packed_sequence_mask_function", lambda ids: lambda b, h, q, kv: q >= 0
    )
    with pytest.raises(UserError, match="differ from padded ones"):
        check_packable(model)


@pytest.fixture(scope="module")
def packed_run(module_args, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed") / "run"
    run_inline(
        "full_finetune", *module_args, "--pack_sequences", "--output_dir", out, "--num_train_epochs", "8",
        "--learning_rate", "3e-3", "--seed", "0",
    )  # fmt: skip
    return out


def test_a_packed_run_learns_and_its_scores_are_the_saved_models_on_padded_batches(packed_run):
    """Evaluation ran on packed batches; the saved model, on padded ones, gives the predictions file's scores."""
    results = json.loads((packed_run / "results.json").read_text())
    assert results["eval_accuracy"] > 0.5  # chance: 1/3
    with (packed_run / "predictions_validation.csv").open() as f:
        rows = list(csv.DictReader(f))
    model = AutoModelForSequenceClassification.from_pretrained(packed_run).eval()
    tokenizer = AutoTokenizer.from_pretrained(packed_run)
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    inputs = tokenizer([r["text"] for r in rows], padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        probabilities = model(**inputs).logits.softmax(-1)
    saved = torch.tensor([scores_of(r, names) for r in rows])
    assert len(rows) == 30 and (probabilities - saved).abs().max().item() <= 1e-4  # the file rounds to 4 places
    truth = torch.tensor([model.config.label2id[r["label"]] for r in rows])
    assert (probabilities.argmax(-1) == truth).float().mean().item() == pytest.approx(results["eval_accuracy"])


@pytest.mark.parametrize("recipe", ["feature_extraction", "contrastive", "static_embeddings"])
def test_a_recipe_whose_model_packing_cannot_serve_refuses_it_before_writing(recipe, module_args, tmp_path):
    out = tmp_path / "run"
    flags = ["--pack_sequences", "--output_dir", out, "--max_train_steps", "1"]
    proc = run_inline(recipe, *module_args, *flags, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--pack_sequences" in errors[0] and "drop --pack_sequences" in errors[0]
    assert not out.exists()


def test_a_class_a_wrapper_swapped_in_is_judged_by_the_transformers_class_beneath():
    model = tiny_classifier("bert")
    model.__class__ = type("FSDPBertForSequenceClassification", (type(model),), {})  # as FSDP2's fully_shard does
    check_packable(model)
    with pytest.raises(UserError, match="this recipe's model is Linear: drop --pack_sequences"):
        check_packable(torch.nn.Linear(2, 2))
