"""A diverged run never saves: a non-finite loss or non-finite weights stop it with one line, exit code 2,
before an evaluation, a checkpoint or the final save; the last good checkpoint stays the newest."""

from __future__ import annotations

import json

import pytest
from conftest import run_inline

from finetune_recipes.training.checkpoints import TrainState, list_checkpoints

DIVERGE = ["--learning_rate", "1e6", "--max_grad_norm", "0", "--max_train_steps", "6", "--save_total_limit", "10"]


@pytest.mark.parametrize(
    "flags, what",
    [
        (["--logging_steps", "1"], "the training loss is nan"),  # the loss, read at its log line
        (["--logging_steps", "100", "--checkpointing_steps", "1"], "its weights are not finite"),  # at a checkpoint
        (["--logging_steps", "100", "--eval_strategy", "steps", "--eval_steps", "1"], "its weights are not finite"),
    ],
)
def test_a_diverged_run_stops_with_one_line_and_saves_nothing(flags, what, tiny_args, tmp_path):
    out = tmp_path / "out"
    proc = run_inline("full_finetune", *tiny_args, *DIVERGE, *flags, check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("error: training diverged by step "), proc.stderr[-3000:]
    assert what in last and "lower --learning_rate" in last and "Traceback" not in proc.stderr
    assert not (out / "model.safetensors").exists() and not (out / "results.json").exists()
    for checkpoint in list_checkpoints(out):  # each one kept was written before the divergence
        assert TrainState.load(checkpoint)[0].completed_steps < int(last.split("by step ")[1].split()[0])


def test_a_run_that_stays_finite_is_untouched_by_the_checks(tiny_args, tmp_path):
    run_inline("full_finetune", *tiny_args, "--max_train_steps", "4", "--checkpointing_steps", "2")
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["steps"] == 4 and len(list_checkpoints(tmp_path / "out")) == 2
