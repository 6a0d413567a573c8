"""What the GPU check's parts share (benchmarks/gpu.py runs them): the checks by name, the sizes of a GPU run and
of a CPU dry run, and a check's row. Standard library only: the orchestrator imports it before anything heavy."""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["feature_extraction", "frozen_base_pooler", "progressive_unfreezing", "full_finetune", "llrd", "lora"]
# The sweep: one lever at a time against the eager batch-128 row (throughput:full_finetune:bs128). `foreach`:
# AdamW's foreach kernels instead of the fused one the recipes use; flash, efficient, math: SDPA forced to that
# backend; `masked`: texts of 120-128 tokens, so batches carry a padding mask (the others have none).
SWEEP = (
    [f"throughput:full_finetune:bs{b}" for b in (32, 256)]
    + [f"throughput:full_finetune:bs128:{v}" for v in ("compiled", "foreach", "flash", "efficient", "math")]
    + [f"throughput:full_finetune:bs128:{v}" for v in ("masked", "flash+masked", "efficient+masked", "math+masked")]
)
# In order of priority: a run cut short (--time_budget, or killed) has reported the rows above what it missed.
CHECKS = (
    [f"single_gpu:{r}" for r in RECIPES]
    + ["resume:full_finetune", "packing"]
    + [f"fsdp:{r}" for r in RECIPES]
    + [f"{z}:{r}" for z in ("zero2", "zero3") for r in ("full_finetune", "lora")]
    + ["fsdp_vs_single:progressive_unfreezing"]  # from the rows above: no process of its own
    + ["mfu_peak", "throughput:full_finetune:bs128", "profile:full_finetune:bs128"]
    + [f"varlen:full_finetune:{layout}" for layout in ("padded", "packed")]
    + ["throughput:lora:bs128", "profile:lora:bs128"]  # LoRA's profile: what the recipe adds per step
    + SWEEP
)
ALONE = ("throughput", "profile", "varlen", "mfu_peak")  # timed: after the others, one process, nothing beside them
# A derived check and the rows it reads: unfreezing under FSDP2 against one plain process, with full fine-tuning's
# FSDP2-against-plain difference as the measure of bf16 noise.
DERIVED = {
    "fsdp_vs_single:progressive_unfreezing": [
        f"{kind}:{recipe}" for recipe in ("progressive_unfreezing", "full_finetune") for kind in ("single_gpu", "fsdp")
    ]
}
LAUNCH_CONFIG = {
    "single_gpu": "single_gpu.yaml",
    "fsdp": "fsdp.yaml",
    "zero2": "deepspeed_zero2.yaml",
    "zero3": "deepspeed_zero3.yaml",
    "resume": "single_gpu.yaml",
}
LEARNING_RATE = {"feature_extraction": 3e-3, "frozen_base_pooler": 3e-3, "lora": 3e-3}  # others: 1e-3
# Dense bf16 FLOP/s from the vendor's datasheets (without sparsity), by the name CUDA reports; the first match.
DATASHEET_PEAKS = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200 NVL", 835e12), ("H200", 989e12),
                   ("H100", 989e12), ("A100", 312e12)]  # fmt: skip
FAIL_ENV = "FINETUNE_GPU_FAIL"


