"""Distillation: a static-vector student learns a trained teacher's scores, on labelled and unlabelled text.

Serving fast: any trained output (`--teacher DIR`: a full model, a LoRA adapter, the contrastive or static model,
a feature-extraction head) scores every text once (cached per text, so another student never runs it again);
the student, static_embeddings' model (a bag of vectors or a BiLSTM over them, and a head), learns from those
scores on the training texts and on `--unlabeled_file`'s, and from the labels where there are labels. It is an
ordinary output: calibrated on validation, scored there and on test by the data's labels (never by the
teacher, and refused where the teacher trained on those texts), saved for `pipeline()`, `predict` and ONNX.

Flags of its own (DistillArguments): `--teacher`, `--student static`, `--unlabeled_file`,
`--distill_temperature`, `--distill_alpha`; and static_embeddings' (StaticArguments). The vectors default to the
input table of the model the teacher started from (its recipe_config.yaml), or `--model_name_or_path` when given.

    python recipes/distill.py --teacher outputs/full_finetune --unlabeled_file more_texts.csv
    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml recipes/distill.py --teacher DIR

From Python, `main(ModelArguments(...), DataArguments(...), TrainingArguments(...), StaticArguments(...),
DistillArguments(teacher=DIR))` returns the results. Raises `UserError` (from the command line: one line, exit
code 2) for a bad flag, teacher, data set or vectors file, before training starts.
"""

from pathlib import Path

from tqdm.auto import tqdm

from finetune_recipes.kit import (
    DataArguments,
    DistillArguments,
    LossMeter,
    ModelArguments,
    RunArgs,
    StaticArguments,
    TrainingArguments,
    build_accelerator,
    build_dataloaders,
    build_optimizer,
    build_schedule,
    build_static_model,
    calibrate,
    check_no_leakage,
    check_outputs,
    check_student_data,
    check_teacher,
    checkpoint_due,
    claim_outputs,
    count_parameters,
    distillation_loss,
    distilled_from,
    end_training,
    evaluate,
    head_has_bias,
    load_data,
    load_vectors,
    param_groups,
    push_to_hub,
    read_teacher,
    record_evaluation,
    restore_best,
    resume_state,
    run_cli,
    run_results,
    save_best,
    save_checkpoint,
    save_run,
    start_trackers,
    student_vectors,
    teacher_scores,
    train_batches,
    unlabeled_texts,
    with_teacher,
)

CONFIG = Path(__file__).parent / "configs" / "distill.yaml"
# What `finetune-recipes tune distill --teacher DIR` searches: the rate, the mix and the temperature.
SEARCH_SPACE = {
    "learning_rate": {"low": 1e-3, "high": 5e-2, "log": True},
    "distill_alpha": {"low": 0.2, "high": 1.0},
    "distill_temperature": {"choices": [1.0, 2.0, 4.0]},
}


def main(model_args, data_args, training_args: TrainingArguments, static: StaticArguments, distill: DistillArguments):
    args = RunArgs.of(__file__, model_args, data_args, training_args, static, distill)  # saved in recipe_config.yaml
    checked = check_outputs(args)  # output_dir and the Hub: refused now, not after the training
    # Strategy: the teacher, a trained output, read back; the student's vectors (the teacher's base model's input
    # table by default) bring their tokenizer (word pieces or words), so they come before the data.
    teacher = read_teacher(distill.teacher)
    check_student_data(data_args)
    unlabeled = unlabeled_texts(distill.unlabeled_file, data_args.text_column)
    vectors = load_vectors(student_vectors(model_args, teacher), data_args, training_args, static)
    accelerator = build_accelerator(training_args)
    if vectors.coverage:
        accelerator.print(vectors.coverage)

    # Tokenizer and data: labels fixed from train, a stratified validation split when none is given.
    tokenizer, data = load_data(model_args, data_args, training_args, accelerator, tokenizer=vectors.tokenizer)
    # Strategy: the teacher predicts the data's labels and never trained on its validation or test texts; it scores
    # every text once (cached), and the training split carries its scores, the unlabelled texts appended.
    check_teacher(teacher, data.task)
    check_no_leakage(teacher, data, data_args.text_column, training_args.seed)
    splits = {s: list(data.raw[s][data_args.text_column]) for s in ("train", "test") if s in data.raw}
    texts = [*splits["train"], *unlabeled, *splits.get("test", [])]
    with accelerator.main_process_first():  # the main process fills the cache; the others read it
        scores = teacher_scores(teacher, texts, data.label_names, static.feature_cache_dir,
                                training_args.per_device_eval_batch_size)  # fmt: skip
    data = with_teacher(data, tokenizer, unlabeled, scores[: len(splits["train"]) + len(unlabeled)], data_args)
    train_loader, eval_loader, test_loader = build_dataloaders(data, tokenizer, data_args, training_args, accelerator)

    # Strategy: the model is the vectors (a bag, or a BiLSTM over them) and a head. What trains: the head, and
    # the LSTM with --encoder lstm; the vectors only with --freeze_embeddings false.
    model = build_static_model(vectors, data.task, static, data_args.pack_sequences)
    trainable, total = count_parameters(model)
    accelerator.print(f"trainable: {trainable:,} of {total:,} parameters ({trainable / total:.2%})")
    groups = param_groups(model, training_args.learning_rate, training_args.weight_decay)
    optimizer = build_optimizer(groups, training_args.learning_rate)
    schedule = build_schedule(optimizer, train_loader, training_args, accelerator.num_processes)

    model, optimizer, scheduler, train_loader, eval_loader, test_loader = accelerator.prepare(
        model, optimizer, schedule.scheduler, train_loader, eval_loader, test_loader
    )

    # Strategy: the mix of the teacher's scores (softened at T) and the labels in every text's loss.
    T, alpha = distill.distill_temperature, distill.distill_alpha

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
            teacher_logits, labeled = batch.pop("teacher"), batch.pop("labeled")  # Strategy: the teacher's scores
            logits = model(**batch).logits  # Strategy: the student's
            loss = distillation_loss(logits, labels, teacher_logits, labeled, data.task, T, alpha)  # Strategy: Hinton's
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
    test_teacher = scores[len(texts) - len(splits.get("test", [])) :]  # Strategy: the card's agreement on test
    results["distillation"] = distilled_from(teacher, unlabeled, distill, data.task, calibration, test_teacher)

    # Save: model and tokenizer where pipeline() loads them, results, predictions, the card; then the Hub.
    results = save_run(
        accelerator, out, args, model=model, tokenizer=tokenizer, data=data, results=results, calibration=calibration
    )
    if training_args.push_to_hub:
        push_to_hub(accelerator, out, training_args, results, data.task)
    end_training(accelerator)  # the trackers finish; the process group lives to the process's end
    return results


if __name__ == "__main__":
    run_cli(main, ModelArguments, DataArguments, TrainingArguments, StaticArguments, DistillArguments,
            default_config=CONFIG)  # fmt: skip
