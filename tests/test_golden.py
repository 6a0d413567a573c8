"""Golden numbers, as torchtune's test_loss pins them: every recipe's training loss at each of its first 8
optimizer steps and its validation metrics after the tiny runs' 3 epochs, on the tiny BERT, CPU, fp32, seed 42,
recorded from the code of 2026-12-01; and the steps at which each run evaluates, its best step and the step it
ends at, recorded 2026-12-06 (before the loops were flattened), also for every recipe under early stopping with
evaluations every 2 steps and gradient accumulation over 5 batches. A refactor that changes what a recipe
computes, or when it evaluates or stops, fails here; a change meant to alter the numbers updates GOLDEN (the
failure message prints the values observed) and says why in its commit."""

from __future__ import annotations

import json

import pytest
from conftest import run_inline
from test_task_shapes import shape_args, shapes  # noqa: F401  (shapes: a fixture)

from finetune_recipes.catalog import caches_features, list_recipes
from finetune_recipes.config import METRICS

# Losses are logged rounded to 6 decimals. Two runs on one CPU gave the same digits; another CPU (AVX2 kernels
# rather than AVX-512) may differ in the last bits of an fp32 matrix product, which training can carry further.
TOLERANCE = 1e-5
SHAPES = {
    "single": [],
    "multi": ["--label_column", "labels"],
    "regression": ["--label_column", "score"],
    "windows": ["--long_documents", "windows", "--window_stride", "8"],
}
FILES = {"multi": "multi", "regression": "regression", "windows": "long"}
# Evaluations every 2 optimizer steps of 5 accumulated batches (12 batches an epoch: 2 whole steps and one of the
# 2 batches left, so epochs end at steps 3, 6 and 9, off the 2-step grid), the best by macro-F1, stopped after 3
# evaluations without improvement.
EARLY_STOPPING = [
    "--eval_strategy", "steps", "--eval_steps", "2", "--gradient_accumulation_steps", "5",
    "--metric_for_best_model", "f1_macro", "--early_stopping_patience", "3",
]  # fmt: skip

