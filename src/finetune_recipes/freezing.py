"""Freezing: choose which layer groups of a model train, count what trains, and report it.

Group names are those of ``LayerMap.groups()`` ("embeddings", "blocks.0" .. "blocks.{n-1}", "pooler",
"head"), and "blocks" for every block. "pooler" on a model without a pooler selects nothing (RoBERTa and
DistilBERT classifiers have none), so "pooler+head" means the same thing everywhere.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterable

from torch import nn

from .errors import UserError
from .layers import LayerMap

logger = logging.getLogger(__name__)


def freeze(model: nn.Module) -> None:
    """Stops gradients for every parameter of ``model``."""
    for param in model.parameters():
        param.requires_grad_(False)


def expand_groups(layer_map: LayerMap, groups: Iterable[str] | str) -> list[str]:
    """The ``LayerMap.groups()`` names that ``groups`` selects, shorthands expanded, in map order.

    A single string is one group name, not an iterable of letters.
    """
    names = [groups] if isinstance(groups, str) else list(groups)
    valid = list(layer_map.groups())
    selected: set[str] = set()
    for name in names:
        selected.update(_expand(layer_map, name, valid))
    return [name for name in valid if name in selected]


def _expand(layer_map: LayerMap, name: str, valid: list[str]) -> list[str]:
    blocks = [f"blocks.{i}" for i in range(layer_map.num_blocks)]
    if name in valid:
        return [name]
    if name == "pooler":
        return []
    if name == "blocks":
        return blocks
    raise UserError(f"unknown layer group '{name}'; valid groups: {', '.join(valid)} (or blocks, for all)")


def unfreeze(layer_map: LayerMap, groups: Iterable[str] | str, model: nn.Module | None = None) -> None:
    """Lets gradients flow into every parameter of the named groups; other parameters keep their state.

    With `model`, its parameters of the same names: FSDP2 replaces a model's parameters with sharded ones
    when it is prepared, so the objects the map was built from may no longer be the ones that train.
    """
    current = dict(model.named_parameters()) if model is not None else {}
    selected = layer_map.groups()
    for name in expand_groups(layer_map, groups):
        for param_name, param in selected[name]:
            current.get(param_name, param).requires_grad_(True)


def set_trainable(model: nn.Module, layer_map: LayerMap, groups: Iterable[str] | str) -> None:
    """Trains exactly ``groups``: freezes the whole model, then unfreezes them (by name, in `model` as it is now).

    Names are checked before anything is frozen, so a typo leaves the model as it was.
    """
    names = expand_groups(layer_map, groups)
    freeze(model)
    unfreeze(layer_map, names, model)


def frozen_names(model: nn.Module, layer_map: LayerMap, groups: Iterable[str] | str) -> set[str]:
    """The names of `model`'s parameters outside ``groups``: what stays frozen while they train (by name, as
    in `unfreeze`)."""
    selected = layer_map.groups()
    training = {name for group in expand_groups(layer_map, groups) for name, _ in selected[group]}
    return {name for name, _ in model.named_parameters() if name not in training}


def eval_frozen(model: nn.Module, frozen: set[str] | None = None) -> None:
    """Puts every submodule whose parameters are all frozen in eval mode: no dropout where nothing trains.

    Frozen means named in `frozen` when given (FSDP2: every parameter keeps requires_grad, see Thaw), else
    not requiring a gradient. Autograd already keeps no activations for a frozen prefix, but dropout there
    still costs a random draw per element, and attention dropout keeps SDPA off its fused kernel on a CPU
    (benchmarks/README.md, progressive unfreezing: 1.4-2.2x faster early stages). Everything else is put in
    train mode, so the modes depend on what trains now alone, never on what trained before (a resumed run
    must match): call it in training, before each forward pass.
    """
    model.train()
    for prefix, module in model.named_modules():
        params = list(module.named_parameters(prefix=prefix))
        if params and all(n in frozen if frozen is not None else not p.requires_grad for n, p in params):
            module.eval()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) element counts; ``parameters()`` yields a shared or tied parameter once."""
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return trainable, total


def format_trainable(model: nn.Module, layer_map: LayerMap, frozen: set[str] | None = None) -> str:
    """A short report: trainable groups (partly trainable ones, as under LoRA, marked), frozen, counts.
    Frozen as in `eval_frozen`: named in `frozen` when given, else not requiring a gradient."""
    current = dict(model.named_parameters())

    def trains(name: str, param: nn.Parameter) -> bool:
        return name not in frozen if frozen is not None else current.get(name, param).requires_grad

    trainable, frozen_groups = [], []
    for name, params in layer_map.groups().items():
        flags = [trains(n, p) for n, p in params]
        if flags and all(flags):
            trainable.append(name)
        elif any(flags):
            trainable.append(f"{name} (partly)")
        else:
            frozen_groups.append(name)
    total = sum(p.numel() for p in current.values())
    count = sum(p.numel() for n, p in current.items() if trains(n, p))
    percent = 100.0 * count / total if total else 0.0
    return "\n".join(
        [
            f"trainable groups: {_compact(trainable) or 'none'}",
            f"frozen groups: {_compact(frozen_groups) or 'none'}",
            f"trainable parameters: {count:,} of {total:,} ({percent:.2f}%)",
        ]
    )


