"""The installed recipes: list them, locate them, copy one out to adapt it."""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.resources
import runpy
import shutil
from pathlib import Path
from typing import Any

from .errors import UserError, listing


def recipes_dir() -> Path:
    """The recipes as installed with the package (the repository's recipes/ in an editable install)."""
    return Path(str(importlib.resources.files("finetune_recipes.recipes")))


def list_recipes() -> dict[str, str]:
    """Recipe name → its description, for every installed recipe."""
    return {path.stem: describe(path) for path in sorted(recipes_dir().glob("*.py")) if not path.name.startswith("_")}


def describe(recipe: str | Path) -> str:
    """The first line of a recipe file's docstring: the one description there is (`ls`, the model card)."""
    return ((ast.get_docstring(ast.parse(Path(recipe).read_text())) or "").splitlines() or [""])[0]


def resolve_recipe(recipe: str | Path) -> Path:
    """An installed recipe's file by name (`llrd`), or a recipe file of the user's own (`my/llrd.py`)."""
    path = Path(recipe)
    if path.suffix == ".py" and path.is_file():
        return path.resolve()
    if str(recipe) not in list_recipes():
        raise UserError(
            f"no recipe '{recipe}'; recipes: {listing(list(list_recipes()), limit=32)}, or a path to a recipe file"
        )
    return recipes_dir() / f"{recipe}.py"


def recipe_config(recipe: Path) -> Path:
    """The default config of a recipe file: configs/<name>.yaml beside it (parse_config falls back to the
    installed one for a recipe copied alone)."""
    return recipe.parent / "configs" / f"{recipe.stem}.yaml"


@functools.cache
def recipe_namespace(recipe: Path) -> dict[str, Any]:
    """What a recipe file defines (its argument dataclasses, SEARCH_SPACE), read without running its main."""
    return runpy.run_path(str(recipe), run_name=f"finetune_recipes_{recipe.stem}")


@functools.cache
def recipe_types(recipe: str | Path) -> tuple[type, ...]:
    """The argument dataclasses a recipe (a name or a file) parses besides the shared ones (LLRD's layer_decay,
    the pooler's feature cache, ...): those its `run_cli(main, ...)` call names, found without running it."""
    from .config import SHARED_TYPES  # here, not at the top: `ls` and `cp` stay light

    path = resolve_recipe(recipe)
    namespace = recipe_namespace(path)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "run_cli":
            names = [a.id for a in node.args[1:] if isinstance(a, ast.Name)]
            return tuple(namespace[n] for n in names if namespace.get(n) not in SHARED_TYPES)
    raise UserError(f"{path} has no run_cli(main, ...) call, so its flags are unknown; end it as the recipes do")


def problem_types(recipe: str | Path) -> tuple[str, ...]:
    """The task shapes a recipe takes: its PROBLEM_TYPES when it declares them (contrastive: no regression),
    else every one."""
    from .config import METRICS

    return tuple(recipe_namespace(resolve_recipe(recipe)).get("PROBLEM_TYPES", tuple(METRICS)))


def caches_features(recipe: str | Path) -> bool:
    """Whether a recipe (a name or a file, a copy included) computes something once from frozen weights and keeps
    it under --feature_cache_dir: whether its dataclasses take that flag (CacheArguments)."""
    return any(f.name == "feature_cache_dir" for t in recipe_types(recipe) for f in dataclasses.fields(t))


def needed_flags(recipe: str | Path) -> tuple[str, ...]:
    """The flags a recipe cannot run without (config.NEEDED in their metadata: distill's --teacher): compare and
    tune leave such a recipe out unless the command gives them."""
    from .config import NEEDED

    return tuple(f.name for t in recipe_types(recipe) for f in dataclasses.fields(t) if f.metadata.get(NEEDED))


def flag_groups(argv: list[str]) -> list[tuple[str, list[str]]]:
    """`--name value...` (or `--name=value`) groups of a command line, each with its field name."""
    groups: list[tuple[str, list[str]]] = []
    for token in argv:
        if token.startswith("--"):
            name = token[2:].split("=", 1)[0].replace("-", "_")
            groups.append((name, [token]))
        elif groups:
            groups[-1][1].append(token)
        else:
            raise UserError(f"'{token}' is not a flag; pass --flag value pairs, run with --help")
    return groups


def given_names(argv: list[str]) -> set[str]:
    """The field names a command line sets (`--no_x` sets `x`)."""
    return {name.removeprefix("no_") for name, _ in flag_groups(argv)}


def flag_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def as_flags(params: dict[str, Any]) -> list[str]:
    return [token for name, value in params.items() for token in (f"--{name}", flag_value(value))]


def copy_recipe(name: str, dest: str | Path, with_config: bool = False) -> list[Path]:
    """Copies recipe `name` (and its YAML under configs/ beside it) to `dest`; never overwrites."""
    recipes = list_recipes()
    if name.removesuffix(".py") not in recipes:
        raise UserError(f"no recipe '{name}'; recipes: {listing(list(recipes), limit=32)}")
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
