"""Every recipe end to end on a tiny BERT: what it trains, what it saves, and how it refuses bad input."""

from __future__ import annotations

import csv
import json
from dataclasses import fields
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import ROOT, run_inline
from safetensors.torch import load_file
from tiny import build_tiny, tiny_configs
from transformers import AutoModelForSequenceClassification, pipeline

from finetune_recipes.catalog import caches_features, list_recipes
from finetune_recipes.kit import UserError, discover_layers, freeze, on_cached_states, set_trainable
from finetune_recipes.tools.predict import predict

RECIPES = list(list_recipes())  # every installed recipe: a new one is tested by every test that takes this
LABELS = {"business", "sport", "tech"}


def base_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


def saved_weights(out: Path) -> dict[str, torch.Tensor]:
    """Base-model weights of a saved classifier, under the names the base checkpoint uses."""
    return {k.removeprefix("bert."): v for k, v in load_file(out / "model.safetensors").items()}


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_trains_saves_and_predicts(recipe, tiny_args, tmp_path):
    extra = ["--feature_cache_dir", tmp_path / "cache"] if caches_features(recipe) else []
    run_inline(recipe, *tiny_args, *extra)
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    assert results["eval_samples"] == 30 and results["test_samples"] == 30
    assert 0 < results["trainable_params"] <= results["total_params"]
    for key in ("eval_accuracy", "eval_f1_macro", "test_accuracy", "train_runtime_s", "peak_memory_mb"):
        assert key in results
    assert (out / "recipe_config.yaml").exists()
    predictions = predict(out, ["market bank profit share price", "goal match team win cup"])
    assert {p["label"] for p in predictions} <= LABELS
    assert all(0 < p["score"] <= 1 for p in predictions)


def test_full_finetune_learns_and_pipeline_reads_the_labels(tiny_args, tmp_path):
    run_inline("full_finetune", *tiny_args, "--num_train_epochs", "8", "--learning_rate", "3e-3")
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["eval_accuracy"] > 0.5  # chance is 1/3
    classify = pipeline("text-classification", model=str(tmp_path / "out"))
    assert {p["label"] for p in classify(["market bank profit", "goal team win"])} <= LABELS


def test_frozen_base_pooler_trains_only_pooler_and_head(tiny_args, tiny_model, tmp_path):
    run_inline("frozen_base_pooler", *tiny_args)
    before, after = base_weights(tiny_model), saved_weights(tmp_path / "out")
    for name, tensor in before.items():
        if name.startswith("pooler."):
            assert not torch.equal(tensor, after[name]), name
        else:
            assert torch.equal(tensor, after[name]), name