def _compact(names: list[str]) -> str:
    """Joins group names, writing runs of consecutive blocks as a range: blocks.0-9."""
    parts: list[str] = []
    run: list[int] = []  # consecutive block indices, all with the same suffix
    suffix = ""

    def flush() -> None:
        if run:
            parts.append(f"blocks.{run[0]}" + (f"-{run[-1]}" if len(run) > 1 else "") + suffix)
            run.clear()

    for name in names:
        head, _, rest = name.partition(" ")
        if head.startswith("blocks."):
            index, tail = int(head.split(".")[1]), f" {rest}" if rest else ""
            if run and (index != run[-1] + 1 or tail != suffix):
                flush()
            run.append(index)
            suffix = tail
        else:
            flush()
            parts.append(name)
    flush()
    return ", ".join(parts)


def unfreezing_stages(layer_map: LayerMap) -> list[list[str]]:
    """Stage 0 trains the pooler and head; each later stage adds the next block down, the last the embeddings."""
    thaw_order = [f"blocks.{i}" for i in reversed(range(layer_map.num_blocks))] + ["embeddings"]
    return [["pooler", "head", *thaw_order[:k]] for k in range(len(thaw_order) + 1)]


def stage_starts(
    num_stages: int,
    every: float,
    steps_per_epoch: int,
    unit: str = "epoch",
    explicit: str | None = None,
    total_steps: int | None = None,
) -> list[int]:
    """The optimizer step at which each stage begins: stage k at k × `every` epochs (or steps), or as listed.

    `explicit` is a comma-separated list of the steps where stages 1, 2, ... begin; stages it leaves out
    never start, so "100,200" thaws two blocks and keeps the rest frozen. Stages that would begin at or
    after `total_steps` never train: a warning says so.
    """
    starts = _stage_starts(num_stages, every, steps_per_epoch, unit, explicit)
    late = [k for k, step in enumerate(starts) if total_steps is not None and step >= total_steps]
    if late:
        logger.warning(
            "unfreezing stages %s begin at step %d or later, after the run's last step (%d): they never train; "
            "lower --unfreeze_every or train for longer",
            ", ".join(map(str, late)), starts[late[0]], total_steps - 1,
        )  # fmt: skip
    return starts


def _stage_starts(num_stages: int, every: float, steps_per_epoch: int, unit: str, explicit: str | None) -> list[int]:
    if explicit:
        try:
            steps = [int(s) for s in explicit.split(",") if s.strip()]
        except ValueError:
            raise UserError(
                f"unfreeze_schedule '{explicit}' must be comma-separated step numbers, e.g. 50,100,150"
            ) from None
        if steps != sorted(steps) or (steps and steps[0] < 0) or len(steps) >= num_stages:
            raise UserError(
                f"unfreeze_schedule '{explicit}' must list at most {num_stages - 1} increasing, non-negative steps"
            )
        return [0, *steps]
    if unit not in ("epoch", "step") or every <= 0:
        raise UserError("unfreeze_every must be positive and unfreeze_unit 'epoch' or 'step'")
    interval = every * steps_per_epoch if unit == "epoch" else every
    return [round(k * interval) for k in range(num_stages)]


def stage_at(step: int, starts: list[int]) -> int:
    """The stage in force at optimizer step `step`."""
    return bisect.bisect_right(starts, step) - 1


class Thaw:
    """Progressive unfreezing's action, `thaw(step)`: the stage that `step` falls in trains (set once, on entering
    it), and the blocks still frozen stay in eval mode (no dropout; again after each evaluation's model.train()).

    A function of the step alone, so a resumed run lands in its stage. `model` is the unwrapped model the
    `layer_map` was discovered on; `say` prints each new stage (accelerator.print: the main process only).

    `keep_requires_grad` is for FSDP2, which fixes at `prepare` which parameters take gradients: a block thawed
    after it fails in backward ("attempting to assign a gradient with dtype BFloat16 to a tensor with
    grad_dtype Float", on an H200 and on CPUs alike). Every parameter then keeps requires_grad, and the frozen
    ones' gradients, computed, are dropped by `drop_frozen_gradients` before clipping and the step. The update
    is the same; the backward through the frozen blocks, which requires_grad=False skips, is the price.
    """

    def __init__(
        self, model: nn.Module, layer_map: LayerMap, stages: list[list[str]], starts: list[int], say=print,
        keep_requires_grad: bool = False,
    ):  # fmt: skip
        self.model, self.layer_map, self.stages, self.starts, self.say = model, layer_map, stages, starts, say
        self.keep_requires_grad = keep_requires_grad
        self.current, self.frozen = -1, set()

    def __call__(self, step: int) -> None:
        stage = stage_at(step, self.starts)
        if stage != self.current:
            self.frozen = frozen_names(self.model, self.layer_map, self.stages[stage])
            if not self.keep_requires_grad:
                set_trainable(self.model, self.layer_map, self.stages[stage])
            self.current = stage
            self.say(f"step {step}: stage {stage}\n{format_trainable(self.model, self.layer_map, self.frozen)}")
        eval_frozen(self.model, self.frozen)

    def drop_frozen_gradients(self) -> None:
        """The frozen parameters' gradients gone (None), so clipping leaves them out of the norm and AdamW skips
        them: no update, no moments, no weight decay, as for a parameter that requires no gradient. Without
        keep_requires_grad they have none: nothing to drop."""
        if self.keep_requires_grad:
            for name, param in self.model.named_parameters():
                if name in self.frozen:
                    param.grad = None
