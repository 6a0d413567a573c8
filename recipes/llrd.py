"""Layer-wise learning-rate decay: full fine-tuning where lower layers take geometrically smaller steps."""

from dataclasses import dataclass, field
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
from finetune_recipes.optim import (
    build_optimizer,
    format_groups,
    lr_trajectory,
    param_groups,
    plot_lr_schedule,
)

CONFIG = Path(__file__).parent / "configs" / "llrd.yaml"


@dataclass
class LLRDArguments:
    layer_decay: float = field(default=0.9, metadata={"help": "lr_i = learning_rate × layer_decay^(top − i)."})
    head_lr: float | None = field(default=None, metadata={"help": "The head's rate; default learning_rate."})
    plot_lr: bool = field(default=False, metadata={"help": "Write lr_schedule.png to output_dir."})


@entrypoint
def main() -> None:
    model_args, data_args, args, llrd = parse_config(
        ModelArguments, DataArguments, TrainingArguments, LLRDArguments, default_config=CONFIG
    )
    check_output_dir(args)
    accelerator = build_accelerator(args)

    tokenizer, data = load_data(model_args, data_args, args.seed, accelerator)
    train_dl, eval_dl, test_dl = build_dataloaders(data, tokenizer, args, accelerator, data_args.group_by_length)

    model = build_model(model_args.model_name_or_path, data.label_names)

    # What trains: everything. Depth 0 is the embeddings, 1..L the blocks, L+1 the pooler and head;
    # each depth below the top multiplies the rate by layer_decay, so the embeddings move least.
    layers = discover_layers(model, model_args.layer_mapping)
    groups = param_groups(
        model,
        args.learning_rate,
        args.weight_decay,
        layer_map=layers,
        layer_decay=llrd.layer_decay,
        head_lr=llrd.head_lr,
    )
    report = format_groups(groups)
    accelerator.print(f"Optimizer groups ({len(groups)}):\n{report}")

    optimizer = build_optimizer(groups, args.learning_rate)
    scheduler, steps = build_schedule(optimizer, args, len(train_dl), accelerator)
    lrs = (
        lr_trajectory(groups, args.lr_scheduler_type, steps, args.warmup_ratio, args.warmup_steps, args.learning_rate)
        if llrd.plot_lr
        else None
    )

    model, optimizer, train_dl, eval_dl, test_dl, scheduler = accelerator.prepare(
        model, optimizer, train_dl, eval_dl, test_dl, scheduler
    )
    results = train(accelerator, model, optimizer, scheduler, train_dl, eval_dl, args, steps, len(data.label_names))
    results |= test_results(accelerator, model, test_dl, len(data.label_names))
    config = config_to_dict(model_args, data_args, args, llrd)
    save_outputs(accelerator, model, tokenizer, args, results, config, {"param_groups.md": report + "\n"})
    if lrs and accelerator.is_main_process:
        plot_lr_schedule(groups, lrs, Path(args.output_dir) / "lr_schedule.png")

    accelerator.end_training()


if __name__ == "__main__":
    main()
