"""Progressive unfreezing: the head trains first, then blocks thaw one at a time from the top down."""

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
from finetune_recipes.freezing import (
    format_trainable,
    set_trainable,
    stage_at,
    stage_starts,
    unfreezing_stages,
)
from finetune_recipes.layers import discover_layers
from finetune_recipes.loop import (
    build_accelerator,
    build_dataloaders,
    build_schedule,
    check_output_dir,
    save_outputs,
    test_results,
    train,
    update_steps_per_epoch,
)
from finetune_recipes.modeling import build_model
from finetune_recipes.optim import build_optimizer, format_groups, param_groups

CONFIG = Path(__file__).parent / "configs" / "progressive_unfreezing.yaml"


@dataclass
class UnfreezeArguments:
    unfreeze_every: float = field(default=1.0, metadata={"help": "Thaw the next group every this many units."})
    unfreeze_unit: str = field(default="epoch", metadata={"help": "epoch or step."})
    unfreeze_schedule: str | None = field(default=None, metadata={"help": "Steps where stages 1, 2, ... begin."})
    layer_decay: float = field(default=1.0, metadata={"help": "Compose with LLRD (ULMFiT's discriminative rates)."})
    head_lr: float | None = None


@entrypoint
def main() -> None:
    model_args, data_args, args, unfreeze = parse_config(
        ModelArguments, DataArguments, TrainingArguments, UnfreezeArguments, default_config=CONFIG
    )
    check_output_dir(args)
    # Which parameters get gradients changes mid-run, so DDP must not expect all of them every step.
    accelerator = build_accelerator(args, find_unused_parameters=True)

    tokenizer, data = load_data(model_args, data_args, args.seed, accelerator)
    train_dl, eval_dl, test_dl = build_dataloaders(data, tokenizer, args, accelerator, data_args.group_by_length)

    model = build_model(model_args.model_name_or_path, data.label_names)

    # What trains, and when: stage 0 is the pooler and head; stage k adds the k-th block from the top;
    # the last stage adds the embeddings. Every parameter is in the optimizer from the start, at its
    # own (optionally layer-decayed) rate on the shared schedule: a frozen one gets no gradient, so
    # AdamW skips it and starts its moments from zero on the step it thaws.
    layers = discover_layers(model, model_args.layer_mapping)
    stages = unfreezing_stages(layers)
    groups = param_groups(
        model,
        args.learning_rate,
        args.weight_decay,
        layer_map=layers,
        layer_decay=unfreeze.layer_decay,
        head_lr=unfreeze.head_lr,
        include_frozen=True,
    )
    report = format_groups(groups)
    accelerator.print(f"Optimizer groups ({len(groups)}):\n{report}")
    optimizer = build_optimizer(groups, args.learning_rate)
    scheduler, steps = build_schedule(optimizer, args, len(train_dl), accelerator)
    steps_per_epoch = update_steps_per_epoch(len(train_dl), accelerator, args.gradient_accumulation_steps)
    starts = stage_starts(
        len(stages), unfreeze.unfreeze_every, steps_per_epoch, unfreeze.unfreeze_unit, unfreeze.unfreeze_schedule
    )
    accelerator.print("Unfreezing schedule: " + ", ".join(f"step {s}: {stages[k][-1]}" for k, s in enumerate(starts)))

    # DDP registers only parameters that require gradients when it wraps the model: prepare while all do.
    model, optimizer, train_dl, eval_dl, test_dl, scheduler = accelerator.prepare(
        model, optimizer, train_dl, eval_dl, test_dl, scheduler
    )
    current = [-1]

    def thaw(step: int) -> None:  # a function of the step alone, so a resumed run lands in its stage
        stage = stage_at(step, starts)
        if stage != current[0]:
            set_trainable(model, layers, stages[stage])
            current[0] = stage
            accelerator.print(f"step {step}: stage {stage}\n{format_trainable(model, layers)}")

    num_labels = len(data.label_names)
    results = train(accelerator, model, optimizer, scheduler, train_dl, eval_dl, args, steps, num_labels, on_step=thaw)
    results |= test_results(accelerator, model, test_dl, len(data.label_names))
    results["unfreezing_stage_starts"] = starts
    config = config_to_dict(model_args, data_args, args, unfreeze)
    save_outputs(accelerator, model, tokenizer, args, results, config, {"param_groups.md": report + "\n"})

    accelerator.end_training()


if __name__ == "__main__":
    main()
