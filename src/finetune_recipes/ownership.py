"""Who owns what in an output directory: the manifest of what runs wrote there (all that a run or a tool may
ever remove) and the lock held by the one process writing there. The standard library only.

A run claims its output_dir (`claim_output_dir`), a tool the folder it fills with many runs (`claim_tool_dir`);
both refuse a folder holding something they did not write, unless asked to keep it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path

from .atomic import atomic_write, is_temporary, remove
from .errors import UserError

MANIFEST = ".finetune_recipes.json"  # the entries of output_dir that runs wrote: all that a run may remove
LOCK = ".finetune_recipes.lock"  # held (flock) by the run writing into output_dir, for its whole lifetime
BOOKKEEPING = {MANIFEST, LOCK}


def entries(out: Path) -> set[str]:
    return {p.name for p in out.iterdir()} if out.is_dir() else set()


def owned_entries(out: Path) -> set[str]:
    """What runs wrote in `out`, by its manifest (nothing when it has none)."""
    try:
        return set(json.loads((out / MANIFEST).read_text())["entries"]) | BOOKKEEPING
    except FileNotFoundError:
        return set()
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{out / MANIFEST} is damaged; remove it and the outputs of the run it described") from None


def write_manifest(out: Path, written: Iterable[str], kept: set[str], hashes: dict[str, str] | None = None) -> None:
    """The manifest: what it listed and is still there, plus `written`, never a kept (user's) entry; and the
    hashes of the files it rendered (the card), to tell a file edited since from one it may redraw.

    Only names a run itself reports are added, so a file someone drops into output_dir while the run writes
    there never becomes the run's, and a later overwrite leaves it alone."""
    ours = sorted(((owned_entries(out) & entries(out)) | {MANIFEST, *written}) - kept - {LOCK})
    manifest = {
        "written_by": "finetune-recipes",
        "entries": ours,
        "rendered": {**rendered_hashes(out), **(hashes or {})},
    }
    atomic_write(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def rendered_hashes(out: Path) -> dict[str, str]:
    """name → sha256 of each file a run or `report` rendered into `out` (the card, the pictures)."""
    try:
        return dict(json.loads((out / MANIFEST).read_text()).get("rendered", {}))
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


def file_hash(content: str | bytes) -> str:
    return hashlib.sha256(content.encode() if isinstance(content, str) else content).hexdigest()


def lock_output_dir(out: Path, flag: str | None = "--output_dir") -> int:
    """An exclusive lock on `out` until its file descriptor is closed: by the run, or by the process's end.

    flock is released by the kernel however the process ends (SIGKILL included), so a dead run never
    leaves a stale lock; the file names the holder for the message a second run prints.
    """
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another run"
        os.close(fd)
        other = f" or pass another {flag}" if flag else ""  # audit and report write into what they read
        raise UserError(f"{out} is in use by {holder}; wait for it to end{other}") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"the run of pid {os.getpid()} on {socket.gethostname()}".encode())
    return fd


def inside(path: Path, directory: Path) -> bool:
    path, directory = path.resolve(), directory.resolve()
    return path == directory or directory in path.parents


def check_output_dir(args, inputs: Iterable[str] = ()) -> str:
    """Refuses an output_dir (`args`: output_dir, overwrite_output_dir, resume_from_checkpoint) whose contents
    the run would replace or remove without being told to; returns what it checked (`contents`), so that the
    claim before the first write checks again only what changed since.

    A non-empty output_dir needs --overwrite_output_dir, which removes only what runs wrote there (its
    manifest says which) and never one of this run's `inputs`, or --resume_from_checkpoint with a checkpoint
    of that same directory.
    """
    refuse_output_dir(args, inputs)
    return contents(Path(args.output_dir))


def contents(out: Path) -> str:
    """A digest of what the output_dir check reads: the directory's entries and its manifest."""
    manifest = out / MANIFEST
    seen = [sorted(entries(out) - BOOKKEEPING), manifest.read_text() if manifest.is_file() else None]
    return file_hash(json.dumps(seen))


def refuse_output_dir(args, inputs: Iterable[str]) -> None:
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} is a file; pass --output_dir a directory")
    if not entries(out) - BOOKKEEPING:
        return
    resume = args.resume_from_checkpoint
    if resume and not args.overwrite_output_dir:
        if resume != "latest" and not inside(Path(resume), out / "checkpoints"):
            raise UserError(
                f"output_dir {out} holds another run's outputs, which resuming from {resume} would replace; "
                "pass an empty --output_dir, or --overwrite_output_dir"
            )
        return
    if not args.overwrite_output_dir:
        raise UserError(f"output_dir {out} is not empty; pass --overwrite_output_dir or another --output_dir")
    if not (out / MANIFEST).is_file():
        found = sorted(entries(out) - BOOKKEEPING)[0]
        raise UserError(
            f"output_dir {out} holds '{found}', which no run wrote (there is no {MANIFEST}), and "
            "--overwrite_output_dir only removes what a run wrote; pass another --output_dir"
        )
    doomed = [out / name for name in (owned_entries(out) & entries(out)) - BOOKKEEPING]
    for path in inputs:
        if any(inside(Path(path), d) or inside(d, Path(path)) for d in doomed):
            raise UserError(
                f"--overwrite_output_dir would remove {path}, an input of this run; move it out of {out} "
                "or pass another --output_dir"
            )


