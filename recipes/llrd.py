"""Layer-wise learning-rate decay: full fine-tuning where lower layers take geometrically smaller steps.

Flags of its own (LLRDArguments below): `--layer_decay`, `--head_lr`, `--plot_lr`; `--help` lists the
shared ones. Defaults: LLRDArguments and finetune_recipes.config, then configs/llrd.yaml beside this
file (shared flags only), then the command line.

    python recipes/llrd.py --layer_decay 0.8 --head_lr 1e-3 --plot_lr
    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml recipes/llrd.py

From Python, `main(ModelArguments(...), DataArguments(...), TrainingArguments(...), LLRDArguments(...))`
returns the results. Raises `UserError` (from the command line: one line, exit code 2) for a bad flag,
data set, model or output_dir, a layer_decay outside (0, 1], or a model whose layers cannot be mapped.
Writes param_groups.md (and lr_schedule.png with --plot_lr) beside the model.
"""

from dataclasses import dataclass, field
from pathlib import Path

from finetune_recipes import (
    ON_RESUME,
    DataArguments,
    ModelArguments,
    TrainingArguments,
    build_model,
    build_optimizer,
    discover_layers,
    format_groups,
    lr_trajectory,
    param_groups,
    plot_lr_schedule,
    run_cli,
    start_run,
    train,
)

CONFIG = Path(__file__).parent / "configs" / "llrd.yaml"
# What `finetune-recipes tune llrd` searches: the top rate (usually above plain fine-tuning's), the decay, the head's.
SEARCH_SPACE = {
    "learning_rate": {"low": 2e-5, "high": 5e-4, "log": True},
    "layer_decay": {"low": 0.7, "high": 0.95},
    "head_lr": {"low": 1e-4, "high": 1e-2, "log": True},
}


@dataclass
class LLRDArguments:
    layer_decay: float = field(default=0.85, metadata={"help": "lr_i = learning_rate × layer_decay^(top − i)."})
    head_lr: float | None = field(default=None, metadata={"help": "The head's rate; default learning_rate."})
    plot_lr: bool = field(default=False, metadata={ON_RESUME: True, "help": "Write lr_schedule.png to output_dir."})


def loss_step(model, batch, criterion):
    """The loss the loop backpropagates: the task's criterion on the model's logits (cross-entropy; per-label BCE
    for multi-label; MSE for regression; class-weighted with --class_weights). Yours to change (label
    smoothing, a penalty): return any scalar tensor computed from `model` and `batch`."""
    labels = batch.pop("labels")
    return criterion(model(**batch).logits, labels)


def main(model_args, data_args, training_args: TrainingArguments, llrd: LLRDArguments) -> dict:
    run = start_run(model_args, data_args, training_args, llrd)
    model = build_model(model_args, run.task)

    # What trains: everything. Depth 0 is the embeddings, 1..L the blocks, L+1 the pooler and head;
    # each depth below the top multiplies the rate by layer_decay, so the embeddings move least.
    layers = discover_layers(model, model_args.layer_mapping)
    lr = training_args.learning_rate
    groups = param_groups(
        model, lr, training_args.weight_decay, layer_map=layers, layer_decay=llrd.layer_decay, head_lr=llrd.head_lr
    )
    report = format_groups(groups)
    run.accelerator.print(f"Optimizer groups ({len(groups)}):\n{report}")
    optimizer = build_optimizer(groups, lr)
    schedule = run.build_schedule(optimizer)
    files = {"param_groups.md": report + "\n"}
    if llrd.plot_lr:  # every group's lr over the run, drawn before training so a missing matplotlib stops it
        args = training_args
        lrs = lr_trajectory(
            groups, args.lr_scheduler_type, schedule.total_steps, args.warmup_ratio, args.warmup_steps, lr
        )
        files["lr_schedule.png"] = plot_lr_schedule(groups, lrs)

    run.prepare(model, optimizer, schedule)
    results = train(run, loss_step)
    return run.finish(results, extra_files=files)


if __name__ == "__main__":
    run_cli(main, ModelArguments, DataArguments, TrainingArguments, LLRDArguments, default_config=CONFIG)
