"""Contrastive fine-tuning for few labels (SetFit's method, Tunstall et al. 2022): the sentence encoder first
learns from pairs drawn from the labelled examples (same label: similar; different: dissimilar), then a
logistic-regression head is fitted on the tuned encoder's embeddings.

Against full_finetune.py, the strategy changes two things. What trains in the loop is the encoder alone, on
pairs, with sentence-transformers' cosine-similarity loss; and the head is not trained by gradient but fitted
once, after the loop, as SetFit fits it. With tens of examples a class, the pairs give the encoder hundreds of
times more training signal than the labels alone. The loop does not evaluate: there is no head until it ends.

Flags of its own (ContrastiveArguments below): `--num_iterations` (pairs per example and round, as SetFit
names it), `--pooling` (read from the model's sentence-transformers files when it has them), and
`--encode_batch_size`; `--learning_rate`, `--num_train_epochs` and `--per_device_train_batch_size` are the
encoder's, on pairs. Defaults: ContrastiveArguments and finetune_recipes.config, then
configs/contrastive.yaml beside this file, then the command line.

    python recipes/contrastive.py --train_file few.csv --num_iterations 20
    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml recipes/contrastive.py

From Python, `main(ModelArguments(...), DataArguments(...), TrainingArguments(...), ContrastiveArguments(...))`
returns the results. Raises `UserError` (from the command line: one line, exit code 2) for a bad flag, data
set or model, a class with one example, or a regression target. The saved model loads with
`AutoModelForSequenceClassification` and `pipeline()` once `finetune_recipes.sentence` is imported, and
`finetune-recipes predict` runs it.
"""

from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm
from transformers import AutoModel

from finetune_recipes.kit import (
    RANGE,
    DataArguments,
    LossMeter,
    ModelArguments,
    RunArgs,
    TrainingArguments,
    UserError,
    build_accelerator,
    build_dataloaders,
    build_model,
    build_optimizer,
    build_schedule,
    calibrate,
    check_outputs,
    checkpoint_due,
    claim_outputs,
    cosine_pair_loss,
    embed,
    embed_splits,
    end_training,
    evaluate,
    fit_head,
    freeze,
    head_has_bias,
    load_data,
    pair_dataloader,
    param_groups,
    push_to_hub,
    record_evaluation,
    resume_state,
    run_cli,
    run_results,
    save_checkpoint,
    save_run,
    sentence_classifier,
    sentence_pairs,
    sentence_pooling,
    start_trackers,
    train_batches,
)

CONFIG = Path(__file__).parent / "configs" / "contrastive.yaml"
# The task shapes it takes: a regression target has no classes to draw alike and unlike pairs from.
PROBLEM_TYPES = ("single_label_classification", "multi_label_classification")
# What `finetune-recipes tune contrastive` searches: the encoder's rate on pairs and how many pairs it sees.
SEARCH_SPACE = {
    "learning_rate": {"low": 5e-6, "high": 1e-4, "log": True},
    "num_iterations": {"choices": [5, 10, 20, 40]},
}


@dataclass
class ContrastiveArguments:
    num_iterations: int = field(
        default=20,
        metadata={
            RANGE: (1, 1000),
            "help": "Rounds of pairs (SetFit's default 20): each gives every example one alike and one unlike partner.",
        },
    )
    pooling: str | None = field(
        default=None, metadata={"help": "cls or mean; default: the model's own (its 1_Pooling), else refused."}
    )
    encode_batch_size: int = field(default=64, metadata={RANGE: (1, 2**16)})

    def __post_init__(self) -> None:
        if self.pooling not in (None, "cls", "mean"):
            raise UserError(f"pooling '{self.pooling}' is not one of cls, mean")


