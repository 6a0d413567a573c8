"""Reading a recipe's configuration: its dataclasses from the defaults, then a YAML file (the recipe's own
configs/<name>.yaml, or --config), then the command line; and `run_cli`, a recipe's `__main__`."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import importlib.resources
import os
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from transformers import HfArgumentParser

from .config import METRICS, NEEDED, ON_RESUME, RANGE, DataArguments, TrainingArguments, check_ranges, range_text
from .errors import OneLineErrors, Parser, UserError, on_interrupt
from .processes import die_with_launcher, run_to_end
from .strategy_args import CacheArguments

T = TypeVar("T")


class DataclassParser(OneLineErrors, HfArgumentParser):
    @staticmethod
    def _parse_dataclass_field(parser: argparse.ArgumentParser, field: dataclasses.Field) -> None:
        # HfArgumentParser hands a field's metadata to add_argument as keywords: ON_RESUME, RANGE, NEEDED are ours, not
        # argparse's (the range goes into the help), and argparse formats a help text with %, so a plain "10%"
        # would break --help.
        metadata = {k: v for k, v in field.metadata.items() if k not in (ON_RESUME, RANGE, NEEDED)}
        if RANGE in field.metadata:
            metadata["help"] = f"{metadata.get('help', '')} ({range_text(field.metadata[RANGE])})".lstrip()
        if "help" in metadata:
            metadata["help"] = metadata["help"].replace("%", "%%")
        if metadata != dict(field.metadata):
            field = copy.copy(field)
            field.metadata = types.MappingProxyType(metadata)
        HfArgumentParser._parse_dataclass_field(parser, field)


def parse_config(
    *types: type, args: list[str] | None = None, default_config: str | Path | None = None, announce: bool = True
) -> tuple[Any, ...]:
    """Parses `types` from `--config FILE` (or `default_config` when it exists) with CLI flags on top.

    YAML values become the parser's defaults, so every command-line flag overrides the file and a
    key that no dataclass declares is an error rather than a silently ignored typo.
    """
    args = sys.argv[1:] if args is None else list(args)
    # No abbreviations: a typo that happens to be a prefix (--learning_rat) must fail like any other typo.
    pre = Parser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    known, rest = pre.parse_known_args(args)
    parser = DataclassParser(types, allow_abbrev=False)
    parser.add_argument("--config", help="YAML file of defaults for every flag below.")
    config_file = known.config or _default_config(default_config)
    if announce and config_file and not known.config and os.environ.get("RANK", "0") == "0":
        print(f"config: {config_file} (the recipe's defaults; --config FILE reads another)", file=sys.stderr)
    if config_file:
        parser.set_defaults(**_read_yaml(Path(config_file), parser))
    try:
        parsed = parser.parse_args_into_dataclasses(rest)
    except UserError:
        raise
    except ValueError as error:  # "Some specified arguments are not used by the HfArgumentParser"
        raise UserError(f"{error}; run with --help to list the valid flags") from None
    configs = tuple(parsed[: len(types)])  # the rest is a namespace holding --config
    for config in configs:
        check_ranges(config)  # nan and inf in a recipe's own float flags too
    check_combination(configs)
    return configs


def kept(output_dir: str) -> str:
    """What an interrupted run kept: its newest checkpoint, read from the disk when Ctrl-C comes. Imported here, not
    at the top: the checkpoints module loads torch, and the tools parse flags with this module without it."""
    from .training.checkpoints import kept_checkpoint

    return kept_checkpoint(output_dir)


def check_combination(configs: tuple[Any, ...]) -> None:
    """Flags of two dataclasses that contradict each other: --pack_sequences packs the batches an encoder trains
    on, and a recipe that caches (CacheArguments) trains on what its frozen weights computed once; it would
    otherwise say so only after encoding every text."""
    packing = any(isinstance(c, DataArguments) and c.pack_sequences for c in configs)
    frozen = any(isinstance(c, CacheArguments) for c in configs)
    if packing and frozen:
        raise UserError(
            "--pack_sequences packs the batches an encoder trains on; this recipe trains on what its frozen "
            "weights computed once (the --feature_cache_dir kind): drop --pack_sequences"
        )
    training = next((c for c in configs if isinstance(c, TrainingArguments)), None)
    data = next((c for c in configs if isinstance(c, DataArguments)), None)
    known = sorted({m for names in METRICS.values() for m in names})
    best = training.metric_for_best_model if training else None
    if best and best not in known and not (data and data.metric_names):  # --metric_name's are known once loaded
        raise UserError(f"metric_for_best_model '{best}' is not one of {', '.join(known)} (or a --metric_name's)")
    if frozen and any(isinstance(c, TrainingArguments) and c.gradient_checkpointing for c in configs):
        raise UserError(
            "--gradient_checkpointing saves memory in a backward pass through the model, and this recipe never "
            "runs one (it trains on what its frozen weights computed once): drop --gradient_checkpointing"
        )


def _default_config(path: str | Path | None) -> Path | None:
    """The config beside the recipe, else the one installed with the package (a recipe copied alone)."""
    if path is None:
        return None
    packaged = Path(str(importlib.resources.files("finetune_recipes.recipes"))) / "configs" / Path(path).name
    return next((p for p in (Path(path), packaged) if p.exists()), None)


def _read_yaml(path: Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise UserError(f"cannot read config {path}: {error.__class__.__name__}; pass a readable YAML file") from None
    if not isinstance(values, dict):
        raise UserError(f"config {path} is not a mapping; write one `flag_name: value` per line")
    actions: dict[str, argparse.Action] = {}
    for action in parser._actions:  # the flag itself comes before a `--no_x` complement of the same dest
        if action.dest not in ("help", "config"):
            actions.setdefault(action.dest, action)
    unknown = sorted(set(values) - set(actions))
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(actions), n=1)
        hint = f"did you mean '{close[0]}'?" if close else "run with --help to list the valid keys"
        raise UserError(f"unknown key '{unknown[0]}' in {path}; {hint}")
    return {k: _coerce(k, v, actions[k], path) for k, v in values.items()}


def _coerce(key: str, value: Any, action: argparse.Action, path: Path) -> Any:
    """Applies the flag's own type, as the command line would: argparse leaves non-string defaults as they are.

    YAML reads 5e-5 as a string, `checkpointing_steps: 500` as an int and `mixed_precision: no` as False;
    each would otherwise reach the dataclass with the wrong type.
    """
    if value is None or isinstance(value, (list, dict)) or not callable(action.type):
        return value
    if isinstance(value, bool) and action.type is str:
        spelling = "yes" if value else "no"
        raise UserError(f"key '{key}' in {path} reads as the boolean {value}; quote it, e.g. {key}: '{spelling}'")
    try:
        return action.type(str(value))
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        kind = getattr(action.type, "__name__", "value")
        raise UserError(f"key '{key}' in {path} has {value!r}, not a valid {kind}; fix that value") from None


def run_cli(main: Callable[..., T], *types: type, default_config: str | Path | None = None) -> T:
    """`python recipe.py FLAGS`: parses `types` (from `default_config`, --config and the flags) and calls
    `main(*parsed)`; a UserError anywhere becomes one line on stderr and exit code 2, and a process of a
    multi-process run ends as processes.run_to_end says; under a launcher, the process ends with it."""
    die_with_launcher()

    def run() -> T:
        configs = parse_config(*types, default_config=default_config)
        output_dir = next(c.output_dir for c in configs if isinstance(c, TrainingArguments))
        with on_interrupt(lambda: kept(output_dir)):
            return main(*configs)

    return run_to_end(run)
