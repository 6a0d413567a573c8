"""A trained output read back: the checks on its folder, the settings its run saved, its model (a full model,
a LoRA adapter, encoder + head, the contrastive or static model) with torch, or its ONNX export with ONNX
Runtime and without torch, and its logits on raw text. `finetune-recipes predict`, `export` and the distill
recipe's teacher all read a run through these.

Texts are read as the model was trained to (max_length, windows of long documents), batched sorted by length
so each pads little, and scored in input order.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

from .documents import aggregate_rows
from .errors import UserError, first_line, listing
from .readback import read_json, read_yaml

MODEL_ONNX, HEAD_ONNX = "model.onnx", "head.onnx"  # what `export` writes
# What features.FeatureClassifier saves beside its encoder; named here, not imported, since importing
# features loads torch, which the ONNX path never needs.
HEAD_CONFIG = "feature_head.json"
STATIC = "finetune_recipes_static"  # static.MODEL_TYPE, named here for the same reason
T = TypeVar("T")
RESTORE = "restore it, or train (and export) again"
# The small files a model folder is read with besides its weights, each read back checked before anything loads: a
# damaged one is one line. tokenizer.json (megabytes for a decoder's) is checked only where it fails to load.
READ_FILES = ("config.json", "tokenizer_config.json", "recipe_config.yaml", "results.json")


def check_model_dir(path: Path, flag: str = "--model") -> None:
    """Refuses, in one line, a path that holds no saved classifier and tokenizer, or misses its weights."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a model directory; pass {flag} a recipe's output_dir")
    if not path.is_dir():
        raise UserError(f"model directory {path} does not exist; pass {flag} a recipe's output_dir")
    if not any((path / name).exists() for name in ("config.json", "adapter_config.json", HEAD_CONFIG, MODEL_ONNX)):
        raise UserError(f"{path} holds no saved model (no config.json); pass {flag} a recipe's output_dir")
    if not (path / "tokenizer_config.json").exists():
        raise UserError(f"{path} holds no tokenizer (no tokenizer_config.json); pass {flag} a recipe's output_dir")
    missing = next((name for name in weight_files(path) if not (path / name).is_file()), None)
    if missing:
        raise UserError(f"{path} has no {missing}, the model's weights; restore it, or train and export again")
    for name in READ_FILES:
        if (path / name).exists():
            (read_yaml if name.endswith(".yaml") else read_json)(path / name, RESTORE)


def weight_files(path: Path) -> list[str]:
    """The files a saved model's weights are in, by its kind: an ONNX export, a feature head, a LoRA
    adapter, or a transformers model (one safetensors file, or shards with their index)."""
    if (path / MODEL_ONNX).exists() or (path / "export.json").exists():  # export.EXPORTED: an export's record
        return [MODEL_ONNX, *([HEAD_ONNX] if (path / HEAD_CONFIG).exists() else [])]
    if (path / HEAD_CONFIG).exists():
        return ["feature_head.safetensors"]
    if (path / "adapter_config.json").exists():
        return ["adapter_model.safetensors"]
    return ["model.safetensors.index.json" if (path / "model.safetensors.index.json").exists() else "model.safetensors"]


