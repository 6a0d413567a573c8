"""A recipe run in its own process, as `compare` and `cv` run them: a clean memory peak, a crash that fails one
run and not the tool, its log in the tool's logs/, its results read back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .catalog import caches_features, given_names, recipes_dir
from .errors import PARENT, die_with_parent


def run_recipe(recipe: str, out: Path, folder: str, flags: list[str], overwrite: bool, launcher=()) -> dict:
    """One recipe in its own process (clean memory peak, failures isolated), or under `launcher` (`accelerate
    launch --config_file ...`); its results plus wall time."""
    log = out / "logs" / f"{folder}.log"
    with tempfile.TemporaryDirectory(dir=out, prefix=".feature_cache_") as cache:  # every encoding is paid for
        given = "feature_cache_dir" in given_names(flags)  # the user's own cache is kept
        extra = ["--feature_cache_dir", cache] if caches_features(recipe) and not given else []
        cmd = [*(launcher or [sys.executable]), str(recipes_dir() / f"{recipe}.py"), *flags, *extra]
        cmd += ["--output_dir", str(out / folder)]
        cmd += ["--overwrite_output_dir"] if overwrite else []
        start = time.perf_counter()
        with log.open("w") as f:
            env = {**os.environ, PARENT: str(os.getpid())}  # the run ends with compare: errors.die_with_launcher
            code = subprocess.run(
                cmd, stdout=f, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent
            ).returncode
        wall = round(time.perf_counter() - start, 1)
    if code != 0:
        return {"strategy": recipe, "wall_time_s": wall, "status": f"failed ({code}): see {log}"}
    results = json.loads((out / folder / "results.json").read_text())
    return {"strategy": recipe, **results, "wall_time_s": wall, "status": "ok"}
