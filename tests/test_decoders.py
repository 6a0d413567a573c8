"""Decoder LLMs as classifiers (issue 41): tiny random Llama, Qwen3, Gemma 3 and GPT-2 models whose tokenizers have,
like the real ones, no padding token, through the recipes; each pitfall users meet elsewhere has its test here."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import FP32, run_inline
from transformers import AutoModelForSequenceClassification, pipeline

from finetune_recipes.config import ModelArguments
from finetune_recipes.errors import UserError
from finetune_recipes.layers import block_linears, discover_layers, stored_transposed
from finetune_recipes.modeling import build_model, is_decoder, load_tokenizer
from finetune_recipes.testing import DECODERS, write_tiny_decoder
from finetune_recipes.tools.predict import predict

LABELS = ["business", "sport", "tech"]


@pytest.fixture(scope="session")
def decoders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("decoders")
    return {family: write_tiny_decoder(root / family, family) for family in DECODERS}


def test_a_tokenizer_without_a_pad_token_pads_with_eos_and_the_config_carries_it(decoders):
    """transformers#27172: no pad token, no batch beyond 1. The saved config and tokenizer carry it."""
    for family, path in decoders.items():
        assert json.loads((path / "config.json").read_text()).get("pad_token_id") is None, family
        tokenizer = load_tokenizer(str(path))
        assert tokenizer.pad_token == tokenizer.eos_token == "<eos>"
        model = build_model(ModelArguments(model_name_or_path=str(path)), LABELS)
        assert model.config.pad_token_id == tokenizer.pad_token_id
        batch = tokenizer(["goal win", "market bank share price"], padding=True, return_tensors="pt")
        assert model(**batch).logits.shape == (2, 3)


def hidden_then_score(model, batch) -> torch.Tensor:
    """Every position's logits, computed around the model's own pooling: the base model, then the head."""
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return model.score(hidden)


@pytest.mark.parametrize("side", ["right", "left"])
def test_the_pooled_token_is_each_texts_last_real_one(decoders, side):
    """transformers takes the last token that is not the pad token: with pad = end-of-sequence, a text ending in
    one is read one token early (transformers#35352 for left padding). The attention mask says where it ends."""
    path = decoders["llama"]
    tokenizer = load_tokenizer(str(path))
    tokenizer.padding_side = side
    model = build_model(ModelArguments(model_name_or_path=str(path)), LABELS).eval()
    texts = ["goal win <eos>", "market bank share price profit", "chip"]  # the first ends in eos = pad
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    lengths = batch["attention_mask"].sum(1)
    width = batch["input_ids"].shape[1]
    last = lengths - 1 if side == "right" else torch.full_like(lengths, width - 1)
    with torch.no_grad():
        pooled = model(**batch).logits
        every = hidden_then_score(model, batch)
    assert torch.allclose(pooled, every[torch.arange(3), last], atol=1e-6)
    if side == "right":  # causal attention: a text's logits do not depend on the pads after it
        for i, text in enumerate(texts):
            with torch.no_grad():
                alone = model(**tokenizer([text], return_tensors="pt")).logits[0]
            assert torch.allclose(pooled[i], alone, atol=1e-5)


def test_layer_discovery_and_lora_targets_follow_each_family(decoders):
    for family, path in decoders.items():
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
        layers = discover_layers(model)
        assert layers.num_blocks == 2 and [n for n, _ in layers.head] == ["score.weight"], family
        assert not layers.pooler and layers.embeddings
        linears = block_linears(model, layers)
        assert len(linears["attention"]) in (4, 8) and linears["feed_forward"], family  # GPT-2: c_attn, c_proj
        assert stored_transposed(model, linears["attention"]) == (family == "gpt2")  # its Conv1D projections
        assert is_decoder(model.config)


# Each recipe once on a decoder, each family once through LoRA (with the merged copy on GPT-2's Conv1D).
RUNS = {
    "full_finetune": ("llama", []),
    "llrd": ("gpt2", []),
    "progressive_unfreezing": ("gemma3_text", []),
    "feature_extraction": ("qwen3", []),  # pools the last real token by default
    "static_embeddings": ("gpt2", []),  # over the decoder's own input table
    "lora": ("qwen3", []),
    "lora/llama": ("llama", []),
    "lora/gemma3_text": ("gemma3_text", []),
    "lora/gpt2": ("gpt2", ["--merge_adapter"]),
}


@pytest.fixture(scope="module")
def trained(decoders, tiny_data, tmp_path_factory) -> dict[str, Path]:
    root, outs = tmp_path_factory.mktemp("decoder-runs"), {}
    for run, (family, extra) in RUNS.items():
        out = outs[run] = root / run.replace("/", "_")
        run_inline(
            run.split("/")[0], "--model_name_or_path", decoders[family], "--train_file", tiny_data["train"],
            "--validation_file", tiny_data["validation"], "--max_length", "32", "--per_device_train_batch_size", "8",
            "--num_train_epochs", "1", "--learning_rate", "3e-3", "--output_dir", out, *FP32, *extra,
        )  # fmt: skip
    return outs


