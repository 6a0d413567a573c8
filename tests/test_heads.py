"""Starting from a model that already has a classification head (an earlier run's output, a fine-tuned Hub
classifier): the head is kept only when it classifies the same labels, else a new one is drawn and a line says
so; a head of another size (other label count, regression) never crashes the load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_inline
from safetensors.torch import load_file
from test_task_shapes import SHAPE_FLAGS, shape_args, shapes  # noqa: F401  (shapes: a fixture)

HEAD = "classifier.weight"


@pytest.fixture(scope="module")
def classifier(tiny_args_module, tmp_path_factory) -> Path:
    """A 3-topic classifier trained from the tiny encoder: the starting point of every test here."""
    out = tmp_path_factory.mktemp("start") / "out"
    run_inline("full_finetune", *tiny_args_module, "--output_dir", out)
    return out


@pytest.fixture(scope="module")
def tiny_args_module(module_args):
    return [*module_args, "--max_train_steps", "4"]


def from_classifier(args: list, classifier: Path, out: Path, *extra) -> tuple[str, dict]:
    """Trains with the rate ~0 from `classifier`, uncalibrated: the saved head is the head the run started with."""
    flags = [*map(str, args), "--model_name_or_path", str(classifier), "--output_dir", str(out)]
    proc = run_inline("full_finetune", *flags, "--learning_rate", "1e-12", "--calibration", "none", *extra)
    return proc.stderr, load_file(out / "model.safetensors")


def test_the_same_labels_keep_the_head(classifier, tiny_args_module, tmp_path):
    log, saved = from_classifier(tiny_args_module, classifier, tmp_path / "out")
    assert "already classifies these labels: training continues from its head" in log
    torch.testing.assert_close(saved[HEAD], load_file(classifier / "model.safetensors")[HEAD])


def test_other_labels_of_the_same_count_get_a_new_head(classifier, tiny_args_module, tiny_data, tmp_path):
    renamed = {}
    for split in ("train", "validation"):
        text = tiny_data[split].read_text()
        for old, new in (("business", "money"), ("sport", "games"), ("tech", "gadgets")):
            text = text.replace(f",{old}\n", f",{new}\n")
        renamed[split] = tmp_path / f"{split}.csv"
        renamed[split].write_text(text)
    args = shape_args(tiny_args_module, renamed)
    log, saved = from_classifier(args, classifier, tmp_path / "out")
    before, after = "business, sport, tech (single-label)", "gadgets, games, money (single-label)"
    assert f"has a head for {before}; a new head is trained for {after}" in log
    assert not torch.allclose(saved[HEAD], load_file(classifier / "model.safetensors")[HEAD])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert list(config["id2label"].values()) == ["gadgets", "games", "money"]


@pytest.mark.parametrize("shape", ["multi", "regression"])
def test_a_head_of_another_size_is_replaced_not_a_traceback(shape, classifier, tiny_args_module, shapes, tmp_path):  # noqa: F811
    args = shape_args(tiny_args_module, {k: v for k, v in shapes[shape].items() if k != "test"}, *SHAPE_FLAGS[shape])
    log, saved = from_classifier(args, classifier, tmp_path / "out")
    kind = {"multi": "business, sport, tech (multi-label)", "regression": "score (regression)"}[shape]
    assert f"a new head is trained for {kind}" in log and "Traceback" not in log
    assert saved[HEAD].shape[0] == (1 if shape == "regression" else 3)
