"""A stopped run stops: a SIGKILL of the launcher alone (`accelerate launch`; `tune`'s in test_tune.py) ends the
recipe processes it started, checked in the process table; and a study does not resume while a trial it started
still trains."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, start_stoppable
from test_distributed import TWO_PROCESSES

CLI = str(Path(sys.executable).parent / "finetune-recipes")


def processes_naming(marker: str) -> list[int]:
    """The pids whose command line holds `marker` (read from /proc: what `ps` shows)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:  # gone while being read
            continue
    return found


def gone_within(marker: str, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while (alive := processes_naming(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def start_and_wait_for(cmd: list[str], ready: Path, timeout: float = 300) -> subprocess.Popen:
    process = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + timeout
    while not ready.exists():
        assert process.poll() is None and time.monotonic() < deadline, f"no {ready} ({process.returncode})"
        time.sleep(0.05)
    return process


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_sigkill_of_the_launcher_alone_ends_its_workers(tiny_args, tmp_path):
    out = tmp_path / "launched"  # in every worker's command line: how they are found
    flags = [*map(str, tiny_args), "--num_train_epochs", "200", "--checkpointing_steps", "2", "--output_dir", str(out)]
    cmd = [*TWO_PROCESSES, str(ROOT / "recipes" / "full_finetune.py"), *flags]
    launcher = start_and_wait_for(cmd, out / "checkpoints" / "step_2")  # both workers are training
    assert len(processes_naming(str(out))) >= 3  # the launcher and two workers
    os.kill(launcher.pid, signal.SIGKILL)  # the launcher alone, not its group: the harsher case
    launcher.wait()
    assert gone_within(str(out), 20) == []


def test_a_trial_holds_the_study_lock_while_it_lives(tmp_path):
    """Where no parent-death signal exists, the lock a trial inherits keeps a resume from starting beside it."""
    from finetune_recipes.errors import UserError
    from finetune_recipes.ownership import lock_output_dir

    tmp_path.mkdir(exist_ok=True)
    lock = lock_output_dir(tmp_path)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], pass_fds=(lock,))
    os.close(lock)  # the tool is gone; its trial lives on
    try:
        with pytest.raises(UserError, match="is in use by"):
            lock_output_dir(tmp_path)
    finally:
        child.kill()
        child.wait()
    os.close(lock_output_dir(tmp_path))  # free once the trial is gone


@pytest.mark.slow
def test_ctrl_c_is_one_line_naming_the_checkpoint_to_resume_from(tiny_args, tmp_path):
    out = tmp_path / "out"
    flags = [*map(str, tiny_args), "--num_train_epochs", "200", "--checkpointing_steps", "2", "--output_dir", str(out)]
    cmd = [sys.executable, str(ROOT / "recipes" / "full_finetune.py"), *flags]
    process = start_stoppable(cmd)
    deadline = time.monotonic() + 300
    # Any whole checkpoint, not one by name: the newest replaces the last every 2 steps, and on a loaded machine a
    # poll missed step_4's few milliseconds and waited out the deadline while the run trained on.
    while not list((out / "checkpoints").glob("step_*")):
        if process.poll() is not None or time.monotonic() > deadline:  # say where it stood
            os.killpg(process.pid, signal.SIGKILL)
            raise AssertionError(f"no checkpoint (exit {process.poll()}):\n{process.communicate()[1][-3000:]}")
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGINT)
    stderr = process.communicate(timeout=120)[1]
    last = stderr.strip().splitlines()[-1]
    assert process.returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    assert (
        last.startswith("error: interrupted (Ctrl-C); the last checkpoint is step ")
        and "resume_from_checkpoint" in last
    )
