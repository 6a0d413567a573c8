"""Frozen base, trainable pooler: the encoder stays fixed, only its pooler and a new head train.

The frozen encoder runs once: each split's first-token states (all that the pooler and the head read) are
encoded in inference mode and cached like feature extraction's features; training then runs the pooler
and head alone on them. The saved model is the whole classifier, which `pipeline()` loads.

Flags of its own (EncodeArguments): `--encode_batch_size`, `--feature_cache_dir`; `--help` lists the shared
model, data and training flags (`--layer_mapping` for an architecture layer discovery cannot map).
Defaults: finetune_recipes.config, then configs/frozen_base_pooler.yaml beside this file, then the command
line.

    python recipes/frozen_base_pooler.py --learning_rate 1e-3
    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml recipes/frozen_base_pooler.py

From Python, `main(ModelArguments(...), DataArguments(...), TrainingArguments(...), EncodeArguments(...))`
returns the results. Raises `UserError` (from the command line: one line, exit code 2) for a bad flag, data
set, model or output_dir, or a model whose layers cannot be mapped, before training starts.
"""

from pathlib import Path

from tqdm.auto import tqdm
from transformers import DataCollatorWithPadding

from finetune_recipes.kit import (
    DataArguments,
    EncodeArguments,
    LossMeter,
    ModelArguments,
    RunArgs,
    TrainingArguments,
    build_accelerator,
    build_model,
    build_optimizer,
    build_schedule,
    cached_features,
    calibrate,
    check_outputs,
    checkpoint_due,
    claim_outputs,
    discover_layers,
    end_training,
    evaluate,
    feature_loaders,
    format_trainable,
    head_has_bias,
    load_data,
    on_cached_states,
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
    set_trainable,
    start_trackers,
    train_batches,
)

CONFIG = Path(__file__).parent / "configs" / "frozen_base_pooler.yaml"
# What `finetune-recipes tune frozen_base_pooler` searches: the rate and length of training of the pooler and head
# (their width is the encoder's; the first-token states are encoded once for the whole study).
SEARCH_SPACE = {
    "learning_rate": {"low": 2e-4, "high": 1e-2, "log": True},
    "num_train_epochs": {"low": 1, "high": 4},
}


def main(model_args, data_args, training_args: TrainingArguments, cache: EncodeArguments | None = None) -> dict:
    cache = cache or EncodeArguments()
    args = RunArgs.of(__file__, model_args, data_args, training_args, cache)  # saved in recipe_config.yaml
    checked = check_outputs(args)  # output_dir and the Hub: refused now, not after the training
    accelerator = build_accelerator(training_args)

    # Tokenizer and data: labels fixed from train, a stratified validation split when none is given.
    tokenizer, data = load_data(model_args, data_args, training_args, accelerator)

    # Model: the pretrained encoder with a new head sized to the labels.
    classifier = build_model(model_args, data.task, pack_sequences=data_args.pack_sequences)

    # Strategy: what trains is the pooler (pretrained, one dense layer over the first token) and the new head.
    # Models without a pooler (RoBERTa, DistilBERT, ELECTRA, DeBERTa) keep their dense pre-classifier layer in
    # the head, so for them "pooler + head" is the whole head, and we say so.
    layers = discover_layers(classifier, model_args.layer_mapping)
    if not layers.pooler:
        accelerator.print(f"{type(classifier).__name__} has no pooler: training its classification head only.")
    set_trainable(classifier, layers, ["pooler", "head"])
    accelerator.print(format_trainable(classifier, layers))
    model = on_cached_states(classifier)  # the classifier's own pooler and head, over first-token states

    # Strategy: the frozen encoder runs once, in eval mode (no dropout): every split's first-token states, or
    # the cache. A long document's windows stay examples of their own, scored and averaged as the saved model will.
    classifier.to(accelerator.device)
    splits = data.labelled_splits()
    states = cached_features(
        classifier.base_model,
        splits,
        DataCollatorWithPadding(tokenizer),
        accelerator,
        "cls",
        data_args.max_length,
        cache.feature_cache_dir,
        cache.encode_batch_size,
    )
    loaders = feature_loaders(states, splits, training_args, data_args, "inputs_embeds", average_windows=False)
    train_loader, eval_loader, test_loader = loaders

    # The optimizer over the pooler and head alone, on full fine-tuning's schedule.
    groups = param_groups(model, training_args.learning_rate, training_args.weight_decay)
    optimizer = build_optimizer(groups, training_args.learning_rate)
    schedule = build_schedule(optimizer, train_loader, training_args, accelerator.num_processes)

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

    # Save: the whole classifier (Strategy), with the trained pooler and head; then the Hub.
    results = save_run(
        accelerator,
        out,
        args,
        model=classifier,
        tokenizer=tokenizer,
        data=data,
        results=results,
        calibration=calibration,
        trained=model,
    )
    if training_args.push_to_hub:
        push_to_hub(accelerator, out, training_args, results, data.task)
    end_training(accelerator)  # the trackers finish; the process group lives to the process's end
    return results


if __name__ == "__main__":
    run_cli(main, ModelArguments, DataArguments, TrainingArguments, EncodeArguments, default_config=CONFIG)
