"""Errors a user can fix, and the command lines that print them as one line with exit code 2 (Ctrl-C as one
line saying what was kept, exit code 130).

Light on purpose (the standard library only): `finetune-recipes predict` on an ONNX export and `ls` import
this and nothing heavy.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import re
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


# The write failures a user can fix. Libraries written in Rust or C++ lose the errno on the way: tokenizers raises a
# plain Exception, safetensors a SafetensorError and torch.save a RuntimeError, each with the system's words.
FIXABLE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
FIXABLE_WORDS = ("No space left on device", "Disk quota exceeded", "Read-only file system", "Permission denied",
                 "file write failed")  # fmt: skip


def write_failure(error: BaseException) -> str | None:
    """Why a write failed when a user can fix it (a full disk, a read-only or forbidden folder), else None."""
    if isinstance(error, OSError) and error.errno in FIXABLE_ERRNOS:
        return error.strerror
    return next((words for words in FIXABLE_WORDS if words in str(error)), None)


def fixable(error: BaseException) -> str | None:
    """One line for a full disk or a forbidden path met anywhere (else None): what every command prints for
    what it did not foresee; a command that knows what it was writing says more."""
    reason = write_failure(error)
    if reason is None:
        return None
    where = getattr(error, "filename", None) or "a file"
    return f"{where}: {reason}; free space or fix permissions, then run the same command again"


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, carrying what the interrupted command has kept (its first argument), for the one line it ends with."""


@contextlib.contextmanager
def on_interrupt(kept: str | Callable[[], str]):
    """A Ctrl-C inside says what was kept: `kept` (or what it returns, asked when the Ctrl-C comes), unless a step
    inside already said it (a cv run by compare names its folds)."""
    try:
        yield
    except Interrupted:
        raise
    except KeyboardInterrupt:
        raise Interrupted(kept if isinstance(kept, str) else kept()) from None


def clear_frames(error: BaseException | None) -> None:
    """Frees the locals of the frames `error` (and the errors it was raised during) unwound: a progress bar among
    them writes its last line as it closes, before the error's one line, which stays the last a user sees."""
    while error is not None:
        traceback.clear_frames(error.__traceback__)
        error = error.__context__


def entrypoint(main: Callable[..., T]) -> Callable[..., T]:
    """Runs `main`, turning a UserError into one line on stderr and exit code 2, and Ctrl-C into one line saying
    what was kept, exit code 130 (as a shell reports an interrupt)."""

    @functools.wraps(main)
    def run(*args, **kwargs) -> T:
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt as interrupt:
            clear_frames(interrupt)
            kept = interrupt.args[0] if isinstance(interrupt, Interrupted) else "nothing was saved"
            print(f"error: interrupted (Ctrl-C); {kept}", file=sys.stderr)
            raise SystemExit(130) from None
        except Exception as error:
            # The failed run's locals go first: a progress bar closing as they are freed writes its last line
            # before this one, so the error stays the last line a user sees.
            message = str(error) if isinstance(error, UserError) else fixable(error)
            if message is None:  # a bug: its traceback
                raise
            clear_frames(error)
            print(f"error: {message}", file=sys.stderr)
            raise SystemExit(2) from None

    return run
