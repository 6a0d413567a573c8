"""LoRA: the encoder stays frozen; low-rank adapters on its attention projections and the head train."""

from dataclasses import dataclass, field
from pathlib import Path

from peft import LoraConfig, TaskType, get_peft_model

from finetune_recipes.config import (
    DataArguments,
    ModelArguments,
    TrainingArguments,
    config_to_dict,
    entrypoint,
    parse_config,
)
from finetune_recipes.data import load_data
from finetune_recipes.freezing import format_trainable
from finetune_recipes.layers import block_linears, discover_layers
from finetune_recipes.loop import (
    build_accelerator,
    build_dataloaders,
    build_schedule,
    check_output_dir,
    save_merged,
    save_outputs,
    test_results,
    train,
)
from finetune_recipes.modeling import build_model
from finetune_recipes.optim import build_optimizer, param_groups

CONFIG = Path(__file__).parent / "configs" / "lora.yaml"


@dataclass
class LoraArguments:
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    lora_feed_forward: bool = field(default=False, metadata={"help": "Adapt the feed-forward projections too."})
    merge_adapter: bool = field(default=False, metadata={"help": "Also save a merged plain model in merged/."})


@entrypoint
def main() -> None:
    model_args, data_args, args, lora = parse_config(
        ModelArguments, DataArguments, TrainingArguments, LoraArguments, default_config=CONFIG
    )
    check_output_dir(args)
    accelerator = build_accelerator(args)

    tokenizer, data = load_data(model_args, data_args, args.seed, accelerator)
    train_dl, eval_dl, test_dl = build_dataloaders(data, tokenizer, args, accelerator, data_args.group_by_length)

    model = build_model(model_args.model_name_or_path, data.label_names)

    # What trains: rank-r adapters on the blocks' attention (and optionally feed-forward) projections,
    # found by layer discovery rather than by name, and the new head in full (modules_to_save).
    layers = discover_layers(model, model_args.layer_mapping)
    linears = block_linears(model, layers)
    targets = linears["attention"] + (linears["feed_forward"] if lora.lora_feed_forward else [])
    head_modules = sorted({name.split(".")[0] for name, _ in layers.head})
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=lora.lora_r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=targets,
        modules_to_save=head_modules,
    )
    model = get_peft_model(model, config)
    model.peft_config["default"].base_model_name_or_path = model_args.model_name_or_path  # portable adapter
    accelerator.print(format_trainable(model, discover_layers(model)))

    groups = param_groups(model, args.learning_rate, args.weight_decay)
    optimizer = build_optimizer(groups, args.learning_rate)
    scheduler, steps = build_schedule(optimizer, args, len(train_dl), accelerator)

    model, optimizer, train_dl, eval_dl, test_dl, scheduler = accelerator.prepare(
        model, optimizer, train_dl, eval_dl, test_dl, scheduler
    )
    results = train(accelerator, model, optimizer, scheduler, train_dl, eval_dl, args, steps, len(data.label_names))
    results |= test_results(accelerator, model, test_dl, len(data.label_names))
    # The adapter alone (a few MB) goes to output_dir; merged/ holds a plain model any pipeline loads.
    save_outputs(accelerator, model, tokenizer, args, results, config_to_dict(model_args, data_args, args, lora))
    if lora.merge_adapter:
        save_merged(accelerator, model, tokenizer, Path(args.output_dir) / "merged")

    accelerator.end_training()


if __name__ == "__main__":
    main()
