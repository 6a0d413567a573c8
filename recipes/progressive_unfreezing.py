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

from tqdm.auto import tqdm

from finetune_recipes.kit import (
    DataArguments,
    LossMeter,
    ModelArguments,
    RunArgs,
    Thaw,
    TrainingArguments,
    Validation,
    build_accelerator,
    build_dataloaders,
    build_model,
    build_optimizer,
    build_schedule,
    check_outputs,
    checkpoint_due,
    discover_layers,
    epoch_batches,
    evaluate,
    format_groups,
    load_data,
    param_groups,
    push_to_hub,
    run_cli,
    save_checkpoint,
    save_run,
    stage_starts,
    start_training,
    unfreezing_stages,
    wrap_blocks_not_embeddings,
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


def main(model_args, data_args, training_args: TrainingArguments, unfreeze: UnfreezeArguments) -> dict:
    args = RunArgs.of(__file__, model_args, data_args, training_args, unfreeze)  # saved in recipe_config.yaml
    checked = check_outputs(args)  # output_dir and the Hub: refused now, not after the training
    # Strategy: which parameters get gradients changes mid-run, so DDP must not expect all of them every step.
    accelerator = build_accelerator(training_args, find_unused_parameters=True)

    # Tokenizer and data: labels fixed from train, a stratified validation split when none is given.
    tokenizer, data = load_data(model_args, data_args, training_args, accelerator)
    train_loader, eval_loader, test_loader = build_dataloaders(data, tokenizer, data_args, training_args, accelerator)

    # Model: the pretrained encoder with a new head sized to the labels.
    model = build_model(model_args, data.task)

    # Strategy: what trains, and when. Stage 0 is the pooler and head; stage k adds the k-th block from the
    # top; the last stage adds the embeddings. Every parameter is in the optimizer from the start, at its own
    # (optionally layer-decayed) rate on the shared schedule: a frozen one gets no gradient, so AdamW skips it
    # and starts its moments from zero on the step it thaws.
    layers = discover_layers(model, model_args.layer_mapping)
    stages = unfreezing_stages(layers)
    lr, u = training_args.learning_rate, unfreeze
    groups = param_groups(model, lr, training_args.weight_decay, layer_map=layers, layer_decay=u.layer_decay,
                          head_lr=u.head_lr, include_frozen=True)  # fmt: skip
    report = format_groups(groups)
    accelerator.print(f"Optimizer groups ({len(groups)}):\n{report}")
    optimizer = build_optimizer(groups, lr)
    schedule = build_schedule(optimizer, train_loader, training_args, accelerator.num_processes)
    starts = stage_starts(len(stages), u.unfreeze_every, schedule.steps_per_epoch, u.unfreeze_unit,
                          u.unfreeze_schedule, schedule.total_steps)  # fmt: skip
    accelerator.print("Unfreezing schedule: " + ", ".join(f"step {s}: {stages[k][-1]}" for k, s in enumerate(starts)))
    thaw = Thaw(model, layers, stages, starts, accelerator.print)  # the model as discovered, not as prepared

    # DDP registers only parameters that require gradients when it wraps the model: prepare while all do.
    wrap_blocks_not_embeddings(accelerator, model)  # FSDP2 only: what it shards
    model, optimizer, scheduler, train_loader, eval_loader, test_loader = accelerator.prepare(
        model, optimizer, schedule.scheduler, train_loader, eval_loader, test_loader
    )

    # The loop. A resume restores every state and skips the batches already trained on.
    state, out = start_training(accelerator, model, data, schedule, args, checked)
    validation = Validation(accelerator, eval_loader, data.task, training_args, data_args.window_aggregation)
    losses = LossMeter(accelerator)
    progress = tqdm(total=schedule.total_steps, initial=state.completed_steps, desc="train",
                    disable=not accelerator.is_local_main_process)  # fmt: skip
    for epoch in range(state.epoch, schedule.num_epochs):
        if state.completed_steps >= schedule.total_steps or validation.patience_spent(state):
            break  # resumed from the run's last checkpoint
        model.train()
        thaw(state.completed_steps)  # Strategy: the stage this step is in
        for batch in epoch_batches(train_loader, epoch, state):
            with accelerator.accumulate(model):
                labels = batch.pop("labels")
                loss = data.task.loss(model(**batch).logits, labels)  # cross-entropy, BCE or MSE; class-weighted
                accelerator.backward(loss)
                if accelerator.sync_gradients:  # the accumulated micro-batches are in: one optimizer step
                    if training_args.max_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), training_args.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            state.batches_in_epoch += 1
            losses.add(loss, len(labels))
            if not accelerator.sync_gradients:
                continue
            state.completed_steps += 1
            progress.update()
            if state.completed_steps % training_args.logging_steps == 0:
                losses.log(state, scheduler, progress)
            if training_args.eval_strategy == "steps" and state.completed_steps % training_args.eval_steps == 0:
                validation(model, state)  # logged; the best weights kept on disk; patience counted
            if checkpoint_due(training_args.checkpointing_steps, state.completed_steps):
                save_checkpoint(accelerator, model, state, training_args.output_dir, training_args.save_total_limit)
            if state.completed_steps >= schedule.total_steps or validation.patience_spent(state):
                break
            thaw(state.completed_steps)  # Strategy: after each optimizer step (and its evaluation), the next stage
        state.epoch, state.batches_in_epoch = epoch + 1, 0
        if training_args.eval_strategy == "epoch" or state.completed_steps >= schedule.total_steps:
            validation(model, state)
        if training_args.checkpointing_steps == "epoch":
            save_checkpoint(accelerator, model, state, training_args.output_dir, training_args.save_total_limit)
        if state.completed_steps >= schedule.total_steps or validation.patience_spent(state):
            break
    progress.close()
    timing = losses.throughput()  # the training's time, not the scoring's below

    # Final evaluation: the best evaluation (its weights restored) or the last; then the test split.
    final = validation.final(model, state)
    test = evaluate(model, test_loader, data.task, accelerator, data_args.window_aggregation) if test_loader else None
    results = {**validation.results(state, final, test), **timing}
    results["unfreezing_stage_starts"] = starts  # Strategy

    # Save: model and tokenizer where pipeline() loads them, results, predictions, the card; then the Hub.
    scored = {"validation": final, "test": test}
    results = save_run(
        accelerator,
        out,
        args,
        model=model,
        tokenizer=tokenizer,
        data=data,
        results=results,
        scored=scored,
        files={"param_groups.md": report + "\n"},
    )
    if training_args.push_to_hub:
        push_to_hub(accelerator, out, training_args, results, data.task)
    accelerator.end_training()
    return results


if __name__ == "__main__":
    run_cli(main, ModelArguments, DataArguments, TrainingArguments, UnfreezeArguments, default_config=CONFIG)
