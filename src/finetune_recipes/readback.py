"""Reading back a file a command wrote (a run's config.json, results.json and recipe_config.yaml, cv's plan, a
tokenizer's JSON): a missing, unreadable or damaged one is one line naming it and the fix, never a
JSONDecodeError or a YAML traceback. The standard library and PyYAML only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import UserError, first_line


def read_text(path: Path, fix: str) -> str:
    """`path`'s text; one line when it is missing, a folder, unreadable or not UTF-8, ending with `fix`."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path} is missing; {fix}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is damaged (not UTF-8 text); {fix}") from None
    except OSError as error:
        raise UserError(f"cannot read {path} ({error.strerror or error.__class__.__name__}); {fix}") from None


def read_json(path: Path, fix: str, kind: type = dict) -> Any:
    """`path`'s JSON, which must be a `kind` (an object by default): a truncated or edited file is one line."""
    try:
        value = json.loads(read_text(path, fix))
    except ValueError as error:
        raise UserError(f"{path} is damaged ({first_line(error)}); {fix}") from None
    if not isinstance(value, kind):
        raise UserError(f"{path} is damaged (it holds a {type(value).__name__}, not a {kind.__name__}); {fix}")
    return value


def read_yaml(path: Path, fix: str) -> dict:
    """`path`'s YAML mapping (an empty file is an empty one)."""
    import yaml  # not at the top: `finetune-recipes ls` imports the ground and no YAML

    try:
        value = yaml.safe_load(read_text(path, fix))
    except yaml.YAMLError as error:
        raise UserError(f"{path} is damaged ({first_line(error)}); {fix}") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{path} is damaged (it holds a {type(value).__name__}, not a mapping); {fix}")
    return value
