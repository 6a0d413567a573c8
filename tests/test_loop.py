"""The shared loop's bookkeeping: step counts, best-model tracking, early stopping, checkpoint discovery."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from finetune_recipes.config import TrainingArguments
from finetune_recipes.errors import UserError
from finetune_recipes.optim import build_schedule
from finetune_recipes.ownership import check_output_dir, write_manifest
from finetune_recipes.training.checkpoints import (
    TrainState,
    list_checkpoints,
    resolve_checkpoint,
    restore_best,
    save_best,
)
from finetune_recipes.training.early_stopping import EarlyStopping
from finetune_recipes.training.start import train_batches


def test_steps_per_epoch_counts_each_process_share_and_accumulation():
    optimizer = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters())

    def schedule(batches: int, processes: int, **flags):
        return build_schedule(optimizer, range(batches), TrainingArguments(**flags), processes)

    assert schedule(60, 1).steps_per_epoch == 60
    assert schedule(61, 2).steps_per_epoch == 31  # the last batch pads out the odd one
    assert schedule(61, 2, gradient_accumulation_steps=4).steps_per_epoch == 8
    assert schedule(10, 1, num_train_epochs=2.5).total_steps == 25
    assert schedule(10, 1, max_train_steps=7).total_steps == 7
    assert schedule(10, 1, num_train_epochs=2.5).num_epochs == 3
    with pytest.raises(UserError, match="no training steps"):
        schedule(10, 1, num_train_epochs=0)
    with pytest.raises(UserError, match="eval_steps 30 is more than the run's 20"):
        schedule(10, 1, num_train_epochs=2, eval_strategy="steps", eval_steps=30)


def test_early_stopping_ranks_evaluations_and_stops_after_patience_without_improvement():
    stopping = EarlyStopping("accuracy", patience=2)
    fed = [(10, 0.5, True, False), (20, 0.8, True, False), (30, 0.7, False, False), (40, 0.8, False, True)]
    for step, accuracy, improved, stop in fed:
        assert stopping.update(step, {"accuracy": accuracy}) is improved and stopping.stop is stop
    assert (stopping.best_step, stopping.best_metric) == (20, 0.8)
    lower = EarlyStopping("mse", patience=None)  # lower is better; no patience: the best kept, no stop
    assert [lower.update(s, {"mse": v}) for s, v in [(1, 2.0), (2, 1.0), (3, 1.5), (4, 3.0)]] == [1, 1, 0, 0]
    assert lower.best_step == 2 and not lower.stop
    undefined = EarlyStopping("pearson", patience=1)  # a correlation of constant predictions never improves
    assert not undefined.update(1, {"pearson": None}) and undefined.stop
    nothing = EarlyStopping()  # no --metric_for_best_model: nothing ranked, nothing stops
    assert not nothing.update(1, {"accuracy": 1.0}) and not nothing.stop and nothing.best_step is None
    with pytest.raises(UserError, match="metric_for_best_model 'loss' is not one of accuracy"):
        EarlyStopping("loss").update(1, {"accuracy": 0.5})


def test_the_best_weights_are_kept_on_disk_and_restored_then_removed_when_no_checkpoint_needs_them(tmp_path):
    model, accelerator = torch.nn.Linear(2, 2), Accelerator(cpu=True)
    for step in (10, 20):
        save_best(accelerator, model, str(tmp_path), step)
        with torch.no_grad():
            model.weight.add_(1.0)  # training moves on after each evaluation
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["best_step_20"]  # only the newest best
    kept = load_file(tmp_path / "checkpoints" / "best_step_20" / "model.safetensors")["weight"]
    assert not torch.equal(model.weight.detach(), kept)
    restore_best(accelerator, model, TrainingArguments(output_dir=str(tmp_path)), 20)
    torch.testing.assert_close(model.weight.detach(), kept)
    assert not (tmp_path / "checkpoints").exists()  # scratch when the run keeps no checkpoints


def test_train_state_round_trips_through_its_json_file_with_the_early_stopping_counts(tmp_path):
    state = TrainState(completed_steps=5, history=[{"accuracy": 0.5}], loss_history=[{"step": 5, "loss": 1.0}])
    stopping = EarlyStopping("accuracy", 3, best_metric=0.5, best_step=4, evals_without_improvement=1)
    state.save(tmp_path, stopping)
    counts = {"best_metric": 0.5, "best_step": 4, "evals_without_improvement": 1}
    assert TrainState.load(tmp_path) == (state, counts)
    old = {"completed_steps": 5, "epoch": 1, "batches_in_epoch": 3, "best_metric": 0.5, "best_step": 4,
           "evals_without_improvement": 1, "history": [], "loss_history": [], "fingerprint": {}}  # fmt: skip
    (tmp_path / "trainer_state.json").write_text(json.dumps(old))  # a checkpoint of 0.1
    with pytest.raises(UserError, match="written by finetune-recipes 0.1, whose loop checkpointed and evaluated"):
        TrainState.load(tmp_path)


def test_the_batches_a_resumed_run_skips_follow_from_its_step_count():
    loader = Accelerator(cpu=True).prepare(torch.utils.data.DataLoader(range(5)))  # 5 batches, 2 a step: 2, 2, 1
    schedule = SimpleNamespace(steps_per_epoch=3, accumulation_steps=2, num_epochs=3)

    def batches(completed_steps: int) -> list[int]:
        return [int(b) for b in train_batches(loader, schedule, completed_steps)]

    assert batches(0) == [*range(5)] * 3
    assert batches(4) == [2, 3, 4, *range(5)]  # epoch 1, one step in: its first two batches skipped
    assert batches(6) == [*range(5)]  # the last epoch from its start


def test_latest_checkpoint_ignores_partial_saves_and_orders_numerically(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step_5", "step_40", "step_100", ".partial_step_120", "step_x"):
        (root / name).mkdir(parents=True)
        (root / name / "index.json").write_text("{}")  # complete: every file it lists (none) is there
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_5", "step_40", "step_100"]
    assert resolve_checkpoint(tmp_path, "latest").name == "step_100"
    assert resolve_checkpoint(tmp_path, str(root / "step_5")).name == "step_5"
    with pytest.raises(UserError, match="does not exist"):
        resolve_checkpoint(tmp_path, str(root / "step_7"))
    with pytest.raises(UserError, match="no checkpoint"):
        resolve_checkpoint(tmp_path / "elsewhere", "latest")


def test_output_dir_rules(tmp_path):
    out = tmp_path / "out"
    check_output_dir(TrainingArguments(output_dir=str(out)))  # missing: fine
    out.mkdir()
    check_output_dir(TrainingArguments(output_dir=str(out)))  # empty: fine
    (out / "results.json").write_text("{}")
    with pytest.raises(UserError, match="--overwrite_output_dir"):
        check_output_dir(TrainingArguments(output_dir=str(out)))
    with pytest.raises(UserError, match="'results.json', which no run wrote"):  # no manifest says a run wrote it
        check_output_dir(TrainingArguments(output_dir=str(out), overwrite_output_dir=True))
    write_manifest(out, ["results.json"], set())
    check_output_dir(TrainingArguments(output_dir=str(out), overwrite_output_dir=True))
    check_output_dir(TrainingArguments(output_dir=str(out), resume_from_checkpoint="latest"))
    with pytest.raises(UserError, match="is a file"):
        check_output_dir(TrainingArguments(output_dir=str(out / "results.json")))


def test_fsdp2_wraps_the_blocks_but_not_the_module_holding_the_input_embedding():
    from types import SimpleNamespace

    from peft import LoraConfig, TaskType, get_peft_model
    from tiny import build_tiny

    from finetune_recipes.training.accelerator import wrap_blocks_not_embeddings

    for model in (build_tiny("bert"), get_peft_model(build_tiny("bert"), LoraConfig(task_type=TaskType.SEQ_CLS))):
        plugin = SimpleNamespace(fsdp_version=2, transformer_cls_names_to_wrap=None)
        wrap_blocks_not_embeddings(SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)), model)
        assert plugin.transformer_cls_names_to_wrap == ["BertLayer"]  # not BertEmbeddings
    plugin = SimpleNamespace(fsdp_version=2, transformer_cls_names_to_wrap=["BertEmbeddings"])  # the user's choice
    wrap_blocks_not_embeddings(SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)), build_tiny("bert"))
    assert plugin.transformer_cls_names_to_wrap == ["BertEmbeddings"]


@pytest.mark.parametrize(
    "device, bf16, expected",
    [("cuda", True, "bf16"), ("cuda", False, "fp16"), ("cpu", True, "bf16"), ("cpu", False, "no")],
)
def test_mixed_precision_auto_by_device(device, bf16, expected, monkeypatch):
    import torch

    from finetune_recipes.training import accelerator

    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda: torch.device(device))
    monkeypatch.setattr(accelerator, "bf16_supported", lambda d: bf16)
    assert accelerator.resolve_mixed_precision("auto") == expected
    assert accelerator.resolve_mixed_precision("fp16") == "fp16"  # what the user asked for stands


@pytest.mark.parametrize(
    "env, refused",
    [
        ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1"}, True),  # --cpu --num_machines 2
        ({"ACCELERATE_USE_CPU": "False", "MASTER_ADDR": "10.0.0.1"}, False),  # one GPU inside a cluster job
        ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": "2"}, False),
        ({"MASTER_ADDR": "10.0.0.1"}, False),  # plain python, no launcher
    ],
)
def test_a_lone_process_of_a_multi_process_launch_refuses(env, refused, monkeypatch):
    from accelerate.utils import DistributedType

    from finetune_recipes.errors import UserError
    from finetune_recipes.training import accelerator as precision

    for key in ("ACCELERATE_USE_CPU", "MASTER_ADDR", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # The accelerator as such a launch leaves it, one process: a real one would join the process group WORLD_SIZE
    # asks for and wait there for a second process.
    alone = SimpleNamespace(num_processes=1, distributed_type=DistributedType.NO)
    if refused:
        with pytest.raises(UserError, match="this process runs alone"):
            precision.check_launch(alone)
    else:
        precision.check_launch(alone)


def test_the_flags_a_resume_may_change_are_marked_on_their_fields():
    """Read from each field's metadata (ON_RESUME), the recipes' own flags included: the list once kept by hand."""
    from finetune_recipes.catalog import list_recipes, recipe_types
    from finetune_recipes.config import SHARED_TYPES, resume_may_change

    recipe_args = {t for recipe in list_recipes() for t in recipe_types(recipe)}
    configs = [t() for t in (*SHARED_TYPES, *recipe_args)]
    assert resume_may_change(*configs) == {
        "output_dir", "logging_steps", "report_to", "per_device_eval_batch_size", "checkpointing_steps",
        "save_total_limit", "eval_strategy", "eval_steps", "metric_for_best_model", "early_stopping_patience",
        "feature_cache_dir", "encode_batch_size", "merge_adapter", "plot_lr", "allow_config_change_on_resume",
        "gradient_checkpointing", "push_to_hub", "hub_model_id", "hub_private_repo", "calibration",
        "dataset_name", "dataset_config_name", "train_file", "validation_file", "test_file",
    }  # fmt: skip
