"""Static word vectors: a bag of pretrained vectors (or a BiLSTM over them) and a head; no transformer runs.

The path users learn first and the cheapest baseline a contextual encoder must beat. The vectors are the
encoder's input embedding table (default: the word pieces of --model_name_or_path, no transformer layer
runs), model2vec's distillation of the encoder (`--embeddings distill`), or a GloVe / word2vec / fastText
text file (`--embeddings_file`, read with a word-level tokenizer over the training words).

Flags of its own (StaticArguments): `--embeddings`, `--embeddings_file`, `--lowercase`, `--min_coverage`,
`--freeze_embeddings`, `--encoder bag|lstm`, `--lstm_hidden_size`, `--head_hidden_size`, `--dropout`,
`--feature_cache_dir`; `--help` lists the shared ones. Defaults: StaticArguments and finetune_recipes.config,
then configs/static_embeddings.yaml beside this file, then the command line.

    python recipes/static_embeddings.py --encoder lstm --embeddings_file glove.6B.300d.txt
    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml recipes/static_embeddings.py

From Python, `main(ModelArguments(...), DataArguments(...), TrainingArguments(...), StaticArguments(...))`
returns the results. Raises `UserError` (from the command line: one line, exit code 2) for a bad flag, data
set or vectors file, before training starts. The saved model loads with `AutoModelForSequenceClassification`
and `pipeline()` once `finetune_recipes.static` is imported, and `finetune-recipes predict` runs it.
"""

from pathlib import Path

from tqdm.auto import tqdm

from finetune_recipes.kit import (
    DataArguments,
    LossMeter,
    ModelArguments,
    RunArgs,
    StaticArguments,
    TrainingArguments,
    Validation,
    build_accelerator,
    build_dataloaders,
    build_optimizer,
    build_schedule,
    build_static_model,
    check_outputs,
    checkpoint_due,
    count_parameters,
    epoch_batches,
    evaluate,
    load_data,
    load_vectors,
    param_groups,
    push_to_hub,
    run_cli,
    save_checkpoint,
    save_run,
    start_training,
)

CONFIG = Path(__file__).parent / "configs" / "static_embeddings.yaml"
# What `finetune-recipes tune static_embeddings` searches: the rate and the head's width.
SEARCH_SPACE = {
    "learning_rate": {"low": 1e-3, "high": 5e-2, "log": True},
    "head_hidden_size": {"choices": [0, 256]},
}


def main(model_args, data_args, training_args: TrainingArguments, static: StaticArguments) -> dict:
    args = RunArgs.of(__file__, model_args, data_args, training_args, static)  # saved in recipe_config.yaml
    checked = check_outputs(args)  # output_dir and the Hub: refused now, not after the training
    # Strategy: the vectors bring their tokenizer (word pieces or words), so they come before the data.
    vectors = load_vectors(model_args, data_args, training_args, static)
    accelerator = build_accelerator(training_args)
    if vectors.coverage:
        accelerator.print(vectors.coverage)

    # Tokenizer and data: labels fixed from train, a stratified validation split when none is given.
    tokenizer, data = load_data(model_args, data_args, training_args, accelerator, tokenizer=vectors.tokenizer)
    train_loader, eval_loader, test_loader = build_dataloaders(data, tokenizer, data_args, training_args, accelerator)

    # Strategy: the model is the vectors (a bag, or a BiLSTM over them) and a head. What trains: the head, and
    # the LSTM with --encoder lstm; the vectors only with --freeze_embeddings false.
    model = build_static_model(vectors, data.task, static)
    trainable, total = count_parameters(model)
    accelerator.print(f"trainable: {trainable:,} of {total:,} parameters ({trainable / total:.2%})")
    groups = param_groups(model, training_args.learning_rate, training_args.weight_decay)
    optimizer = build_optimizer(groups, training_args.learning_rate)
    schedule = build_schedule(optimizer, train_loader, training_args, accelerator.num_processes)

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
    run_cli(main, ModelArguments, DataArguments, TrainingArguments, StaticArguments, default_config=CONFIG)
