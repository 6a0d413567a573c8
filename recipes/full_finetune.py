"""Full fine-tuning: every weight of the pretrained encoder and a new classification head trains."""

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

CONFIG = Path(__file__).parent / "configs" / "full_finetune.yaml"


@entrypoint
def main() -> None:
    model_args, data_args, args = parse_config(ModelArguments, DataArguments, TrainingArguments, default_config=CONFIG)
    check_output_dir(args)
    accelerator = build_accelerator(args)

    # Tokenizer and data: labels fixed from train, a stratified validation split when none is given.
    tokenizer, data = load_data(model_args, data_args, args.seed, accelerator)
    train_dl, eval_dl, test_dl = build_dataloaders(data, tokenizer, args, accelerator, data_args.group_by_length)

    # Model: the pretrained encoder with a new head sized to the labels.
    model = build_model(model_args.model_name_or_path, data.label_names)

    # What trains: everything, at one learning rate; no weight decay on biases and norms.
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
