"""Layer discovery over tiny random encoders of every supported architecture (no downloads)."""

from __future__ import annotations

import pytest
import torch
from tiny import build_tiny, tiny_configs
from torch import nn

from finetune_recipes.layers import LayerDiscoveryError, LayerMap, discover_layers, parse_layer_mapping

CONFIGS = tiny_configs()
HAS_POOLER = {"bert", "albert", "albert-2-groups"}


def build(name: str) -> nn.Module:
    return build_tiny(name)


def assert_partition(model: nn.Module, layer_map: LayerMap) -> None:
    """Every parameter, by identity, in exactly one group."""
    assigned = [p for params in layer_map.groups().values() for _, p in params]
    expected = list(model.parameters())
    assert len(assigned) == len(expected)
    assert {id(p) for p in assigned} == {id(p) for p in expected}
    assert len({id(p) for p in assigned}) == len(assigned)
    names = [n for params in layer_map.groups().values() for n, _ in params]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def mapped(request) -> tuple[str, nn.Module, LayerMap]:
    model = build(request.param)
    return request.param, model, discover_layers(model)


def test_every_parameter_in_exactly_one_group(mapped):
    _, model, layer_map = mapped
    assert_partition(model, layer_map)


def test_blocks_count_and_order(mapped):
    name, model, layer_map = mapped
    config = model.config
    expected = config.num_hidden_groups if name.startswith("albert") else config.num_hidden_layers
    assert layer_map.num_blocks == expected
    groups = list(layer_map.groups())
    assert groups[0] == "embeddings" and groups[-1] == "head"
    assert groups[1 : 1 + expected] == [f"blocks.{i}" for i in range(expected)]
    for i, block in enumerate(layer_map.blocks):
        assert block, f"block {i} is empty"
        # Each block's own parameters carry its index in the path (ALBERT: the group index).
        assert all(f".{i}." in n for n, _ in block if "final_norm" not in n)


def test_head_pooler_and_embeddings(mapped):
    name, _, layer_map = mapped
    head_names = [n for n, _ in layer_map.head]
    assert any(n.startswith("classifier.") for n in head_names)
    assert bool(layer_map.pooler) == (name in HAS_POOLER)
    assert ("pooler" in layer_map.groups()) == (name in HAS_POOLER)
    assert any("word_embeddings" in n or "tok_embeddings" in n for n, _ in layer_map.embeddings)


def test_depth_ordering(mapped):
    _, _, layer_map = mapped
    top = layer_map.num_blocks + 1
    assert layer_map.depth("embeddings") == 0
    assert [layer_map.depth(f"blocks.{i}") for i in range(layer_map.num_blocks)] == list(range(1, top))
    assert layer_map.depth("head") == top
    if layer_map.pooler:
        assert layer_map.depth("pooler") == top
    depths = layer_map.param_depths()
    for group, params in layer_map.groups().items():
        for param_name, _ in params:
            assert depths[param_name] == layer_map.depth(param_name) == layer_map.depth(group)


def test_leftover_rules():
    """Documented placement of base-model modules outside embeddings, blocks and pooler."""
    groups = {name: {n for n, _ in discover_layers(build(name)).embeddings} for name in ("electra", "albert")}
    assert "electra.embeddings_project.weight" in groups["electra"]
    assert "albert.encoder.embedding_hidden_mapping_in.weight" in groups["albert"]

    deberta = discover_layers(build("deberta-v2"))
    embeddings = {n for n, _ in deberta.embeddings}
    assert {"deberta.encoder.rel_embeddings.weight", "deberta.encoder.LayerNorm.weight"} <= embeddings
    assert any(n.startswith("deberta.encoder.conv.") for n in embeddings)
    assert {"pooler.dense.weight", "classifier.weight"} <= {n for n, _ in deberta.head}

    if "modernbert" in CONFIGS:
        modernbert = discover_layers(build("modernbert"))
        assert "model.final_norm.weight" in {n for n, _ in modernbert.blocks[-1]}
        assert "head.dense.weight" in {n for n, _ in modernbert.head}


