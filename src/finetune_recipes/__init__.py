"""Transfer-learning recipes for text classification: the builders the recipes import.

Recipes import from here, not from the modules, so a copied recipe keeps working when a helper moves.
Each name is imported on first use (PEP 562), as transformers does: `finetune-recipes predict` on an ONNX
export, or `ls`, never pays for torch, transformers or accelerate.
"""

from __future__ import annotations

import importlib

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
    "CacheArguments": "features",
    "EncodeArguments": "features",
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
    "StaticArguments": "static",
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


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