@pytest.mark.parametrize("run", RUNS)
def test_a_saved_decoder_classifier_gives_the_runs_validation_scores(run, trained):
    """The head is saved (with a LoRA adapter: modules_to_save) and restored (transformers#26160, peft#577):
    `predict` on the saved output gives the live model's validation scores, and `pipeline()` batches them."""
    out = trained[run]
    rows = list(csv.DictReader((out / "predictions_validation.csv").open()))
    texts = [r["text"] for r in rows]
    saved = [{n: float(v) for n, v in (p.split(":") for p in r["scores"].split())} for r in rows]
    for got, want in zip(predict(out, texts, bf16=False), saved, strict=True):
        assert got["score"] == pytest.approx(want[got["label"]], abs=1e-4)
    served = out / "merged" if (out / "merged").is_dir() else out  # a LoRA run's merged copy, when it saved one
    if not any((served / name).exists() for name in ("adapter_config.json", "feature_head.json")):
        import finetune_recipes.static  # noqa: F401  (registers the static model's class, as its card says)

        piped = pipeline("text-classification", model=str(served), top_k=None, batch_size=8)(texts)
        for scores, want in zip(piped, saved, strict=True):
            assert {s["label"]: s["score"] for s in scores} == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize(
    "recipe, extra, message",
    [
        ("frozen_base_pooler", [], "is a decoder: it has no pooler and classifies from its last token"),
        ("contrastive", [], "is a decoder, and contrastive is SetFit's method for sentence encoders"),
        ("feature_extraction", ["--pooling", "cls"], "is a decoder: its first token has read nothing after it"),
        ("feature_extraction", ["--gradient_checkpointing"], "this recipe never runs one"),
    ],
)
def test_what_a_decoder_cannot_do_is_one_line_before_training(recipe, extra, message, decoders, tiny_args, tmp_path):
    args = [str(a) for a in tiny_args]
    args[args.index("--model_name_or_path") + 1] = str(decoders["llama"])
    proc = run_inline(recipe, *args, *extra, check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("error: ") and message in last, last
    assert not (tmp_path / "out").exists()


def test_a_model_type_without_a_sequence_classifier_is_named(tmp_path):
    from transformers import MambaConfig

    MambaConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="is a mamba model, and transformers has no sequence classifier for it "
                       r"\(it would need a MambaForSequenceClassification\)"):  # fmt: skip
        build_model(ModelArguments(model_name_or_path=str(tmp_path)), LABELS)


@pytest.mark.parametrize("family", ["llama", "llama+lora", "bert"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(family, decoders, tiny_model):
    """Non-reentrant checkpointing: with LoRA no input needs requires_grad (the reentrant kind would leave the
    adapters without gradients), and DDP sees each parameter's gradient once."""
    from peft import LoraConfig, TaskType, get_peft_model

    path = decoders["llama"] if family.startswith("llama") else tiny_model
    tokenizer = load_tokenizer(str(path))
    batch = tokenizer(["goal win team", "market bank"], padding=True, return_tensors="pt")
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model(ModelArguments(model_name_or_path=str(path)), LABELS, gradient_checkpointing=checkpointing)
        if family.endswith("lora"):
            targets = block_linears(model, discover_layers(model))["attention"]
            model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=targets))
            for name, param in model.named_parameters():  # adapters start at zero: give them gradients to compare
                if "lora_B" in name:
                    torch.nn.init.normal_(param, std=0.02, generator=torch.Generator().manual_seed(2))
        model.train()
        torch.manual_seed(1)  # the same dropout masks: checkpointing replays the RNG state when it recomputes
        loss = torch.nn.functional.cross_entropy(model(**batch).logits, torch.tensor([1, 0]))
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss, grads), (loss_checkpointed, grads_checkpointed) = results
    assert model.is_gradient_checkpointing and loss == pytest.approx(loss_checkpointed, abs=1e-6)
    assert grads.keys() == grads_checkpointed.keys() and len(grads) > 4
    assert not family.endswith("lora") or sum("lora_A" in name for name in grads) == 8  # every adapter learns
    for name, grad in grads.items():
        assert torch.allclose(grad, grads_checkpointed[name], atol=1e-6), name


def test_a_tokenizer_that_ends_texts_with_eos_and_has_no_pad_is_refused(decoders, tmp_path):
    """Padding with the end-of-sequence token a tokenizer appends to every text would let pipeline() and predict
    (transformers' pooling: the last token that is not the pad) read each text one token early."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(decoders["llama"])
    eos = tokenizer.eos_token_id
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", eos)])
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="ends every text with its end-of-sequence token and has no padding token"):
        load_tokenizer(str(tmp_path))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_head_without_a_bias_is_calibrated_by_scales_alone(family, decoders):
    """Decoders' `score` has no bias: calibration fits no shift for it, and the scales fold into its rows, so the
    saved model gives the calibrated scores with no weight it cannot load."""
    import numpy as np

    from finetune_recipes.calibration import fit_scaling
    from finetune_recipes.modeling import head_has_bias
    from finetune_recipes.training.save import fold_into

    model = AutoModelForSequenceClassification.from_pretrained(decoders[family], num_labels=3)
    assert not head_has_bias(model, 3)
    logits = np.random.default_rng(0).normal(0, 2, (600, 3))
    planted = np.exp(logits * [0.3, 1.0, 2.0])  # some classes over-, others underconfident
    cumulative = (planted / planted.sum(-1, keepdims=True)).cumsum(-1)
    labels = (np.random.default_rng(1).random((600, 1)) > cumulative).sum(-1).clip(0, 2)
    scaling = fit_scaling("vector", logits, labels, "single_label_classification", shift=False)
    assert scaling.method == "vector" and scaling.shift == [0.0] * 3 and len(set(scaling.scale)) == 3
    state = model.state_dict()
    weight = state["score.weight"].clone()
    fold_into(state, "score", scaling.shift, scaling.scale)
    torch.testing.assert_close(state["score.weight"], weight * torch.tensor(scaling.scale)[:, None])
    with pytest.raises(ValueError, match="no bias"):
        fold_into(model.state_dict(), "score", [0.5, 0.0, 0.0], [1.0] * 3)
