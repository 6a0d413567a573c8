"""Layer discovery: split a sequence classifier's parameters into embeddings, ordered blocks, pooler and head.

Freezing recipes and layer-wise learning-rate decay (LLRD) need to know how deep in the network each
parameter sits. Discovery reads the module tree rather than one model family's parameter names, so the
same rules cover BERT, RoBERTa, XLM-RoBERTa, DistilBERT, ELECTRA, DeBERTa-v2, ALBERT and ModernBERT, and a
peft-wrapped model (looked through with ``get_base_model()``; names stay the wrapper's own). Callers unwrap
``torch.compile`` and DDP first. The rules, in order:

- blocks: inside the base model (``model.base_model``, i.e. transformers' ``base_model_prefix``), the
  ``nn.ModuleList`` whose children are all one class, each with parameters, that holds the most parameters;
  a tie goes to the outermost list. Block ``i`` is child ``i``. ALBERT reuses its layers: the
  ``num_hidden_layers`` layer applications share ``num_hidden_groups`` parameter groups, so each group
  (``albert_layer_groups.i``) is ONE block and ``num_blocks == num_hidden_groups``.
- pooler: a direct child of the base model named ``pooler`` or whose class name contains ``Pooler``.
- head: every parameter outside the base model: classifier, DistilBERT's ``pre_classifier``, the
  ``dense`` of RoBERTa's classification head, DeBERTa-v2's ``ContextPooler`` and ModernBERT's ``head``
  (both built outside the base model, hence head, not pooler), and peft modules added outside it.
- embeddings: base-model parameters registered before the blocks (word/position embeddings and their norm,
  ELECTRA's ``embeddings_project``, ALBERT's ``encoder.embedding_hidden_mapping_in``).
- leftovers registered after the blocks: an ``nn.Embedding`` there is a table every block reads (DeBERTa-v2's
  relative-position ``encoder.rel_embeddings``), so it and the other modules under the same parent
  (DeBERTa-v2's ``encoder.LayerNorm`` that normalises it, ``encoder.conv`` that reads the embedding output)
  go to embeddings; anything else (a final norm such as ModernBERT's ``final_norm``) goes to the top block.

Discovery raises ``LayerDiscoveryError`` (one line) when no such ModuleList exists or when two disjoint ones
each hold over half the winner's parameters (an encoder and a decoder), rather than guess. ``mapping`` then
names the embeddings, blocks and pooler modules by hand; the other rules stay, except that a model with no
distinct base model puts whatever follows the blocks in the head.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import UserError

NamedParams = list[tuple[str, nn.Parameter]]

MAPPING_KEYS = ("embeddings", "blocks", "pooler")
MAPPING_HINT = (
    "pass layer_mapping={'embeddings': PATH, 'blocks': PATH, 'pooler': PATH or ''} "
    "(CLI: --layer_mapping embeddings=PATH,blocks=PATH,pooler=PATH), paths from model.named_modules()"
)


class LayerDiscoveryError(UserError):
    """The model's layers cannot be mapped; the one-line message says how to pass a mapping by hand."""


@dataclass
class LayerMap:
    """Every parameter of a model, by identity, in exactly one group; names from ``named_parameters()``."""

    embeddings: NamedParams
    blocks: list[NamedParams]
    pooler: NamedParams
    head: NamedParams

    def groups(self) -> dict[str, NamedParams]:
        """Groups bottom to top: embeddings, blocks.0 .. blocks.{n-1}, pooler (only if present), head."""
        groups = {"embeddings": self.embeddings}
        groups.update({f"blocks.{i}": block for i, block in enumerate(self.blocks)})
        if self.pooler:
            groups["pooler"] = self.pooler
        groups["head"] = self.head
        return groups

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def depth(self, name: str) -> int:
        """Depth of a group or parameter name: 0 embeddings, i+1 block i, num_blocks+1 pooler and head."""
        group = name if name in self.groups() else self.group_of(name)
        if group == "embeddings":
            return 0
        if group.startswith("blocks."):
            return int(group.split(".", 1)[1]) + 1
        return self.num_blocks + 1

    def group_of(self, param_name: str) -> str:
        """The group holding the parameter called ``param_name``."""
        for group, params in self.groups().items():
            if any(name == param_name for name, _ in params):
                return group
        raise KeyError(f"no parameter or group named '{param_name}'; groups: {', '.join(self.groups())}")

    def param_depths(self) -> dict[str, int]:
        """Depth of every parameter by name, in one pass (what LLRD needs)."""
        return {name: self.depth(group) for group, params in self.groups().items() for name, _ in params}


