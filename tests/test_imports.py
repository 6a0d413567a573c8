"""The package's layers, read from its source: no import circle, the ground imports nothing heavy, and the tools
(predict, export, tune, compare, cli) sit on top: nothing below them imports one."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "src" / "finetune_recipes"
TOOLS = {"predict", "export", "tune", "compare", "cv", "audit", "runs", "cli"}
GROUND = {"errors", "atomic", "ownership", "problem_types", "tables"}  # the standard library only


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
    for name, (inside, _) in modules.items():
        short = name.removeprefix("finetune_recipes.")
        if short not in TOOLS and short != "finetune_recipes":
            assert not {m.rsplit(".", 1)[-1] for m in inside} & TOOLS, f"{short} imports a tool: {inside}"


def test_the_configuration_loads_no_metrics_and_the_training_helpers_no_tool():
    code = (
        "import sys, finetune_recipes.config, finetune_recipes.training.save, finetune_recipes.training.resume;"
        "print(sorted(m for m in ('sklearn', 'scipy', 'finetune_recipes.tune', 'finetune_recipes.compare',"
        " 'finetune_recipes.predict', 'finetune_recipes.export', 'optuna', 'matplotlib') if m in sys.modules))"
    )
    config_only = "import sys, finetune_recipes.config; print('sklearn' in sys.modules, 'scipy' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", config_only], capture_output=True, text=True).stdout.split() == [
        "False",
        "False",
    ]
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "['scipy', 'sklearn']", loaded  # the metrics evaluation needs; no tool, no plotting


LIGHT_IMPORTS = {"__future__", "dataclasses", "pathlib", "tqdm", "finetune_recipes"}


def recipes_importing_nothing_heavy() -> list[Path]:
    """The recipes whose own imports are light: a recipe importing peft or a transformers model class loads
    torch itself, as its reader sees on its first lines."""
    found = []
    for path in sorted((ROOT / "recipes").glob("[!_]*.py")):
        tops = {n.module.split(".")[0] for n in ast.parse(path.read_text()).body if isinstance(n, ast.ImportFrom)}
        tops |= {
            a.name.split(".")[0] for n in ast.parse(path.read_text()).body if isinstance(n, ast.Import) for a in n.names
        }
        if tops <= LIGHT_IMPORTS:
            found.append(path)
    return found


def test_bad_data_is_refused_before_torch_and_transformers_load(tmp_path):
    """What the issue measured at 11–15 s (imports, then the check): the flags, output_dir and data are checked
    by run_cli before a builder's module loads. A real process, since what is loaded is the point."""
    recipes = recipes_importing_nothing_heavy()
    assert {p.stem for p in recipes} >= {"full_finetune", "llrd", "progressive_unfreezing", "static_embeddings"}
    bad = tmp_path / "train.csv"
    bad.write_text("text,label\nhello,a\nworld,b\n")
    out = tmp_path / "out"
    probe = (
        "import atexit, runpy, sys\n"
        "atexit.register(lambda: print('LOADED', [m for m in ('torch', 'accelerate', 'transformers.modeling_utils',"
        " 'sklearn') if m in sys.modules], file=sys.stderr))\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    for recipe in recipes:
        args = [str(recipe), "--train_file", str(bad), "--label_column", "topic", "--output_dir", str(out)]
        proc = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (recipe.name, proc.stderr[-2000:])
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert errors == [
            f"error: column 'topic' not in the train split ({bad}), whose columns are text, label; "
            "pass --text_column/--text_pair_column/--label_column"
        ], recipe.name
        assert "LOADED []" in proc.stderr, (recipe.name, proc.stderr[-500:])
        assert not out.exists()


def test_a_deferred_builder_copies_and_pickles():
    import copy
    import pickle

    from finetune_recipes import _Deferred
    from finetune_recipes.modeling import build_model

    deferred = _Deferred("build_model")
    for twin in (copy.copy(deferred), pickle.loads(pickle.dumps(deferred))):  # no recursion before __init__ runs
        assert twin._get() is build_model and twin.__name__ == "build_model"
