"""Frozen base, trainable pooler: the encoder stays fixed, only its pooler and a new head train.

The frozen encoder runs once: each split's first-token states (all that the pooler and the head read) are
encoded in inference mode and cached like feature extraction's features; training then runs the pooler
and head alone on them. The saved model is the whole classifier, which `pipeline()` loads.

Flags of its own (EncodeArguments): `--encode_batch_size`, `--feature_cache_dir`; `--help` lists the shared
model, data and training flags (`--layer_mapping` for an architecture layer discovery cannot map).
Defaults: finetune_recipes.config, then configs/frozen_base_pooler.yaml beside this file, then the command
line.

    python recipes/frozen_base_pooler.py --learning_rate 1e-3
    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml recipes/frozen_base_pooler.py

From Python, `main(ModelArguments(...), DataArguments(...), TrainingArguments(...), EncodeArguments(...))`
returns the results. Raises `UserError` (from the command line: one line, exit code 2) for a bad flag, data
set, model or output_dir, or a model whose layers cannot be mapped, before training starts.
"""

from pathlib import Path

from transformers import DataCollatorWithPadding

from finetune_recipes import (
    DataArguments,
    EncodeArguments,
    ModelArguments,
    TrainingArguments,
    build_model,
    build_optimizer,
    cached_features,
    discover_layers,
    feature_loaders,
    format_trainable,
    on_cached_states,
    param_groups,
    run_cli,
    set_trainable,
    start_run,
    train,
)

CONFIG = Path(__file__).parent / "configs" / "frozen_base_pooler.yaml"
# What `finetune-recipes tune frozen_base_pooler` searches: the rate and length of training of the pooler and head
# (their width is the encoder's; the first-token states are encoded once for the whole study).
SEARCH_SPACE = {
    "learning_rate": {"low": 2e-4, "high": 1e-2, "log": True},
    "num_train_epochs": {"low": 1, "high": 4},
}


def loss_step(model, batch, criterion):
    """The loss the loop backpropagates: the task's criterion on the model's logits (cross-entropy; per-label BCE
    for multi-label; MSE for regression; class-weighted with --class_weights). Yours to change (label
    smoothing, a penalty): return any scalar tensor computed from `model` and `batch`."""
    labels = batch.pop("labels")
    return criterion(model(**batch).logits, labels)


def main(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments, cache=None) -> dict:
    cache = cache or EncodeArguments()
    run = start_run(model_args, data_args, training_args, cache)
    model = build_model(model_args, run.task)

    # What trains: the pooler (pretrained, one dense layer over the first token) and the new head.
    # Models without a pooler (RoBERTa, DistilBERT, ELECTRA, DeBERTa) keep their dense pre-classifier
    # layer in the head, so for them "pooler + head" is the whole head, and we say so.
    layers = discover_layers(model, model_args.layer_mapping)
    if not layers.pooler:
        run.accelerator.print(f"{type(model).__name__} has no pooler: training its classification head only.")
    set_trainable(model, layers, ["pooler", "head"])
    run.accelerator.print(format_trainable(model, layers))

    top = on_cached_states(model)  # the model's own pooler and head, over first-token states

    # The frozen encoder runs once, in eval mode (no dropout): every split's first-token states, or the cache.
    model.to(run.accelerator.device)
    splits = {split: getattr(run.data, split) for split in run.loaders}  # train, validation, labelled test
    collator = DataCollatorWithPadding(run.tokenizer)
    states = cached_features(
        model.base_model,
        splits,
        collator,
        run.accelerator,
        "cls",
        data_args.max_length,
        cache.feature_cache_dir,
        cache.encode_batch_size,
    )
    # A long document's windows stay examples of their own, scored and averaged as the saved model will.
    run.loaders = feature_loaders(states, splits, training_args, data_args, "inputs_embeds", average_windows=False)

    groups = param_groups(top, training_args.learning_rate, training_args.weight_decay)
    optimizer = build_optimizer(groups, training_args.learning_rate)
    schedule = run.build_schedule(optimizer)

    run.prepare(top, optimizer, schedule)
    results = train(run, loss_step)
    return run.finish(results, model=model)  # the whole classifier, with the trained pooler and head


if __name__ == "__main__":
    run_cli(main, ModelArguments, DataArguments, TrainingArguments, EncodeArguments, default_config=CONFIG)
