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

from finetune_recipes import (
    ON_RESUME,
    DataArguments,
    ModelArguments,
    TrainingArguments,
    block_linears,
    build_model,
    build_optimizer,
    check_ranges,
    discover_layers,
    format_trainable,
    param_groups,
    run_cli,
    save_merged,
    start_run,
    train,
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
    lora_r: int = 8
    lora_alpha: int = 32  # tuned with the rate in configs/lora.yaml (benchmarks/README.md)
    lora_dropout: float = 0.1
    lora_feed_forward: bool = field(default=False, metadata={"help": "Adapt the feed-forward projections too."})
    merge_adapter: bool = field(
        default=False, metadata={ON_RESUME: True, "help": "Also save a merged plain model in merged/."}
    )

    def __post_init__(self) -> None:
        check_ranges(self, lora_r=(1, None), lora_alpha=(1, None), lora_dropout=(0, 0.99))


def loss_step(model, batch, criterion):
    """The loss the loop backpropagates: the task's criterion on the model's logits (cross-entropy; per-label BCE
    for multi-label; MSE for regression; class-weighted with --class_weights). Yours to change (label
    smoothing, a penalty): return any scalar tensor computed from `model` and `batch`."""
    labels = batch.pop("labels")
    return criterion(model(**batch).logits, labels)


def main(model_args, data_args, training_args: TrainingArguments, lora: LoraArguments) -> dict:
    run = start_run(model_args, data_args, training_args, lora)
    model = build_model(model_args, run.task)

    # What trains: rank-r adapters on the blocks' attention (and optionally feed-forward) projections,
    # found by layer discovery rather than by name, and the new head in full (modules_to_save).
    layers = discover_layers(model, model_args.layer_mapping)
    linears = block_linears(model, layers)
    lora_config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=lora.lora_r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=linears["attention"] + (linears["feed_forward"] if lora.lora_feed_forward else []),
        modules_to_save=sorted({name.split(".")[0] for name, _ in layers.head}),
    )
    # Adapters in the base weights' dtype: under DeepSpeed ZeRO-3 the base loads in bf16, and peft's default
    # fp32 upcast of the adapters would give ZeRO-3 trainable parameters of two dtypes, which it refuses.
    model = get_peft_model(model, lora_config, autocast_adapter_dtype=False)
    model.peft_config["default"].base_model_name_or_path = model_args.model_name_or_path  # portable adapter
    # The same mapping again: its paths are the transformers model's, which discovery finds inside peft.
    run.accelerator.print(format_trainable(model, discover_layers(model, model_args.layer_mapping)))

    groups = param_groups(model, training_args.learning_rate, training_args.weight_decay)
    optimizer = build_optimizer(groups, training_args.learning_rate)
    schedule = run.build_schedule(optimizer)

    run.prepare(model, optimizer, schedule)
    results = train(run, loss_step)
    results = run.finish(results)
    if lora.merge_adapter:  # beside the few-MB adapter, a plain model any pipeline() loads
        save_merged(run)
    return results


if __name__ == "__main__":
    run_cli(main, ModelArguments, DataArguments, TrainingArguments, LoraArguments, default_config=CONFIG)