def parse_layer_mapping(text: str) -> dict[str, str]:
    """Reads the CLI form 'embeddings=PATH,blocks=PATH,pooler=PATH' (an empty PATH means none)."""
    mapping = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, path = item.partition("=")
        if not sep:
            raise LayerDiscoveryError(f"layer_mapping item '{item}' is not KEY=PATH; {MAPPING_HINT}")
        mapping[key.strip()] = path.strip()
    return mapping


def discover_layers(model: nn.Module, mapping: Mapping[str, str] | str | None = None) -> LayerMap:
    """Maps ``model``'s parameters to groups by the rules in this module's docstring.

    ``mapping`` ({'embeddings': PATH, 'blocks': PATH, 'pooler': PATH or ''}, or its CLI string form) replaces
    discovery of those modules; paths are ``named_modules()`` paths of the model, or of the transformers
    model inside a peft wrapper. The blocks module's children with parameters are the blocks.
    """
    paths = {id(module): path for path, module in model.named_modules()}
    root_path, base_path = _root_and_base_paths(model, paths)
    modules = dict(model.named_modules())
    if mapping is None:
        blocks_path = _find_blocks(model, modules, root_path if base_path is None else base_path)
        pooler_path = _find_pooler(modules, root_path if base_path is None else base_path)
        embeddings_path = None
    else:
        embeddings_path, blocks_path, pooler_path = _resolve_mapping(model, modules, root_path, mapping)
    block_paths = [
        _join(blocks_path, name) for name, child in modules[blocks_path].named_children() if _has_params(child)
    ]
    if not block_paths:
        raise LayerDiscoveryError(
            f"layer_mapping blocks '{blocks_path}' of {type(model).__name__} has no child with parameters; "
            + MAPPING_HINT
        )
    return _assign(model, modules, block_paths, pooler_path, embeddings_path, base_path)


def blocks_path(model: nn.Module) -> str:
    """The ``named_modules()`` path of ``model``'s stack of transformer blocks (its parent is the encoder)."""
    paths = {id(module): path for path, module in model.named_modules()}
    root_path, base_path = _root_and_base_paths(model, paths)
    return _find_blocks(model, dict(model.named_modules()), root_path if base_path is None else base_path)


def _assign(
    model: nn.Module,
    modules: dict[str, nn.Module],
    block_paths: list[str],
    pooler_path: str | None,
    embeddings_path: str | None,
    base_path: str | None,
) -> LayerMap:
    """One pass over ``named_parameters()`` (which lists a shared parameter once) then the leftovers rule."""
    layer_map = LayerMap(embeddings=[], blocks=[[] for _ in block_paths], pooler=[], head=[])
    after: NamedParams = []  # base-model leftovers registered after the first block parameter
    for name, param in model.named_parameters():
        index = next((i for i, path in enumerate(block_paths) if _inside(name, path)), None)
        if index is not None:
            layer_map.blocks[index].append((name, param))
        elif _inside(name, pooler_path):
            layer_map.pooler.append((name, param))
        elif _inside(name, embeddings_path):
            layer_map.embeddings.append((name, param))
        elif base_path is not None and not _inside(name, base_path):
            layer_map.head.append((name, param))
        elif not any(layer_map.blocks):
            layer_map.embeddings.append((name, param))
        else:
            after.append((name, param))
    if base_path is None:  # no base model to say where the encoder ends: what follows the blocks is head
        layer_map.head.extend(after)
        return layer_map
    tables = {_parent(name) for name, _ in after if isinstance(modules[_parent(name)], nn.Embedding)}
    # Modules beside a shared table (same parent, below the base model itself) serve that table.
    table_parents = {_parent(table) for table in tables if _inside(_parent(table), base_path)}
    for name, param in after:
        with_table = _parent(name) in tables or any(_inside(name, parent) for parent in table_parents)
        (layer_map.embeddings if with_table else layer_map.blocks[-1]).append((name, param))
    return layer_map


def _root_and_base_paths(model: nn.Module, paths: dict[int, str]) -> tuple[str, str | None]:
    """Paths of the transformers model (through a peft wrapper) and of its base model; None if it has none."""
    get_base_model = getattr(model, "get_base_model", None)
    root = get_base_model() if callable(get_base_model) else model
    root_path = paths.get(id(root), "")
    root = model if root_path == "" else root
    base = getattr(root, "base_model", None)
    if not isinstance(base, nn.Module) or base is root or id(base) not in paths:
        return root_path, None
    return root_path, paths[id(base)]


