"""Two processes, unfreezing stages and exact resume: the runs a user cannot afford to get wrong."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_inline, run_recipe, teacher_for
from safetensors.torch import load_file
from test_recipes import RECIPES
from transformers import AutoModelForSequenceClassification

from finetune_recipes.catalog import caches_features
from finetune_recipes.freezing import unfreezing_stages
from finetune_recipes.layers import discover_layers

TWO_PROCESSES = [
    str(Path(sys.executable).parent / "accelerate"),
    "launch",
    "--config_file",
    str(ROOT / "accelerate_configs" / "cpu_2proc.yaml"),
]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_runs_on_two_processes_and_counts_each_example_once(recipe, tiny_args, tiny_model, tmp_path):
    """Trained once per recipe, asserted many times: progressive unfreezing's run is the one of its stages
    (DDP only reduces gradients of parameters it registered: thawed ones must still train and sync), full
    fine-tuning's the one that keeps its best weights on disk (assert_best_weights_kept)."""
    extra = ["--feature_cache_dir", tmp_path / "cache"] if caches_features(recipe) else []
    if recipe == "progressive_unfreezing":
        extra += stage_args([])
    elif recipe == "full_finetune":  # tiny_args' 3 epochs
        extra += ["--metric_for_best_model", "f1_macro", "--checkpointing_steps", "epoch", "--save_total_limit", "1"]
    else:
        extra += ["--num_train_epochs", "2"]
    proc = run_recipe(recipe, *tiny_args, *extra, launcher=TWO_PROCESSES)
    assert "on 2 process(es) (MULTI_CPU)" in proc.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    # 30 validation and 30 test texts do not split evenly into 2 × 16-row batches: padding must not count.
    assert results["eval_samples"] == 30 and results["test_samples"] == 30
    if recipe == "progressive_unfreezing":
        assert_each_stage_trains_its_groups(tmp_path / "out", tiny_model)
    elif recipe == "full_finetune":
        assert_best_weights_kept(tmp_path / "out")


def stage_args(tiny_args: list) -> list:
    """Four stages of four optimizer steps each, a checkpoint at every stage boundary."""
    return [
        *tiny_args,
        "--unfreeze_unit",
        "step",
        "--unfreeze_every",
        "4",
        "--max_train_steps",
        "16",
        "--checkpointing_steps",
        "4",
        "--save_total_limit",
        "10",
        "--warmup_ratio",
        "0",
    ]


def assert_each_stage_trains_its_groups(out: Path, tiny_model: Path) -> None:
    """Between consecutive checkpoints exactly the groups of that stage changed, bit for bit."""
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=3)
    layers = discover_layers(model)
    stages = unfreezing_stages(layers)
    previous = {f"bert.{k}": v for k, v in load_file(tiny_model / "model.safetensors").items()}
    for stage, step in enumerate((4, 8, 12, 16)):
        weights = load_file(out / "checkpoints" / f"step_{step}" / "model.safetensors")
        trained = set(stages[stage]) & set(layers.groups())
        for name, tensor in weights.items():
            if name not in previous:  # the new head has no weights before training
                continue
            changed = not torch.equal(previous[name], tensor)
            assert changed == (layers.group_of(name) in trained), f"stage {stage}: {name} changed={changed}"
        previous = weights


def test_progressive_unfreezing_stages_train_exactly_their_groups(tiny_args, tiny_model, tmp_path):
    run_inline("progressive_unfreezing", *stage_args(tiny_args))
    assert_each_stage_trains_its_groups(tmp_path / "out", tiny_model)


def kill_after_checkpoint(cmd: list[str], checkpoint: Path, timeout: float = 300) -> None:
    """Starts `cmd` and SIGKILLs it as soon as `checkpoint` exists: no clean shutdown of any kind."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    deadline = time.monotonic() + timeout
    while not checkpoint.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {checkpoint.name}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {checkpoint.name} after {timeout} s")
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
@pytest.mark.parametrize(
    ("recipe", "extra"),
    [
        ("full_finetune", []),
        ("progressive_unfreezing", ["--unfreeze_every", "1"]),
        ("full_finetune", ["--sampler", "weighted", "--class_weights", "balanced"]),  # the drawn order repeats
        ("contrastive", ["--num_iterations", "1", "--num_train_epochs", "1"]),  # 24 steps of pairs, then the head
        ("distill", []),  # the teacher's scores ride in the batches: a resume skips the same ones
    ],
)
def test_killed_run_resumes_to_the_same_weights_and_metrics(recipe, extra, tiny_args, tmp_path):
    # 12 optimizer steps per epoch; checkpoints every 5 land mid-epoch.
    common = [*map(str, tiny_args), "--num_train_epochs", "8", "--checkpointing_steps", "5", *extra]
    common = teacher_for(ROOT / "recipes" / f"{recipe}.py", common)  # distill's, given to the killed process too
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_inline(recipe, *common, "--output_dir", straight)
    cmd = [sys.executable, str(ROOT / "recipes" / f"{recipe}.py"), *map(str, common), "--output_dir", str(resumed)]
    kill_after_checkpoint(cmd, resumed / "checkpoints" / "step_10")
    assert not (resumed / "results.json").exists()
    run_inline(recipe, *common, "--output_dir", resumed, "--resume_from_checkpoint", "latest")

    expected, actual = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-6, msg=name)
    metrics = [json.loads((d / "results.json").read_text()) for d in (straight, resumed)]
    for key in ("eval_accuracy", "eval_f1_macro", "test_accuracy", "steps", "history"):
        assert metrics[0][key] == metrics[1][key], key


def assert_best_weights_kept(out: Path) -> None:
    """--metric_for_best_model with --save_total_limit 1: the best evaluation's weights are the ones saved."""
    results = json.loads((out / "results.json").read_text())
    best = max(results["history"], key=lambda h: h["f1_macro"])
    assert results["eval_f1_macro"] == best["f1_macro"]
    # One checkpoint kept (the last), and the best weights its resume would restore: nothing else.
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == sorted({f"step_{results['steps']}", f"best_step_{best['step']}"})
    saved = load_file(out / "model.safetensors")
    best_weights = load_file(out / "checkpoints" / f"best_step_{best['step']}" / "model.safetensors")
    scaling = results["task"].get("calibration", {"scale": {"all": 1.0}, "shift": {"all": 0.0}})
    scale, shift = (torch.tensor(list(scaling[k].values())) for k in ("scale", "shift"))
    for name, tensor in best_weights.items():  # the calibration is folded into the saved head, not the checkpoint's
        if name == "classifier.weight":
            torch.testing.assert_close(saved[name], tensor * scale[:, None], msg=name)
        elif name == "classifier.bias":
            torch.testing.assert_close(saved[name], tensor * scale + shift, msg=name)
        else:
            torch.testing.assert_close(saved[name], tensor, rtol=0, atol=0, msg=name)