GOLDEN: dict[str, dict] = {
    # Recorded 2026-12-06 with the recipe (issue 40): its teacher is static_embeddings trained on the same tiny data
    # (conftest.teacher_for, 4 epochs), so these also pin the teacher's run and the scores it hands over.
    "distill/single": {
        "losses": [0.552404, 0.542781, 0.550766, 0.55415, 0.541265, 0.54335, 0.554956, 0.54971],
        "eval": {"eval_accuracy": 0.466667, "eval_f1_macro": 0.375661},
        "evaluated_at": [12, 24, 36],
        "best_step": None,
        "steps": 36,
    },
    "distill/early_stopping": {
        "losses": [0.54872, 0.550496, 0.555881, 0.548991, 0.550602, 0.552913, 0.54832, 0.547947],
        "eval": {"eval_accuracy": 0.4, "eval_f1_macro": 0.282744},
        "evaluated_at": [2, 4, 6, 8],
        "best_step": 2,
        "steps": 8,
    },
    "full_finetune/single": {
        "losses": [1.095955, 1.093954, 1.099442, 1.099771, 1.087423, 1.082981, 1.116106, 1.093182],
        "eval": {"eval_accuracy": 0.666667, "eval_f1_macro": 0.555556},
        "evaluated_at": [12, 24, 36],
        "best_step": None,
        "steps": 36,
    },
    "llrd/single": {
        "losses": [1.095955, 1.093954, 1.09947, 1.099602, 1.087956, 1.083104, 1.115881, 1.093358],
        "eval": {"eval_accuracy": 0.666667, "eval_f1_macro": 0.555556},
        "evaluated_at": [12, 24, 36],
        "best_step": None,
        "steps": 36,
    },
    "frozen_base_pooler/single": {
        "losses": [1.099901, 1.093987, 1.098973, 1.103188, 1.089349, 1.085512, 1.109147, 1.09562],
        "eval": {"eval_accuracy": 0.333333, "eval_f1_macro": 0.21345},
        "evaluated_at": [12, 24, 36],
        "best_step": None,
        "steps": 36,
    },
    "progressive_unfreezing/single": {
        "losses": [1.099901, 1.093987, 1.098844, 1.102634, 1.089211, 1.084959, 1.111917, 1.09739],
        "eval": {"eval_accuracy": 0.666667, "eval_f1_macro": 0.555556},
        "evaluated_at": [12, 24, 36],
        "best_step": None,
        "steps": 36,
    },
    "feature_extraction/single": {
        "losses": [1.069133, 1.238405, 1.093943, 1.071852, 1.107568, 1.19238, 1.108357, 1.102444],
        "eval": {"eval_accuracy": 0.6, "eval_f1_macro": 0.6},
        "evaluated_at": [12, 24, 36],
        "best_step": None,
        "steps": 36,
    },
    "lora/single": {
        "losses": [1.099682, 1.094936, 1.101279, 1.098884, 1.095472, 1.089815, 1.10847, 1.092344],
        "eval": {"eval_accuracy": 0.566667, "eval_f1_macro": 0.506173},
        "evaluated_at": [12, 24, 36],
        "best_step": None,
        "steps": 36,
    },
    "static_embeddings/single": {
        "losses": [1.103973, 1.084902, 1.100348, 1.107269, 1.078797, 1.079869, 1.11136, 1.092501],
        "eval": {"eval_accuracy": 0.333333, "eval_f1_macro": 0.166667},
        "evaluated_at": [12, 24, 36],
        "best_step": None,
        "steps": 36,
    },
    "contrastive/single": {  # cosine-similarity losses on pairs; the head is fitted after them
        "losses": [0.177563, 0.283049, 0.444682, 0.159284, 0.269935, 0.448724, 0.241695, 0.324106],
        "eval": {"eval_accuracy": 1.0, "eval_f1_macro": 1.0},
        "evaluated_at": [1440],
        "best_step": None,
        "steps": 1440,
    },
    "full_finetune/multi": {
        "losses": [0.692474, 0.690426, 0.689015, 0.698905, 0.70009, 0.683119, 0.681759, 0.683463],
        "eval": {
            "eval_f1_macro": 0.80117,
            "eval_f1_micro": 0.806723,
            "eval_f1_samples": 0.808333,
            "eval_subset_accuracy": 0.425,
        },
        "evaluated_at": [15, 30, 45],
        "best_step": None,
        "steps": 45,
    },
    "full_finetune/regression": {
        "losses": [0.778735, 0.697512, 1.230467, 1.216132, 0.650148, 0.937508, 1.810015, 0.788747],
        "eval": {
            "eval_mae": 1.346166,
            "eval_mse": 2.433933,
            "eval_pearson": 0.813576,
            "eval_r2": 0.653759,
            "eval_spearman": 0.963924,
        },
        "evaluated_at": [15, 30, 45],
        "best_step": None,
        "steps": 45,
    },
    "full_finetune/windows": {
        "losses": [1.10075, 1.100156, 1.092759, 1.102364, 1.105185, 1.098825, 1.087252, 1.102819],
        "eval": {"eval_accuracy": 0.65, "eval_f1_macro": 0.542222},
        "evaluated_at": [45, 90, 135],
        "best_step": None,
        "steps": 135,
    },
    "contrastive/early_stopping": {
        "losses": [0.267771, 0.394261, 0.296323, 0.322037, 0.35595, 0.203101, 0.234516, 0.189233],
        "eval": {"eval_accuracy": 1.0, "eval_f1_macro": 1.0},
        "evaluated_at": [288],
        "best_step": 288,
        "steps": 288,
    },
    "feature_extraction/early_stopping": {
        "losses": [1.123439, 1.13216, 1.040454, 1.066881, 1.086489, 1.129085, 1.080165, 1.075711],
        "eval": {"eval_accuracy": 0.3, "eval_f1_macro": 0.153846},
        "evaluated_at": [2, 4, 6, 8],
        "best_step": 2,
        "steps": 8,
    },
    "frozen_base_pooler/early_stopping": {
        "losses": [1.097975, 1.094981, 1.11674, 1.097803, 1.103706, 1.09837, 1.100829, 1.098538],
        "eval": {"eval_accuracy": 0.333333, "eval_f1_macro": 0.166667},
        "evaluated_at": [2, 4, 6, 8],
        "best_step": 2,
        "steps": 8,
    },
    "full_finetune/early_stopping": {
        "losses": [1.096754, 1.095437, 1.116773, 1.098924, 1.104902, 1.097915, 1.100864, 1.097963],
        "eval": {"eval_accuracy": 0.333333, "eval_f1_macro": 0.166667},
        "evaluated_at": [2, 4, 6, 8],
        "best_step": 2,
        "steps": 8,
    },
    "llrd/early_stopping": {
        "losses": [1.096754, 1.095437, 1.116044, 1.099052, 1.104873, 1.097135, 1.100914, 1.098408],
        "eval": {"eval_accuracy": 0.333333, "eval_f1_macro": 0.166667},
        "evaluated_at": [2, 4, 6, 8],
        "best_step": 2,
        "steps": 8,
    },
    "lora/early_stopping": {
        "losses": [1.098319, 1.096733, 1.110143, 1.097057, 1.102656, 1.096021, 1.09865, 1.098306],
        "eval": {"eval_accuracy": 0.333333, "eval_f1_macro": 0.166667},
        "evaluated_at": [2, 4, 6, 8],
        "best_step": 2,
        "steps": 8,
    },
    "progressive_unfreezing/early_stopping": {
        "losses": [1.097975, 1.094838, 1.118119, 1.097891, 1.103667, 1.099397, 1.10038, 1.097583],
        "eval": {"eval_accuracy": 0.333333, "eval_f1_macro": 0.166667},
        "evaluated_at": [2, 4, 6, 8],
        "best_step": 2,
        "steps": 8,
    },
    "static_embeddings/early_stopping": {
        "losses": [1.096719, 1.100243, 1.112781, 1.09958, 1.100698, 1.098723, 1.095326, 1.095756],
        "eval": {"eval_accuracy": 0.333333, "eval_f1_macro": 0.166667},
        "evaluated_at": [2, 4, 6, 8],
        "best_step": 2,
        "steps": 8,
    },
}