class OutputDir:
    """A run's claim on its output_dir: the lock, held until this object is dropped (the run's `main` returned
    or failed; a process's end releases it too, so a run called from Python does not keep the directory from
    the next one), and the entries that are not the run's (`kept`), which it never replaces or removes."""

    def __init__(self, path: Path, kept: set[str], lock: int):
        self.path, self.kept = path, kept
        self._release = weakref.finalize(self, os.close, lock)

    def record(self, *written: str) -> None:
        """Adds `written` (entries this run wrote or is about to write) to the manifest."""
        write_manifest(self.path, written, self.kept)


def claim_output_dir(
    args, inputs: Iterable[str], needed_mb: float, ahead: Iterable[str] = (), checked: str | None = None
) -> OutputDir:
    """Locks output_dir for this run and records what runs wrote there; on overwrite, removes only that.

    Checked here, just before the first write, unless `checked` (check_output_dir's answer at the run's start)
    shows the directory unchanged since; refused when the disk has not `needed_mb` free. The entries `ahead`
    are claimed before they exist, so a run that dies after writing them still owns them."""
    out = Path(args.output_dir)
    if checked is None or contents(out) != checked:
        check_output_dir(args, inputs)
    out.mkdir(parents=True, exist_ok=True)
    lock = lock_output_dir(out)
    try:
        free_mb = shutil.disk_usage(out).free / 2**20
        if free_mb < needed_mb:
            raise UserError(
                f"output_dir {out} has {free_mb:,.0f} MB free and the saved model alone needs {needed_mb:,.1f} MB; "
                "free space or pass another --output_dir"
            )
        if args.overwrite_output_dir and not args.resume_from_checkpoint:
            for name in (owned_entries(out) & entries(out)) - BOOKKEEPING:
                remove(out / name)
    except BaseException:
        os.close(lock)
        raise
    claim = OutputDir(out, entries(out) - owned_entries(out), lock)
    claim.record(*(entries(out) - claim.kept - BOOKKEEPING), *ahead)
    return claim


def adopt_earlier(directory: Path, tool: str, signature: tuple[str, ...], named: Callable[[str], bool]) -> None:
    """A folder the same tool filled before it kept a manifest (0.2.0 before 2026-12-06): its `signature` entries
    all there and every entry of the names it writes (`named`: the rule it went by then) make it the tool's,
    once, said in a line; the manifest decides from then on. Anything else leaves the folder as it is."""
    present = entries(directory) - BOOKKEEPING
    if (directory / MANIFEST).exists() or not set(signature) <= present or not all(map(named, present)):
        return
    write_manifest(directory, present, set())
    print(
        f"{tool}: {directory} was written by an earlier {tool}: its entries are recorded as {tool}'s", file=sys.stderr
    )


def claim_tool_dir(
    directory: Path,
    tool: str,
    writes: Iterable[str],
    earlier: str = "",
    inputs: Iterable[str] = (),
    leftover: Callable[[str], bool] = lambda name: False,
) -> int:
    """The folder `tool` (cv, tune, compare) fills with many runs, its --output_dir, claimed by a run's rule: its
    manifest says what the tool wrote there, and nothing else is ever written over or removed, whatever its name.

    Refused when it is a file; holds one of the tool's `inputs` inside an entry the tool writes or owns; holds an
    entry its manifest does not list (a user's `cv.md` as much as their `notes.txt`); or, when `earlier` (the
    message) is given, holds anything. Then locked, the entries it `writes` recorded before they exist (a killed
    tool still owns them), and a killed session's temporary names, and the owned entries `leftover` says are a
    killed session's, removed. Returns the lock."""
    if directory.exists() and not directory.is_dir():
        raise UserError(f"output_dir {directory} is a file; pass --output_dir a directory")
    writes = {*writes, "logs"}
    owned, present = owned_entries(directory), sorted(entries(directory) - BOOKKEEPING)
    for path in inputs:
        within = inside(Path(path), directory) and Path(path).resolve() != directory.resolve()
        if within and Path(path).resolve().relative_to(directory.resolve()).parts[0] in owned | writes:
            raise UserError(
                f"{path}, an input of this {tool}, is where {tool} writes in --output_dir {directory}; move it "
                f"out of {directory} or pass another --output_dir"
            )
    foreign = [n for n in present if n not in owned and not is_temporary(n)]
    if foreign:
        raise UserError(
            f"output_dir {directory} holds '{foreign[0]}', which {tool} did not write (its {MANIFEST} lists what "
            "it wrote); pass another --output_dir"
        )
    if present and earlier:
        raise UserError(earlier)
    lock = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock = lock_output_dir(directory)
        write_manifest(directory, writes, set())  # before anything it lists is written
        (directory / "logs").mkdir(exist_ok=True)
    except OSError as error:
        if lock is not None:
            os.close(lock)
        raise UserError(
            f"cannot write in --output_dir {directory} ({error.strerror}); fix its permissions or pass another "
            "--output_dir"
        ) from None
    for name in present:
        if is_temporary(name) or (name in owned and leftover(name)):
            remove(directory / name)
    return lock


def refuse_unowned(directory: Path, names: Iterable[str], command: str) -> None:
    """Refuses to write `names` into `directory` where one is there and its manifest does not list it: a file a
    user put there since (an `audit` after the cv, a `report` after the run) is theirs."""
    owned = owned_entries(directory)
    theirs = sorted(n for n in names if (directory / n).exists() and n not in owned)
    if theirs:
        raise UserError(
            f"{directory / theirs[0]} is not a run's output and {command} would replace it; move it away, then "
            f"run {command} again"
        )
