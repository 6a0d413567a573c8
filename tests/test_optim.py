"""Optimizer groups, AdamW and schedules: the lr and weight decay every parameter really gets.

Expected values are computed here from the definitions (the LLRD formula and each schedule's formula),
not from `layers.py` depths or transformers' lr lambdas, and compared with the lr the optimizer holds.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from tiny import build_tiny, tiny_configs
from torch import nn

from finetune_recipes.errors import UserError
from finetune_recipes.layers import discover_layers
from finetune_recipes.optim import (
    build_optimizer,
    build_scheduler,
    decay_flags,
    format_groups,
    is_norm,
    lr_trajectory,
    param_groups,
    plot_lr_schedule,
)

LLRD_ARCHS = ["bert", "roberta", "distilbert", "electra", "deberta-v2"]
ALL_ARCHS = list(tiny_configs())
BASE_LR, DECAY, WD, HEAD_LR = 1e-3, 0.7, 0.01, 5e-3
TOTAL, WARMUP = 10, 3
POLY_LR_END = 1e-7  # transformers' default lr_end for the polynomial schedule (power 1)

# Where each parameter of the tiny models sits, from the parameter names alone (independent of layers.py).
BASES = {"bert", "roberta", "distilbert", "electra", "deberta"}
BLOCK = re.compile(
    r"^(?:bert|roberta|electra|deberta)\.encoder\.layer\.(\d+)\.|^distilbert\.transformer\.layer\.(\d+)\."
)
EMBEDDINGS = (
    "bert.embeddings.",
    "roberta.embeddings.",
    "distilbert.embeddings.",
    "electra.embeddings.",
    "electra.embeddings_project.",  # ELECTRA's embedding_size → hidden_size projection
    "deberta.embeddings.",
    "deberta.encoder.rel_embeddings.",  # DeBERTa-v2's relative-position table, its norm and conv
    "deberta.encoder.LayerNorm.",
    "deberta.encoder.conv.",
)


def expected_depth(name: str, num_blocks: int) -> tuple[int, bool]:
    """(depth, is_head): 0 embeddings, i+1 block i, num_blocks+1 pooler and head."""
    if match := BLOCK.match(name):
        return int(match.group(1) or match.group(2)) + 1, False
    if name.startswith(EMBEDDINGS):
        return 0, False
    if name.startswith("bert.pooler."):
        return num_blocks + 1, False
    assert name.split(".")[0] not in BASES, f"unexpected base-model parameter {name}"
    return num_blocks + 1, True  # outside the base model: classifier, pre_classifier, DeBERTa's ContextPooler


def linear(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return step / warmup
    return max(0.0, (total - step) / (total - warmup))


def cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return step / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def polynomial(step: int, warmup: int, total: int, lr_init: float = BASE_LR) -> float:
    """Linear warmup, then linear decay from the optimizer's default lr to lr_end, as a multiplier."""
    if step < warmup:
        return step / warmup
    remaining = 1 - (min(step, total) - warmup) / (total - warmup)
    return ((lr_init - POLY_LR_END) * remaining + POLY_LR_END) / lr_init


def constant(step: int, warmup: int, total: int) -> float:
    return 1.0  # transformers' "constant" ignores warmup (that is "constant_with_warmup")


SCHEDULES = {"linear": linear, "cosine": cosine, "polynomial": polynomial, "constant": constant}


def lr_by_param(optimizer: torch.optim.Optimizer) -> dict[int, float]:
    """Current lr of every parameter the optimizer holds, by identity; fails on a duplicated parameter."""
    lrs: dict[int, float] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert id(p) not in lrs, "a parameter sits in two optimizer groups"
            lrs[id(p)] = group["lr"]
    return lrs


def wd_by_param(groups: list[dict]) -> dict[int, float]:
    return {id(p): g["weight_decay"] for g in groups for p in g["params"]}


def llrd_groups(arch: str, head_lr: float | None = None, **kwargs):
    model = build_tiny(arch)
    layer_map = discover_layers(model)
    groups = param_groups(model, BASE_LR, WD, layer_map=layer_map, layer_decay=DECAY, head_lr=head_lr, **kwargs)
    return model, layer_map, groups


# --- LLRD: the acceptance criterion ---------------------------------------------------------------------


