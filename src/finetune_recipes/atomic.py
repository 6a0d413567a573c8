"""Writing so that a reader never sees half a file: under a temporary name beside the target, renamed whole.

A rename within one directory is atomic on POSIX, so a run killed mid-write leaves only a temporary name
(`.NAME.tmp…`) that nothing reads, and a reader finds the old content or the new, never a mix. The standard
library and huggingface_hub have no such helper for a path that is also read while it is written (a feature
cache shared by the trials of a study, an output directory a user is looking at).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(final: Path, *, per_process: bool = False) -> Iterator[Path]:
    """Yields a temporary path beside `final` to write a file or a folder at; renamed to `final` when the block
    ends without an error, removed when it raises.

    `per_process` gives each process a temporary name of its own, for caches that several processes may fill
    at once with the same content: the first rename wins, and a later one that finds a folder there (which
    os.replace cannot replace) drops its copy.
    """
    tmp = final.with_name(f".{final.name}.tmp" + (str(os.getpid()) if per_process else ""))
    remove(tmp)
    try:
        yield tmp
        os.replace(tmp, final)
    except OSError:
        remove(tmp)
        if not (per_process and final.is_dir()):
            raise
    except BaseException:
        remove(tmp)
        raise


def atomic_write(path: Path, content: str | bytes) -> None:
    """`content` (text as UTF-8) at `path`, written whole or not at all."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(content if isinstance(content, bytes) else content.encode())


def is_temporary(name: str) -> bool:
    """A name atomic_path gives its temporary: what a killed run leaves behind, safe to remove."""
    return re.fullmatch(r"\..+\.tmp\d*", name) is not None


def remove(path: Path) -> None:
    """A file or a folder, if there is one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
