"""The test harness's own promises: an in-process run (run_inline) ends as a real process does, and a hung
process fails its test with every thread's stack."""

from __future__ import annotations

import sys

import pytest
from conftest import run_inline, run_or_dump, run_recipe


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe, flags",
    [
        ("full_finetune", ["--learnig_rate", "1"]),  # argparse's error
        ("llrd", ["--layer_decay", "1.5"]),  # a range check
        ("static_embeddings", ["--embeddings_file", "nope.txt"]),  # a recipe's own flag, checked before training
    ],
)
def test_an_in_process_run_exits_as_the_real_command_line_does(recipe, flags, tiny_args, tmp_path):
    """The in-process bad-input tests stand for the command line: the same exit code, error line and output."""
    real = run_recipe(recipe, *tiny_args, *flags, check=False)
    inline = run_inline(recipe, *tiny_args, *flags, check=False)
    assert real.returncode == inline.returncode == 2
    assert real.stderr.strip().splitlines()[-1] == inline.stderr.strip().splitlines()[-1]
    assert real.stdout == inline.stdout and "Traceback" not in real.stderr + inline.stderr
    assert not (tmp_path / "out").exists()


def test_a_hung_process_fails_with_its_stacks():
    code = "import time\ndef waiting_forever():\n    time.sleep(600)\nwaiting_forever()\n"
    with pytest.raises(AssertionError, match=r"hung for 2 s; the stacks:(.|\n)*waiting_forever"):
        run_or_dump([sys.executable, "-c", code], timeout=2)