class Scale:
    """Sizes of a GPU run, or of a CPU dry run that walks the same code paths in a few minutes."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run
        self.train_rows, self.validation_rows = (96, 60) if dry_run else (960, 300)
        self.batch_size = 16 if dry_run else 32
        self.steps = 30 if dry_run else 300
        self.logging_steps = 5 if dry_run else 10
        self.checkpoint_every = 10 if dry_run else 50
        self.precision = "no" if dry_run else "bf16"
        # throughput: warm-up steps, timed steps, and the encoder (BERT-base on the GPU, a tiny one on the CPU)
        # (the timed steps are 3 windows; a rate is their median)
        self.warmup, self.timed = (2, 3) if dry_run else (10, 90)
        self.encoder = (
            dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128) if dry_run else {}
        )
        self.batch_sizes = {32: 4, 128: 8, 256: 16} if dry_run else {32: 32, 128: 128, 256: 256}
        self.matmul = 512 if dry_run else 8192
        # varlen: texts with BBC News' token lengths, capped; profile: the steps the profiler records
        self.varlen_cap, self.varlen_batch = (128, 4) if dry_run else (512, 32)
        self.profiled = 3 if dry_run else 20
        self.timeout = 900 if dry_run else 240


def row(check: str, status: str, seconds: float, summary: str = "", note: str = "", **metrics) -> dict:
    return {"check": check, "status": status, "seconds": round(seconds, 1), "summary": summary, "note": note,
            "metrics": metrics}  # fmt: skip


def last_line(text: str) -> str:
    """The error that ended a log: the last `SomethingError: ...` or `error: ...` line (a launcher's banner of
    ===== and its ChildFailedError come after the worker's own error), else the last line that is not a
    progress bar."""
    lines = [line.strip() for line in re.split(r"[\r\n]+", text or "")]
    lines = [line for line in lines if line and not re.search(r"\d+%\||\d+/\d+ \[", line)]
    errors = [
        line for line in lines
        if re.match(r"(\[rank\d+\]: )?(\w+\.)*\w*(Error|Exception)\b|error: ", line) and "ChildFailedError" not in line
    ]  # fmt: skip
    return (errors or lines or [""])[-1][:300]


def importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def datasheet_peak(device: str) -> float | None:
    """The card's dense bf16 peak (FLOP/s) from DATASHEET_PEAKS, None for a card not listed (or a CPU)."""
    return next((peak for name, peak in DATASHEET_PEAKS if name in device), None)


def port_of(name: str) -> int:
    return 29600 + 4 * CHECKS.index(name)


def slug(check: str) -> str:
    """A check's name as a file name."""
    return check.replace(":", "_")


def not_run(check: str) -> dict:
    """The row of a check the time budget left out."""
    return row(check, "not run (time budget)", 0)


def fsdp_against_single(name: str, rows: dict[str, dict]) -> dict:
    """A DERIVED row: progressive unfreezing under FSDP2 against one plain process (the same flags and seed). It
    passes when the stages start at the same steps and the logged losses differ by at most 3× what full
    fine-tuning's do between the same two launches (FSDP2's bf16 parameters against autocast; nothing thaws
    there) plus 0.01."""
    missing = [check for check in DERIVED[name] if rows.get(check, {}).get("status") != "ok"]
    if missing:
        return row(name, f"skipped (needs {', '.join(missing)} ok)", 0)

    def metrics(kind: str, recipe: str) -> dict:
        return rows[f"{kind}:{recipe}"]["metrics"]

    def gap(recipe: str) -> float:
        """The largest difference of the mean training loss logged at the same step (results.json's
        loss_history); infinite when the two runs logged different steps."""
        a, b = (metrics(kind, recipe)["loss_history"] for kind in ("single_gpu", "fsdp"))
        return max((abs(a[step] - b[step]) for step in a), default=math.inf) if a.keys() == b.keys() else math.inf

    recipe = name.partition(":")[2]
    single, sharded = metrics("single_gpu", recipe), metrics("fsdp", recipe)
    unfreezing, noise = gap(recipe), gap("full_finetune")
    limit = 3 * noise + 0.01
    problems = [] if math.isfinite(noise) else ["full fine-tuning's two runs logged different steps"]
    if single["stage_starts"] != sharded["stage_starts"]:
        problems.append(f"stages start at {sharded['stage_starts']} under FSDP2, {single['stage_starts']} alone")
    if not unfreezing <= limit:
        problems.append(f"losses differ by {unfreezing:.4f} > {limit:.4f}")
    speed = (sharded["samples_per_s"] or 0) / (single["samples_per_s"] or math.inf)
    summary = (
        f"stages at {single['stage_starts']}; max |Δ logged loss| {unfreezing:.4f}, full fine-tuning's {noise:.4f}; "
        f"samples/s FSDP2/alone {speed:.2f}"
    )
    return row(name, "FAILED" if problems else "ok", 0, summary, "; ".join(problems), loss_gap=unfreezing,
               full_finetune_gap=noise, limit=limit, speed_ratio=speed)  # fmt: skip
