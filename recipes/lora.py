"""LoRA: the encoder stays frozen; low-rank adapters on its attention projections and the head train.

Flags of its own (LoraArguments below): `--lora_r`, `--lora_alpha`, `--lora_dropout`,
`--lora_feed_forward`, `--merge_adapter`; `--help` lists the shared ones. Defaults: LoraArguments and
finetune_recipes.config, then configs/lora.yaml beside this file (shared flags only), then the command line.

    python recipes/lora.py --lora_r 16 --lora_alpha 32 --merge_adapter
    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml recipes/lora.py

From Python, `main(ModelArguments(...), DataArguments(...), TrainingArguments(...), LoraArguments(...))`
returns the results. Raises `UserError` (from the command line: one line, exit code 2) for a bad flag,
data set, model or output_dir, or a model whose layers cannot be mapped. Saves the adapter (a few MB);
with --merge_adapter also merged/, a plain model that `pipeline()` loads.
"""

from dataclasses import dataclass, field
from pathlib import Path

from peft import LoraConfig, TaskType, get_peft_model
from tqdm.auto import tqdm

from finetune_recipes.kit import (
    ON_RESUME,
    RANGE,
    DataArguments,
    LossMeter,
    ModelArguments,
    RunArgs,
    TrainingArguments,
    block_linears,
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
    format_trainable,
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
    save_merged,
    save_run,
    start_trackers,
    stored_transposed,
    train_batches,
    wrap_blocks_not_embeddings,
)

CONFIG = Path(__file__).parent / "configs" / "lora.yaml"
# What `finetune-recipes tune lora` searches: the adapter's rank and scale, and the rate.
SEARCH_SPACE = {
    "lora_r": {"choices": [4, 8, 16]},
    "lora_alpha": {"choices": [8, 16, 32]},
    "learning_rate": {"low": 2e-4, "high": 5e-3, "log": True},
}


@dataclass
class LoraArguments:
    lora_r: int = field(default=8, metadata={RANGE: (1, 2**16)})
    lora_alpha: int = field(default=32, metadata={RANGE: (1, None)})  # tuned with the rate in configs/lora.yaml
    lora_dropout: float = field(default=0.1, metadata={RANGE: (0, 0.99)})
    lora_feed_forward: bool = field(default=False, metadata={"help": "Adapt the feed-forward projections too."})
    merge_adapter: bool = field(
        default=False, metadata={ON_RESUME: True, "help": "Also save a merged plain model in merged/."}
    )


def main(model_args, data_args, training_args: TrainingArguments, lora: LoraArguments) -> dict:
    args = RunArgs.of(__file__, model_args, data_args, training_args, lora)  # saved in recipe_config.yaml
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

    # Strategy: what trains is rank-r adapters on the blocks' attention (and optionally feed-forward)
    # projections, found by layer discovery rather than by name, and the new head in full (modules_to_save).
    layers = discover_layers(model, model_args.layer_mapping)
    linears = block_linears(model, layers)
    targets = linears["attention"] + (linears["feed_forward"] if lora.lora_feed_forward else [])
    lora_config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=lora.lora_r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=targets,
        fan_in_fan_out=stored_transposed(model, targets),  # GPT-2's Conv1D projections keep (in, out) weights
        modules_to_save=sorted({name.split(".")[0] for name, _ in layers.head}),
    )
    # Adapters in the base weights' dtype: under DeepSpeed ZeRO-3 the base loads in bf16, and peft's default
    # fp32 upcast of the adapters would give ZeRO-3 trainable parameters of two dtypes, which it refuses.
    model = get_peft_model(model, lora_config, autocast_adapter_dtype=False)
    model.peft_config["default"].base_model_name_or_path = model_args.model_name_or_path  # portable adapter
    # The same mapping again: its paths are the transformers model's, which discovery finds inside peft.
    accelerator.print(format_trainable(model, discover_layers(model, model_args.layer_mapping)))
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
    if lora.merge_adapter:  # Strategy: beside the few-MB adapter, a plain model any pipeline() loads
        save_merged(accelerator, out, tokenizer)
    end_training(accelerator)  # the trackers finish; the process group lives to the process's end
    return results


if __name__ == "__main__":
    run_cli(main, ModelArguments, DataArguments, TrainingArguments, LoraArguments, default_config=CONFIG)