@pytest.mark.parametrize("head_lr", [None, HEAD_LR])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("arch", LLRD_ARCHS)
def test_every_parameter_follows_llrd_through_the_schedule(arch, schedule, head_lr):
    model, layer_map, groups = llrd_groups(arch, head_lr)
    top = layer_map.num_blocks + 1
    peak = {}
    for name, param in model.named_parameters():
        depth, head = expected_depth(name, layer_map.num_blocks)
        peak[id(param)] = head_lr if head and head_lr is not None else BASE_LR * DECAY ** (top - depth)
    assert {expected_depth(n, layer_map.num_blocks)[0] for n, _ in model.named_parameters()} == set(range(top + 1))

    optimizer = build_optimizer(groups, BASE_LR)
    scheduler = build_scheduler(optimizer, schedule, TOTAL, warmup_steps=WARMUP)
    multiplier = SCHEDULES[schedule]
    checked = set()
    for step in range(TOTAL + 1):  # every step, so step 0, WARMUP (right after warmup) and TOTAL (the end)
        lrs = lr_by_param(optimizer)
        assert set(lrs) == set(peak), "optimizer parameters differ from the model's"
        for pid, lr in lrs.items():
            assert lr == pytest.approx(peak[pid] * multiplier(step, WARMUP, TOTAL), rel=1e-9, abs=1e-15)
        checked.add(step)
        if step < TOTAL:
            optimizer.step()  # no gradients: nothing moves, but the scheduler sees an optimizer step first
            scheduler.step()
    assert {0, WARMUP, TOTAL} <= checked
    # The points named in the acceptance criterion, spelled out.
    assert multiplier(0, WARMUP, TOTAL) == 0 and multiplier(WARMUP, WARMUP, TOTAL) == 1
    assert multiplier(TOTAL, WARMUP, TOTAL) == pytest.approx(0, abs=1e-15)


def test_llrd_peaks_spelled_out_for_bert():
    """Tiny BERT (2 blocks): embeddings lr·d³, block 0 lr·d², block 1 lr·d, pooler lr, classifier head_lr."""
    model, _, groups = llrd_groups("bert", HEAD_LR)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    expected = {
        "bert.embeddings.word_embeddings.weight": BASE_LR * DECAY**3,
        "bert.embeddings.LayerNorm.weight": BASE_LR * DECAY**3,
        "bert.encoder.layer.0.attention.self.query.weight": BASE_LR * DECAY**2,
        "bert.encoder.layer.1.output.dense.bias": BASE_LR * DECAY,
        "bert.pooler.dense.weight": BASE_LR,
        "classifier.weight": HEAD_LR,
        "classifier.bias": HEAD_LR,
    }
    for name, lr in expected.items():
        assert lr_of[id(params[name])] == pytest.approx(lr, rel=1e-12), name


def test_warmup_ratio_rounds_up_to_whole_steps():
    model, _, groups = llrd_groups("bert")
    optimizer = build_optimizer(groups, BASE_LR)
    scheduler = build_scheduler(optimizer, "linear", TOTAL, warmup_ratio=0.25)  # ceil(2.5) = 3 steps
    for step in range(TOTAL + 1):
        expected = BASE_LR * linear(step, 3, TOTAL)
        assert max(g["lr"] for g in optimizer.param_groups) == pytest.approx(expected, abs=1e-15)
        optimizer.step()
        scheduler.step()


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_every_schedule_keeps_per_group_peak_ratios(schedule):
    model, _, groups = llrd_groups("bert", HEAD_LR)
    peaks = [g["lr"] for g in groups]
    assert len(set(peaks)) == 5  # 4 LLRD depths + head_lr
    optimizer = build_optimizer(groups, BASE_LR)
    scheduler = build_scheduler(optimizer, schedule, TOTAL, warmup_steps=WARMUP)
    for step in range(TOTAL + 1):
        lrs = [g["lr"] for g in optimizer.param_groups]
        expected = SCHEDULES[schedule](step, WARMUP, TOTAL)
        for lr, peak in zip(lrs, peaks, strict=True):
            assert lr == pytest.approx(peak * expected, rel=1e-9, abs=1e-15)
        if all(lrs):  # ratios between any two groups equal their peak ratios (undefined where both are 0)
            for i in range(len(lrs)):
                for j in range(len(lrs)):
                    assert lrs[i] / lrs[j] == pytest.approx(peaks[i] / peaks[j], rel=1e-9)
        else:
            assert not any(lrs), "one group at 0 while another is not"
        if step < TOTAL:
            optimizer.step()
            scheduler.step()


