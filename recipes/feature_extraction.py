"""Feature extraction: a frozen encoder embeds every text once (cached); only a small head trains.

Flags of its own (FeatureArguments below): `--pooling`, `--head_hidden_size`, `--head_dropout`,
`--encode_batch_size`, `--feature_cache_dir`; `--help` lists the shared ones. Defaults: FeatureArguments
and finetune_recipes.config, then configs/feature_extraction.yaml beside this file (shared flags only),
then the command line.

    python recipes/feature_extraction.py --pooling cls --head_hidden_size 256
    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml recipes/feature_extraction.py

From Python, `main(ModelArguments(...), DataArguments(...), TrainingArguments(...), FeatureArguments(...))`
returns the results. Raises `UserError` (from the command line: one line, exit code 2) for a bad flag,
data set, model or output_dir, or a pooling the encoder lacks. Saves encoder + pooling + head, which
`finetune-recipes predict` runs on raw text.
"""

from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoModel, DataCollatorWithPadding

from finetune_recipes import (
    ClassificationHead,
    DataArguments,
    EncodeArguments,
    FeatureClassifier,
    ModelArguments,
    TrainingArguments,
    build_model,
    build_optimizer,
    cached_features,
    check_pooling,
    feature_loaders,
    freeze,
    param_groups,
    run_cli,
    start_run,
    train,
)

CONFIG = Path(__file__).parent / "configs" / "feature_extraction.yaml"
# What `finetune-recipes tune feature_extraction` searches: the head's rate and width (the cached features are
# computed once for the whole study).
SEARCH_SPACE = {
    "learning_rate": {"low": 1e-4, "high": 3e-2, "log": True},
    "head_hidden_size": {"choices": [0, 256]},
}


@dataclass
class FeatureArguments(EncodeArguments):  # + --encode_batch_size, --feature_cache_dir
    pooling: str = field(default="mean", metadata={"help": "cls, mean (over real tokens) or pooler."})
    head_hidden_size: int = field(default=0, metadata={"help": "0: a linear head; else an MLP of this width."})
    head_dropout: float = 0.1


def loss_step(head, batch, criterion):
    """The loss the loop backpropagates: the task's criterion on the head's logits (cross-entropy; per-label BCE
    for multi-label; MSE for regression; class-weighted with --class_weights). Yours to change (label
    smoothing, a penalty): return any scalar tensor computed from `head` and `batch`."""
    labels = batch.pop("labels")
    return criterion(head(**batch).logits, labels)


def main(model_args, data_args, training_args: TrainingArguments, feats: FeatureArguments) -> dict:
    run = start_run(model_args, data_args, training_args, feats)

    # The encoder never trains: encode every split once, in inference mode, or read the cache.
    encoder = build_model(model_args, run.task, auto_class=AutoModel)
    check_pooling(encoder, feats.pooling)
    freeze(encoder)
    encoder.to(run.accelerator.device)
    splits = {split: getattr(run.data, split) for split in run.loaders}  # train, validation, labelled test
    features = cached_features(
        encoder,
        splits,
        DataCollatorWithPadding(run.tokenizer),
        run.accelerator,
        feats.pooling,
        data_args.max_length,
        feats.feature_cache_dir,
        feats.encode_batch_size,
    )
    # One row per document (a long document's windows averaged); the train split shuffled or class-weighted.
    run.loaders = feature_loaders(features, splits, training_args, data_args)

    # What trains: a linear (or MLP) head on the cached features; a step takes microseconds.
    head = ClassificationHead(
        encoder.config.hidden_size, run.task.num_labels, feats.head_hidden_size, feats.head_dropout
    )
    optimizer = build_optimizer(
        param_groups(head, training_args.learning_rate, training_args.weight_decay), training_args.learning_rate
    )
    schedule = run.build_schedule(optimizer)

    run.prepare(head, optimizer, schedule)
    results = train(run, loss_step)
    # Saved as encoder + pooling + head, which `finetune-recipes predict` runs on raw text.
    return run.finish(results, model=FeatureClassifier(encoder, run.accelerator.unwrap_model(run.model), feats.pooling))


if __name__ == "__main__":
    run_cli(main, ModelArguments, DataArguments, TrainingArguments, FeatureArguments, default_config=CONFIG)
