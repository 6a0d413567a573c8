"""What a run watches and logs: the training loss (LossMeter), the divergence guard that stops a run whose loss or
weights are no longer finite (before they are scored, kept or saved), and `--report_to jsonl`: every logged value
as one JSON line per step, readable while the run goes on.

Accelerate's trackers (TensorBoard, W&B, ...) all need a package or a service; this one needs nothing, and a
program can follow it with a plain read: `finetune-recipes tune` reads each trial's evaluations from it to
prune hopeless trials. It is Accelerate's own custom-tracker interface (`GeneralTracker`), so
`accelerator.log` feeds it like any other.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
from accelerate.tracking import GeneralTracker, on_main_process

from ..atomic import atomic_write
from ..errors import UserError

JSONL = "jsonl"
TRACKER_PROJECT = "finetune_recipes"  # init_trackers' project name: the folder in output_dir
METRICS_FILE = "metrics.jsonl"


class JSONLinesTracker(GeneralTracker):
    """Writes `logging_dir/run_name/metrics.jsonl`: {"step": N, name: value, ...} per `log` call, flushed at once;
    the run's config beside it as config.json."""

    name = JSONL
    requires_logging_directory = True

    def __init__(self, run_name: str, logging_dir: str | os.PathLike):
        super().__init__()
        self.dir = Path(logging_dir) / run_name

    @property
    def tracker(self):
        return self.dir / METRICS_FILE

    @on_main_process
    def store_init_configuration(self, values: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.dir / "config.json", json.dumps(values, indent=1, default=str) + "\n")

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with (self.dir / METRICS_FILE).open("a") as f:  # one write of a whole line: a reader never sees half
            f.write(json.dumps({"step": step, **values}) + "\n")


def trackers(report_to: str | None, project_dir: str, run_name: str) -> list | None:
    """`--report_to` ("tensorboard", "jsonl", "tensorboard,jsonl") as Accelerate's `log_with`."""
    if not report_to:
        return None
    names = [n.strip() for n in report_to.split(",") if n.strip()]
    return [JSONLinesTracker(run_name, project_dir) if n == JSONL else n for n in names]


class LossMeter:
    """The mean training loss since the last log line, kept on the device (no host sync per step), and the
    run's throughput."""

    def __init__(self, accelerator):
        self.accelerator, self.total, self.batches = accelerator, torch.zeros((), device=accelerator.device), 0
        self.samples, self.start = 0, time.perf_counter()

    def add(self, loss: torch.Tensor, samples: int) -> None:
        self.total += loss.detach()  # a nan or inf stays in the sum until the next log line reads it
        self.batches += 1
        self.samples += samples

    def log(self, state, scheduler, progress) -> None:
        """The mean since the last call, to the progress bar, the TrainState's loss history and the trackers;
        a non-finite mean (the run diverged) stops the run with one line."""
        mean = self.accelerator.reduce(self.total, reduction="mean").item() / self.batches
        if not math.isfinite(mean):
            raise UserError(diverged_message(state, f"the training loss is {mean}"))
        lr = scheduler.get_last_lr()[-1]
        self.total.zero_()
        self.batches = 0
        progress.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}")
        state.loss_history.append({"step": state.completed_steps, "loss": round(mean, 6), "lr": lr})
        self.accelerator.log({"train/loss": mean, "train/lr": lr}, step=state.completed_steps)

    def throughput(self) -> dict[str, float]:
        runtime = time.perf_counter() - self.start
        samples = self.samples * self.accelerator.num_processes
        return {"train_runtime_s": round(runtime, 2), "train_samples_per_second": round(samples / runtime, 2)}


def diverged_message(state, what: str) -> str:
    """One line for a run whose loss or weights are no longer finite: where, the last finite loss, what to try."""
    last = next((r for r in reversed(state.loss_history) if math.isfinite(r["loss"])), None)
    before = f"; the last finite loss was {last['loss']:.4g} at step {last['step']}" if last else ""
    return (
        f"training diverged by step {state.completed_steps} ({what}{before}); nothing was saved from it: lower "
        "--learning_rate, keep --max_grad_norm above 0, or check the data for extreme values"
    )


def local_shard(param: torch.Tensor) -> torch.Tensor:
    """What this process holds of a parameter: its ZeRO-3 partition, its FSDP2 (DTensor) shard, or itself."""
    if hasattr(param, "ds_tensor"):
        return param.ds_tensor
    return param.to_local() if hasattr(param, "to_local") else param


def refuse_diverged(accelerator, model: torch.nn.Module, state) -> None:
    """Before an evaluation, a checkpoint or the final save: weights that are no longer finite (nan, inf) stop
    the run with one line, in every process at once (under FSDP or ZeRO-3 each holds a shard)."""
    finite = torch.stack([local_shard(p).detach().isfinite().all() for p in model.parameters()]).all()
    if not bool(accelerator.gather(finite.reshape(1)).all()):
        raise UserError(diverged_message(state, "its weights are not finite"))