# --- weight decay ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_weight_decay_off_for_biases_and_norms_on_for_matrices(arch):
    model, layer_map, groups = llrd_groups(arch, head_lr=None)
    wd = wd_by_param(groups)
    modules = dict(model.named_modules())
    norm_params = 0
    for name, param in model.named_parameters():
        owner = modules[name.rpartition(".")[0]]
        norm = isinstance(owner, nn.LayerNorm) or "norm" in type(owner).__name__.lower()
        norm_params += norm
        if name.endswith("bias") or norm or param.ndim < 2:
            assert wd[id(param)] == 0.0, name
        else:
            assert wd[id(param)] == WD, name
    assert norm_params > 0
    assert any(g["weight_decay"] == WD for g in groups) and any(g["weight_decay"] == 0 for g in groups)


def test_modernbert_norms_without_bias_get_no_decay():
    if "modernbert" not in tiny_configs():
        pytest.skip("this transformers has no ModernBERT")
    model = build_tiny("modernbert")
    flags = decay_flags(model)
    modules = dict(model.named_modules())
    norms = [n for n, _ in model.named_parameters() if is_norm(modules[n.rpartition(".")[0]])]
    assert norms and not any(n.endswith("bias") for n in norms)  # ModernBERT's norms have no bias
    assert not any(flags[n] for n in norms)


