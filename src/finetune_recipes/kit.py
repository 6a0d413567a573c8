"""What the recipes import: the builders and helpers of the kit, re-exported under one stable name.

A recipe writes `from finetune_recipes.kit import build_model`, and a copied recipe keeps working when a helper
moves between modules: only this file changes. Every name here is the real object (go-to-definition, `help()`
and `inspect.signature` reach its code), imported plainly from the module that defines it; importing this module
loads torch, transformers and accelerate. `__all__` is derived from the imports below, and
tests/test_imports.py checks that it is exactly what the recipes import.
"""
# The names below are re-exports, this module's whole interface:
# ruff: noqa: F401

from .config import ON_RESUME, RANGE, DataArguments, ModelArguments, RunArgs, TrainingArguments
from .data import build_dataloaders, load_data
from .distillation import (
    check_no_leakage,
    check_student_data,
    check_teacher,
    distillation_loss,
    distilled_from,
    read_teacher,
    student_vectors,
    teacher_scores,
    unlabeled_texts,
    with_teacher,
)
from .errors import UserError
from .features import (
    ClassificationHead,
    FeatureClassifier,
    cached_features,
    check_pooling,
    feature_loaders,
    on_cached_states,
)
from .freezing import Thaw, count_parameters, format_trainable, freeze, set_trainable, stage_starts, unfreezing_stages
from .layers import block_linears, discover_layers, stored_transposed
from .modeling import build_model, head_has_bias
from .optim import build_optimizer, build_schedule, format_groups, lr_trajectory, param_groups, plot_lr_schedule
from .parsing import run_cli
from .sentence import (
    cosine_pair_loss,
    embed,
    embed_splits,
    fit_head,
    pair_dataloader,
    sentence_classifier,
    sentence_pairs,
    sentence_pooling,
)
from .static import build_static_model, load_vectors
from .strategy_args import DistillArguments, EncodeArguments, StaticArguments
from .training.accelerator import build_accelerator, end_training, wrap_blocks_not_embeddings
from .training.checkpoints import checkpoint_due, restore_best, save_best, save_checkpoint
from .training.evaluate import calibrate, evaluate, record_evaluation, run_results
from .training.save import check_outputs, push_to_hub, save_merged, save_run
from .training.start import claim_outputs, resume_state, start_trackers, train_batches
from .training.tracking import LossMeter

__all__ = sorted(name for name in dir() if not name.startswith("_"))
