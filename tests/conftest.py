"""Fixtures: a tiny BERT and a tiny 3-topic data set, written once per test session."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import runpy
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

# Before anything imports huggingface_hub, which reads these once: no test may reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Nor write to the user's caches: the datasets cache and the recipes' default feature cache live under it.
CACHE = tempfile.TemporaryDirectory(prefix="finetune-recipes-tests-")  # removed when the session ends
os.environ.setdefault("HF_DATASETS_CACHE", CACHE.name)
# One torch thread per test process, set before torch is imported so every subprocess inherits it: a tiny
# model's step is 5-30x slower on two threads than on one, and pytest-xdist already keeps both cores busy.
for threads in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(threads, "1")

import pytest  # noqa: E402
from tiny import topic_rows, write_csv, write_tiny_bert  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state, fixed by the first Accelerator (its precision, its device): each
    test's in-process runs start from none, as a new process would, whatever ran before them."""
    yield
    reset_accelerate_state()


def reset_accelerate_state() -> None:
    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


@pytest.fixture(autouse=True)
def fp32(request, monkeypatch):
    """Tiny runs compute in fp32 on every CPU, so that their tolerances hold with and without bf16 hardware: the
    hardware check says no bf16 here (in-process), and the tiny runs' flags say --mixed_precision no (for
    subprocesses). A test marked `bf16` keeps the machine's own answer."""
    if "bf16" not in request.keywords:
        # accelerator first: importing it binds the real function, which the patch then restores
        for where in ("finetune_recipes.training.accelerator", "finetune_recipes.modeling"):  # training, prediction
            monkeypatch.setattr(f"{where}.bf16_supported", lambda device: False)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    """train / validation / test CSV files of a 3-topic task a tiny model learns in a few epochs."""
    root = tmp_path_factory.mktemp("tiny-data")
    return {
        split: write_csv(root / f"{split}.csv", topic_rows(n, seed))
        for split, n, seed in [("train", 96, 0), ("validation", 30, 1), ("test", 30, 2)]
    }


FP32 = ["--mixed_precision", "no"]  # the recipes' YAML says auto: bf16 on CPUs with AVX-512 BF16 or AMX


@pytest.fixture(scope="module")
def module_args(tiny_model, tiny_data) -> list[str]:
    """tiny_args for a module's shared runs: the tiny model, train and validation, no output_dir (each run names
    its own); a module adds its steps and rates."""
    return [
        "--model_name_or_path", str(tiny_model), "--train_file", str(tiny_data["train"]),
        "--validation_file", str(tiny_data["validation"]), "--max_length", "32", "--per_device_train_batch_size",
        "8", "--per_device_eval_batch_size", "16", *FP32,
    ]  # fmt: skip