def main(model_args, data_args, training_args: TrainingArguments, pairs_args: ContrastiveArguments) -> dict:
    args = RunArgs.of(__file__, model_args, data_args, training_args, pairs_args)  # saved in recipe_config.yaml
    checked = check_outputs(args)  # output_dir and the Hub: refused now, not after the training
    accelerator = build_accelerator(training_args)

    # Tokenizer and data: labels fixed from train, a stratified validation split when none is given.
    tokenizer, data = load_data(model_args, data_args, training_args, accelerator)
    _, eval_loader, test_loader = build_dataloaders(data, tokenizer, data_args, training_args, accelerator)

    # Strategy: pairs of training examples, alike (target 1) or unlike (target 0), seeded and balanced.
    pairs = sentence_pairs(
        data.train["labels"], data.task.problem_type, pairs_args.num_iterations, training_args.seed,
        progress=accelerator.is_local_main_process,
    )  # fmt: skip
    pooling, normalize = sentence_pooling(model_args.model_name_or_path, pairs_args.pooling)
    train_loader = pair_dataloader(data.train, pairs, tokenizer, training_args.per_device_train_batch_size,
                                   training_args.seed)  # fmt: skip

    # Model: the encoder alone; the head comes after the loop.
    model = build_model(
        model_args, data.task, auto_class=AutoModel, pack_sequences=data_args.pack_sequences,
        gradient_checkpointing=training_args.gradient_checkpointing,
    )  # fmt: skip

    # What trains: the whole encoder, on pairs; its pooler layer, if it has one, is not in a sentence embedding.
    if getattr(model, "pooler", None) is not None:
        freeze(model.pooler)  # (unused, it would also stop DDP, which expects a gradient for every trainable weight)
    groups = param_groups(model, training_args.learning_rate, training_args.weight_decay)
    optimizer = build_optimizer(groups, training_args.learning_rate)
    schedule = build_schedule(optimizer, train_loader, training_args, accelerator.num_processes)

    model, optimizer, scheduler, train_loader, eval_loader, test_loader = accelerator.prepare(
        model, optimizer, schedule.scheduler, train_loader, eval_loader, test_loader
    )

    # The loop: the batches of pairs of every epoch in turn, one optimizer step per gradient_accumulation_steps of
    # them; after each step, logging, a checkpoint and the stop, each at the steps its condition names.
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
            first, second = embed(model, batch, pooling, normalize).chunk(2)  # Strategy: both sides in one forward
            loss = cosine_pair_loss(first, second, labels)  # Strategy: (cos(a, b) - target)²
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
        step = state.completed_steps  # Strategy: no epoch end to evaluate at
        if step % training_args.logging_steps == 0:
            losses.log(state, scheduler, progress)
        # Strategy: no evaluation here; the classifier exists only once its head is fitted after the loop.
        if checkpoint_due(training_args.checkpointing_steps, step, schedule.steps_per_epoch):
            save_checkpoint(accelerator, model, state, early_stopping, training_args.output_dir,
                            training_args.save_total_limit)  # fmt: skip
    progress.close()
    timing = losses.throughput()  # the training's time, not the head's or the scoring's below

    # Strategy, stage 2: the tuned encoder embeds the training texts once; logistic regression on them is the head.
    classifier = sentence_classifier(accelerator.unwrap_model(model), data.task, pooling, normalize)
    features = embed_splits(classifier, {"train": data.train}, tokenizer, accelerator, pairs_args.encode_batch_size)
    fit_head(classifier, features["train"], data.train["labels"], data.task, training_args.seed)
    classifier.to(accelerator.device).eval()

    # Final evaluation: the one evaluation of the whole classifier (Strategy: kept in the history); then the test.
    final = evaluate(classifier, eval_loader, data.task, accelerator, data_args.window_aggregation)
    record_evaluation(accelerator, classifier, state, final.metrics, schedule.steps_per_epoch)  # Strategy
    early_stopping.update(state.completed_steps, final.metrics)  # Strategy: the one evaluation is the best
    test = (
        evaluate(classifier, test_loader, data.task, accelerator, data_args.window_aggregation) if test_loader else None
    )

    # Calibrate: scores as trained, a temperature or vector scaling, chosen on validation's held-out folds and
    # fitted there (multi-label: thresholds tuned there too), returned to be saved; a head without a bias
    # (decoders' `score`) takes scales only.
    shift = head_has_bias(classifier, data.task.num_labels)  # Strategy: the head fitted on the embeddings
    calibration = calibrate(data.task, {"validation": final, "test": test}, training_args.calibration, shift)
    results = {**run_results(data.task, state, early_stopping, calibration, schedule), **timing}

    # Save: encoder + pooling + head as one Transformers classifier, which pipeline() and predict load.
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
    run_cli(main, ModelArguments, DataArguments, TrainingArguments, ContrastiveArguments, default_config=CONFIG)