def observed(recipe: str, shape: str, tiny_args: list, shapes: dict, tmp_path) -> dict:  # noqa: F811
    args = shape_args(tiny_args, shapes[FILES[shape]]) if shape in FILES else [str(a) for a in tiny_args]
    cache = ["--feature_cache_dir", str(tmp_path / "cache")] if caches_features(recipe) else []
    flags = EARLY_STOPPING if shape == "early_stopping" else SHAPES[shape]
    run_inline(recipe, *args, *flags, *cache, "--learning_rate", "3e-3", "--logging_steps", "1")
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    task_metrics = {m for names in METRICS.values() for m in names}  # calibration's ECE, NLL, Brier: not golden
    metrics = {k: v for k, v in results.items() if k.removeprefix("eval_") in task_metrics and isinstance(v, float)}
    return {
        "losses": [h["loss"] for h in results["loss_history"][:8]],
        "eval": {k: round(v, 6) for k, v in sorted(metrics.items()) if not k.endswith(("runtime", "per_second"))},
        "evaluated_at": [h["step"] for h in results["history"]],
        "best_step": results.get("best_step"),
        "steps": results["steps"],
    }


@pytest.mark.parametrize(
    "recipe, shape",
    [
        *((recipe, "single") for recipe in list_recipes()),  # every recipe, a new one included
        ("full_finetune", "multi"),
        ("full_finetune", "regression"),
        ("full_finetune", "windows"),
        *((recipe, "early_stopping") for recipe in list_recipes()),
    ],
)
def test_the_first_8_losses_and_the_final_metrics_are_the_recorded_ones(recipe, shape, tiny_args, shapes, tmp_path):  # noqa: F811
    got = observed(recipe, shape, tiny_args, shapes, tmp_path)
    want = GOLDEN.get(f"{recipe}/{shape}")
    assert want is not None, f"no golden values for {recipe}/{shape}; observed: {got!r}"
    assert len(got["losses"]) == min(8, got["steps"]) and got["eval"].keys() == want["eval"].keys(), got
    assert got["losses"] == pytest.approx(want["losses"], abs=TOLERANCE), got
    assert got["eval"] == pytest.approx(want["eval"], abs=TOLERANCE), got
    assert (got["evaluated_at"], got["best_step"], got["steps"]) == (
        want["evaluated_at"],
        want["best_step"],
        want["steps"],
    ), got
