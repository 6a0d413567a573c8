"""Static word vectors: a bag of pretrained vectors (or a BiLSTM over them) and a head; no transformer runs.

The path users learn first and the cheapest baseline a contextual encoder must beat. The vectors are the
encoder's input embedding table (default: the word pieces of --model_name_or_path, no transformer layer
runs), model2vec's distillation of the encoder (`--embeddings distill`), or a GloVe / word2vec / fastText
text file (`--embeddings_file`, read with a word-level tokenizer over the training words).

Flags of its own (StaticArguments): `--embeddings`, `--embeddings_file`, `--lowercase`, `--min_coverage`,
`--freeze_embeddings`, `--encoder bag|lstm`, `--lstm_hidden_size`, `--head_hidden_size`, `--dropout`,
`--feature_cache_dir`; `--help` lists the shared ones. Defaults: StaticArguments and finetune_recipes.config,
then configs/static_embeddings.yaml beside this file, then the command line.

    python recipes/static_embeddings.py --encoder lstm --embeddings_file glove.6B.300d.txt
    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml recipes/static_embeddings.py

From Python, `main(ModelArguments(...), DataArguments(...), TrainingArguments(...), StaticArguments(...))`
returns the results. Raises `UserError` (from the command line: one line, exit code 2) for a bad flag, data
set or vectors file, before training starts. The saved model loads with `AutoModelForSequenceClassification`
and `pipeline()` once `finetune_recipes.static` is imported, and `finetune-recipes predict` runs it.
"""

from pathlib import Path

from finetune_recipes import (
    DataArguments,
    ModelArguments,
    StaticArguments,
    TrainingArguments,
    build_optimizer,
    build_static_model,
    count_parameters,
    load_vectors,
    param_groups,
    run_cli,
    start_run,
    train,
)

CONFIG = Path(__file__).parent / "configs" / "static_embeddings.yaml"
# What `finetune-recipes tune static_embeddings` searches: the rate and the head's width.
SEARCH_SPACE = {
    "learning_rate": {"low": 1e-3, "high": 5e-2, "log": True},
    "head_hidden_size": {"choices": [0, 256]},
}


def loss_step(model, batch, criterion):
    """The loss the loop backpropagates: the task's criterion on the model's logits (cross-entropy; per-label BCE
    for multi-label; MSE for regression; class-weighted with --class_weights). Yours to change (label
    smoothing, a penalty): return any scalar tensor computed from `model` and `batch`."""
    labels = batch.pop("labels")
    return criterion(model(**batch).logits, labels)


def main(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments, static) -> dict:
    # The vectors bring their tokenizer (word pieces or words), so they come before the data.
    vectors = load_vectors(model_args, data_args, training_args, static)
    run = start_run(model_args, data_args, training_args, static, tokenizer=vectors.tokenizer)
    if vectors.coverage:
        run.accelerator.print(vectors.coverage)
    model = build_static_model(vectors, run.task, static)

    # What trains: the head, and the LSTM with --encoder lstm; the vectors only with --freeze_embeddings false.
    trainable, total = count_parameters(model)
    run.accelerator.print(f"trainable: {trainable:,} of {total:,} parameters ({trainable / total:.2%})")

    groups = param_groups(model, training_args.learning_rate, training_args.weight_decay)
    optimizer = build_optimizer(groups, training_args.learning_rate)
    schedule = run.build_schedule(optimizer)

    run.prepare(model, optimizer, schedule)
    results = train(run, loss_step)
    return run.finish(results)


if __name__ == "__main__":
    run_cli(main, ModelArguments, DataArguments, TrainingArguments, StaticArguments, default_config=CONFIG)
