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
    Validation,
    build_accelerator,
    build_dataloaders,
    build_model,
    build_optimizer,
    build_schedule,
    check_outputs,
    checkpoint_due,
    epoch_batches,
    evaluate,
    load_data,
    param_groups,
    push_to_hub,
    run_cli,
    save_checkpoint,
    save_run,
    start_training,
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
    model = build_model(model_args, data.task)

    # What trains: everything, at one learning rate; no weight decay on biases and norms.
    groups = param_groups(model, training_args.learning_rate, training_args.weight_decay)
    optimizer = build_optimizer(groups, training_args.learning_rate)
    schedule = build_schedule(optimizer, train_loader, training_args, accelerator.num_processes)

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

    # Save: model and tokenizer where pipeline() loads them, results, predictions, the card; then the Hub.
    scored = {"validation": final, "test": test}
    results = save_run(
        accelerator, out, args, model=model, tokenizer=tokenizer, data=data, results=results, scored=scored
    )
    if training_args.push_to_hub:
        push_to_hub(accelerator, out, training_args, results, data.task)
    accelerator.end_training()
    return results


if __name__ == "__main__":
    run_cli(main, ModelArguments, DataArguments, TrainingArguments, default_config=CONFIG)
