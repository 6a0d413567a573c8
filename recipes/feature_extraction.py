"""Feature extraction: a frozen encoder embeds every text once (cached); only a small head trains."""

from dataclasses import dataclass, field
from pathlib import Path

import datasets
from transformers import AutoModel, DataCollatorWithPadding

from finetune_recipes.config import (
    DataArguments,
    ModelArguments,
    TrainingArguments,
    config_to_dict,
    entrypoint,
    parse_config,
)
from finetune_recipes.data import labelled, load_data
from finetune_recipes.features import (
    ClassificationHead,
    FeatureClassifier,
    cached_features,
    check_pooling,
    feature_dataloader,
)
from finetune_recipes.freezing import freeze
from finetune_recipes.loop import (
    build_accelerator,
    build_schedule,
    check_output_dir,
    save_outputs,
    test_results,
    train,
)
from finetune_recipes.modeling import build_model
from finetune_recipes.optim import build_optimizer, param_groups

CONFIG = Path(__file__).parent / "configs" / "feature_extraction.yaml"


@dataclass
class FeatureArguments:
    pooling: str = field(default="mean", metadata={"help": "cls, mean (over real tokens) or pooler."})
    head_hidden_size: int = field(default=0, metadata={"help": "0: a linear head; else an MLP of this width."})
    head_dropout: float = 0.1
    encode_batch_size: int = 64
    feature_cache_dir: str = field(
        default=str(Path(datasets.config.HF_DATASETS_CACHE) / "finetune_recipes" / "features"),
        metadata={"help": "Where encoded features are kept between runs."},
    )


@entrypoint
def main() -> None:
    model_args, data_args, args, feats = parse_config(
        ModelArguments, DataArguments, TrainingArguments, FeatureArguments, default_config=CONFIG
    )
    check_output_dir(args)
    accelerator = build_accelerator(args)

    tokenizer, data = load_data(model_args, data_args, args.seed, accelerator)

    # The encoder never trains: encode every split once, in inference mode, or read the cache.
    encoder = build_model(model_args.model_name_or_path, data.label_names, auto_class=AutoModel)
    check_pooling(encoder, feats.pooling)
    freeze(encoder)
    encoder.to(accelerator.device)
    splits = {"train": data.train, "validation": data.validation}
    if labelled(data.test) is not None:
        splits["test"] = data.test
    features = cached_features(
        encoder,
        splits,
        DataCollatorWithPadding(tokenizer),
        accelerator,
        feats.pooling,
        data_args.max_length,
        feats.feature_cache_dir,
        feats.encode_batch_size,
    )
    loaders = {
        split: feature_dataloader(
            features[split],
            ds["labels"],
            args.per_device_train_batch_size if split == "train" else args.per_device_eval_batch_size,
            shuffle=split == "train",
        )
        for split, ds in splits.items()
    }

    # What trains: a linear (or MLP) head on the cached features; a step takes microseconds.
    head = ClassificationHead(
        encoder.config.hidden_size, len(data.label_names), feats.head_hidden_size, feats.head_dropout
    )
    optimizer = build_optimizer(param_groups(head, args.learning_rate, args.weight_decay), args.learning_rate)
    scheduler, steps = build_schedule(optimizer, args, len(loaders["train"]), accelerator)

    head, optimizer, train_dl, eval_dl, test_dl, scheduler = accelerator.prepare(
        head, optimizer, loaders["train"], loaders["validation"], loaders.get("test"), scheduler
    )
    results = train(accelerator, head, optimizer, scheduler, train_dl, eval_dl, args, steps, len(data.label_names))
    results |= test_results(accelerator, head, test_dl, len(data.label_names))

    # Saved as encoder + pooling + head, which `finetune-recipes predict` runs on raw text.
    classifier = FeatureClassifier(encoder, accelerator.unwrap_model(head), feats.pooling)
    save_outputs(accelerator, classifier, tokenizer, args, results, config_to_dict(model_args, data_args, args, feats))

    accelerator.end_training()


if __name__ == "__main__":
    main()
