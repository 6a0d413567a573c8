"""Transfer-learning recipes for text classification: the builders the recipes import.

Recipes import from here, not from the modules, so a copied recipe keeps working when a helper moves.
"""

from .config import DataArguments, ModelArguments, TrainingArguments, UserError, check_ranges, run_cli
from .data import Task
from .features import (
    ClassificationHead,
    FeatureClassifier,
    cached_features,
    check_pooling,
    feature_dataloader,
    feature_loaders,
)
from .freezing import eval_frozen, format_trainable, freeze, set_trainable, stage_at, stage_starts, unfreezing_stages
from .layers import block_linears, discover_layers
from .modeling import build_model
from .optim import build_optimizer, format_groups, lr_trajectory, param_groups, plot_lr_schedule
from .training.loop import evaluate, train
from .training.outputs import save_merged
from .training.run import Run, Schedule, start_run

__all__ = [
    "ClassificationHead",
    "DataArguments",
    "FeatureClassifier",
    "ModelArguments",
    "Run",
    "Schedule",
    "Task",
    "TrainingArguments",
    "UserError",
    "block_linears",
    "build_model",
    "build_optimizer",
    "cached_features",
    "check_ranges",
    "check_pooling",
    "discover_layers",
    "eval_frozen",
    "evaluate",
    "feature_dataloader",
    "feature_loaders",
    "format_groups",
    "format_trainable",
    "freeze",
    "lr_trajectory",
    "param_groups",
    "plot_lr_schedule",
    "run_cli",
    "save_merged",
    "set_trainable",
    "stage_at",
    "stage_starts",
    "start_run",
    "train",
    "unfreezing_stages",
]
