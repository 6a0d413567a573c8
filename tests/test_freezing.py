"""Freezing by layer group: semantics, counts, errors, and that frozen weights really stay put in training."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForSequenceClassification, BertConfig

from finetune_recipes.freezing import (
    count_parameters,
    eval_frozen,
    expand_groups,
    format_trainable,
    freeze,
    set_trainable,
    stage_at,
    stage_starts,
    unfreeze,
    unfreezing_stages,
)
from finetune_recipes.layers import LayerMap, discover_layers


def tiny_bert(num_hidden_layers: int = 2) -> nn.Module:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        num_labels=3,
    )
    return AutoModelForSequenceClassification.from_config(config)


@pytest.fixture
def bert() -> tuple[nn.Module, LayerMap]:
    model = tiny_bert()
    return model, discover_layers(model)


def trainable_groups(layer_map: LayerMap) -> list[str]:
    """Names of the groups with at least one trainable parameter, bottom to top."""
    return [name for name, params in layer_map.groups().items() if any(p.requires_grad for _, p in params)]


def numel(params) -> int:
    return sum(p.numel() for _, p in params)


def test_freeze_everything(bert):
    model, layer_map = bert
    freeze(model)
    assert not any(p.requires_grad for p in model.parameters())
    assert trainable_groups(layer_map) == []
    assert count_parameters(model) == (0, sum(p.numel() for p in model.parameters()))


def test_unfreeze_adds_groups_without_touching_others(bert):
    model, layer_map = bert
    freeze(model)
    unfreeze(layer_map, ["head"])
    unfreeze(layer_map, "blocks.1")  # a single name, not its letters
    assert trainable_groups(layer_map) == ["blocks.1", "head"]
    trainable, total = count_parameters(model)
    assert trainable == numel(layer_map.head) + numel(layer_map.blocks[1])
    assert total == sum(p.numel() for p in model.parameters())


def test_set_trainable_replaces_the_selection(bert):
    model, layer_map = bert
    set_trainable(model, layer_map, ["embeddings", "head"])
    set_trainable(model, layer_map, ["pooler", "head"])
    assert trainable_groups(layer_map) == ["pooler", "head"]
    assert count_parameters(model)[0] == numel(layer_map.pooler) + numel(layer_map.head)


def test_shorthands():
    model = tiny_bert(num_hidden_layers=4)
    layer_map = discover_layers(model)
    assert expand_groups(layer_map, ["head", "blocks.3", "blocks.2"]) == ["blocks.2", "blocks.3", "head"]
    assert expand_groups(layer_map, ["blocks"]) == [f"blocks.{i}" for i in range(4)]


def test_pooler_on_a_model_without_one_selects_nothing():
    model = nn.Sequential(nn.Embedding(10, 4), nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)]))
    layer_map = discover_layers(model)
    assert "pooler" not in layer_map.groups()
    assert expand_groups(layer_map, ["pooler", "head"]) == ["head"]


@pytest.mark.parametrize("name", ["blocks.2", "blocks.top", "classifier", "blocks.x", "Head"])
def test_unknown_group_names_the_valid_ones(bert, name):
    model, layer_map = bert
    with pytest.raises(ValueError, match="valid groups: embeddings, blocks.0, blocks.1, pooler, head") as error:
        set_trainable(model, layer_map, ["head", name])
    assert f"'{name}'" in str(error.value)
    assert all(p.requires_grad for p in model.parameters()), "a bad name must leave the model untouched"


def test_count_parameters_counts_tied_weights_once():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    assert count_parameters(model) == (40, 40)
    model[0].weight.requires_grad_(False)
    assert count_parameters(model) == (0, 40)


def test_format_trainable(bert):
    model, layer_map = bert
    set_trainable(model, layer_map, ["blocks.0", "blocks.1", "head"])
    layer_map.blocks[0][0][1].requires_grad_(False)
    report = format_trainable(model, layer_map)
    trainable, total = count_parameters(model)
    lines = report.splitlines()
    assert lines[0] == "trainable groups: blocks.0 (partly), blocks.1, head"
    assert lines[1] == "frozen groups: embeddings, pooler"
    assert lines[2] == f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"


def test_format_trainable_writes_block_runs_as_ranges():
    model = tiny_bert(num_hidden_layers=5)
    layer_map = discover_layers(model)
    set_trainable(model, layer_map, ["blocks.3", "blocks.4", "head"])
    assert format_trainable(model, layer_map).splitlines()[:2] == [
        "trainable groups: blocks.3-4, head",
        "frozen groups: embeddings, blocks.0-2, pooler",
    ]


def test_frozen_weights_do_not_move_in_training(bert):
    """Two AdamW steps with weight decay: frozen weights stay bit-identical, the head moves."""
    model, layer_map = bert
    set_trainable(model, layer_map, ["head"])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(2):
        input_ids = torch.randint(0, 100, (4, 8), generator=generator)
        labels = torch.randint(0, 3, (4,), generator=generator)
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    head = {name for name, _ in layer_map.head}
    for name, param in model.named_parameters():
        if name in head:
            assert not torch.equal(param, before[name]), f"{name} did not train"
        else:
            assert torch.equal(param, before[name]), f"frozen {name} changed"


def test_stage_starts_by_epoch_step_or_list_and_the_stage_in_force():
    assert stage_starts(4, 1, steps_per_epoch=10, unit="epoch") == [0, 10, 20, 30]
    assert stage_starts(4, 15, steps_per_epoch=10, unit="step") == [0, 15, 30, 45]
    assert stage_starts(4, 1, steps_per_epoch=10, explicit="5,8") == [0, 5, 8]
    assert [stage_at(s, [0, 10, 20]) for s in (0, 9, 10, 25)] == [0, 0, 1, 2]


def test_stages_that_begin_after_the_last_step_are_named_in_a_warning(caplog):
    with caplog.at_level("WARNING"):
        stage_starts(5, 15, steps_per_epoch=20, unit="step", total_steps=40)
    [said] = [r.getMessage() for r in caplog.records]
    assert said.startswith("unfreezing stages 3, 4 begin at step 45 or later, after the run's last step (39)")
    caplog.clear()
    with caplog.at_level("WARNING"):
        stage_starts(3, 15, steps_per_epoch=20, unit="step", total_steps=40)
    assert not caplog.records


def test_set_trainable_reaches_parameters_replaced_after_discovery():
    """FSDP2 swaps a prepared model's parameters for sharded ones: the map's old objects must not be what thaws."""
    model = tiny_bert()
    layers = discover_layers(model)
    old = model.classifier.weight
    model.classifier.weight = nn.Parameter(old.detach().clone())  # what fully_shard does to every parameter
    set_trainable(model, layers, ["head"])
    assert model.classifier.weight.requires_grad and model.classifier.bias.requires_grad
    assert not model.bert.pooler.dense.weight.requires_grad


def test_eval_frozen_turns_dropout_off_only_where_nothing_trains(bert):
    model, layers = bert
    set_trainable(model, layers, ["head", "pooler", "blocks.1"])
    model.train()
    eval_frozen(model)
    encoder = model.bert.encoder.layer
    assert not model.bert.embeddings.training and not encoder[0].training
    assert not any(m.training for m in encoder[0].modules())  # its attention dropout too
    assert encoder[1].training and model.bert.pooler.training and model.classifier.training
    assert model.dropout.training  # no parameters of its own, under a parent that trains: stays on
    torch.manual_seed(0)
    ids = torch.randint(5, 100, (2, 8))
    model(input_ids=ids).logits.sum().backward()  # the trainable part still gets its gradients
    assert model.bert.encoder.layer[1].output.dense.weight.grad is not None


@pytest.mark.slow
def test_thawing_under_fsdp2_keeps_requires_grad_and_steps_only_the_stage(tmp_path):
    """Two gloo processes shard a tiny BERT with FSDP2's fully_shard, as fsdp.yaml does on GPUs. Switching
    requires_grad after sharding fails there in backward with a bf16 policy; Thaw(keep_requires_grad=True)
    drops the frozen gradients instead: the weights equal a one-process run that switches requires_grad, and
    what never thawed is untouched, bit for bit."""
    from fsdp_thaw import STARTS, dropout_free_bert, train

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "fsdp_thaw.py"), str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=dict(os.environ,
                          OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "tests")))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    initial = {n: p.detach().clone() for n, p in dropout_free_bert().named_parameters()}
    reference = {n: p.detach() for n, p in train(dropout_free_bert(), keep_requires_grad=False).named_parameters()}
    layers = discover_layers(dropout_free_bert())
    thawed = set(unfreezing_stages(layers)[len(STARTS) - 1])
    for policy in ("fp32", "bf16"):
        sharded = load_file(tmp_path / f"{policy}.safetensors")
        assert sharded.keys() == reference.keys()
        for name, weight in sharded.items():
            if layers.group_of(name) in thawed:
                assert not torch.equal(weight, initial[name]), f"{policy}: {name} did not train"
            else:
                assert torch.equal(weight, initial[name]), f"{policy}: frozen {name} changed"
            if policy == "fp32":
                torch.testing.assert_close(weight, reference[name], atol=2e-5, rtol=1e-4, msg=f"fp32: {name}")
