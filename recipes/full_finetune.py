"""Full fine-tuning: every weight of the pretrained encoder and a new classification head trains.

Flags of its own: none; `--help` lists the shared model, data and training flags. Defaults: the dataclasses
in finetune_recipes.config, then configs/full_finetune.yaml beside this file, then the command line.

    python recipes/full_finetune.py --learning_rate 3e-5 --train_file train.csv --validation_file dev.csv
    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml recipes/full_finetune.py

From Python, `main(ModelArguments(...), DataArguments(...), TrainingArguments(...))` returns the results.
Raises `UserError` (from the command line: one line, exit code 2) for a bad flag, data set, model or
output_dir, before training starts.
"""

from pathlib import Path

from finetune_recipes import (
    DataArguments,
    ModelArguments,
    TrainingArguments,
    build_model,
    build_optimizer,
    param_groups,
    run_cli,
    start_run,
    train,
)

CONFIG = Path(__file__).parent / "configs" / "full_finetune.yaml"
# What `finetune-recipes tune full_finetune` searches (flag: range, log-scale for rates; or choices). Yours to edit.
SEARCH_SPACE = {
    "learning_rate": {"low": 1e-5, "high": 2e-4, "log": True},
    "num_train_epochs": {"low": 1, "high": 4},
    "warmup_ratio": {"low": 0.0, "high": 0.2},
}


def loss_step(model, batch, criterion):
    """The loss the loop backpropagates: the task's criterion on the model's logits (cross-entropy; per-label BCE
    for multi-label; MSE for regression; class-weighted with --class_weights). Yours to change (label
    smoothing, a penalty): return any scalar tensor computed from `model` and `batch`."""
    labels = batch.pop("labels")
    return criterion(model(**batch).logits, labels)


def main(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> dict:
    # Tokenizer and data: labels fixed from train, a stratified validation split when none is given.
    run = start_run(model_args, data_args, training_args)

    # Model: the pretrained encoder with a new head sized to the labels.
    model = build_model(model_args, run.task)

    # What trains: everything, at one learning rate; no weight decay on biases and norms.
    groups = param_groups(model, training_args.learning_rate, training_args.weight_decay)
    optimizer = build_optimizer(groups, training_args.learning_rate)
    schedule = run.build_schedule(optimizer)

    run.prepare(model, optimizer, schedule)
    results = train(run, loss_step)
    return run.finish(results)  # test metrics, then model, tokenizer, results.json, recipe_config.yaml


if __name__ == "__main__":
    run_cli(main, ModelArguments, DataArguments, TrainingArguments, default_config=CONFIG)