def interruptible() -> None:
    """A child's Ctrl-C as a terminal's: a shell's background job starts with SIGINT ignored, and Python then
    installs no KeyboardInterrupt handler, so a test of Ctrl-C run from such a job would see it ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_stoppable(cmd: list[str]) -> subprocess.Popen:
    """`cmd` started in a session of its own (a test stops its whole process group) that Ctrl-C reaches, its
    stderr kept for the test to read."""
    return subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=interruptible,
    )  # fmt: skip


def teacher_for(path: Path, args: list[str]) -> list[str]:
    """`args`, with `--teacher DIR` when the recipe needs one (distill) and they give none: static_embeddings
    trained on the same model and data flags (so on the same splits: no leakage), once per data in a session."""
    import hashlib
    from dataclasses import fields

    from finetune_recipes.catalog import flag_groups, needed_flags
    from finetune_recipes.config import DataArguments, ModelArguments

    if "teacher" not in needed_flags(path) or {"--teacher", "--help", "-h"} & set(args):
        return args
    kept_names = {f.name for t in (ModelArguments, DataArguments) for f in fields(t)} | {"seed", "mixed_precision"}
    kept = [token for name, tokens in flag_groups(args) if name in kept_names for token in tokens]
    teacher = Path(CACHE.name) / "teachers" / hashlib.sha256("\0".join(kept).encode()).hexdigest()[:16]
    if not (teacher / "results.json").is_file():
        flags = ["--output_dir", teacher, "--feature_cache_dir", teacher.parent / "cache", "--num_train_epochs", "4"]
        run_inline("static_embeddings", *kept, *flags)  # 4 epochs: what it teaches matters less than its cost
    return [*args, "--teacher", str(teacher)]


def run_recipe(recipe: str, *args: str, launcher: list[str] | None = None, check: bool = True, **kw):
    """Runs recipes/<recipe>.py in a subprocess, as a user would, and returns the finished process (a recipe
    that needs a teacher gets one: teacher_for)."""
    path = ROOT / "recipes" / f"{recipe}.py"
    cmd = [*(launcher or [sys.executable]), str(path), *teacher_for(path, list(map(str, args)))]
    proc = run_or_dump(cmd, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def run_inline(recipe: str | Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Runs a recipe in this process as `python recipes/<recipe>.py ARGS` would run (`recipe` a name or a copied
    file's path), and returns what the process would: its exit code, stdout and stderr (log lines included).
    10 s faster than run_recipe, which stays for what only a real process shows: kills, launches, imports. A
    recipe that needs a teacher gets one (teacher_for)."""
    path = Path(recipe) if str(recipe).endswith(".py") else ROOT / "recipes" / f"{recipe}.py"
    args = tuple(teacher_for(path, list(map(str, args))))
    out, err = io.StringIO(), io.StringIO()
    log = logging.StreamHandler(err)
    logger = logging.getLogger("finetune_recipes")
    argv, level, search = sys.argv, logger.level, list(sys.path)
    sys.argv = [str(path), *map(str, args)]
    sys.path.insert(0, str(path.parent))  # as `python path` puts the script's folder first
    logger.addHandler(log)
    reset_accelerate_state()  # as in a new process
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(str(path), run_name="__main__")
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code if isinstance(exit_info.code, int) else 0 if exit_info.code is None else 1
    finally:
        sys.argv, sys.path[:] = argv, search
        logger.removeHandler(log)
        logger.setLevel(level)
    proc = subprocess.CompletedProcess([str(path), *map(str, args)], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"{path.name} {' '.join(proc.args[1:])} failed ({code}):\n{proc.stderr[-4000:]}")
    return proc


def run_or_dump(cmd: list[str], timeout: float = 600, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """subprocess.run with captured text output; past `timeout`, every Python process of the command (a launcher
    and its workers) prints its threads' stacks (faulthandler, on SIGABRT) before the test fails, so a hang in
    CI says where it hung."""
    env = {**(env or os.environ), "PYTHONFAULTHANDLER": "1"}
    process = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=kw.pop("cwd", ROOT), env=env,
        start_new_session=True, **kw,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGABRT)
        stdout, stderr = process.communicate(timeout=30)
        raise AssertionError(f"{' '.join(cmd)} hung for {timeout} s; the stacks:\n{stderr[-12000:]}") from None
    return subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)


@pytest.fixture
def tiny_args(tiny_model, tiny_data, tmp_path) -> list[str]:
    """Flags pointing a recipe at the tiny model and data, small and fast."""
    return [
        "--model_name_or_path",
        tiny_model,
        "--train_file",
        tiny_data["train"],
        "--validation_file",
        tiny_data["validation"],
        "--test_file",
        tiny_data["test"],
        "--max_length",
        "32",
        "--per_device_train_batch_size",
        "8",
        "--per_device_eval_batch_size",
        "16",
        "--learning_rate",
        "1e-3",
        "--num_train_epochs",
        "3",
        "--output_dir",
        tmp_path / "out",
        "--logging_steps",
        "5",
        *FP32,
    ]
