"""The installed recipes: list them, locate them, copy one out to adapt it."""

from __future__ import annotations

import ast
import importlib.resources
import shutil
from pathlib import Path

from .errors import UserError, listing

# The recipes that compute something once from frozen weights and take --feature_cache_dir (CacheArguments).
CACHED_RECIPES = frozenset({"feature_extraction", "frozen_base_pooler", "static_embeddings"})


def recipes_dir() -> Path:
    """The recipes as installed with the package (the repository's recipes/ in an editable install)."""
    return Path(str(importlib.resources.files("finetune_recipes.recipes")))


def list_recipes() -> dict[str, str]:
    """Recipe name → the first line of its module docstring, the one description there is."""
    return {
        path.stem: (ast.get_docstring(ast.parse(path.read_text())) or "").splitlines()[0]
        for path in sorted(recipes_dir().glob("*.py"))
        if not path.name.startswith("_")
    }


def copy_recipe(name: str, dest: str | Path, with_config: bool = False) -> list[Path]:
    """Copies recipe `name` (and its YAML under configs/ beside it) to `dest`; never overwrites."""
    recipes = list_recipes()
    if name.removesuffix(".py") not in recipes:
        raise UserError(f"no recipe '{name}'; recipes: {listing(list(recipes))}")
    name = name.removesuffix(".py")
    # Anything not named *.py is a directory, created when missing (cp llrd mydir/).
    target = Path(dest) if str(dest).endswith(".py") else Path(dest) / f"{name}.py"
    blocking = next((p for p in [target.parent, *target.parent.parents] if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise UserError(f"{blocking} is a file, not a folder; copy to a folder or to a path ending in .py")
    copies = {recipes_dir() / f"{name}.py": target}
    if with_config:
        copies[recipes_dir() / "configs" / f"{name}.yaml"] = target.parent / "configs" / f"{name}.yaml"
    existing = [str(t) for t in copies.values() if t.exists()]
    if existing:
        raise UserError(f"{existing[0]} exists; remove it or copy to another destination")
    for source, copy in copies.items():
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, copy)
    return list(copies.values())