def onnx_session(onnxruntime, path: Path, name: str):
    try:
        return onnxruntime.InferenceSession(str(path / name), providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime's own classes (InvalidProtobuf, Fail): a truncated or foreign file
        raise damaged(path, error, name) from None


def damaged(path: Path, error: BaseException, name: str | None = None) -> UserError:
    """A weights file that is there but cannot be read (truncated, overwritten): one line naming it (`name`, when
    the reader knows which one failed)."""
    return UserError(
        f"cannot load the model in {path} ({first_line(error)}): {name or ' or '.join(weight_files(path))} is "
        "damaged; restore it, or train and export again"
    )


def recipe_settings(path: Path) -> dict:
    """How the model read its texts in training (max_length, windows), from its recipe config when there."""
    config = path / "recipe_config.yaml"
    saved = read_yaml(config, RESTORE) if config.exists() else {}
    tokenizer = read_json(path / "tokenizer_config.json", RESTORE)
    return {
        "max_length": int(saved.get("max_length") or min(tokenizer.get("model_max_length") or 512, 512)),
        "windows": saved.get("long_documents") == "windows",
        "stride": int(saved.get("window_stride") or 0),
        "aggregation": saved.get("window_aggregation") or "mean",
    }


def thresholds_of(path: Path, label_names: list[str], problem_type: str | None) -> list[float]:
    """A multi-label model's decision thresholds, tuned on validation: thresholds.json, read with the checks of
    every input (its keys the labels, each value a number in [0, 1]). A run writes it with every multi-label
    model; a missing, damaged or edited one is refused, never silently replaced by 0.5."""
    file = path / "thresholds.json"
    if problem_type != "multi_label_classification":
        return [0.5] * len(label_names)
    fix = f"restore the file the run wrote, or write {{label: threshold}} for {listing(label_names, 4)}"
    try:
        saved = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if not (path / "results.json").exists():  # not a recipe's run: a multi-label model from elsewhere
            return [0.5] * len(label_names)
        raise UserError(f"{path} is a multi-label model without its thresholds.json; {fix}") from None
    except (OSError, ValueError) as error:
        raise UserError(f"{file} is not readable JSON ({first_line(error)}); {fix}") from None
    if not isinstance(saved, dict) or set(saved) != set(label_names):
        found = listing(sorted(saved)) if isinstance(saved, dict) else type(saved).__name__
        raise UserError(f"{file} holds thresholds for {found}, not for the model's labels; {fix}")
    bad = [k for k, v in saved.items() if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 1]
    if bad:  # nan fails 0 <= v too
        raise UserError(f"{file}: the threshold of {bad[0]} is {saved[bad[0]]!r}, not a number in [0, 1]; {fix}")
    return [float(saved[name]) for name in label_names]


def default_bf16(path: Path, problem_type: str | None) -> bool | None:
    """predict's precision unless told: the run's own (results.json), so that predict agrees with the run's
    predictions files; bf16 only where the hardware computes it natively (None: ask it); regression always
    in fp32, whose values bf16 would round (10.9746 → 11.0)."""
    if problem_type == "regression":
        return False
    try:
        precision = json.loads((path / "results.json").read_text())["hardware"]["precision"]
    except (OSError, ValueError, KeyError, TypeError):
        precision = "bf16"  # a model from elsewhere: the hardware decides
    return None if precision == "bf16" else False


def batches(lengths: list[int], batch_size: int):
    """Row indices in batches of similar length, shortest first: each batch pads only to its own longest."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def load_classifier(path: str | Path):
    """The model a recipe saved in `path`, ready for inference with torch, whichever strategy produced it.

    Refuses a bare encoder: its classification head would be freshly initialised, and its confident
    labels random. A missing head is what tells (id2label cannot: a regression model keeps LABEL_0).
    """
    path = Path(path)
    check_model_dir(path)
    from safetensors import SafetensorError, safe_open
    from transformers.utils import logging as transformers_logging

    shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # "Loading weights" of a saved classifier: no bar over the output
    try:
        for name in weight_files(path):  # each header read first: a damaged adapter fails before its base loads
            if name.endswith(".safetensors"):
                with safe_open(path / name, framework="numpy"):
                    pass
        return load_model(path).eval()
    except UserError:  # a refusal of its own (a bare encoder, an adapter's missing base): as it is
        raise
    except (OSError, RuntimeError, ValueError, EOFError, SafetensorError) as error:  # truncated, overwritten
        raise damaged(path, error) from None
    finally:
        if shown:
            transformers_logging.enable_progress_bar()


def load_model(path: Path):
    # Imported here: the ONNX path needs none of it, and torch and transformers take seconds to import. Each
    # kind of model's loader is imported only for that kind (they pull in datasets, accelerate, peft).
    import transformers
    from transformers import AutoModelForSequenceClassification

    config = path / "config.json"
    model_type = read_json(config, RESTORE).get("model_type", "") if config.exists() else ""
    if model_type.startswith("finetune_recipes_"):  # this package's own classifiers: static, sentence
        importlib.import_module(f"finetune_recipes.{model_type.removeprefix('finetune_recipes_')}")  # registers it
    if (path / HEAD_CONFIG).exists():
        from .features import FeatureClassifier

        model = FeatureClassifier.from_pretrained(path)
    elif (path / "adapter_config.json").exists():
        from .modeling import load_adapter_classifier

        model = load_adapter_classifier(path)
    else:
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # the load report of a bare encoder; we say it in one line
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(path, output_loading_info=True)
        finally:
            transformers.logging.set_verbosity(verbosity)
        if info["missing_keys"]:
            missing = listing(sorted(info["missing_keys"]), limit=3)
            raise UserError(
                f"{path} holds no trained classification head ({missing} not in its weights), so its labels "
                "would be random; train a head with a recipe and pass --model its output_dir"
            )
    return model


def torch_logits(path: Path, texts: list[str], settings: dict, batch_size: int, bf16: bool | None) -> np.ndarray:
    """Logits per text from the saved model, with torch; in bf16 where native unless `bf16` is False."""
    import torch  # here, as in load_classifier
    from transformers import AutoTokenizer, DataCollatorWithPadding

    from .modeling import bf16_supported

    tokenizer = open_tokenizer(path, lambda: AutoTokenizer.from_pretrained(path))  # first: it fails quicker
    model = load_classifier(path)
    if settings["windows"]:
        from .data.windows import encode_windows

        encoded = encode_windows(tokenizer, [texts], settings["max_length"], settings["stride"])
        documents = np.asarray(encoded.pop("overflow_to_sample_mapping"))
    else:
        encoded = tokenizer(texts, truncation=True, max_length=settings["max_length"])
        documents = np.arange(len(texts))
    rows = [{k: encoded[k][i] for k in encoded} for i in range(len(documents))]
    collator = DataCollatorWithPadding(tokenizer)
    # A feature head was trained on a document's window features averaged, so it predicts from those too.
    features = (path / HEAD_CONFIG).exists() and settings["windows"]
    values = np.empty((len(rows), model.config.hidden_size if features else model.config.num_labels), np.float32)
    device = next(model.parameters()).device
    bf16 = bf16_supported(device) if bf16 is None else bf16
    with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        for indices in batches([len(r["input_ids"]) for r in rows], batch_size):
            batch = collator([rows[i] for i in indices])
            values[indices] = (model.embed(**batch) if features else model(**batch).logits).float().numpy()
        if not features:
            return aggregate_rows(values, documents, settings["aggregation"])[0]
        return model.head(torch.from_numpy(aggregate_rows(values, documents, "mean")[0])).logits.float().numpy()


def onnx_logits(path: Path, texts: list[str], settings: dict, batch_size: int) -> np.ndarray:
    """Logits per text from an ONNX export, with ONNX Runtime and the `tokenizers` library alone."""
    try:  # an optional dependency (the export extra)
        import onnxruntime
    except ImportError:
        raise UserError("onnxruntime is not installed; pip install 'finetune-recipes[export]'") from None
    session = onnx_session(onnxruntime, path, MODEL_ONNX)
    encodings, documents, pad_id = encode_texts(path, texts, settings)
    inputs = [i.name for i in session.get_inputs()]
    # A feature head's export gives (logits, features): a long document's windows average the features.
    by_features = len(session.get_outputs()) == 2 and settings["windows"]
    values = [None] * len(encodings)
    for indices in batches([len(e.ids) for e in encodings], batch_size):
        batch = pad([encodings[i] for i in indices], pad_id)
        out = session.run(None, {name: batch[name] for name in inputs})[1 if by_features else 0]
        for i, row in zip(indices, out, strict=True):
            values[i] = row
    values = np.stack(values)
    if not by_features:
        return aggregate_rows(values, documents, settings["aggregation"])[0]
    head = onnx_session(onnxruntime, path, HEAD_ONNX)
    return head.run(None, {"features": aggregate_rows(values, documents, "mean")[0]})[0]


def encode_texts(path: Path, texts: list[str], settings: dict) -> tuple[list, np.ndarray, int]:
    """Each text's encoding with the `tokenizers` library alone (a long document's windows when the model was
    trained on windows), the document each encoding belongs to, and the padding id."""
    from tokenizers import Tokenizer

    tokenizer = open_tokenizer(path, lambda: Tokenizer.from_file(str(path / "tokenizer.json")))
    tokenizer.no_padding()  # padded per length-sorted batch
    tokenizer.enable_truncation(settings["max_length"], stride=settings["stride"] if settings["windows"] else 0)
    encodings, documents = [], []
    for document, encoding in enumerate(tokenizer.encode_batch(texts)):
        windows = [encoding, *encoding.overflowing] if settings["windows"] else [encoding]
        encodings += windows
        documents += [document] * len(windows)
    return encodings, np.asarray(documents), pad_token_id(path, tokenizer)


def numpy_servable(path: Path) -> bool:
    """A bag-of-vectors model (static_embeddings', or a distilled student): numpy serves it without torch."""
    config = read_json(path / "config.json", RESTORE) if (path / "config.json").exists() else {}
    plain = (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    return plain and config.get("model_type") == STATIC and config.get("encoder") == "bag"


def numpy_logits(path: Path, texts: list[str], settings: dict, batch_size: int) -> np.ndarray:
    """A bag-of-vectors model's logits with numpy, safetensors and `tokenizers` alone: the mean of each text's
    vectors over its real tokens, then the head's linear layers with GELU between them (exact, through erf), in
    float32 as the torch model computes them. Written by hand so that `predict` on such a model never imports
    torch or transformers, which take most of a short job's time."""
    from safetensors.numpy import load_file
    from scipy.special import erf

    weights = load_file(path / "model.safetensors")
    table = weights["embeddings.weight"]
    layers = sorted(
        {k.rsplit(".", 1)[0] for k in weights if k.startswith("head.")}, key=lambda n: int(n.rsplit(".", 1)[1])
    )
    encodings, documents, pad_id = encode_texts(path, texts, settings)
    values = np.empty((len(encodings), weights[f"{layers[-1]}.weight"].shape[0]), np.float32)
    for indices in batches([len(e.ids) for e in encodings], batch_size):
        batch = pad([encodings[i] for i in indices], pad_id)
        mask = batch["attention_mask"][..., None].astype(np.float32)
        features = (table[batch["input_ids"]] * mask).sum(1) / np.maximum(mask.sum(1), 1)
        for depth, name in enumerate(layers):
            features = features @ weights[f"{name}.weight"].T + weights[f"{name}.bias"]
            if depth < len(layers) - 1:  # ClassificationHead's MLP: Linear, GELU, Linear
                features = 0.5 * features * (1 + erf(features / np.sqrt(np.float32(2))))
        values[indices] = features
    return aggregate_rows(values, documents, settings["aggregation"])[0]


def pad(encodings: list, pad_id: int) -> dict[str, np.ndarray]:
    """input_ids, attention_mask and token_type_ids of `encodings`, right-padded to the longest.

    By hand: `tokenizers` pads only the batch it encodes, and these batches are formed after encoding."""
    shape = (len(encodings), max(len(e.ids) for e in encodings))
    batch = {
        "input_ids": np.full(shape, pad_id, np.int64),
        "attention_mask": np.zeros(shape, np.int64),
        "token_type_ids": np.zeros(shape, np.int64),
    }
    for row, encoding in enumerate(encodings):
        n = len(encoding.ids)
        batch["input_ids"][row, :n] = encoding.ids
        batch["attention_mask"][row, :n] = 1
        batch["token_type_ids"][row, :n] = encoding.type_ids
    return batch


def open_tokenizer(path: Path, load: Callable[[], T]) -> T:
    """`load()`s the saved tokenizer; where that fails, a damaged tokenizer.json is one line naming it (the
    tokenizers library raises a plain Exception for it), read only then, not parsed twice on every start."""
    try:
        return load()
    except Exception:
        if (path / "tokenizer.json").exists():
            read_json(path / "tokenizer.json", RESTORE)
        raise


def pad_token_id(path: Path, tokenizer) -> int:
    """The id of the tokenizer's padding token (tokenizer_config.json names it)."""
    token = read_json(path / "tokenizer_config.json", RESTORE).get("pad_token")
    token = token.get("content") if isinstance(token, dict) else token
    pad_id = tokenizer.token_to_id(token) if token else None
    return 0 if pad_id is None else pad_id


def trained_logits(path: str | Path, texts: list[str], batch_size: int = 64, bf16: bool | None = None):
    """The saved model's logits on `texts` (calibrated: the scaling is folded into its output layer; regression:
    values in the target's units), one row per text in input order, with the problem type and the label names.
    `path` is checked first by its caller (check_model_dir: predict, distill's read_teacher), once."""
    path = Path(path)
    settings = recipe_settings(path)
    config = read_json(path / "config.json", RESTORE)
    kind, id2label = config.get("problem_type"), config.get("id2label") or {}
    if (path / MODEL_ONNX).exists():
        logits = onnx_logits(path, texts, settings, batch_size)
    elif numpy_servable(path):
        logits = numpy_logits(path, texts, settings, batch_size)
    else:
        logits = torch_logits(path, texts, settings, batch_size, default_bf16(path, kind) if bf16 is None else bf16)
    return logits, kind, [id2label.get(str(i), f"LABEL_{i}") for i in range(logits.shape[1])]