def _find_blocks(model: nn.Module, modules: dict[str, nn.Module], search_path: str) -> str:
    """The homogeneous ModuleList under ``search_path`` with the most parameters (outermost on a tie)."""
    candidates = [
        (_numel(module), -path.count("."), path)
        for path, module in modules.items()
        if (path == search_path or _inside(path, search_path))
        and isinstance(module, nn.ModuleList)
        and len(module) > 0
        and len({type(child) for child in module}) == 1
        and all(_has_params(child) for child in module)
    ]
    if not candidates:
        raise LayerDiscoveryError(
            f"cannot find the transformer blocks of {type(model).__name__} (no nn.ModuleList of repeated "
            f"layers with parameters); {MAPPING_HINT}"
        )
    numel, _, best = max(candidates)
    rivals = [path for n, _, path in candidates if n * 2 > numel and not _nested(path, best)]
    if rivals:  # e.g. an encoder and a decoder stack: guessing one would silently mis-assign the other
        raise LayerDiscoveryError(
            f"{type(model).__name__} has several stacks of blocks ({best}, {', '.join(rivals)}); " + MAPPING_HINT
        )
    return best


def _find_pooler(modules: dict[str, nn.Module], base_path: str) -> str | None:
    """A direct child of the base model named 'pooler' or of a *Pooler* class, if it has parameters."""
    for path, module in modules.items():
        is_child = _parent(path) == base_path and path != base_path
        named_pooler = path.rpartition(".")[2] == "pooler" or "Pooler" in type(module).__name__
        if is_child and named_pooler and _has_params(module):
            return path
    return None


def _resolve_mapping(
    model: nn.Module, modules: dict[str, nn.Module], root_path: str, mapping: Mapping[str, str] | str
) -> tuple[str | None, str, str | None]:
    """(embeddings, blocks, pooler) module paths from a user mapping, each checked to exist."""
    mapping = parse_layer_mapping(mapping) if isinstance(mapping, str) else dict(mapping)
    unknown = sorted(set(mapping) - set(MAPPING_KEYS))
    if unknown or not mapping.get("blocks"):
        problem = f"unknown key '{unknown[0]}'" if unknown else "no 'blocks' path"
        raise LayerDiscoveryError(f"layer_mapping for {type(model).__name__} has {problem}; {MAPPING_HINT}")

    def resolve(key: str) -> str | None:
        path = (mapping.get(key) or "").strip()
        if not path:
            return None
        for candidate in (_join(root_path, path), path):
            if candidate in modules:
                return candidate
        raise LayerDiscoveryError(
            f"layer_mapping {key} '{path}' is not a module of {type(model).__name__}; {MAPPING_HINT}"
        )

    return resolve("embeddings"), resolve("blocks") or "", resolve("pooler")


def _inside(name: str, path: str | None) -> bool:
    """Whether a dotted parameter or module name lies under module ``path`` (all lie under the root '')."""
    if path is None:
        return False
    return path == "" or name.startswith(path + ".")


def _nested(a: str, b: str) -> bool:
    return a == b or _inside(a, b) or _inside(b, a)


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def block_linears(model: nn.Module, layer_map: LayerMap) -> dict[str, list[str]]:
    """Names of the Linear layers inside the blocks (GPT-2's Conv1D projections too), split into attention and
    feed-forward projections.

    A projection is attention when one of the modules holding it is an attention module by class
    (BertAttention, MultiHeadSelfAttention, DisentangledSelfAttention, ModernBertAttention, ...), so the
    split follows structure and works for fused QKV projections too. LoRA targets come from here.
    """
    in_blocks = {id(p) for block in layer_map.blocks for _, p in block}
    attention_paths = [name for name, m in model.named_modules() if "attention" in type(m).__name__.lower()]
    found: dict[str, list[str]] = {"attention": [], "feed_forward": []}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Conv1D)) and id(module.weight) in in_blocks:
            kind = "attention" if any(_inside(name, path) for path in attention_paths) else "feed_forward"
            found[kind].append(name)
    return found


def stored_transposed(model: nn.Module, names: list[str]) -> bool:
    """Whether the layers `names` keep their weights as (in, out), as transformers' Conv1D does (GPT-2's
    projections): peft's LoRA must then be told (`fan_in_fan_out`). A model mixing both kinds is refused."""
    kinds = {isinstance(model.get_submodule(name), Conv1D) for name in names}
    if len(kinds) > 1:
        raise UserError(f"{type(model).__name__} mixes Conv1D and Linear projections; pass LoRA targets of one kind")
    return kinds == {True}
