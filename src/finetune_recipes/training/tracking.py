"""`--report_to jsonl`: every logged value as one JSON line per step, readable while the run goes on.

Accelerate's trackers (TensorBoard, W&B, ...) all need a package or a service; this one needs nothing, and a
program can follow it with a plain read: `finetune-recipes tune` reads each trial's evaluations from it to
prune hopeless trials. It is Accelerate's own custom-tracker interface (`GeneralTracker`), so
`accelerator.log` feeds it like any other.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from accelerate.tracking import GeneralTracker, on_main_process

from ..atomic import atomic_write

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
