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

from accelerate.utils import DistributedType
from tqdm.auto import tqdm

from finetune_recipes.kit import (
    RANGE,
    DataArguments,
    LossMeter,
    ModelArguments,
    RunArgs,
    Thaw,
    TrainingArguments,
    build_accelerator,
    build_dataloaders,
    build_model,
    build_optimizer,
    build_schedule,
    calibrate,
    check_outputs,
    checkpoint_due,
    claim_outputs,
    discover_layers,
    end_training,
    evaluate,
    format_groups,
    head_has_bias,
    load_data,
    param_groups,
    push_to_hub,
    record_evaluation,
    restore_best,
    resume_state,
    run_cli,
    run_results,
    save_best,
    save_checkpoint,
    save_run,
    stage_starts,
    start_trackers,
    train_batches,
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
    unfreeze_every: float = field(
        default=0.25, metadata={RANGE: (0, None, "above"), "help": "Thaw the next group every this many units."}
    )
    unfreeze_unit: str = field(default="epoch", metadata={"help": "epoch or step."})
    unfreeze_schedule: str | None = field(default=None, metadata={"help": "Steps where stages 1, 2, ... begin."})
    layer_decay: float = field(
        default=1.0, metadata={RANGE: (0, 1, "above"), "help": "Compose with LLRD (ULMFiT's discriminative rates)."}
    )
    head_lr: float | None = field(
        default=5e-3, metadata={RANGE: (0, None, "above"), "help": "The new head's rate; the rest learning_rate."}
    )


def main(model_args, data_args, training_args: TrainingArguments, unfreeze: UnfreezeArguments) -> dict:
    args = RunArgs.of(__file__, model_args, data_args, training_args, unfreeze)  # saved in recipe_config.yaml
    checked = check_outputs(args)  # output_dir and the Hub: refused now, not after the training
    # Strategy: which parameters get gradients changes mid-run, so DDP must not expect all of them every step.
    accelerator = build_accelerator(training_args, find_unused_parameters=True)

    # Tokenizer and data: labels fixed from train, a stratified validation split when none is given.
    tokenizer, data = load_data(model_args, data_args, training_args, accelerator)
    train_loader, eval_loader, test_loader = build_dataloaders(data, tokenizer, data_args, training_args, accelerator)

    # Model: the pretrained encoder with a new head sized to the labels.
    model = build_model(
        model_args,
        data.task,
        pack_sequences=data_args.pack_sequences,
        gradient_checkpointing=training_args.gradient_checkpointing,
    )

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
    # FSDP2 fixes at prepare which parameters take gradients: there all keep them, the frozen ones' are dropped.
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    thaw = Thaw(model, layers, stages, starts, accelerator.print, keep_requires_grad=fsdp)  # the model as discovered

    # DDP registers only parameters that require gradients when it wraps the model: prepare while all do.
    wrap_blocks_not_embeddings(accelerator, model)  # FSDP2 only: what it shards
    model, optimizer, scheduler, train_loader, eval_loader, test_loader = accelerator.prepare(
        model, optimizer, schedule.scheduler, train_loader, eval_loader, test_loader
    )

    # The loop: the batches of every epoch in turn, one optimizer step per gradient_accumulation_steps of them;
    # after each step, logging, evaluation, a checkpoint and the stop, each at the steps its condition names.
    state, early_stopping = resume_state(accelerator, data, args)  # new, or a checkpoint's: every state restored
    out = claim_outputs(accelerator, model, args, checked, early_stopping.best_step)  # output_dir locked, claimed
    start_trackers(accelerator, args, schedule)  # --report_to; the plan logged
    losses = LossMeter(accelerator)
    progress = tqdm(total=schedule.total_steps, initial=state.completed_steps, desc="train",
                    disable=not accelerator.is_local_main_process)  # fmt: skip
    model.train()
    for batch in train_batches(train_loader, schedule, state.completed_steps):  # a resume skips what it trained on
        if state.completed_steps >= schedule.total_steps or early_stopping.stop:
            break
        thaw(state.completed_steps)  # Strategy: the stage this step is in; frozen blocks kept in eval mode
        with accelerator.accumulate(model):
            labels = batch.pop("labels")
            loss = data.task.loss(model(**batch).logits, labels)  # cross-entropy, BCE or MSE; class-weighted
            accelerator.backward(loss)
            if accelerator.sync_gradients:  # the accumulated micro-batches are in: one optimizer step
                thaw.drop_frozen_gradients()  # Strategy: under FSDP2 the frozen blocks have gradients: not stepped
                if training_args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), training_args.max_grad_norm)
                optimizer.step()
                scheduler.step()  # once per optimizer step (not per batch or process)
                optimizer.zero_grad(set_to_none=True)
        losses.add(loss, len(labels))
        if not accelerator.sync_gradients:  # an epoch's last step may gather fewer batches
            continue
        state.completed_steps += 1
        progress.update()
        step, epoch_end = state.completed_steps, state.completed_steps % schedule.steps_per_epoch == 0
        if step % training_args.logging_steps == 0:
            losses.log(state, scheduler, progress)
        if (
            (training_args.eval_strategy == "steps" and step % training_args.eval_steps == 0)
            or (training_args.eval_strategy == "epoch" and epoch_end)
            or step == schedule.total_steps
        ):
            metrics = evaluate(model, eval_loader, data.task, accelerator, data_args.window_aggregation).metrics
            record_evaluation(accelerator, model, state, metrics, schedule.steps_per_epoch)  # history, trackers, log
            if early_stopping.update(step, metrics):  # the best so far by --metric_for_best_model: keep its weights
                save_best(accelerator, model, training_args.output_dir, step)
        if checkpoint_due(training_args.checkpointing_steps, step, schedule.steps_per_epoch):
            save_checkpoint(accelerator, model, state, early_stopping, training_args.output_dir,
                            training_args.save_total_limit)  # fmt: skip
    progress.close()
    timing = losses.throughput()  # the training's time, not the scoring's below

    # Final evaluation: the best evaluation's weights restored (--metric_for_best_model), or the last ones kept.
    if early_stopping.best_step is not None:
        restore_best(accelerator, model, training_args, early_stopping.best_step)
    final = evaluate(model, eval_loader, data.task, accelerator, data_args.window_aggregation)
    test = evaluate(model, test_loader, data.task, accelerator, data_args.window_aggregation) if test_loader else None

    # Calibrate: scores as trained, a temperature or vector scaling, chosen on validation's held-out folds and
    # fitted there (multi-label: thresholds tuned there too), returned to be saved; a head without a bias
    # (decoders' `score`) takes scales only.
    shift = head_has_bias(model, data.task.num_labels)
    calibration = calibrate(data.task, {"validation": final, "test": test}, training_args.calibration, shift)
    results = {**run_results(data.task, state, early_stopping, calibration, schedule), **timing}
    results["unfreezing_stage_starts"] = starts  # Strategy

    # Save: model and tokenizer where pipeline() loads them, results, predictions, the card; then the Hub.
    results = save_run(
        accelerator,
        out,
        args,
        model=model,
        tokenizer=tokenizer,
        data=data,
        results=results,
        calibration=calibration,
        files={"param_groups.md": report + "\n"},
    )
    if training_args.push_to_hub:
        push_to_hub(accelerator, out, training_args, results, data.task)
    end_training(accelerator)  # the trackers finish; the process group lives to the process's end
    return results


if __name__ == "__main__":
    run_cli(main, ModelArguments, DataArguments, TrainingArguments, UnfreezeArguments, default_config=CONFIG)
