"""The package's layers, read from its source: no import circle, the ground imports nothing heavy, the tools
(finetune_recipes.tools) sit on top and nothing below them imports one; and the recipes import real objects,
plainly, from finetune_recipes.kit."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGE = ROOT / "src" / "finetune_recipes"
GROUND = {"errors", "atomic", "ownership", "processes"}  # the standard library only
RECIPES = sorted((ROOT / "recipes").glob("[!_]*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> tuple[set[str], set[str]]:
    """(the package's modules `path` imports, anywhere in it: lazy and TYPE_CHECKING imports count; the
    top-level names of the other packages it imports)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    inside, outside = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            inside |= {t for t in (target, *(f"{target}.{a.name}" for a in node.names)) if t in modules}
        elif isinstance(node, ast.ImportFrom | ast.Import):
            names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            for full in names:
                (inside if full.startswith("finetune_recipes") else outside).add(
                    full if full.startswith("finetune_recipes") else full.split(".")[0]
                )
    return inside - {name}, outside


def graph() -> dict[str, tuple[set[str], set[str]]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports(path, set(paths)) for name, path in paths.items()}


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as the modules along it, or None."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return [*path[path.index(nxt) :], nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = "done"
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_cycle_finds_a_circle_and_only_a_circle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_package_has_no_import_circle():
    edges = {name: inside for name, (inside, _) in graph().items()}
    assert cycle(edges) is None, " → ".join(cycle(edges))


def test_the_ground_imports_only_the_standard_library_and_nothing_imports_a_tool():
    modules = graph()
    for name in GROUND:
        inside, outside = modules[f"finetune_recipes.{name}"]
        assert outside <= set(sys.stdlib_module_names) | {"__future__"}, (name, outside)
        assert {m.rsplit(".", 1)[-1] for m in inside} <= GROUND, (name, inside)
    tools = {name for name in modules if name.startswith("finetune_recipes.tools")}
    assert {"finetune_recipes.tools.cli", "finetune_recipes.tools.predict", "finetune_recipes.tools.cv"} <= tools
    for name, (inside, _) in modules.items():
        if name not in tools:
            assert not inside & tools, f"{name} imports a tool: {sorted(inside & tools)}"


def test_the_package_root_the_command_line_and_the_onnx_path_load_no_torch():
    code = (
        "import sys, finetune_recipes, finetune_recipes.tools.cli, finetune_recipes.tools.predict;"
        "print(sorted(m for m in ('torch', 'transformers', 'accelerate', 'sklearn') if m in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_the_configuration_loads_no_metrics_and_the_training_helpers_no_tool():
    code = (
        "import sys, finetune_recipes.config, finetune_recipes.training.save, finetune_recipes.training.start;"
        "print(sorted(m for m in sys.modules if m.startswith('finetune_recipes.tools')"
        " or m.split('.')[0] in ('sklearn', 'scipy', 'optuna', 'matplotlib')))"
    )
    config_only = "import sys, finetune_recipes.config; print('sklearn' in sys.modules, 'scipy' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", config_only], capture_output=True, text=True).stdout.split() == [
        "False",
        "False",
    ]
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert {m.split(".")[0] for m in eval(loaded)} == {"scipy", "sklearn"}, loaded  # the metrics; no tool, no plot


def kit_imports(path: Path) -> tuple[set[str], set[str]]:
    """(the names a recipe file imports from finetune_recipes.kit; the other finetune_recipes modules it imports)."""
    names, others = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("finetune_recipes"):
            if node.module == "finetune_recipes.kit":
                names |= {a.name for a in node.names}
            else:
                others.add(node.module)
        elif isinstance(node, ast.Import):
            others |= {a.name for a in node.names if a.name.startswith("finetune_recipes")}
    return names, others


def test_the_kit_is_what_the_recipes_import_and_the_recipes_import_only_the_kit():
    from finetune_recipes import kit

    imported = set()
    for recipe in RECIPES:
        names, others = kit_imports(recipe)
        assert names and not others, (recipe.name, others)
        imported |= names
    assert imported == set(kit.__all__), (sorted(imported - set(kit.__all__)), sorted(set(kit.__all__) - imported))


def test_every_name_of_the_kit_is_the_real_object_with_its_own_signature_and_docs():
    from finetune_recipes import kit

    for name in kit.__all__:
        value = getattr(kit, name)
        if isinstance(value, str):  # ON_RESUME, a metadata key
            continue
        assert value.__module__.startswith("finetune_recipes.") and value.__module__ != kit.__name__, name
        module_file = Path(inspect.getsourcefile(inspect.unwrap(value)))
        assert module_file.stem in (value.__module__.rsplit(".", 1)[-1], "__init__"), name
        assert value.__doc__, name
        if inspect.isfunction(value):
            assert "*args" not in str(inspect.signature(value)) or name == "run_cli", name
    assert "model_args" in inspect.signature(kit.build_model).parameters


def test_code_importing_from_the_package_root_keeps_working_and_is_told_the_new_import():
    """Code written before 0.2.0 imports the recipes' names from the package root: the same objects, one warning
    each naming the import to write."""
    import finetune_recipes
    from finetune_recipes import kit

    names, _ = kit_imports(ROOT / "recipes" / "full_finetune.py")
    old = f"from finetune_recipes import {', '.join(sorted(names))}"
    namespace: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(old, namespace)
    assert all(namespace[n] is getattr(kit, n) for n in names)
    messages = {str(w.message) for w in caught if w.category is FutureWarning}
    assert (
        "`from finetune_recipes import build_model` is the import of recipes copied before 0.2.0; write "
        "`from finetune_recipes.kit import build_model`" in messages
    )
    with pytest.raises(AttributeError, match="finetune_recipes.kit"):
        finetune_recipes.no_such_builder  # noqa: B018
    from finetune_recipes import tools  # a subpackage is a submodule, not a moved name

    assert tools.__name__ == "finetune_recipes.tools"


# The import block of recipes/full_finetune.py at 0.1 (commit 9318c45), as a copy made then holds it.
IMPORTS_OF_0_1 = (
    "DataArguments, LossMeter, ModelArguments, RunArgs, TrainingArguments, Validation, build_accelerator, "
    "build_dataloaders, build_model, build_optimizer, build_schedule, check_outputs, checkpoint_due, epoch_batches, "
    "evaluate, load_data, param_groups, push_to_hub, run_cli, save_checkpoint, save_run, start_training, "
    "wrap_blocks_not_embeddings"
)


def test_a_recipe_copied_from_0_1_stops_at_its_imports_saying_to_copy_it_again():
    with pytest.raises(ImportError) as refused:
        exec(f"from finetune_recipes import ({IMPORTS_OF_0_1})", {})
    assert str(refused.value).startswith("finetune_recipes.Validation (a recipe copied from 0.1) was replaced in ")
    assert "copy the recipe again (finetune-recipes cp RECIPE DEST)" in str(refused.value)
