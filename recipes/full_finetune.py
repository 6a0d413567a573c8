"""Full fine-tuning: every weight of the pretrained encoder and a new classification head trains.

Flags of its own: none; `--help` lists the shared model, data and training flags. Defaults: the dataclasses
in finetune_recipes.config, then configs/full_finetune.yaml beside this file, then the command line.

    python recipes/full_finetune.py --learning_rate 3e-5 --train_file train.csv --validation_file dev.csv
    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml recipes/full_finetune.py

From Python, `main(ModelArguments(...), DataArguments(...), TrainingArguments(...))` returns the results.
Raises `UserError` (from the command line: one line, exit code 2) for a bad flag, data set, model or
output_dir, before training starts. The other recipes are this one with their strategy's lines changed,
marked `# Strategy:`; `diff recipes/full_finetune.py recipes/llrd.py` shows only the strategy.
"""

from pathlib import Path

from tqdm.auto import tqdm

from finetune_recipes.kit import (
    DataArguments,
    LossMeter,
    ModelArguments,
    RunArgs,
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
    end_training,
    evaluate,
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
    start_trackers,
    train_batches,
    wrap_blocks_not_embeddings,
)

CONFIG = Path(__file__).parent / "configs" / "full_finetune.yaml"
# What `finetune-recipes tune full_finetune` searches (flag: range, log-scale for rates; or choices). Yours to edit.
SEARCH_SPACE = {
    "learning_rate": {"low": 1e-5, "high": 2e-4, "log": True},
    "num_train_epochs": {"low": 1, "high": 4},
    "warmup_ratio": {"low": 0.0, "high": 0.2},
}


def main(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> dict:
    args = RunArgs.of(__file__, model_args, data_args, training_args)  # saved in recipe_config.yaml
    checked = check_outputs(args)  # output_dir and the Hub: refused now, not after the training
    accelerator = build_accelerator(training_args)

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

    # What trains: everything, at one learning rate; no weight decay on biases and norms.
    groups = param_groups(model, training_args.learning_rate, training_args.weight_decay)
    optimizer = build_optimizer(groups, training_args.learning_rate)
    schedule = build_schedule(optimizer, train_loader, training_args, accelerator.num_processes)

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
        with accelerator.accumulate(model):
            labels = batch.pop("labels")
            loss = data.task.loss(model(**batch).logits, labels)  # cross-entropy, BCE or MSE; class-weighted
            accelerator.backward(loss)
            if accelerator.sync_gradients:  # the accumulated micro-batches are in: one optimizer step
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

    # Save: model and tokenizer where pipeline() loads them, results, predictions, the card; then the Hub.
    results = save_run(
        accelerator, out, args, model=model, tokenizer=tokenizer, data=data, results=results, calibration=calibration
    )
    if training_args.push_to_hub:
        push_to_hub(accelerator, out, training_args, results, data.task)
    end_training(accelerator)  # the trackers finish; the process group lives to the process's end
    return results


if __name__ == "__main__":
    run_cli(main, ModelArguments, DataArguments, TrainingArguments, default_config=CONFIG)
