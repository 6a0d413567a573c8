"""Feature extraction: a frozen encoder embeds every text once (cached); only a small head trains.

Flags of its own (FeatureArguments below): `--pooling`, `--head_hidden_size`, `--head_dropout`,
`--encode_batch_size`, `--feature_cache_dir`; `--help` lists the shared ones. Defaults: FeatureArguments
and finetune_recipes.config, then configs/feature_extraction.yaml beside this file (shared flags only),
then the command line.

    python recipes/feature_extraction.py --pooling cls --head_hidden_size 256
    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml recipes/feature_extraction.py

From Python, `main(ModelArguments(...), DataArguments(...), TrainingArguments(...), FeatureArguments(...))`
returns the results. Raises `UserError` (from the command line: one line, exit code 2) for a bad flag,
data set, model or output_dir, or a pooling the encoder lacks. Saves encoder + pooling + head, which
`finetune-recipes predict` runs on raw text.
"""

from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm
from transformers import AutoModel, DataCollatorWithPadding

from finetune_recipes.kit import (
    ClassificationHead,
    DataArguments,
    EncodeArguments,
    FeatureClassifier,
    LossMeter,
    ModelArguments,
    RunArgs,
    TrainingArguments,
    Validation,
    build_accelerator,
    build_model,
    build_optimizer,
    build_schedule,
    cached_features,
    check_outputs,
    check_pooling,
    checkpoint_due,
    epoch_batches,
    evaluate,
    feature_loaders,
    freeze,
    load_data,
    param_groups,
    push_to_hub,
    run_cli,
    save_checkpoint,
    save_run,
    start_training,
)

CONFIG = Path(__file__).parent / "configs" / "feature_extraction.yaml"
# What `finetune-recipes tune feature_extraction` searches: the head's rate and width (the cached features are
# computed once for the whole study).
SEARCH_SPACE = {
    "learning_rate": {"low": 1e-4, "high": 3e-2, "log": True},
    "head_hidden_size": {"choices": [0, 256]},
}


@dataclass
class FeatureArguments(EncodeArguments):  # + --encode_batch_size, --feature_cache_dir
    pooling: str = field(default="mean", metadata={"help": "cls, mean (over real tokens) or pooler."})
    head_hidden_size: int = field(default=0, metadata={"help": "0: a linear head; else an MLP of this width."})
    head_dropout: float = 0.1


def main(model_args, data_args, training_args: TrainingArguments, feats: FeatureArguments) -> dict:
    args = RunArgs.of(__file__, model_args, data_args, training_args, feats)  # saved in recipe_config.yaml
    checked = check_outputs(args)  # output_dir and the Hub: refused now, not after the training
    accelerator = build_accelerator(training_args)

    # Tokenizer and data: labels fixed from train, a stratified validation split when none is given.
    tokenizer, data = load_data(model_args, data_args, training_args, accelerator)

    # Strategy: the encoder never trains. It encodes every split once, in inference mode, or the cache is read;
    # a long document's windows are averaged to one row; the train split shuffled or class-weighted.
    encoder = build_model(model_args, data.task, auto_class=AutoModel)
    check_pooling(encoder, feats.pooling)
    freeze(encoder)
    encoder.to(accelerator.device)
    splits = data.labelled_splits()
    f = feats
    collator = DataCollatorWithPadding(tokenizer)
    features = cached_features(
        encoder,
        splits,
        collator,
        accelerator,
        f.pooling,
        data_args.max_length,
        f.feature_cache_dir,
        f.encode_batch_size,
    )
    train_loader, eval_loader, test_loader = feature_loaders(features, splits, training_args, data_args)
    model = ClassificationHead(encoder.config.hidden_size, data.task.num_labels, f.head_hidden_size, f.head_dropout)

    # What trains: the head on the cached features; a step takes microseconds.
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

    # Save: encoder + pooling + head (Strategy), which `finetune-recipes predict` runs on raw text.
    saved = FeatureClassifier(encoder, accelerator.unwrap_model(model), feats.pooling)
    scored = {"validation": final, "test": test}
    results = save_run(
        accelerator,
        out,
        args,
        model=saved,
        tokenizer=tokenizer,
        data=data,
        results=results,
        scored=scored,
        trained=model,
    )
    if training_args.push_to_hub:
        push_to_hub(accelerator, out, training_args, results, data.task)
    accelerator.end_training()
    return results


if __name__ == "__main__":
    run_cli(main, ModelArguments, DataArguments, TrainingArguments, FeatureArguments, default_config=CONFIG)
