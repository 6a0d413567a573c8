"""Optimizer parameter groups (weight decay, layer-wise lr decay), AdamW, schedules, and their report."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import get_scheduler

from .errors import UserError
from .rendering import markdown_table, png, pyplot

if TYPE_CHECKING:
    from .layers import LayerMap


def is_norm(module: nn.Module) -> bool:
    """LayerNorm, RMSNorm, BatchNorm, ... under any name a model gives its own normalisation class."""
    # By suffix, so T5LayerNorm or DebertaLayerNorm count and a NormedLinear does not.
    return isinstance(module, nn.modules.normalization.LayerNorm | nn.modules.batchnorm._NormBase) or bool(
        re.search(r"norm(\dd)?$", type(module).__name__.lower())
    )


def decay_flags(model: nn.Module) -> dict[str, bool]:
    """Parameter name → whether weight decay applies: matrices yes; biases, norms and 1-D vectors no."""
    flags = {}
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            flags[full] = param.ndim >= 2 and not is_norm(module)
    return flags


def param_groups(
    model: nn.Module,
    learning_rate: float,
    weight_decay: float,
    layer_map: LayerMap | None = None,
    layer_decay: float = 1.0,
    head_lr: float | None = None,
    include_frozen: bool = False,
) -> list[dict[str, Any]]:
    """Plain optimizer groups: one per distinct (lr, weight decay), each listing the layers it holds.

    With a layer map, a parameter at depth i gets learning_rate × layer_decay^(top − i): the
    embeddings the smallest rate, the pooler the base rate, the head `head_lr` when given.
    `include_frozen` keeps parameters that do not train yet, for strategies that unfreeze later.
    """
    if learning_rate <= 0 or (head_lr is not None and head_lr <= 0):
        raise UserError("learning rates must be positive; check --learning_rate and --head_lr")
    if not 0 < layer_decay <= 1:
        raise UserError(f"layer_decay {layer_decay} is outside (0, 1]; 1 turns layer-wise decay off, try 0.9")
    if weight_decay < 0:
        raise UserError(f"weight_decay {weight_decay} is negative; pass a value ≥ 0")
    if head_lr is not None and layer_map is None:
        raise UserError("head_lr needs a layer map to find the head; pass layer_map=discover_layers(model)")
    if head_lr is not None and not layer_map.head:
        raise UserError("head_lr is set but the model has no classification head outside its base; drop --head_lr")
    flags = decay_flags(model)
    layer_groups = layer_map.groups() if layer_map else {}
    layer_of = {name: group for group, params in layer_groups.items() for name, _ in params}
    depths = layer_map.param_depths() if layer_map else {}
    head_names = {name for name, _ in layer_map.head} if layer_map else set()
    top = layer_map.num_blocks + 1 if layer_map else 0
    merged: dict[tuple[float, float], dict[str, Any]] = defaultdict(lambda: {"params": [], "layers": []})
    for name, param in model.named_parameters():
        if not (param.requires_grad or include_frozen):
            continue
        if name in head_names and head_lr is not None:
            lr = head_lr
        else:
            lr = learning_rate * layer_decay ** (top - depths[name]) if layer_map else learning_rate
        group = merged[(lr, weight_decay if flags[name] else 0.0)]
        group["params"].append(param)
        layer = layer_of.get(name, "all")
        if layer not in group["layers"]:
            group["layers"].append(layer)
    return [{"lr": lr, "weight_decay": wd, **group} for (lr, wd), group in sorted(merged.items(), key=lambda kv: kv[0])]


def build_optimizer(groups: list[dict[str, Any]], learning_rate: float) -> torch.optim.AdamW:
    """AdamW with the fused kernel where this torch has one for the parameters' device, else foreach.

    The optimizer gets copies of the group dicts: a scheduler rewrites its groups' lr in place, and the
    caller's `groups` keep their peak lr for `format_groups` and `lr_trajectory`.
    """
    device = next((p.device for g in groups for p in g["params"]), None)
    if device is None:
        raise UserError("no parameter to optimize: every parameter is frozen; unfreeze some or pass include_frozen")
    fused = device.type in ("cuda", "cpu", "xpu", "mps")
    try:
        return torch.optim.AdamW([dict(g) for g in groups], lr=learning_rate, fused=fused)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW([dict(g) for g in groups], lr=learning_rate, foreach=True)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    num_training_steps: int,
    warmup_ratio: float = 0.0,
    warmup_steps: int | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """`transformers.get_scheduler`: the multiplier it applies keeps each group's own peak lr."""
    warmup = warmup_steps if warmup_steps is not None else math.ceil(warmup_ratio * num_training_steps)
    if not 0 <= warmup <= num_training_steps:
        raise UserError(f"warmup of {warmup} steps does not fit in {num_training_steps} training steps")
    try:
        scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=num_training_steps)
    except (TypeError, ValueError) as error:  # TypeError: a schedule needing arguments this project does not pass
        raise UserError(f"lr_scheduler_type '{name}': {error}; use linear, cosine, polynomial or constant") from None
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):  # e.g. reduce_lr_on_plateau
        raise UserError(f"lr_scheduler_type '{name}' steps on a metric the training loop does not pass; use linear")
    return scheduler


