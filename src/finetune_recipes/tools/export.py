"""`finetune-recipes export --onnx`: a trained classifier as an ONNX graph for ONNX Runtime on CPU servers,
optionally with int8 weights (dynamic quantisation).

The export folder is self-contained: the graph, the tokenizer, the label names (config.json), the multi-label
thresholds and the recipe config that says how texts were read (max_length, windows). `finetune-recipes
predict --model FOLDER` serves it with ONNX Runtime and without torch.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from ..errors import UserError, first_line
from ..features import FeatureClassifier
from ..ownership import MANIFEST, entries, lock_output_dir, write_manifest
from .predict import HEAD_ONNX, MODEL_ONNX, check_model_dir, load_classifier

logger = logging.getLogger(__name__)

EXPORTED = "export.json"  # the files an export wrote: all that a later export may replace
COPIED = ("recipe_config.yaml", "thresholds.json")  # how texts were read; multi-label decision thresholds


def check_onnx_tools(quantize: bool) -> None:
    """The exporter needs onnx and onnxscript; int8 needs ONNX Runtime's quantiser: refused now, not halfway."""
    needed = ["onnx", "onnxscript", *(["onnxruntime"] if quantize else [])]
    missing = [name for name in needed if not _importable(name)]
    if missing:
        raise UserError(
            f"{', '.join(missing)} not installed; pip install 'finetune-recipes[export]' (or: pip install "
            f"{' '.join(missing)})"
        )


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_export_dir(model_dir: Path, quantize: bool) -> Path:
    return model_dir / ("onnx-int8" if quantize else "onnx")


class Logits(torch.nn.Module):
    """The classifier as a function of token ids to logits (and, for a feature head, the pooled features
    too: a long document's windows are averaged on those before the head)."""

    def __init__(self, model: torch.nn.Module, features: bool):
        super().__init__()
        self.model, self.features = model, features

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        if self.features:
            pooled = self.model.embed(**inputs)
            return self.model.head(pooled).logits, pooled
        return self.model(**inputs).logits


def export_onnx(model_dir: str | Path, output_dir: str | Path | None = None, quantize: bool = False) -> Path:
    """Writes `model.onnx` (int8 weights with `quantize`), the tokenizer, config.json and the recipe's
    settings to `output_dir` (default: MODEL/onnx, or MODEL/onnx-int8), and returns it.

    Written in a temporary folder beside it and renamed into place: a failed export leaves nothing, and an
    earlier export there is replaced only once the new one is complete. Refuses a folder that is not a
    saved classifier, a tokenizer without tokenizer.json (serving reads it with `tokenizers` alone), and an
    output_dir holding anything but an earlier export.
    """
    model_dir = Path(model_dir)
    check_model_dir(model_dir)
    if (model_dir / MODEL_ONNX).exists():
        raise UserError(f"{model_dir} is an ONNX export already; pass --model the recipe's output_dir it came from")
    out = Path(output_dir) if output_dir else default_export_dir(model_dir, quantize)
    check_earlier_export(out)
    check_onnx_tools(quantize)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not tokenizer.is_fast:
        raise UserError(
            f"{type(tokenizer).__name__} has no tokenizer.json, which ONNX serving reads; export a model with a "
            "fast tokenizer"
        )
    model = load_classifier(model_dir)
    if hasattr(model, "merge_and_unload"):  # a LoRA adapter: one plain model to trace
        model = model.merge_and_unload()
    features = isinstance(model, FeatureClassifier)
    # Inside a run's output_dir, the export becomes the run's: an --overwrite_output_dir run that retrains
    # removes it with the rest, so a stale export never sits beside a new model. No run may write meanwhile.
    owned = (model_dir / MANIFEST).exists() and out.parent.resolve() == model_dir.resolve()
    lock = lock_output_dir(model_dir, None) if owned else None
    try:
        write_export(model, tokenizer, model_dir, out, quantize, features)
        if owned:
            write_manifest(model_dir, [out.name], set())
    finally:
        if lock is not None:
            os.close(lock)
    return out


