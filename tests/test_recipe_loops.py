"""The recipes' loops agree, as accelerate's ExampleDifferenceTests keeps its examples to their base loop: every
recipe's loop (from its first line, the resume, to `progress.close()`) equals full_finetune.py's but for the lines
marked `# Strategy`. The recipes are copies by design; this keeps a fix to one loop from missing the others, and a
strategy's change visible as what it is."""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest
from conftest import ROOT

BASE = ROOT / "recipes" / "full_finetune.py"
MARK = "# Strategy"


def loop_of(path: Path) -> list[str]:
    """The loop's lines: from the resume (the first line after the loop's comment) to `progress.close()`."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "= resume_state(" in line)
    end = next(i for i, line in enumerate(lines) if i > start and line.strip() == "progress.close()")
    return lines[start : end + 1]


def unmarked_differences(base: list[str], loop: list[str]) -> list[str]:
    """The lines where `loop` differs from `base` with no `# Strategy` mark, as `- base` and `+ loop` lines: a
    change must be lines of its own, each marked (a removal too: a marked line says what stands instead)."""
    differing = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=base, b=loop, autojunk=False).get_opcodes():
        ours = loop[j1:j2]
        if tag != "equal" and not (ours and all(MARK in line for line in ours)):
            differing += [f"- {line}" for line in base[i1:i2]] + [f"+ {line}" for line in ours]
    return differing


@pytest.mark.parametrize("recipe", sorted(p.stem for p in (ROOT / "recipes").glob("[!_]*.py")))
def test_each_recipes_loop_is_full_finetunes_but_for_its_strategy_lines(recipe):
    differing = unmarked_differences(loop_of(BASE), loop_of(ROOT / "recipes" / f"{recipe}.py"))
    assert not differing, f"{recipe}'s loop differs from full_finetune's outside # Strategy lines:\n" + "\n".join(
        differing
    )


def test_a_change_that_is_not_marked_as_the_strategy_is_found_and_a_marked_one_is_not():
    base = loop_of(BASE)
    step = next(i for i, line in enumerate(base) if line.strip() == "optimizer.zero_grad(set_to_none=True)")
    unmarked = [*base[:step], base[step].replace("set_to_none=True", "set_to_none=False"), *base[step + 1 :]]
    assert unmarked_differences(base, unmarked) == [f"- {base[step]}", f"+ {unmarked[step]}"]
    marked = [*unmarked[:step], unmarked[step] + "  # Strategy: keep the zeros", *unmarked[step + 1 :]]
    assert unmarked_differences(base, marked) == []
    dropped = [*base[:step], *base[step + 1 :]]  # a line gone without a marked line in its place
    assert unmarked_differences(base, dropped) == [f"- {base[step]}"]
    assert len(base) > 30 and base[-1].strip() == "progress.close()"
