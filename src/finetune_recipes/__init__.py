"""Transfer-learning recipes for text classification: the builders the recipes import.

Recipes import from here, not from the modules, so a copied recipe keeps working when a helper moves.
Each name is imported on first use (PEP 562), as transformers does: `finetune-recipes predict` on an ONNX
export, or `ls`, never pays for torch, transformers or accelerate. A recipe's `from finetune_recipes import
build_model` binds the flag dataclasses and run_cli at once (they are light), and each builder as a deferred
reference that imports its module when first called: run_cli checks the flags, the output_dir and the data
before torch loads, so a refusal takes a second or two, not the ten of a whole run's imports.
"""

from __future__ import annotations

import importlib
import sys

# name -> the module that defines it
_EXPORTS = {
    "DataArguments": "config",
    "ON_RESUME": "config",
    "ModelArguments": "config",
    "RunArgs": "config",
    "TrainingArguments": "config",
    "check_ranges": "config",
    "run_cli": "parsing",
    "UserError": "errors",
    "Task": "data",
    "build_dataloaders": "data",
    "load_data": "data",
    "CacheArguments": "strategy_args",
    "EncodeArguments": "strategy_args",
    "ClassificationHead": "features",
    "FeatureClassifier": "features",
    "cached_features": "features",
    "check_pooling": "features",
    "feature_dataloader": "features",
    "feature_loaders": "features",
    "on_cached_states": "features",
    "Thaw": "freezing",
    "count_parameters": "freezing",
    "eval_frozen": "freezing",
    "format_trainable": "freezing",
    "freeze": "freezing",
    "set_trainable": "freezing",
    "stage_at": "freezing",
    "stage_starts": "freezing",
    "unfreezing_stages": "freezing",
    "block_linears": "layers",
    "discover_layers": "layers",
    "build_model": "modeling",
    "Schedule": "optim",
    "build_optimizer": "optim",
    "build_schedule": "optim",
    "format_groups": "optim",
    "lr_trajectory": "optim",
    "param_groups": "optim",
    "plot_lr_schedule": "optim",
    "cosine_pair_loss": "sentence",
    "embed": "sentence",
    "embed_splits": "sentence",
    "fit_head": "sentence",
    "pair_dataloader": "sentence",
    "sentence_classifier": "sentence",
    "sentence_pairs": "sentence",
    "sentence_pooling": "sentence",
    "StaticArguments": "strategy_args",
    "build_static_model": "static",
    "load_vectors": "static",
    "TrainState": "training.checkpoints",
    "checkpoint_due": "training.checkpoints",
    "save_checkpoint": "training.checkpoints",
    "Evaluation": "training.evaluate",
    "Validation": "training.evaluate",
    "evaluate": "training.evaluate",
    "build_accelerator": "training.precision",
    "wrap_blocks_not_embeddings": "training.precision",
    "epoch_batches": "training.resume",
    "start_training": "training.resume",
    "check_outputs": "training.save",
    "push_to_hub": "training.save",
    "save_merged": "training.save",
    "save_run": "training.save",
    "LossMeter": "training.tracking",
}
__all__ = sorted(_EXPORTS)


# The modules that import neither torch nor transformers' models: what parsing a recipe's flags needs.
_LIGHT = ("config", "errors", "parsing", "strategy_args")


def _resolve(name: str):
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


class _Deferred:
    """A builder bound before its module is imported; the first call (or attribute, isinstance, subclassing)
    imports it. Written here because PEP 562 defers modules, not the names a `from ... import` binds."""

    def __init__(self, name: str):
        self.__name__ = self._name = name
        self._target = None

    def _get(self):
        if self._target is None:
            self._target = _resolve(self._name)
        return self._target

    def __call__(self, *args, **kwargs):
        return self._get()(*args, **kwargs)

    def __getattr__(self, attribute: str):  # only for what the instance lacks: __doc__ and __name__ are its own
        if attribute.startswith("_"):  # copy and pickle probe __reduce_ex__ etc. before __init__ has run
            raise AttributeError(attribute)
        return getattr(self._get(), attribute)

    def __mro_entries__(self, bases: tuple) -> tuple:
        return (self._get(),)

    def __instancecheck__(self, instance) -> bool:
        return isinstance(instance, self._get())

    def __repr__(self) -> str:
        return f"<deferred finetune_recipes.{self._name}>"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = f"{__name__}.{_EXPORTS[name]}"
    if _EXPORTS[name] in _LIGHT or module in sys.modules:
        return _resolve(name)
    return _Deferred(name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
