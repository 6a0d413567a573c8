"""How a command's process ends, and workarounds that last the process's lifetime: a multi-process run's process
group is never destructed (gloo's teardown hangs), and a process a launcher or a tool started dies with it
(Linux's parent-death signal, through ctypes). The standard library only."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable
from typing import TypeVar

from .errors import entrypoint

T = TypeVar("T")


def process_group_alive() -> bool:
    """Whether this process belongs to a multi-process run's group (torch's own state: nothing is kept here). A
    process that never imported torch.distributed (a tool, `ls`) has none."""
    distributed = sys.modules.get("torch.distributed")
    return bool(distributed and distributed.is_available() and distributed.is_initialized())


def run_to_end(call: Callable[[], T]) -> T:
    """`entrypoint(call)()`, and a process of a multi-process (gloo/NCCL) run ends here with os._exit, once its
    outputs are written and its output flushed.

    Its process group is never destructed (training.accelerator.end_training leaves it alive): measured with
    torch 2.13 on a loaded 2-core machine, ~ProcessGroupGloo (run when DDP's Reducer, its last holder once
    Accelerate's end_training destroyed the group, is freed as the run returns) joins gloo's worker thread while
    holding the GIL, and that thread, freeing the last barrier's tensors, waits for the GIL: the process hung
    forever after its run was done (a CI timeout; stacks in the 2026-11-30 notes).
    """
    try:
        result = entrypoint(call)()
        code = 0
    except SystemExit as exit_info:  # a UserError's exit code 2
        if not process_group_alive():
            raise
        code = exit_info.code if isinstance(exit_info.code, int) else 0 if exit_info.code is None else 1
    except BaseException:
        if not process_group_alive():
            raise
        traceback.print_exc()
        code = 1
    if not process_group_alive():
        return result
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
    finally:  # a closed pipe must not bring the hang back
        os._exit(code)


PARENT = "FINETUNE_RECIPES_PARENT"  # set by tune and compare for the recipe processes they start: their pid


def die_with_launcher() -> None:
    """A recipe process started by a launcher ends when the launcher does, however it ends (SIGKILL included).

    torchrun's agent (what `accelerate launch` runs) starts its workers in sessions of their own, so a kill of
    the launcher or of its process group does not reach them, and a killed `tune`, `compare` or `cv` would leave
    its run training. Linux's parent-death signal ties them: the kernel sends SIGKILL to this process when its
    parent dies (a tool ties an `accelerate launch` it starts to itself the same way: `die_with_parent`). Only
    under a launcher: a run started from a shell (with nohup, say) outlives the shell.
    """
    worker = "TORCHELASTIC_RUN_ID" in os.environ  # its parent is the agent
    started = PARENT in os.environ and os.getppid() == int(os.environ[PARENT])  # not a variable come down to another
    if worker or started:
        die_with_parent()


def die_with_parent() -> None:
    """SIGKILL to this process when its parent ends (Linux; elsewhere nothing). Kept across exec, so a tool passes
    it as a child's preexec_fn."""
    if not sys.platform.startswith("linux"):
        return
    parent, pr_set_pdeathsig = os.getppid(), 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above: the signal came too late
        os.kill(os.getpid(), signal.SIGKILL)
