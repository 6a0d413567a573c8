"""What the tools that run a recipe many times share (tune, compare, cv): the folder each fills, the paths a run
reads (so a tool never writes where one lies), the flags they refuse or add, and a run's one-line error."""

from __future__ import annotations

import sys
from pathlib import Path

from ..catalog import given_names, recipe_config, recipe_types
from ..config import SHARED_TYPES, RunArgs
from ..errors import UserError
from ..parsing import parse_config

# A held-out test split when the data has none, so the numbers a study reports were never used to choose.
TEST_SPLIT_PERCENTAGE = 10.0


def refuse_hub_flags(given: set[str], instead: str) -> None:
    """Tools that run a recipe many times neither push each run to the Hub nor write a token into their files."""
    hub = sorted(given & {"push_to_hub", "hub_token", "hub_model_id", "hub_private_repo"})
    if hub:
        raise UserError(f"--{hub[0]} is not taken here: {instead} --push_to_hub")


def with_test_split(flags: list[str]) -> list[str]:
    """`flags`, holding out TEST_SPLIT_PERCENTAGE of train as test unless they say otherwise."""
    if "test_split_percentage" in given_names(flags):
        return flags
    return [*flags, "--test_split_percentage", str(TEST_SPLIT_PERCENTAGE)]


def old_name(argv: list[str] | None, flag: str) -> list[str]:
    """`argv`, after a warning when it uses `flag`, the 0.1 name of the tool's --output_dir (argparse reads both)."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a == flag or a.startswith(f"{flag}=") for a in argv):
        print(f"warning: {flag} is now --output_dir, as in every command; {flag} goes in 0.3", file=sys.stderr)
    return argv


def tool_dir(given: str | None, tool: str, recipe: str) -> Path:
    """The folder a tool fills: --output_dir, by default outputs/TOOL/RECIPE; an empty one is refused (Path("")
    would be the working directory)."""
    default = Path("outputs") / tool / recipe
    if given is not None and not given.strip():
        raise UserError(f"--output_dir is empty; pass a folder, or drop it for {default}")
    return Path(given or default)


def error_line(log: Path) -> str:
    """The trial's own one-line error (a recipe's `error: ...`), else where to read what went wrong."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    return next((line for line in reversed(lines) if line.startswith("error: ")), f"see {log}")


def flag_inputs(recipe: Path, flags: list[str]) -> list[str]:
    """The paths a run of `recipe` on `flags` reads (data files, a local model, a vectors file), resolved before
    anything runs, so that a tool never writes where one lies."""
    configs = parse_config(*SHARED_TYPES, *recipe_types(recipe), args=flags, default_config=recipe_config(recipe),
                           announce=False)  # fmt: skip
    return RunArgs.of(recipe, *configs[: len(SHARED_TYPES) + len(recipe_types(recipe))]).inputs()
