"""Progressive unfreezing: the head trains first, then blocks thaw one at a time from the top down.

Flags of its own (UnfreezeArguments below): `--unfreeze_every`, `--unfreeze_unit`, `--unfreeze_schedule`,
`--layer_decay`, `--head_lr`; `--help` lists the shared ones. Defaults: UnfreezeArguments and
finetune_recipes.config, then configs/progressive_unfreezing.yaml beside this file (shared flags only),
then the command line.

    python recipes/progressive_unfreezing.py --unfreeze_every 1 --unfreeze_unit epoch --num_train_epochs 8
    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml recipes/progressive_unfreezing.py

From Python, `main(ModelArguments(...), DataArguments(...), TrainingArguments(...), UnfreezeArguments(...))`
returns the results. Raises `UserError` (from the command line: one line, exit code 2) for a bad flag,
data set, model or output_dir, a bad unfreezing schedule, or a model whose layers cannot be mapped.
"""

from dataclasses import dataclass, field
from pathlib import Path

from finetune_recipes import (
    DataArguments,
    ModelArguments,
    TrainingArguments,
    build_model,
    build_optimizer,
    discover_layers,
    eval_frozen,
    format_groups,
    format_trainable,
    param_groups,
    run_cli,
    set_trainable,
    stage_at,
    stage_starts,
    start_run,
    train,
    unfreezing_stages,
)

CONFIG = Path(__file__).parent / "configs" / "progressive_unfreezing.yaml"
# What `finetune-recipes tune progressive_unfreezing` searches: how fast blocks thaw (in epochs), and the two rates.
SEARCH_SPACE = {
    "unfreeze_every": {"low": 0.1, "high": 1.0},
    "head_lr": {"low": 1e-4, "high": 1e-2, "log": True},
    "learning_rate": {"low": 2e-5, "high": 5e-4, "log": True},
}


@dataclass
class UnfreezeArguments:
    # The head alone for a quarter of an epoch, then one more block every quarter, the embeddings last: all
    # of MiniLM's 6 blocks train by the end of the second epoch, whatever the data's size (in steps, a fixed
    # count left a 400-text set's encoder frozen for its whole run: benchmarks/README.md, tuning).
    unfreeze_every: float = field(default=0.25, metadata={"help": "Thaw the next group every this many units."})
    unfreeze_unit: str = field(default="epoch", metadata={"help": "epoch or step."})
    unfreeze_schedule: str | None = field(default=None, metadata={"help": "Steps where stages 1, 2, ... begin."})
    layer_decay: float = field(default=1.0, metadata={"help": "Compose with LLRD (ULMFiT's discriminative rates)."})
    head_lr: float | None = field(default=5e-3, metadata={"help": "The new head's rate; the rest learning_rate."})


def loss_step(model, batch, criterion):
    """The loss the loop backpropagates: the task's criterion on the model's logits (cross-entropy; per-label BCE
    for multi-label; MSE for regression; class-weighted with --class_weights). Yours to change (label
    smoothing, a penalty): return any scalar tensor computed from `model` and `batch`."""
    labels = batch.pop("labels")
    return criterion(model(**batch).logits, labels)


def main(model_args, data_args, training_args: TrainingArguments, unfreeze: UnfreezeArguments) -> dict:
    # Which parameters get gradients changes mid-run, so DDP must not expect all of them every step.
    run = start_run(model_args, data_args, training_args, unfreeze, find_unused_parameters=True)
    model = build_model(model_args, run.task)

    # What trains, and when: stage 0 is the pooler and head; stage k adds the k-th block from the top;
    # the last stage adds the embeddings. Every parameter is in the optimizer from the start, at its
    # own (optionally layer-decayed) rate on the shared schedule: a frozen one gets no gradient, so
    # AdamW skips it and starts its moments from zero on the step it thaws.
    layers = discover_layers(model, model_args.layer_mapping)
    stages = unfreezing_stages(layers)
    groups = param_groups(
        model,
        training_args.learning_rate,
        training_args.weight_decay,
        layer_map=layers,
        layer_decay=unfreeze.layer_decay,
        head_lr=unfreeze.head_lr,
        include_frozen=True,
    )
    report = format_groups(groups)
    run.accelerator.print(f"Optimizer groups ({len(groups)}):\n{report}")
    optimizer = build_optimizer(groups, training_args.learning_rate)
    schedule = run.build_schedule(optimizer)
    starts = stage_starts(
        len(stages),
        unfreeze.unfreeze_every,
        schedule.steps_per_epoch,
        unfreeze.unfreeze_unit,
        unfreeze.unfreeze_schedule,
        schedule.total_steps,
    )
    run.accelerator.print(
        "Unfreezing schedule: " + ", ".join(f"step {s}: {stages[k][-1]}" for k, s in enumerate(starts))
    )

    # DDP registers only parameters that require gradients when it wraps the model: prepare while all do.
    run.prepare(model, optimizer, schedule)
    current = [-1]

    def thaw(step: int) -> None:  # a function of the step alone, so a resumed run lands in its stage
        stage = stage_at(step, starts)
        if stage != current[0]:
            set_trainable(model, layers, stages[stage])
            current[0] = stage
            run.accelerator.print(f"step {step}: stage {stage}\n{format_trainable(model, layers)}")
        eval_frozen(model)  # frozen blocks without dropout (again after each evaluation's model.train())

    results = train(run, loss_step, on_step=thaw)
    results["unfreezing_stage_starts"] = starts
    return run.finish(results, extra_files={"param_groups.md": report + "\n"})


if __name__ == "__main__":
    run_cli(main, ModelArguments, DataArguments, TrainingArguments, UnfreezeArguments, default_config=CONFIG)
