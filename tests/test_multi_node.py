"""Two machines on one host: a real two-node launch trains as one group; a launch that asked for two machines
but runs alone refuses instead of writing beside its twin."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

ACCELERATE = str(Path(sys.executable).parent / "accelerate")


def launch(*args: str, recipe_args: list) -> subprocess.Popen:
    cmd = [ACCELERATE, "launch", *args, str(ROOT / "recipes" / "full_finetune.py"), *map(str, recipe_args)]
    # A session of its own, so the whole process group (the launcher and its workers) can be stopped.
    return subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


@pytest.mark.slow
def test_a_two_node_launch_on_one_host_trains_as_one_group(tiny_args, tmp_path):
    with socket.socket() as free:  # not the config's fixed port: another run on this host may hold it
        free.bind(("127.0.0.1", 0))
        port = str(free.getsockname()[1])
    config = ["--config_file", str(ROOT / "accelerate_configs" / "cpu_2node.yaml"), "--main_process_port", port]
    args = [*tiny_args, "--num_train_epochs", "2"]
    ranks = [launch(*config, "--machine_rank", str(rank), recipe_args=args) for rank in (0, 1)]
    try:
        outputs = [proc.communicate(timeout=300) for proc in ranks]
    finally:
        for proc in ranks:  # a rank left waiting for its twin must not outlive the test
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    assert [proc.returncode for proc in ranks] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    assert "on 2 process(es) (MULTI_CPU)" in outputs[0][1]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["eval_samples"] == 30 and results["test_samples"] == 30  # each example once


def test_a_launch_that_asked_for_two_machines_but_runs_alone_refuses(tiny_args, tmp_path):
    flags = ["--cpu", "--num_machines", "2", "--machine_rank", "0", "--main_process_ip", "127.0.0.1"]
    proc = launch(*flags, "--main_process_port", "29533", recipe_args=tiny_args)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "runs alone" in err and "Traceback" not in err.split("error: ")[0][-200:]
    assert not (tmp_path / "out").exists()
