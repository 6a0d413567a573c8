"""A recipe's search space (its SEARCH_SPACE, or a YAML file): read, checked against the recipe's own flags and
range checks before the first trial, and sampled by an Optuna trial."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from ..catalog import flag_value, recipe_namespace
from ..errors import UserError
from ..parsing import parse_config


def search_space(recipe: Path, file: str | None = None) -> dict[str, dict]:
    """The recipe's SEARCH_SPACE (flag → {low, high[, log]} or {choices}), or the one in a YAML `file`."""
    if file is None:
        space = recipe_namespace(recipe).get("SEARCH_SPACE")
        if not space:
            raise UserError(f"{recipe.name} declares no SEARCH_SPACE; add one to the recipe or pass --search_space")
        return space
    try:
        space = yaml.safe_load(Path(file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise UserError(f"cannot read search space {file} ({error.__class__.__name__}); pass a YAML file") from None
    if not isinstance(space, dict) or not space:
        raise UserError(f"{file} holds no search space; write flag: {{low: L, high: H}} or flag: {{choices: [...]}}")
    return space


def check_space(space: dict[str, Any], types: tuple[type, ...], given: set[str], recipe: str) -> None:
    """Every entry names a flag of the recipe, not one given on the command line, with a non-empty range whose
    ends (or choices) the recipe's own parser accepts. Checked before the first trial."""
    flags = {f.name for t in types for f in fields(t)}
    for name, spec in space.items():
        if name not in flags:
            raise UserError(f"the search space names --{name}, which {recipe} does not take; remove it")
        if name in ("output_dir", "report_to", "resume_from_checkpoint", "overwrite_output_dir"):
            raise UserError(f"the search space names --{name}, which tune sets for each trial; remove it")
        unknown = sorted(set(spec) - {"low", "high", "log", "choices"}) if isinstance(spec, dict) else []
        if unknown:
            raise UserError(f"search space entry {name} has '{unknown[0]}'; write low, high (and log), or choices")
        if name in given:
            raise UserError(f"--{name} is in the search space; drop it from the command line or from the space")
        if not isinstance(spec, dict) or not ({"choices"} <= set(spec) or {"low", "high"} <= set(spec)):
            raise UserError(f"search space entry {name} needs low and high, or choices")
        if "choices" in spec:
            values = spec["choices"]
            if not isinstance(values, list) or not values:
                raise UserError(f"search space entry {name} has no choices; list at least one")
        else:
            low, high = spec["low"], spec["high"]
            if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (low, high)):
                hint = " (YAML reads 1e-5 as text: write 1.0e-5)" if str in (type(low), type(high)) else ""
                raise UserError(
                    f"search space entry {name} needs numbers for low and high, not {low!r}, {high!r}{hint}"
                )
            if not low < high:
                kind = "empty" if low == high else "inverted"
                raise UserError(f"search space entry {name} is {kind} (low {low}, high {high}); make low < high")
            if spec.get("log") and low <= 0:
                raise UserError(f"search space entry {name} is on a log scale, so low must be above 0, not {low}")
            values = [low, high]
        for value in values:  # the recipe's own types and range checks, on each end or choice
            try:
                parse_config(*types, args=[f"--{name}", flag_value(value)])
            except UserError as error:
                raise UserError(f"search space entry {name}: {error}") from None


def suggest(trial, space: dict[str, dict]) -> dict[str, Any]:
    """One value per entry: categorical for choices, integer when both ends are integers, else float."""
    values = {}
    for name, spec in space.items():
        if "choices" in spec:
            values[name] = trial.suggest_categorical(name, spec["choices"])
        elif isinstance(spec["low"], int) and isinstance(spec["high"], int):
            values[name] = trial.suggest_int(name, spec["low"], spec["high"], log=bool(spec.get("log")))
        else:
            values[name] = trial.suggest_float(name, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log")))
    return values