@pytest.mark.parametrize("name", sorted(tiny_configs()))
def test_pooler_and_head_on_cached_first_token_states_give_the_whole_models_logits(name):
    model = build_tiny(name).eval()
    set_trainable(model, discover_layers(model), ["pooler", "head"])
    ids = torch.randint(5, 60, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    whole = model(input_ids=ids, attention_mask=mask).logits
    states = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
    assert torch.allclose(on_cached_states(model)(inputs_embeds=states).logits, whole, atol=1e-5)


def test_on_cached_states_refuses_a_trainable_layer_below_the_first_token_state():
    model = build_tiny("bert")
    freeze(model)
    model.bert.encoder.layer[1].output.dense.weight.requires_grad_(True)
    with pytest.raises(UserError, match="bert.encoder.layer.1.output.dense.weight trains but runs before"):
        on_cached_states(model)
    config = tiny_configs()["modernbert"]
    config.classifier_pooling = "mean"
    with pytest.raises(UserError, match="pools every token for its head"):
        on_cached_states(AutoModelForSequenceClassification.from_config(config))


def test_frozen_base_pooler_encodes_once_then_reads_the_cache(tiny_args, tmp_path):
    cache = ["--feature_cache_dir", tmp_path / "cache"]
    first = run_inline("frozen_base_pooler", *tiny_args, *cache)
    assert "encode train" in first.stderr and len(list((tmp_path / "cache").glob("*.safetensors"))) == 3
    second = run_inline("frozen_base_pooler", *tiny_args, *cache, "--overwrite_output_dir")
    assert "encode train" not in second.stderr and "from cache" in second.stderr
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert any(k.startswith("bert.encoder.") for k in saved) and "classifier.weight" in saved
    classify = pipeline("text-classification", model=str(tmp_path / "out"))  # a whole classifier was saved
    assert {p["label"] for p in classify(["market bank profit", "goal team win"])} <= LABELS


def test_feature_extraction_encoder_frozen_and_cache_skips_encoding(tiny_args, tiny_model, tmp_path):
    cache = tmp_path / "cache"
    first = run_inline("feature_extraction", *tiny_args, "--feature_cache_dir", cache)
    assert "encode train" in first.stderr and len(list(cache.glob("*.safetensors"))) == 3
    second = run_inline("feature_extraction", *tiny_args, "--feature_cache_dir", cache, "--overwrite_output_dir")
    assert "encode train" not in second.stderr and "from cache" in second.stderr
    before, after = base_weights(tiny_model), saved_weights(tmp_path / "out")
    assert all(torch.equal(t, after[n]) for n, t in before.items())
    # A different pooling is a different encoding: the cache must not be reused.
    third = run_inline(
        "feature_extraction", *tiny_args, "--feature_cache_dir", cache, "--overwrite_output_dir", "--pooling", "cls"
    )
    assert "encode train" in third.stderr


def test_lora_trains_adapters_and_head_only_and_merges(tiny_args, tiny_model, tmp_path):
    run_inline("lora", *tiny_args, "--merge_adapter")
    out = tmp_path / "out"
    adapter = load_file(out / "adapter_model.safetensors")
    assert any("lora_A" in k for k in adapter) and any("classifier" in k for k in adapter)
    assert all("lora_" in k or "classifier" in k for k in adapter)
    results = json.loads((out / "results.json").read_text())
    assert results["trainable_params"] < results["total_params"] / 2
    texts = ["market bank profit share price", "goal match team win cup", "phone chip data code"]
    adapter_preds = predict(out, texts)
    merged_preds = predict(out / "merged", texts)
    assert [p["label"] for p in adapter_preds] == [p["label"] for p in merged_preds]
    for a, m in zip(adapter_preds, merged_preds, strict=True):
        assert a["score"] == pytest.approx(m["score"], abs=1e-3)
    assert {p["label"] for p in pipeline("text-classification", model=str(out / "merged"))(texts)} <= LABELS


def replace(args: list, flag: str, value) -> list:
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


def same_file(path: Path) -> list[tuple[str, Path]]:
    return [("--train_file", path), ("--validation_file", path), ("--test_file", path)]


def bad_inputs(tmp: Path, data: dict[str, Path]) -> dict[str, tuple[str, list, str]]:
    """case → (recipe, how to change the tiny args, what the error line must say)."""
    (tmp / "empty.csv").write_text("text,label\n")
    (tmp / "garbage.parquet").write_bytes(b"\x00not parquet at all")
    (tmp / "unseen.csv").write_text("text,label\nmarket bank,business\ngoal team,weather\n")
    (tmp / "typo.yaml").write_text("learning_rate: 1e-3\nlearnig_rate: 2e-3\n")
    (tmp / "one_class.csv").write_text("text,label\nmarket bank,business\nshares rose,business\n")
    # A CSV's cells are texts as written ('1' is a text); JSON says which values are numbers.
    (tmp / "numbers.jsonl").write_text("".join(f'{{"text": {i}, "label": "sport"}}\n' for i in range(4)))
    (tmp / "pairs.jsonl").write_text('{"text": ["a", "b"], "label": "sport"}\n{"text": ["c", "d"], "label": "tech"}\n')
    (tmp / "mixed.jsonl").write_text('{"text": 5, "label": "sport"}\n{"text": "goal", "label": "tech"}\n')
    (tmp / "nolabel.csv").write_text("text\nmarket bank\ngoal team\n")
    (tmp / "folder.csv").mkdir()
    pq.write_table(pa.table({"text": [{"title": "t", "body": "b"}] * 2, "label": ["sport", "tech"]}), tmp / "s.parquet")
    return {
        "missing text column": ("full_finetune", ["--text_column", "body"], "columns are text, label"),
        "missing label column": ("full_finetune", ["--label_column", "topic"], "columns are text, label"),
        "empty split": ("full_finetune", [("--validation_file", tmp / "empty.csv")], "split is empty"),
        "unknown config key": ("full_finetune", ["--config", tmp / "typo.yaml"], "unknown key 'learnig_rate'"),
        "unknown flag": ("full_finetune", ["--learnig_rate", "1"], "learnig_rate"),
        "model path": (
            "full_finetune",
            [("--model_name_or_path", tmp / "no-such-model")],
            "no-such-model does not exist",
        ),
        "model hub id": ("full_finetune", [("--model_name_or_path", "nobody/no-such-model")], "cannot load model"),
        "unreadable data": (
            "full_finetune",
            [
                ("--train_file", tmp / "garbage.parquet"),
                ("--validation_file", tmp / "garbage.parquet"),
                ("--test_file", tmp / "garbage.parquet"),
            ],
            "garbage.parquet (ArrowInvalid",
        ),
        "numbers as text": ("full_finetune", same_file(tmp / "numbers.jsonl"), "holds int64 values, not text"),
        "lists as text": (
            "full_finetune",
            same_file(tmp / "pairs.jsonl"),
            "pairs.jsonl) holds lists, not text; pass --text_column a column of strings (for text pairs",
        ),
        "mixed types": (
            "full_finetune",
            same_file(tmp / "mixed.jsonl"),
            "holds values of mixed types",
        ),
        "struct column": (
            "full_finetune",
            same_file(tmp / "s.parquet"),
            "column 'text' of the train split",
        ),
        "validation without labels": (
            "full_finetune",
            [("--validation_file", tmp / "nolabel.csv")],
            "column 'label' not in the validation split (",
        ),
        "folder named .csv": ("full_finetune", [("--train_file", tmp / "folder.csv")], "folder.csv is a folder"),
        "type error": ("full_finetune", ["--num_train_epochs", "x"], "invalid float value: 'x'; run with --help"),
        "label column is the text": ("full_finetune", ["--label_column", "text"], "… (96 in all)"),
        "max_length over limit": ("full_finetune", [("--max_length", 1000)], "max_length 1000 is outside 1..64"),
        "unseen validation label": ("full_finetune", [("--validation_file", tmp / "unseen.csv")], "label 'weather'"),
        "layer_decay": ("llrd", ["--layer_decay", "1.5"], "layer_decay is 1.5; pass a value above 0 and at most 1"),
        "negative learning rate": ("llrd", ["--learning_rate=-1e-3"], "learning_rate is -0.001; pass a rate above 0"),
        "pooling without pooler": ("feature_extraction", ["--pooling", "max"], "pooling 'max' is not one of"),
        "bad unfreeze schedule": ("progressive_unfreezing", ["--unfreeze_schedule", "5,3"], "unfreeze_schedule"),
        "one class": ("full_finetune", [("--train_file", tmp / "one_class.csv")], "classification needs at least two"),
        "negative max_grad_norm": (
            "full_finetune",
            ["--max_grad_norm", "-1"],
            "max_grad_norm is -1.0; pass a value at least 0",
        ),
        "negative save_total_limit": ("full_finetune", ["--save_total_limit", "-1"], "save_total_limit is -1"),
        "zero max_train_samples": ("full_finetune", ["--max_train_samples", "0"], "max_train_samples is 0"),
        "nan learning_rate": (
            "full_finetune",
            ["--learning_rate", "nan"],
            "learning_rate is nan; pass a finite number",
        ),
        "infinite epochs": ("full_finetune", ["--num_train_epochs", "inf"], "num_train_epochs is inf"),
        "negative seed": ("full_finetune", ["--seed", "-1"], "seed is -1"),
        "unknown tracker": ("full_finetune", ["--report_to", "bogus"], "report_to 'bogus' is not one of"),
        "zero lora_r": ("lora", ["--lora_r", "0"], "lora_r is 0"),
        "lora_dropout over 1": ("lora", ["--lora_dropout", "2"], "lora_dropout is 2.0"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing text column",
        "missing label column",
        "empty split",
        "unknown config key",
        "unknown flag",
        "model path",
        "unreadable data",
        "max_length over limit",
        "unseen validation label",
        "layer_decay",
        "negative learning rate",
        "pooling without pooler",
        "bad unfreeze schedule",
        "one class",
        "negative max_grad_norm",
        "negative save_total_limit",
        "zero max_train_samples",
        "nan learning_rate",
        "infinite epochs",
        "negative seed",
        "unknown tracker",
        "zero lora_r",
        "lora_dropout over 1",
        "model hub id",
        "numbers as text",
        "lists as text",
        "mixed types",
        "struct column",
        "validation without labels",
        "folder named .csv",
        "type error",
        "label column is the text",
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(case, tiny_args, tiny_data, tmp_path):
    recipe, change, expected = bad_inputs(tmp_path, tiny_data)[case]
    args = list(tiny_args)
    for item in change:
        args = replace(args, *item) if isinstance(item, tuple) else args
    args += [c for c in change if not isinstance(c, tuple)]
    proc = run_inline(recipe, *args, check=False)
    code, err = proc.returncode, proc.stderr
    assert code == 2
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last, err
    assert len(last) < 600 and "usage:" not in err  # one readable line, no usage block
    assert not (tmp_path / "out").exists()


def test_non_empty_output_dir_is_not_overwritten(tiny_args, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    proc = run_inline("full_finetune", *tiny_args, check=False)
    code, err = proc.returncode, proc.stderr
    assert code == 2 and "--overwrite_output_dir" in err.strip().splitlines()[-1]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_schedule_counts_optimizer_steps_under_accumulation_and_overwrite_starts_clean(tiny_args, tmp_path):
    out = tmp_path / "out"
    run_inline(
        "full_finetune", *tiny_args, "--gradient_accumulation_steps", "2", "--max_train_steps", "6",
        "--checkpointing_steps", "3", "--warmup_ratio", "0",
    )  # fmt: skip
    scheduler = torch.load(out / "checkpoints" / "step_3" / "scheduler.bin", weights_only=False)
    assert scheduler["last_epoch"] == 3  # three optimizer steps of two micro-batches each, not six
    assert scheduler["_last_lr"][0] == pytest.approx(1e-3 * (6 - 3) / 6)
    (out / "feature_head.json").write_text("{}")  # a file no run wrote (not in the manifest): the user's
    run_inline("full_finetune", *tiny_args, "--max_train_steps", "2", "--overwrite_output_dir")
    assert not (out / "checkpoints").exists() and (out / "feature_head.json").read_text() == "{}"
    saved = (out / "recipe_config.yaml").read_text()
    assert "overwrite_output_dir" not in saved and "output_dir" in saved


def test_lora_with_a_manual_layer_mapping_on_an_architecture_discovery_cannot_map(tiny_args, tmp_path, monkeypatch):
    import finetune_recipes.layers as layers

    def unmappable(model, *args):
        raise layers.LayerDiscoveryError(f"cannot map {type(model).__name__}; pass --layer_mapping")

    monkeypatch.setattr(layers, "_find_blocks", unmappable)  # as for an architecture discovery does not know
    mapping = "embeddings=bert.embeddings,blocks=bert.encoder.layer,pooler=bert.pooler"
    args = [*map(str, tiny_args), "--num_train_epochs", "1", "--layer_mapping", mapping]
    run_inline("lora", *args)
    adapter = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert any("encoder.layer.1.attention" in k and "lora_A" in k for k in adapter)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_yaml_holds_only_overrides_and_starts_with_its_launch_command(recipe):
    from finetune_recipes.config import DataArguments, ModelArguments, TrainingArguments

    text = (ROOT / "recipes" / "configs" / f"{recipe}.yaml").read_text()
    assert text.startswith("# accelerate launch ") and f"recipes/{recipe}.py" in text.splitlines()[0]
    defaults = {f.name: f.default for t in (ModelArguments, DataArguments, TrainingArguments) for f in fields(t)}
    for key, value in yaml.safe_load(text).items():
        assert key in defaults, f"{key}: the recipe's own flags keep their defaults in the recipe's dataclass"
        assert value != defaults[key], f"{key}: {value} repeats the default"


def test_eval_strategy_steps_evaluates_every_eval_steps_and_at_the_end(tiny_args, tmp_path):
    run_inline("full_finetune", *tiny_args, "--max_train_steps", "10", "--eval_strategy", "steps", "--eval_steps", "4")
    history = json.loads((tmp_path / "out" / "results.json").read_text())["history"]
    assert [h["step"] for h in history] == [4, 8, 10]


def test_best_model_is_restored_from_disk_and_leaves_no_scratch(tiny_args, tiny_data, tmp_path):
    args = [*tiny_args, "--eval_strategy", "steps", "--eval_steps", "3", "--metric_for_best_model", "accuracy"]
    run_inline("full_finetune", *args)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    best = max(h["accuracy"] for h in results["history"])
    assert results["eval_accuracy"] == best
    assert not (tmp_path / "out" / "checkpoints").exists()
    # The saved model is the best evaluation's: it scores that accuracy again on the validation texts.
    rows = list(csv.DictReader(tiny_data["validation"].open()))
    labels = [p["label"] for p in predict(tmp_path / "out", [r["text"] for r in rows])]
    assert sum(p == r["label"] for p, r in zip(labels, rows, strict=True)) / len(rows) == pytest.approx(best)


@pytest.mark.bf16
def test_bf16_asked_for_trains_encodes_and_predicts_in_bf16(tiny_args, tmp_path):
    """The one tiny run in bf16 (every other test pins fp32, for its tolerances): it computes in bf16 on any CPU,
    natively where the CPU has AVX-512 BF16 or AMX, emulated elsewhere."""
    bf16 = replace(tiny_args, "--mixed_precision", "bf16")
    proc = run_inline("full_finetune", *bf16, "--num_train_epochs", "8", "--learning_rate", "3e-3")
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    assert "bf16 precision" in proc.stderr and results["hardware"]["precision"] == "bf16"
    assert results["eval_accuracy"] > 0.5  # it learns (chance is 1/3)
    texts = ["market bank profit share price", "goal match team win cup", "phone chip data code"]
    half, full = predict(out, texts, bf16=True), predict(out, texts, bf16=False)
    assert [p["label"] for p in half] == [p["label"] for p in full]
    assert [p["score"] for p in half] == pytest.approx([p["score"] for p in full], abs=0.05)
    # Features are encoded in the run's precision: a bf16 encoding is not an fp32 one, cached apart.
    cache = ["--feature_cache_dir", tmp_path / "cache", "--overwrite_output_dir"]
    assert "encode train" in run_inline("feature_extraction", *tiny_args, *cache).stderr
    assert "encode train" in run_inline("feature_extraction", *bf16, *cache).stderr
    assert "encode train" not in run_inline("feature_extraction", *bf16, *cache).stderr


@pytest.mark.parametrize("recipe", RECIPES)
def test_help_lists_every_flag_the_recipe_takes(recipe):
    from finetune_recipes.catalog import recipe_types
    from finetune_recipes.config import SHARED_TYPES

    proc = run_inline(recipe, "--help", check=False)
    assert proc.returncode == 0, proc.stderr
    for flag in (f.name for t in (*SHARED_TYPES, *recipe_types(recipe)) for f in fields(t) if f.init):
        assert f"--{flag}" in proc.stdout, flag


def test_a_stage_that_begins_at_the_last_step_never_thaws(tiny_args, tmp_path):
    # Stages 1 and 2 begin at steps 2 and 4, the run's last: stage 2's block must stay frozen, as stage_starts says.
    flags = ["--max_train_steps", "4", "--unfreeze_unit", "step", "--unfreeze_schedule", "2,4"]
    proc = run_inline("progressive_unfreezing", *tiny_args, *flags)
    assert "step 2: stage 1" in proc.stdout and "stage 2" not in proc.stdout.split("Unfreezing schedule")[1]
    once = json.loads((tmp_path / "out" / "results.json").read_text())["trainable_params"]
    flags = ["--max_train_steps", "4", "--unfreeze_unit", "step", "--unfreeze_schedule", "2,100"]
    run_inline("progressive_unfreezing", *tiny_args, *flags, "--overwrite_output_dir")
    assert json.loads((tmp_path / "out" / "results.json").read_text())["trainable_params"] == once
