"""Copy and adapt, as a user does: `finetune-recipes cp`, then edit only the copy. Each edit is a line or two of
the recipe's own loop, and each changes what the run does, measured against the unedited recipe."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_inline
from safetensors.torch import load_file

from finetune_recipes.config import DataArguments, ModelArguments, TrainingArguments
from finetune_recipes.parsing import parse_config
from finetune_recipes.tools.cli import main as cli

LOSS = "loss = data.task.loss(model(**batch).logits, labels)  # cross-entropy, BCE or MSE; class-weighted\n"
# The evaluation's condition, as the recipe writes it: three lines, one per reason to evaluate.
EVALUATE = """            (training_args.eval_strategy == "steps" and step % training_args.eval_steps == 0)
            or (training_args.eval_strategy == "epoch" and epoch_end)
            or step == schedule.total_steps
"""
PREPARE = "model, optimizer, schedule.scheduler, train_loader, eval_loader, test_loader\n"
STEPPED = "optimizer.zero_grad(set_to_none=True)\n"
SAVED = "model=model, tokenizer=tokenizer"


def copy_of(recipe: str, dest: Path, *edits: tuple[str, str]) -> Path:
    """`finetune-recipes cp recipe dest`, then each (old, new) edit made in the copy, where `old` stands once."""
    cli(["cp", recipe, str(dest)])
    path = dest if dest.suffix == ".py" else dest / f"{recipe}.py"
    source = path.read_text()
    for old, new in edits:
        assert source.count(old) == 1, old
        source = source.replace(old, new)
    path.write_text(source)
    return path


def pretrained_encoder(tiny_model) -> dict[str, torch.Tensor]:
    """The tiny BERT's weights, named as inside the classifier a recipe saves."""
    return {f"bert.{k}": v for k, v in load_file(Path(tiny_model) / "model.safetensors").items()}


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def plain(tiny_args_module, tmp_path_factory):
    """The unedited full_finetune, 25 steps, a loss logged at each: what every edit is measured against."""
    out = tmp_path_factory.mktemp("plain") / "out"
    run_inline("full_finetune", *tiny_args_module, "--output_dir", out)
    return out


@pytest.fixture(scope="module")
def tiny_args_module(module_args):
    return [
        *module_args,
        "--learning_rate",
        "3e-3",
        "--max_train_steps",
        "25",
        "--logging_steps",
        "1",
        "--warmup_ratio",
        "0",
    ]


def test_evaluation_every_10_steps_and_at_a_step_of_my_choosing_is_one_edited_condition(
    plain, tiny_args_module, tmp_path
):
    mine = "            step % 10 == 0 or step == 3\n"
    copy = copy_of("full_finetune", tmp_path / "mine", (EVALUATE, mine))
    run_inline(copy, *tiny_args_module, "--output_dir", tmp_path / "out")
    # Exactly the steps the edited condition names: one site decides, so the ends of epochs (12 and 24 of the
    # plain run) and of the run (25) are no longer evaluated; the final evaluation scores the weights it ends with.
    edited = results(tmp_path / "out")
    assert [h["step"] for h in edited["history"]] == [3, 10, 20]
    assert [h["step"] for h in results(plain)["history"]] == [12, 24, 25]
    assert edited["eval_accuracy"] == results(plain)["eval_accuracy"]  # the same final weights, scored once more
    assert results(tmp_path / "out")["loss_history"] == results(plain)["loss_history"]  # evaluating changes nothing


def test_an_l2_sp_penalty_keeps_the_encoder_near_its_pretrained_weights(plain, tiny_args_module, tiny_model, tmp_path):
    start = "    progress = tqdm("
    anchor = "    start = {n: p.detach().clone() for n, p in model.named_parameters()}  # L2-SP: the pretrained point\n"
    penalty = (
        LOSS.rstrip("\n")
        + "\n"
        + " " * 12
        + ("loss = loss + 100.0 * sum(((p - start[n]) ** 2).sum() for n, p in model.named_parameters())\n")
    )
    copy = copy_of("full_finetune", tmp_path / "mine", (start, anchor + start), (LOSS, penalty))
    run_inline(copy, *tiny_args_module, "--output_dir", tmp_path / "out")
    pretrained = pretrained_encoder(tiny_model)

    def moved(out: Path) -> float:
        saved = load_file(out / "model.safetensors")
        return sum(float((saved[k] - v).norm()) for k, v in pretrained.items())

    assert moved(tmp_path / "out") < 0.5 * moved(plain), (moved(tmp_path / "out"), moved(plain))


def test_a_cosine_schedule_with_restarts_from_torch_replaces_the_built_one(plain, tiny_args_module, tmp_path):
    restarts = PREPARE.replace(
        "schedule.scheduler", "torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=5)"
    )
    copy = copy_of(
        "full_finetune", tmp_path / "mine", (PREPARE, restarts), ("from pathlib", "import torch\nfrom pathlib")
    )
    run_inline(copy, *tiny_args_module, "--output_dir", tmp_path / "out")
    lrs = {r["step"]: r["lr"] for r in results(tmp_path / "out")["loss_history"]}
    assert lrs[5] == lrs[10] == lrs[20] == pytest.approx(3e-3)  # back at the top after every 5 steps
    assert lrs[3] < lrs[2] < lrs[1] < 3e-3
    plain_lrs = [r["lr"] for r in results(plain)["loss_history"]]
    assert plain_lrs == sorted(plain_lrs, reverse=True)  # the built linear decay never climbs


def test_an_ema_of_the_weights_after_every_optimizer_step_is_saved_instead_of_the_raw_weights(
    plain, tiny_args_module, tiny_model, tmp_path
):
    start = "    progress = tqdm("
    ema = (
        "    ema = torch.optim.swa_utils.AveragedModel(\n"
        "        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.8), use_buffers=True\n"
        "    )\n"
    )
    update = STEPPED + " " * 16 + "ema.update_parameters(model)\n"
    copy = copy_of(
        "full_finetune",
        tmp_path / "mine",
        ("from pathlib", "import torch\nfrom pathlib"),
        (start, ema + start),
        (STEPPED, update),
        (SAVED, "model=ema.module, tokenizer=tokenizer"),
    )
    run_inline(copy, *tiny_args_module, "--output_dir", tmp_path / "out")
    assert results(tmp_path / "out")["loss_history"] == results(plain)["loss_history"]  # the same training
    saved, raw = load_file(tmp_path / "out" / "model.safetensors"), load_file(plain / "model.safetensors")
    pretrained = pretrained_encoder(tiny_model)
    key = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(saved[key], raw[key])  # the average, not the last weights
    assert float((saved[key] - raw[key]).norm()) < float((pretrained[key] - raw[key]).norm())  # of the late steps


def test_main_called_from_python_records_the_recipes_own_name(tiny_args_module, tmp_path, monkeypatch):
    copy = copy_of("full_finetune", tmp_path / "my_finetune.py")
    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher.py", "-f", "kernel.json"])  # as in a notebook
    types = (ModelArguments, DataArguments, TrainingArguments)
    args = [*map(str, tiny_args_module), "--max_train_steps", "2", "--output_dir", str(tmp_path / "out")]
    returned = runpy.run_path(str(copy))["main"](*parse_config(*types, args=args, announce=False))
    assert returned["strategy"] == results(tmp_path / "out")["strategy"] == "my_finetune"
