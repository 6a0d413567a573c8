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
    DataArguments,
    LossMeter,
    ModelArguments,
    RunArgs,
    TrainingArguments,
    UserError,
    Validation,
    build_accelerator,
    build_dataloaders,
    build_model,
    build_optimizer,
    build_schedule,
    check_outputs,
    checkpoint_due,
    cosine_pair_loss,
    embed,
    embed_splits,
    epoch_batches,
    evaluate,
    fit_head,
    freeze,
    load_data,
    pair_dataloader,
    param_groups,
    push_to_hub,
    run_cli,
    save_checkpoint,
    save_run,
    sentence_classifier,
    sentence_pairs,
    sentence_pooling,
    start_training,
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
            "help": "Rounds of pairs (SetFit's default 20): each gives every example one alike and one unlike partner."
        },
    )
    pooling: str | None = field(
        default=None, metadata={"help": "cls or mean; default: the model's own (its 1_Pooling), else refused."}
    )
    encode_batch_size: int = 64

    def __post_init__(self) -> None:
        if self.num_iterations < 1:
            raise UserError(f"--num_iterations must be at least 1, not {self.num_iterations}")
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
    pairs = sentence_pairs(data.train["labels"], data.task.problem_type, pairs_args.num_iterations, training_args.seed)
    pooling, normalize = sentence_pooling(model_args.model_name_or_path, pairs_args.pooling)
    train_loader = pair_dataloader(data.train, pairs, tokenizer, training_args.per_device_train_batch_size,
                                   training_args.seed)  # fmt: skip

    # Model: the encoder alone; the head comes after the loop.
    body = build_model(model_args, data.task, auto_class=AutoModel)

    # What trains: the whole encoder, on pairs; its pooler layer, if it has one, is not in a sentence embedding.
    if getattr(body, "pooler", None) is not None:
        freeze(body.pooler)  # (unused, it would also stop DDP, which expects a gradient for every trainable weight)
    groups = param_groups(body, training_args.learning_rate, training_args.weight_decay)
    optimizer = build_optimizer(groups, training_args.learning_rate)
    schedule = build_schedule(optimizer, train_loader, training_args, accelerator.num_processes)

    body, optimizer, scheduler, train_loader, eval_loader, test_loader = accelerator.prepare(
        body, optimizer, schedule.scheduler, train_loader, eval_loader, test_loader
    )

    # The loop. A resume restores every state and skips the batches already trained on.
    state, out = start_training(accelerator, body, data, schedule, args, checked)
    losses = LossMeter(accelerator)
    progress = tqdm(total=schedule.total_steps, initial=state.completed_steps, desc="pairs",
                    disable=not accelerator.is_local_main_process)  # fmt: skip
    for epoch in range(state.epoch, schedule.num_epochs):
        if state.completed_steps >= schedule.total_steps:
            break  # resumed from the run's last checkpoint
        body.train()
        for batch in epoch_batches(train_loader, epoch, state):
            with accelerator.accumulate(body):
                targets = batch.pop("labels")
                first, second = embed(body, batch, pooling, normalize).chunk(2)  # both sides in one forward
                loss = cosine_pair_loss(first, second, targets)  # (cos(a, b) - target)²
                accelerator.backward(loss)
                if accelerator.sync_gradients:  # the accumulated micro-batches are in: one optimizer step
                    if training_args.max_grad_norm:
                        accelerator.clip_grad_norm_(body.parameters(), training_args.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            state.batches_in_epoch += 1
            losses.add(loss, len(targets))
            if not accelerator.sync_gradients:
                continue
            state.completed_steps += 1
            progress.update()
            if state.completed_steps % training_args.logging_steps == 0:
                losses.log(state, scheduler, progress)
            if checkpoint_due(training_args.checkpointing_steps, state.completed_steps):
                save_checkpoint(accelerator, body, state, training_args.output_dir, training_args.save_total_limit)
            if state.completed_steps >= schedule.total_steps:
                break
        state.epoch, state.batches_in_epoch = epoch + 1, 0
        if training_args.checkpointing_steps == "epoch":
            save_checkpoint(accelerator, body, state, training_args.output_dir, training_args.save_total_limit)
    progress.close()
    timing = losses.throughput()  # the training's time, not the head's or the scoring's below

    # Strategy, stage 2: the tuned encoder embeds the training texts once; logistic regression on them is the head.
    model = sentence_classifier(accelerator.unwrap_model(body), data.task, pooling, normalize)
    features = embed_splits(model, {"train": data.train}, tokenizer, accelerator, pairs_args.encode_batch_size)
    fit_head(model, features["train"], data.train["labels"], data.task, training_args.seed)
    model.to(accelerator.device).eval()

    # Final evaluation: the one evaluation of the whole classifier; then the test split.
    validation = Validation(accelerator, eval_loader, data.task, training_args, data_args.window_aggregation)
    final = validation.final(model, state)
    test = evaluate(model, test_loader, data.task, accelerator, data_args.window_aggregation) if test_loader else None
    results = {**validation.results(state, final, test), **timing}

    # Save: encoder + pooling + head as one Transformers classifier, which pipeline() and predict load.
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
        trained=body,
    )
    if training_args.push_to_hub:
        push_to_hub(accelerator, out, training_args, results, data.task)
    accelerator.end_training()
    return results


if __name__ == "__main__":
    run_cli(main, ModelArguments, DataArguments, TrainingArguments, ContrastiveArguments, default_config=CONFIG)
