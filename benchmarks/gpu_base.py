"""What the GPU check's parts share (benchmarks/gpu.py runs them): the checks by name, the sizes of a GPU run and
of a CPU dry run, and a check's row. Standard library only: the orchestrator imports it before anything heavy."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["feature_extraction", "frozen_base_pooler", "progressive_unfreezing", "full_finetune", "llrd", "lora"]
CHECKS = (
    [f"single_gpu:{r}" for r in RECIPES]
    + ["resume:full_finetune", "packing"]
    + [f"fsdp:{r}" for r in RECIPES]
    + [f"{z}:{r}" for z in ("zero2", "zero3") for r in ("full_finetune", "lora")]
    + [f"throughput:{r}:bs{b}" for r in ("full_finetune", "lora") for b in (32, 128)]
    + ["throughput:full_finetune:bs128:compiled"]
    + [f"profile:{r}:bs128" for r in ("full_finetune", "lora")]  # LoRA's: what the recipe adds per step
    + [f"varlen:full_finetune:{layout}" for layout in ("padded", "packed")]
    + ["mfu_peak"]
)
ALONE = ("throughput", "profile", "varlen", "mfu_peak")  # timed: after the others, one process, nothing beside them
LAUNCH_CONFIG = {
    "single_gpu": "single_gpu.yaml",
    "fsdp": "fsdp.yaml",
    "zero2": "deepspeed_zero2.yaml",
    "zero3": "deepspeed_zero3.yaml",
    "resume": "single_gpu.yaml",
}
LEARNING_RATE = {"feature_extraction": 3e-3, "frozen_base_pooler": 3e-3, "lora": 3e-3}  # others: 1e-3
H200_BF16_DENSE_PEAK = 989e12  # FLOP/s, vendor datasheet, SXM, dense
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
        self.warmup, self.timed = (2, 3) if dry_run else (10, 100)
        self.encoder = (
            dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128) if dry_run else {}
        )
        self.batch_sizes = {32: 4, 128: 8} if dry_run else {32: 32, 128: 128}
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


def port_of(name: str) -> int:
    return 29600 + 4 * CHECKS.index(name)


def slug(check: str) -> str:
    """A check's name as a file name."""
    return check.replace(":", "_")