def test_depth_unknown_name():
    with pytest.raises(KeyError, match="no parameter or group"):
        discover_layers(build("bert")).depth("nope")


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_unmappable_model_raises_one_line():
    with pytest.raises(LayerDiscoveryError) as error:
        discover_layers(Plain())
    message = str(error.value)
    assert isinstance(error.value, ValueError)
    assert "\n" not in message
    assert "Plain" in message and "layer_mapping=" in message


class Toy(nn.Module):
    """An architecture discovery cannot map: blocks in an nn.Sequential."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.body = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
        self.norm = nn.LayerNorm(4)
        self.out = nn.Linear(4, 3)


def test_manual_mapping_on_unknown_architecture():
    model = Toy()
    with pytest.raises(LayerDiscoveryError):
        discover_layers(model)
    layer_map = discover_layers(model, {"embeddings": "emb", "blocks": "body", "pooler": ""})
    assert_partition(model, layer_map)
    assert layer_map.num_blocks == 2  # the ReLU has no parameters, so it is no block
    assert [n for n, _ in layer_map.embeddings] == ["emb.weight"]
    assert [n for n, _ in layer_map.blocks[1]] == ["body.2.weight", "body.2.bias"]
    assert {n for n, _ in layer_map.head} == {"norm.weight", "norm.bias", "out.weight", "out.bias"}
    assert list(layer_map.groups()) == ["embeddings", "blocks.0", "blocks.1", "head"]


def test_manual_mapping_matches_discovery_and_accepts_cli_form():
    model = build("bert")
    found = discover_layers(model)
    text = "embeddings=bert.embeddings, blocks=bert.encoder.layer, pooler=bert.pooler"
    assert parse_layer_mapping(text) == {
        "embeddings": "bert.embeddings",
        "blocks": "bert.encoder.layer",
        "pooler": "bert.pooler",
    }
    for mapping in (parse_layer_mapping(text), text):
        by_hand = discover_layers(model, mapping)
        assert {g: [n for n, _ in ps] for g, ps in by_hand.groups().items()} == {
            g: [n for n, _ in ps] for g, ps in found.groups().items()
        }


@pytest.mark.parametrize(
    "mapping, match",
    [
        ({"embeddings": "bert.embeddings", "blocks": "bert.nope"}, "'bert.nope' is not a module"),
        ({"embeddings": "bert.embeddings"}, "no 'blocks' path"),
        ({"blocks": "bert.encoder.layer", "head": "classifier"}, "unknown key 'head'"),
        ("blocks", "not KEY=PATH"),
    ],
)
def test_bad_mapping(mapping, match):
    with pytest.raises(LayerDiscoveryError, match=match) as error:
        discover_layers(build("bert"), mapping)
    assert "\n" not in str(error.value)


def test_peft_lora_model():
    peft = pytest.importorskip("peft")
    model = build("bert")
    config = peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=2, lora_alpha=4, target_modules=["query", "value"])
    wrapped = peft.get_peft_model(model, config)
    layer_map = discover_layers(wrapped)
    assert_partition(wrapped, layer_map)
    assert layer_map.num_blocks == 2
    assert bool(layer_map.pooler)
    lora = [n for n, _ in layer_map.blocks[1] if "lora_A" in n]
    assert lora and all(n.startswith("base_model.model.bert.encoder.layer.1.") for n in lora)
    assert any("classifier" in n for n, _ in layer_map.head)
    assert all("classifier" in n for n, _ in layer_map.head)
    # A mapping relative to the transformers model works through the wrapper too.
    by_hand = discover_layers(wrapped, {"blocks": "bert.encoder.layer", "pooler": "bert.pooler"})
    assert [n for n, _ in by_hand.blocks[0]] == [n for n, _ in layer_map.blocks[0]]
    # And on the unwrapped model, names are the plain transformers names.
    base_map = discover_layers(wrapped.get_base_model())
    assert base_map.num_blocks == 2
    assert_partition(wrapped.get_base_model(), base_map)


def test_two_stacks_of_blocks_are_not_guessed():
    """An encoder and a decoder stack of the same size: discovery refuses rather than pick one."""
    model = nn.Module()
    model.encoder = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
    model.decoder = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
    with pytest.raises(LayerDiscoveryError, match="several stacks of blocks"):
        discover_layers(model)
    assert discover_layers(model, {"blocks": "encoder"}).num_blocks == 2
