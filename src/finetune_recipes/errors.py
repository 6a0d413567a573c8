"""Errors a user can fix, the command lines that print them as one line with exit code 2, and how such a
command's process ends.

Light on purpose (the standard library only): `finetune-recipes predict` on an ONNX export and `ls` import
this and nothing heavy.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import logging
import os
import re
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class UserError(ValueError):
    """A problem the user can fix; entry points print it as one line and exit with code 2."""


class OneLineErrors:
    """argparse's errors (a bad value, a missing argument) as one line and exit code 2, not a usage block."""

    def error(self, message: str):
        raise UserError(f"{message}; run with --help")


class Parser(OneLineErrors, argparse.ArgumentParser):
    pass


def first_line(error: BaseException, width: int = 160) -> str:
    """The first line of a library's error message, short enough to quote inside one of ours."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()  # without a library's terminal colours
    return text.splitlines()[0][:width] if text else error.__class__.__name__


def listing(items: list[Any], limit: int = 8) -> str:
    """Items joined by commas, the first `limit` only, so a message stays one readable line."""
    shown = ", ".join(t if len(t := str(i)) <= 32 else t[:31] + "…" for i in items[:limit])
    return shown if len(items) <= limit else f"{shown}, … ({len(items)} in all)"


# What an interrupted command has kept, for its Ctrl-C line: a run's checkpoints say where it resumes.
SAVED_SO_FAR = ["nothing was saved"]


def entrypoint(main: Callable[..., T]) -> Callable[..., T]:
    """Runs `main`, turning a UserError into one line on stderr and exit code 2, and Ctrl-C into one line saying
    what was kept, exit code 130 (as a shell reports an interrupt)."""

    @functools.wraps(main)
    def run(*args, **kwargs) -> T:
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt as interrupt:
            traceback.clear_frames(interrupt.__traceback__)
            print(f"error: interrupted (Ctrl-C); {SAVED_SO_FAR[-1]}", file=sys.stderr)
            raise SystemExit(130) from None
        except UserError as error:
            # The failed run's locals go first: a progress bar closing as they are freed writes its last line
            # before this one, so the error stays the last line a user sees.
            traceback.clear_frames(error.__traceback__)
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from None

    return run


# The accelerators and prepared (DDP) models of this process's multi-process runs, kept alive until
# run_to_end ends the process. The accelerator alone is not enough: on CPUs (MULTI_CPU) Accelerate 1.15 does
# not keep the DDP wrapper it returns, whose Reducer holds the process group.
DISTRIBUTED: list[Any] = []


def run_to_end(call: Callable[[], T]) -> T:
    """`entrypoint(call)()`, and a process of a multi-process (gloo/NCCL) run ends here with os._exit, once its
    outputs are written and its output flushed.

    Its process group is never destructed: measured with torch 2.13 on a loaded 2-core machine,
    ~ProcessGroupGloo (run when DDP's Reducer is freed as the run returns) joins gloo's worker thread while
    holding the GIL, and that thread, freeing the last barrier's tensors, waits for the GIL: the process hung
    forever after its run was done (a CI timeout; stacks in the 2026-11-30 notes).
    """
    try:
        result = entrypoint(call)()
        code = 0
    except SystemExit as exit_info:  # a UserError's exit code 2
        if not DISTRIBUTED:
            raise
        code = exit_info.code if isinstance(exit_info.code, int) else 0 if exit_info.code is None else 1
    except BaseException:
        if not DISTRIBUTED:
            raise
        traceback.print_exc()
        code = 1
    if not DISTRIBUTED:
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
