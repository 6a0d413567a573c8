"""Frozen base, trainable pooler: the encoder stays fixed, only its pooler and a new head train."""

from pathlib import Path

from finetune_recipes.config import (
    DataArguments,
    ModelArguments,
    TrainingArguments,
    config_to_dict,
    entrypoint,
    parse_config,
)
from finetune_recipes.data import load_data
from finetune_recipes.freezing import format_trainable, set_trainable
from finetune_recipes.layers import discover_layers
from finetune_recipes.loop import (
    build_accelerator,
    build_dataloaders,
    build_schedule,
    check_output_dir,
    save_outputs,
    test_results,
    train,
)
from finetune_recipes.modeling import build_model
from finetune_recipes.optim import build_optimizer, param_groups

CONFIG = Path(__file__).parent / "configs" / "frozen_base_pooler.yaml"


@entrypoint
def main() -> None:
    model_args, data_args, args = parse_config(ModelArguments, DataArguments, TrainingArguments, default_config=CONFIG)
    check_output_dir(args)
    accelerator = build_accelerator(args)

    tokenizer, data = load_data(model_args, data_args, args.seed, accelerator)
    train_dl, eval_dl, test_dl = build_dataloaders(data, tokenizer, args, accelerator, data_args.group_by_length)

    model = build_model(model_args.model_name_or_path, data.label_names)

    # What trains: the pooler (pretrained, one dense layer over the first token) and the new head.
    # Models without a pooler (RoBERTa, DistilBERT, ELECTRA, DeBERTa) keep their dense pre-classifier
    # layer in the head, so for them "pooler + head" is the whole head, and we say so.
    layers = discover_layers(model, model_args.layer_mapping)
    if not layers.pooler:
        accelerator.print(f"{type(model).__name__} has no pooler: training its classification head only.")
    set_trainable(model, layers, ["pooler", "head"])
    accelerator.print(format_trainable(model, layers))

    groups = param_groups(model, args.learning_rate, args.weight_decay)
    optimizer = build_optimizer(groups, args.learning_rate)
    scheduler, steps = build_schedule(optimizer, args, len(train_dl), accelerator)

    model, optimizer, train_dl, eval_dl, test_dl, scheduler = accelerator.prepare(
        model, optimizer, train_dl, eval_dl, test_dl, scheduler
    )
    results = train(accelerator, model, optimizer, scheduler, train_dl, eval_dl, args, steps, len(data.label_names))
    results |= test_results(accelerator, model, test_dl, len(data.label_names))
    save_outputs(accelerator, model, tokenizer, args, results, config_to_dict(model_args, data_args, args))

    accelerator.end_training()


if __name__ == "__main__":
    main()