class T5StyleRMSNorm(nn.Module):
    """A model's own norm class (not an nn.LayerNorm subclass), with a deliberately 2-D scale."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2, 4))


class DebertaLayerNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4))
        self.bias = nn.Parameter(torch.zeros(4))


@pytest.mark.parametrize(
    "module",
    [
        nn.LayerNorm(4),
        nn.LayerNorm(4, bias=False),
        nn.RMSNorm(4),
        nn.GroupNorm(2, 4),
        nn.BatchNorm1d(4),
        T5StyleRMSNorm(),
        DebertaLayerNorm(),
    ],
    ids=lambda m: type(m).__name__,
)
def test_is_norm_recognises_norms_under_any_name(module):
    assert is_norm(module)


@pytest.mark.parametrize(
    "module", [nn.Linear(4, 4), nn.Embedding(4, 4), nn.Conv1d(4, 4, 3)], ids=lambda m: type(m).__name__
)
def test_is_norm_rejects_other_layers(module):
    assert not is_norm(module)


def test_decay_flags_follow_the_owning_module():
    model = nn.Sequential(nn.Linear(4, 4), T5StyleRMSNorm(), DebertaLayerNorm(), nn.Embedding(5, 4))
    assert decay_flags(model) == {
        "0.weight": True,
        "0.bias": False,
        "1.weight": False,  # 2-D, but its module is a norm by name
        "2.weight": False,
        "2.bias": False,
        "3.weight": True,
    }


# --- grouping ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head_lr", [None, HEAD_LR])
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_groups_merge_by_lr_and_decay_and_hold_every_parameter_once(arch, head_lr):
    model, layer_map, groups = llrd_groups(arch, head_lr)
    keys = [(g["lr"], g["weight_decay"]) for g in groups]
    assert len(keys) == len(set(keys)), "two groups share (lr, weight_decay)"
    assert len(groups) <= 2 * (layer_map.num_blocks + 2 + (head_lr is not None))
    top = layer_map.num_blocks + 1
    head = {id(p) for _, p in layer_map.head}
    depths = layer_map.param_depths()
    lrs = {
        head_lr if id(p) in head and head_lr is not None else BASE_LR * DECAY ** (top - depths[name])
        for name, p in model.named_parameters()
    }
    assert len({g["lr"] for g in groups}) == len(lrs)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)), "a parameter is duplicated"
    assert set(ids) == {id(p) for p in model.parameters()}, "a parameter is lost"
    assert all(g["params"] and g["layers"] for g in groups)
    named = {name for g in groups for name in g["layers"]}
    assert named == set(layer_map.groups()) - ({"head"} if not layer_map.head else set())


def test_without_layer_map_two_groups_at_the_base_lr():
    model = build_tiny("bert")
    groups = param_groups(model, BASE_LR, WD)
    assert sorted((g["lr"], g["weight_decay"]) for g in groups) == [(BASE_LR, 0.0), (BASE_LR, WD)]
    assert all(g["layers"] == ["all"] for g in groups)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_layer_decay_one_means_a_single_lr():
    model = build_tiny("roberta")
    groups = param_groups(model, BASE_LR, WD, layer_map=discover_layers(model), layer_decay=1.0)
    assert {g["lr"] for g in groups} == {BASE_LR} and len(groups) == 2


def test_frozen_parameters_excluded_by_default_included_on_request():
    model = build_tiny("bert")
    layer_map = discover_layers(model)
    frozen = {id(p) for _, p in layer_map.embeddings + layer_map.blocks[0]}
    for _, p in layer_map.embeddings + layer_map.blocks[0]:
        p.requires_grad_(False)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}

    groups = param_groups(model, BASE_LR, WD, layer_map=layer_map, layer_decay=DECAY)
    assert {id(p) for g in groups for p in g["params"]} == trainable
    assert not {"embeddings", "blocks.0"} & {name for g in groups for name in g["layers"]}

    groups = param_groups(model, BASE_LR, WD, layer_map=layer_map, layer_decay=DECAY, include_frozen=True)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert set(lr_of) == trainable | frozen
    for _, p in layer_map.embeddings:  # frozen parameters keep their LLRD rate for when they unfreeze
        assert lr_of[id(p)] == pytest.approx(BASE_LR * DECAY**3)


# --- errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(layer_decay=0.0), "layer_decay"),
        (dict(layer_decay=1.5), "layer_decay"),
        (dict(layer_decay=-0.9), "layer_decay"),
        (dict(learning_rate=0.0), "learning_rate"),
        (dict(learning_rate=-1e-3), "learning_rate"),
        (dict(head_lr=-1e-3), "head_lr"),
        (dict(weight_decay=-0.01), "weight_decay"),
        (dict(layer_map=None, head_lr=1e-3), "head_lr"),
    ],
)
def test_param_groups_rejects_bad_settings(kwargs, match):
    model = build_tiny("bert")
    args = dict(learning_rate=BASE_LR, weight_decay=WD, layer_map=discover_layers(model), layer_decay=DECAY)
    with pytest.raises(UserError, match=match) as info:
        param_groups(model, **{**args, **kwargs})
    assert "\n" not in str(info.value)


def optimizer_for(arch: str = "bert") -> torch.optim.Optimizer:
    return build_optimizer(param_groups(build_tiny(arch), BASE_LR, WD), BASE_LR)


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("linear", dict(warmup_steps=TOTAL + 1), "warmup"),
        ("linear", dict(warmup_ratio=1.5), "warmup"),
        ("linear", dict(warmup_steps=-1), "warmup"),
        ("no_such_schedule", {}, "no_such_schedule"),
        ("reduce_lr_on_plateau", {}, "reduce_lr_on_plateau"),  # steps on a metric the loop never passes
        ("warmup_stable_decay", {}, "warmup_stable_decay"),  # needs num_decay_steps (a TypeError before)
    ],
)
def test_build_scheduler_rejects_bad_settings(name, kwargs, match):
    with pytest.raises(UserError, match=match) as info:
        build_scheduler(optimizer_for(), name, TOTAL, **kwargs)
    assert "\n" not in str(info.value)


def test_warmup_as_long_as_training_is_allowed():
    optimizer = optimizer_for()
    build_scheduler(optimizer, "linear", TOTAL, warmup_steps=TOTAL)
    assert all(g["lr"] == 0 for g in optimizer.param_groups)


# --- AdamW ----------------------------------------------------------------------------------------------


def test_build_optimizer_is_fused_adamw_on_cpu_and_steps():
    """torch 2.13 has a fused AdamW kernel for CPU; this test records that the fused path ran."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    assert "cpu" in _get_fused_kernels_supported_devices()
    torch.manual_seed(0)
    model = build_tiny("bert")
    reference = build_tiny("bert")  # same seed, same weights
    model.eval(), reference.eval()  # no dropout: both see the same gradients
    groups = param_groups(model, BASE_LR, WD, layer_map=discover_layers(model), layer_decay=DECAY, head_lr=HEAD_LR)
    optimizer = build_optimizer(groups, BASE_LR)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["fused"] is True and not optimizer.defaults["foreach"]
    ref_groups = param_groups(
        reference, BASE_LR, WD, layer_map=discover_layers(reference), layer_decay=DECAY, head_lr=HEAD_LR
    )
    ref_optimizer = torch.optim.AdamW(ref_groups, lr=BASE_LR, foreach=False)  # plain for-loop implementation

    batch = dict(input_ids=torch.randint(0, 100, (4, 8)), labels=torch.tensor([0, 1, 2, 0]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for m, opt in ((model, optimizer), (reference, ref_optimizer)):
        for _ in range(2):
            m(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) == len(before), "some parameter did not move"
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)


def test_build_optimizer_falls_back_to_foreach_when_fused_is_refused(monkeypatch):
    real_adamw = torch.optim.AdamW

    def adamw(*args, fused=None, **kwargs):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors")
        return real_adamw(*args, fused=fused, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", adamw)
    optimizer = build_optimizer(param_groups(build_tiny("bert"), BASE_LR, WD), BASE_LR)
    assert isinstance(optimizer, real_adamw)
    assert optimizer.defaults["foreach"] is True and not optimizer.defaults["fused"]


def test_build_optimizer_without_parameters_is_a_user_error():
    model = build_tiny("bert").requires_grad_(False)
    with pytest.raises(UserError, match="frozen"):
        build_optimizer(param_groups(model, BASE_LR, WD), BASE_LR)


def test_scheduler_leaves_the_callers_groups_at_their_peak_lr():
    """The scheduler rewrites the optimizer's lr in place; the caller's groups (reported, plotted) stay put."""
    _, _, groups = llrd_groups("bert")
    peaks = [g["lr"] for g in groups]
    optimizer = build_optimizer(groups, BASE_LR)
    build_scheduler(optimizer, "linear", TOTAL, warmup_steps=WARMUP)
    assert all(g["lr"] == 0 for g in optimizer.param_groups)
    assert [g["lr"] for g in groups] == peaks


# --- report, trajectory, plot -----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_format_groups_names_every_layer_and_counts_every_parameter(arch):
    model, layer_map, groups = llrd_groups(arch, head_lr=HEAD_LR)
    table = format_groups(groups)
    lines = table.splitlines()
    assert lines[0] == "| layers | params | lr | weight decay |" and len(lines) == len(groups) + 2
    for layer in layer_map.groups():
        assert re.search(rf"[| ]{re.escape(layer)}[,|| ]", table), layer
    counts = [int(line.split("|")[2].strip().replace(",", "")) for line in lines[2:]]
    assert sum(counts) == sum(p.numel() for p in model.parameters())
    lrs = [float(line.split("|")[3]) for line in lines[2:]]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] == HEAD_LR


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_lr_trajectory_matches_the_real_scheduler_step_by_step(schedule):
    _, _, groups = llrd_groups("deberta-v2", HEAD_LR)
    optimizer = build_optimizer(groups, BASE_LR)
    scheduler = build_scheduler(optimizer, schedule, TOTAL, warmup_ratio=0.25)
    # Called after the real scheduler exists, as recipes/llrd.py does.
    predicted = lr_trajectory(groups, schedule, TOTAL, 0.25, None, learning_rate=BASE_LR)
    assert len(predicted) == TOTAL
    for step in range(TOTAL):
        assert predicted[step] == pytest.approx([g["lr"] for g in optimizer.param_groups], rel=1e-12, abs=1e-18)
        optimizer.step()
        scheduler.step()


def test_lr_trajectory_defaults_and_optimizer_groups():
    """Without head_lr the largest group lr is the base lr, so the default fits polynomial decay too;
    the optimizer's own (scheduled) groups give the same trajectory as the caller's."""
    _, _, groups = llrd_groups("electra")
    optimizer = build_optimizer(groups, BASE_LR)
    scheduler = build_scheduler(optimizer, "polynomial", TOTAL, warmup_steps=WARMUP)
    from_groups = lr_trajectory(groups, "polynomial", TOTAL, 0.0, WARMUP)
    from_optimizer = lr_trajectory(optimizer.param_groups, "polynomial", TOTAL, 0.0, WARMUP)
    assert from_groups == from_optimizer
    for step in range(TOTAL):
        assert from_groups[step] == pytest.approx([g["lr"] for g in optimizer.param_groups], rel=1e-12, abs=1e-18)
        optimizer.step()
        scheduler.step()


def test_plot_lr_schedule_draws_a_png():
    pytest.importorskip("matplotlib")
    _, _, groups = llrd_groups("bert", HEAD_LR)
    lrs = lr_trajectory(groups, "cosine", TOTAL, 0.25, None, learning_rate=BASE_LR)
    data = plot_lr_schedule(groups, lrs)
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