@dataclass
class Schedule:
    """The lr scheduler and the optimizer steps it spans, counted once, before the loaders are sharded."""

    scheduler: torch.optim.lr_scheduler.LRScheduler
    total_steps: int
    steps_per_epoch: int
    accumulation_steps: int = 1  # batches per optimizer step (the last of an epoch may take fewer)

    @property
    def num_epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)


def build_schedule(optimizer: torch.optim.Optimizer, train_loader, args, processes: int) -> Schedule:
    """`lr_scheduler_type` over max_train_steps, else over the epochs' worth of optimizer steps of the
    not-yet-prepared `train_loader` once `processes` share its batches (`args`: the TrainingArguments)."""
    per_epoch = math.ceil(math.ceil(len(train_loader) / processes) / args.gradient_accumulation_steps)
    steps = args.max_train_steps or math.ceil(args.num_train_epochs * per_epoch)
    if steps <= 0:
        raise UserError("no training steps: raise --num_train_epochs or --max_train_steps")
    if args.eval_strategy == "steps" and args.eval_steps > steps:  # it would only evaluate at the end
        raise UserError(
            f"eval_steps {args.eval_steps} is more than the run's {steps} optimizer steps; pass a smaller "
            "--eval_steps, or --eval_strategy epoch"
        )
    scheduler = build_scheduler(optimizer, args.lr_scheduler_type, steps, args.warmup_ratio, args.warmup_steps)
    return Schedule(scheduler, steps, per_epoch, args.gradient_accumulation_steps)


def format_groups(groups: list[dict[str, Any]]) -> str:
    """A Markdown table: layers, parameter count, lr and weight decay of every optimizer group."""
    ordered = sorted(groups, key=lambda g: (-_peak_lr(g), g["weight_decay"]))
    rows = [
        [", ".join(g["layers"]), sum(p.numel() for p in g["params"]), f"{_peak_lr(g):.3g}", f"{g['weight_decay']:g}"]
        for g in ordered
    ]
    return markdown_table(["layers", "params", "lr", "weight decay"], rows, right=(1, 2, 3))


def lr_trajectory(
    groups: list[dict[str, Any]],
    name: str,
    num_training_steps: int,
    warmup_ratio: float,
    warmup_steps: int | None,
    learning_rate: float | None = None,
) -> list[list[float]]:
    """The lr of every group at every step, from a stand-in optimizer stepped through the same schedule.

    `learning_rate` is the real optimizer's default lr (polynomial decay scales its end lr by it);
    without it, the largest group lr.
    """
    peaks = [_peak_lr(g) for g in groups]
    default_lr = learning_rate if learning_rate is not None else max(peaks)
    params = [{"params": [torch.zeros(1, requires_grad=True)], "lr": lr} for lr in peaks]
    dummy = torch.optim.SGD(params, lr=default_lr)
    scheduler = build_scheduler(dummy, name, num_training_steps, warmup_ratio, warmup_steps)
    lrs = []
    for _ in range(num_training_steps):
        lrs.append([g["lr"] for g in dummy.param_groups])
        dummy.step()
        scheduler.step()
    return lrs


def _peak_lr(group: dict[str, Any]) -> float:
    """A group's scheduled peak lr: a scheduler keeps it as `initial_lr` and rewrites `lr` every step."""
    return group.get("initial_lr", group["lr"])


def plot_lr_schedule(groups: list[dict[str, Any]], lrs: list[list[float]]) -> bytes:
    """One line per optimizer group over the run, as PNG bytes: drawn before training, saved with the rest."""
    fig, ax = pyplot().subplots(figsize=(8, 4.5))
    for i, g in enumerate(groups):
        label = f"{g['layers'][0]}{' …' if len(g['layers']) > 1 else ''} (wd {g['weight_decay']:g})"
        ax.plot([step[i] for step in lrs], label=label)
    ax.set(xlabel="optimizer step", ylabel="learning rate", yscale="log", title="Learning rate per parameter group")
    ax.legend(fontsize="x-small", ncol=2)
    return png(fig, dpi=120)
