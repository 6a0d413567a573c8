"""Recipe configuration: the three problem types and their metrics, and the dataclasses parsed from a YAML file
plus command-line overrides."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .errors import UserError

T = TypeVar("T")

# The three problem types, the metrics each one reports (its first the primary: compare's column, tune's objective)
# and which way each metric is better; the flags are checked against these names without loading scikit-learn.
SINGLE, MULTI, REGRESSION = "single_label_classification", "multi_label_classification", "regression"
METRICS = {
    SINGLE: ("accuracy", "f1_macro"),
    MULTI: ("f1_micro", "f1_macro", "f1_samples", "subset_accuracy"),
    REGRESSION: ("mse", "mae", "pearson", "spearman", "r2"),
}
# Lower is better: the built-in errors, and the `evaluate` metrics that are errors without saying so in their name.
LOWER_IS_BETTER = {"mse", "mae", "rmse", "mape", "smape", "wer", "cer", "ter", "brier_score", "perplexity"}


def greater_is_better(metric: str) -> bool:
    """Which way a metric improves: the errors of LOWER_IS_BETTER and, for another `evaluate` metric (--metric_name),
    a name ending in "loss" (transformers' Trainer rule) or holding "error" go down; every other goes up."""
    return metric not in LOWER_IS_BETTER and not metric.endswith("loss") and "error" not in metric


# Field metadata of a flag a resumed run may change: where the run writes, how often it logs, evaluates or saves,
# where its data comes from (the data itself is compared by content); none alters what the run computes.
ON_RESUME = "may_change_on_resume"
NEEDED = "needed_to_run"  # a flag without which a recipe cannot run (distill's --teacher): no default serves
# Field metadata of a numeric flag: its (low, high) bounds, None for no bound, and "above" third where low itself is
# out (a rate, a decay); every numeric flag has one (a test says so), bounded above where a larger value would
# exhaust memory or time before anything is learned.
RANGE = "range"


def range_text(bounds: tuple) -> str:
    """'at least 1', 'above 0', 'between 0 and 1', 'above 0 and at most 1': a RANGE in words, for messages and
    --help."""
    low, high, *above = bounds
    start = f"above {low}" if above else f"at least {low}"
    if high is None:
        return start
    return f"{start} and at most {high:,}" if above else f"between {low} and {high:,}"


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="sentence-transformers/all-MiniLM-L6-v2",
        metadata={"help": "Local directory or Hub id of a pretrained encoder."},
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Defaults to model_name_or_path."})
    layer_mapping: str | None = field(
        default=None,
        metadata={"help": "For architectures layer discovery cannot map: 'embeddings=PATH,blocks=PATH,pooler=PATH'."},
    )
    attn_implementation: str = field(
        default="auto",
        metadata={
            "help": "Attention kernel: auto (transformers' default, SDPA where the model has it), sdpa or eager."
        },
    )
    attention_dropout: float | None = field(
        default=None,
        metadata={
            RANGE: (0, 0.99),
            "help": "Overrides the model config's attention-probability dropout (hidden dropout stays). Default: "
            "0 when training on a CPU, where dropout pushes SDPA off its fused kernel (1.2x slower at 128 "
            "tokens, 2.9x at 512, no accuracy gained: benchmarks/README.md); the model's own on GPUs.",
        },
    )

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.attn_implementation not in ("auto", "sdpa", "eager"):
            raise UserError(f"attn_implementation '{self.attn_implementation}' is not one of auto, sdpa, eager")


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default="bbc_news",
        metadata={ON_RESUME: True, "help": "Hub data set, or 'bbc_news' for the bundled BBC News corpus."},
    )
    dataset_config_name: str | None = field(default=None, metadata={ON_RESUME: True})
    train_file: str | None = field(
        default=None, metadata={ON_RESUME: True, "help": "CSV, JSON, JSON Lines or Parquet file."}
    )
    validation_file: str | None = field(default=None, metadata={ON_RESUME: True})
    test_file: str | None = field(default=None, metadata={ON_RESUME: True})
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    max_length: int = field(default=128, metadata={RANGE: (1, None)})
    validation_split_percentage: float = field(
        default=10.0, metadata={RANGE: (0, 100), "help": "Held out, stratified, when the data has no validation split."}
    )
    test_split_percentage: float = field(
        default=0.0,
        metadata={
            RANGE: (0, 50),
            "help": "Held out, stratified, from train before anything else sees it, when the data has no test split "
            "(tune and compare hold out 10%); drawn with a fixed seed, so every seed and trial is tested on it.",
        },
    )
    max_train_samples: int | None = field(default=None, metadata={RANGE: (1, None)})
    max_eval_samples: int | None = field(default=None, metadata={RANGE: (1, None)})
    group_by_length: bool = field(default=False, metadata={"help": "Batch texts of similar length together."})
    pack_sequences: bool = field(
        default=False,
        metadata={
            "help": "Lay each batch's texts end to end in rows of max_length tokens, each attending only to itself, "
            "instead of padding them to the longest: the same logits, fewer tokens through the encoder on texts of "
            "mixed length (README: packed batches)."
        },
    )
    # The task's shape: found from the label column's values unless --problem_type says (README: task shapes).
    problem_type: str | None = field(
        default=None,
        metadata={
            "help": "single_label, multi_label or regression; default: from the labels (lists or --label_delimiter "
            "or --label_columns: multi_label; non-integer numbers: regression; else single_label)."
        },
    )
    label_columns: str | None = field(
        default=None, metadata={"help": "Multi-label from several 0/1 columns: 'a,b,c' (instead of --label_column)."}
    )
    label_delimiter: str | None = field(
        default=None, metadata={"help": "Multi-label from one text column: the separator between labels, e.g. '|'."}
    )
    metric_name: str | None = field(
        default=None,
        metadata={
            "help": "Hugging Face `evaluate` metrics computed beside the built-in ones, on validation and test: a "
            "Hub name (online) or a local metric script's path, several comma-separated; usable as "
            "--metric_for_best_model (an error such as mse, mape or wer, or a result named *loss or *error*, is "
            "minimised; any other maximised). Needs the evaluate extra."
        },
    )
    allow_empty_labels: bool = field(
        default=True, metadata={"help": "Multi-label: a text may have no label (pass false to refuse such rows)."}
    )
    standardize_target: bool = field(
        default=True,
        metadata={"help": "Regression: train on (y - mean) / std of train; the saved model predicts in y's units."},
    )
    class_weights: str = field(
        default="none",
        metadata={
            "help": "Loss weights per class: none, balanced (from train frequencies; multi-label: pos_weight), "
            "or a JSON file {label: weight}."
        },
    )
    sampler: str = field(
        default="random", metadata={"help": "random, or weighted: draw each class equally often (seeded)."}
    )
    long_documents: str = field(
        default="truncate",
        metadata={"help": "truncate at max_length, or windows: overlapping windows, predictions per document."},
    )
    window_stride: int = field(
        default=32,
        metadata={
            RANGE: (0, None),
            "help": "Windows: tokens each window shares with the one before (below max_length).",
        },
    )
    window_aggregation: str = field(default="mean", metadata={"help": "Windows → document: mean or max of logits."})
    max_windows_per_document: int | None = field(
        default=None,
        metadata={
            RANGE: (1, None),
            "help": "Windows: keep a document's first N windows (the dropped ones are counted).",
        },
    )

    def __post_init__(self) -> None:
        check_ranges(self)
        choices = {
            "problem_type": (None, "single_label", "multi_label", "regression"),
            "sampler": ("random", "weighted"),
            "long_documents": ("truncate", "windows"),
            "window_aggregation": ("mean", "max"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                shown = ", ".join(a for a in allowed if a)
                raise UserError(f"{name} '{getattr(self, name)}' is not one of {shown}")
        if self.label_columns is not None and self.label_delimiter is not None:
            raise UserError("pass --label_columns (several 0/1 columns) or --label_delimiter (one column), not both")
        if self.label_columns is not None and self.label_column != "label":
            raise UserError("pass --label_columns (several 0/1 columns) or --label_column (one column), not both")
        repeated = sorted({c for c in self.label_sources if self.label_sources.count(c) > 1})
        if self.label_columns is not None and repeated:
            raise UserError(f"--label_columns names '{repeated[0]}' twice; name each label column once")
        if self.label_delimiter == "":
            raise UserError("label_delimiter is empty; pass the character between labels, e.g. '|'")
        if self.problem_type == "regression" and (self.label_columns or self.label_delimiter):
            raise UserError("--label_columns/--label_delimiter make a multi-label task; drop --problem_type regression")
        if self.long_documents == "windows" and self.text_pair_column:
            raise UserError(
                "long_documents windows reads one text per example, and a text pair would repeat its second text in "
                "every window; drop --text_pair_column, or use --long_documents truncate"
            )
        if self.long_documents == "windows" and self.window_stride >= self.max_length:
            raise UserError(
                f"window_stride {self.window_stride} is not below max_length {self.max_length}; windows would not "
                "advance: pass a smaller --window_stride (e.g. max_length / 4)"
            )

    @property
    def metric_names(self) -> tuple[str, ...]:
        """--metric_name, split at commas."""
        return tuple(n.strip() for n in (self.metric_name or "").split(",") if n.strip())

    @property
    def label_sources(self) -> list[str]:
        """The columns the labels come from: --label_columns, else --label_column."""
        if self.label_columns:
            return [c.strip() for c in self.label_columns.split(",") if c.strip()]
        return [self.label_column]


@dataclass
class TrainingArguments:
    output_dir: str = field(default="outputs/run", metadata={ON_RESUME: True})
    overwrite_output_dir: bool = False
    per_device_train_batch_size: int = field(default=32, metadata={RANGE: (1, 2**16)})
    per_device_eval_batch_size: int = field(default=64, metadata={RANGE: (1, 2**16), ON_RESUME: True})
    learning_rate: float = field(default=5e-5, metadata={RANGE: (0, None, "above")})
    weight_decay: float = field(default=0.01, metadata={RANGE: (0, None)})
    max_grad_norm: float = field(default=1.0, metadata={RANGE: (0, None)})
    num_train_epochs: float = field(default=3.0, metadata={RANGE: (0, 10**6)})
    max_train_steps: int | None = field(
        default=None, metadata={RANGE: (1, None), "help": "Overrides num_train_epochs."}
    )
    gradient_accumulation_steps: int = field(default=1, metadata={RANGE: (1, 2**16)})
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = field(default=0.1, metadata={RANGE: (0, 1)})
    warmup_steps: int | None = field(default=None, metadata={RANGE: (0, None), "help": "Overrides warmup_ratio."})
    seed: int = field(default=42, metadata={RANGE: (0, 2**32 - 1)})
    mixed_precision: str | None = field(
        default=None,
        metadata={"help": "no, bf16, fp16, or auto (bf16 where the hardware has it); default: accelerate launch's."},
    )
    logging_steps: int = field(default=20, metadata={RANGE: (1, None), ON_RESUME: True})
    eval_strategy: str = field(
        default="epoch", metadata={ON_RESUME: True, "help": "epoch, or steps (every eval_steps); also at the end."}
    )
    eval_steps: int | None = field(
        default=None, metadata={RANGE: (1, None), ON_RESUME: True, "help": "Optimizer steps between evaluations."}
    )
    report_to: str | None = field(
        default=None,
        metadata={
            ON_RESUME: True,
            "help": "Accelerate trackers: tensorboard, wandb, ..., jsonl (metrics.jsonl); comma-separated.",
        },
    )
    checkpointing_steps: str | None = field(default=None, metadata={ON_RESUME: True, "help": "An integer, or 'epoch'."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "A checkpoint path, or 'latest'."})
    allow_config_change_on_resume: bool = field(
        default=False,
        metadata={ON_RESUME: True, "help": "Resume although settings or data differ from the checkpoint's."},
    )
    save_total_limit: int | None = field(
        default=2, metadata={RANGE: (1, None), ON_RESUME: True, "help": "Checkpoints kept in output_dir."}
    )
    metric_for_best_model: str | None = field(
        default=None,
        metadata={
            ON_RESUME: True,
            "help": "Keep the weights of the best evaluation by this metric: accuracy or f1_macro (single-label), "
            "f1_micro, f1_macro, f1_samples or subset_accuracy (multi-label), mse, mae, pearson, spearman or r2 "
            "(regression); lower is better for mse and mae.",
        },
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={
            ON_RESUME: True,  # the same loss and gradients (tests/test_decoders.py): resume in less memory
            "help": "Recompute the blocks' activations in the backward pass instead of keeping them: less memory "
            "(a decoder LLM's long inputs), about a third more compute; the same loss and gradients.",
        },
    )
    calibration: str | None = field(
        default=None,
        metadata={
            ON_RESUME: True,
            "help": "auto (the default for classification): at the end, choose among the scores as trained, a "
            "temperature and vector scaling (a scale and a shift per class) by their log-loss on held-out folds of "
            "validation, fit the choice on all of it and fold it into the saved output layer, so its probabilities "
            "mean what they say; temperature or vector: that one; none: save as trained.",
        },
    )
    early_stopping_patience: int | None = field(
        default=None,
        metadata={RANGE: (1, None), ON_RESUME: True, "help": "Stop after this many evaluations without improvement."},
    )
    push_to_hub: bool = field(
        default=False,
        metadata={ON_RESUME: True, "help": "Upload output_dir (card included, checkpoints not) to the Hub at the end."},
    )
    hub_model_id: str | None = field(
        default=None, metadata={ON_RESUME: True, "help": "The Hub repo to push to: 'user/name'."}
    )
    hub_private_repo: bool = field(default=False, metadata={ON_RESUME: True, "help": "Create the Hub repo private."})
    hub_token: str | None = field(
        default=None, metadata={"help": "Hub token; default: the cached login. Never written to any file."}
    )

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:  # (nan is refused as not finite)
            raise UserError(f"learning_rate is {self.learning_rate}; pass a rate above 0")
        check_ranges(self)
        for tracker in self.report_to.split(",") if self.report_to is not None else []:
            from accelerate.utils import LoggerType  # imports torch: only for a run that names a tracker

            trackers = [t.value for t in LoggerType] + ["jsonl"]
            if tracker.strip() not in trackers:
                raise UserError(
                    f"report_to '{tracker}' is not one of {', '.join(trackers)} (or several, comma-separated)"
                )
        if self.mixed_precision not in (None, "no", "bf16", "fp16", "auto"):
            raise UserError(f"mixed_precision '{self.mixed_precision}' is not one of no, bf16, fp16, auto")
        if self.calibration not in (None, "auto", "temperature", "vector", "none"):
            raise UserError(f"calibration '{self.calibration}' is not one of auto, temperature, vector, none")
        if self.eval_strategy not in ("epoch", "steps"):
            raise UserError(f"eval_strategy '{self.eval_strategy}' is not one of epoch, steps")
        if self.eval_strategy == "steps" and not (self.eval_steps and self.eval_steps > 0):
            raise UserError("eval_strategy steps needs --eval_steps N, a positive number of optimizer steps")
        steps = self.checkpointing_steps
        if steps is not None and steps != "epoch" and not (str(steps).isdigit() and int(steps) > 0):
            raise UserError(f"checkpointing_steps '{steps}' must be a positive integer or 'epoch'")
        if self.push_to_hub and not self.hub_model_id:
            raise UserError("push_to_hub needs --hub_model_id user/name, the Hub repo to push to")
        if self.early_stopping_patience is not None and not self.metric_for_best_model:
            raise UserError("early_stopping_patience needs --metric_for_best_model (e.g. accuracy, f1_micro, mse)")


SHARED_TYPES = (ModelArguments, DataArguments, TrainingArguments)  # the flags every recipe takes


def check_ranges(config: Any) -> None:
    """Every float field of `config` finite, and each field (when set) within its RANGE."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{f.name} is {value}; pass a finite number")
        if value is None or RANGE not in f.metadata:
            continue
        low, high, *above = f.metadata[RANGE]
        if (low is not None and (value <= low if above else value < low)) or (high is not None and value > high):
            raise UserError(f"{f.name} is {value}; pass a value {range_text(f.metadata[RANGE])}")


RUN_CONTROL = ("overwrite_output_dir", "resume_from_checkpoint", "allow_config_change_on_resume")
SECRETS = ("hub_token",)  # never written to a file, a tracker or a log


def config_to_dict(*configs: Any) -> dict[str, Any]:
    """The resolved configuration, one flat mapping, as `--config` reads it back.

    Flags that say what to do with an existing run are left out: reading a saved config back must not
    overwrite or resume that run unless asked again on the command line.
    """
    return {k: v for c in configs for k, v in dataclasses.asdict(c).items() if k not in (*RUN_CONTROL, *SECRETS)}


def resume_may_change(*configs: Any) -> set[str]:
    """The flags of `configs` (dataclass instances) marked ON_RESUME: a resumed run may change them."""
    return {f.name for c in configs for f in dataclasses.fields(c) if f.metadata.get(ON_RESUME)}


@dataclass(frozen=True)
class RunArgs:
    """What a run was asked to do: the recipe (named after its file, wherever it is called from: a shell, a
    notebook, a test) and its argument dataclasses, shared and its own. recipe_config.yaml records them; a
    resume compares them."""

    recipe_file: Path
    configs: tuple[Any, ...]

    @classmethod
    def of(cls, recipe_file: str | Path, *configs: Any) -> RunArgs:
        return cls(Path(recipe_file), configs)

    @property
    def recipe(self) -> str:
        return self.recipe_file.stem

    def get(self, kind: type[T]) -> T:
        return next(c for c in self.configs if isinstance(c, kind))

    def resolved(self) -> dict[str, Any]:
        """The resolved configuration, as `--config` reads it back."""
        return config_to_dict(*self.configs)

    def inputs(self) -> list[str]:
        """Paths the run reads: data files, a local model or tokenizer, the checkpoint, a recipe's *_dir/_file."""
        paths = [v for c in self.configs for k, v in vars(c).items() if k.endswith(("_dir", "_file"))]
        paths.remove(self.get(TrainingArguments).output_dir)  # where it writes
        model, training = self.get(ModelArguments), self.get(TrainingArguments)
        named = [*paths, model.model_name_or_path, model.tokenizer_name, training.resume_from_checkpoint]
        return [p for p in named if isinstance(p, str) and p != "latest" and Path(p).exists()]