def check_earlier_export(out: Path) -> None:
    """An existing `out` may be replaced only when it is an earlier export: its EXPORTED record lists every
    entry in it. A folder of the user's, even one holding a model.onnx of their own, is refused."""
    if not out.exists():
        return
    try:
        written = set(json.loads((out / EXPORTED).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{out} exists and holds no earlier export; pass another --output_dir or remove it") from None
    foreign = sorted(entries(out) - written - {EXPORTED})
    if foreign:
        raise UserError(f"{out} holds '{foreign[0]}', which no export wrote; pass another --output_dir")


def write_export(model, tokenizer, model_dir: Path, out: Path, quantize: bool, features: bool) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        tmp = Path(tmp)
        try:  # the exporter's and quantiser's errors are of many kinds: one line names the model and the cause
            with quiet():
                trace(Logits(model, features).eval(), tokenizer, tmp / MODEL_ONNX, features)
                if features:  # features -> logits, for the average of a long document's windows
                    trace_head(model.head.eval(), model.config.hidden_size, tmp / HEAD_ONNX)
            if quantize:
                quantize_int8(tmp / MODEL_ONNX)
        except Exception as error:
            raise UserError(f"ONNX export of {type(model).__name__} failed: {first_line(error)}") from None
        tokenizer.save_pretrained(tmp)
        model.config.save_pretrained(tmp)
        for name in COPIED:
            if (model_dir / name).exists():
                shutil.copyfile(model_dir / name, tmp / name)
        record = {"written_by": "finetune-recipes export", "files": sorted(p.name for p in tmp.iterdir())}
        (tmp / EXPORTED).write_text(json.dumps(record, indent=1) + "\n")  # what a later export may replace
        tmp.chmod(0o777 & ~current_umask())  # as a plain mkdir would leave it, not TemporaryDirectory's 0700
        if out.exists():  # an earlier export, checked above: replaced whole
            shutil.rmtree(out)
        os.replace(tmp, out)
        Path(tmp).mkdir()  # TemporaryDirectory removes what it made


@contextlib.contextmanager
def quiet():
    """The exporter's warnings (torchvision missing, axis renames, tracer notes) say nothing a user can act on."""
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        onnx_logger.setLevel(level)


@torch.no_grad()
def trace(module: torch.nn.Module, tokenizer, path: Path, features: bool) -> None:
    """torch.onnx.export (dynamo) with batch and sequence length dynamic."""
    texts = ["a short text", "a longer text, to give the batch some padding"]
    sample = tokenizer(texts, padding=True, return_tensors="pt")
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in sample]
    batch, length = torch.export.Dim("batch", min=1), torch.export.Dim("sequence", min=1)
    shapes = {n: {0: batch, 1: length} for n in names}
    outputs = ["logits", "features"] if features else ["logits"]
    torch.onnx.export(
        module,
        tuple(sample[n] for n in names),
        str(path),
        input_names=names,
        output_names=outputs,
        dynamic_shapes=tuple(shapes[n] for n in names),
        dynamo=True,
        external_data=False,
        verbose=False,
    )


@torch.no_grad()
def trace_head(head: torch.nn.Module, hidden_size: int, path: Path) -> None:
    class HeadLogits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = head

        def forward(self, features):
            return self.head(features).logits

    torch.onnx.export(
        HeadLogits(),
        (torch.zeros(2, hidden_size),),
        str(path),
        input_names=["features"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
        dynamo=True,
        external_data=False,
        verbose=False,
    )


def quantize_int8(path: Path) -> None:
    """int8 weights for the matrix multiplies, activations quantised on the fly (ONNX Runtime's dynamic
    quantisation): a smaller file and faster CPU inference, at some agreement with fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = path.with_suffix(".fp32.onnx")
    path.rename(fp32)
    # Per output channel: one scale per weight row. Measured on BBC News with MiniLM: per-tensor scales
    # changed 2 of 213 validation labels, per-channel none (benchmarks/README.md).
    quantize_dynamic(str(fp32), str(path), weight_type=QuantType.QInt8, per_channel=True)
    fp32.unlink()
