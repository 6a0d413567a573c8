"""The one-command GPU check: every recipe on one GPU, kill-and-resume, FSDP, DeepSpeed ZeRO, packed batches,
throughput, MFU, a profile and a sweep of speed levers, in order of priority.

    bash benchmarks/gpu.sh [--dry-run] [--only CHECK,...] [--time_budget S] [--out DIR|FILE.md] [--jobs N]

Checks (one table row each, in this order; `--only` takes names or a group, e.g. `--only single_gpu,resume`):

- single_gpu:RECIPE   the recipe through `accelerate launch` (single_gpu.yaml, bf16) on a small random BERT and
                      planted 3-topic data: the training loss falls, validation accuracy, and the saved output
                      loaded by `pipeline()` on the CPU agrees with the GPU's predictions on >= 99% of texts.
- resume:full_finetune SIGKILL after the first checkpoint, resume from `latest`; max |weight difference| against
                      an uninterrupted run, with default settings and with deterministic algorithms.
- packing             packed against padded logits per text on the device (BERT and RoBERTa shapes), fp32 and bf16.
- fsdp:RECIPE         as single_gpu, through fsdp.yaml with one process.
- zero2:*, zero3:*    full_finetune and lora, as single_gpu, through deepspeed_zero2.yaml / deepspeed_zero3.yaml.
- fsdp_vs_single:progressive_unfreezing  from the rows above (run with them): the same stages, and losses as
                      close as full fine-tuning's under the same two launches (gpu_base.fsdp_against_single).
- mfu_peak            the measured bf16 rate of large matrix products, the ceiling for the second MFU.
- throughput:RECIPE:bsN[:LEVER+...]  full_finetune or lora on a BERT-base-sized encoder, sequences of 128
                      tokens, bf16: samples/s (median of 3 windows), tokens/s, peak memory, MFU, host-device
                      syncs per step; at batch 128 without levers, the recipe against a plain Accelerate loop.
                      The sweep turns one lever at a time (gpu_base.SWEEP): batch 32 and 256, `compiled`
                      (torch.compile, inductor, its compile time apart), `foreach` (AdamW unfused), SDPA held to
                      `flash`, `efficient` or `math`, `masked` (batches with a padding mask).
- profile:RECIPE:bsN  torch.profiler over 20 steps of that throughput check (full_finetune, lora): top ops by self
                      CUDA time, GPU idle share.
- varlen:RECIPE:padded|packed  texts of BBC News' token lengths capped at 512, batch 32: real tokens/s, padded
                      batches against --pack_sequences, and the mean loss of each.

`--time_budget S`: no check starts after S seconds, a timed one running then is stopped 120 s later, and the
rest are "not run (time budget)"; the report is rewritten as each row arrives, so a run killed from outside
keeps what it measured. The report ends with the `--only` command that reruns what failed or did not run.

`--dry-run` runs the same code on the CPU (cpu.yaml, fp32, tiny models, a few steps): FSDP rows are skipped, and
DeepSpeed rows when deepspeed does not import. Exit code: 0 when no check failed, 1 when one did, 2 for a bad
flag or (without --dry-run) no CUDA device. Setting FINETUNE_GPU_FAIL=CHECK,... makes those checks fail on
purpose (the dry-run test uses it).

Each check runs in its own process; the small ones run side by side (`--jobs`), the timed ones alone at the end.
The checks live in gpu_checks.py (correctness) and gpu_throughput.py (speed, timed by gpu_timing.py); what they
share in gpu_base.py; the report is gpu_report.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from gpu_base import (
    ALONE,
    CHECKS,
    DERIVED,
    FAIL_ENV,
    ROOT,
    Scale,
    fsdp_against_single,
    importable,
    last_line,
    not_run,
    row,
    slug,
)
from gpu_report import environment_line, format_progress, write_report

GRACE = 120  # seconds a timed check running at the time budget's end may go on (a compile takes about a minute)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="on the CPU: tiny models, a few steps")
    parser.add_argument("--only", default="", help="comma-separated checks or groups (single_gpu, fsdp, ...)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu.md"), help="a .md file or a dir")
    parser.add_argument("--jobs", type=int, default=None, help="checks run side by side (default 8 GPU, 1 CPU)")
    parser.add_argument("--time_budget", type=float, default=None, help="seconds after which no check starts")
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)  # a worker's: time.time()
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def select(only: str) -> list[str]:
    """The checks `--only` names, in table order; a name that is neither a check nor a group is a UsageError."""
    if not only:
        return list(CHECKS)
    chosen = set()
    for name in filter(None, (n.strip() for n in only.split(","))):
        matched = [name] if name in CHECKS else [c for c in CHECKS if c.startswith(name + ":")]  # a check or a group
        if not matched:
            groups = sorted({c.split(":")[0] for c in CHECKS})
            raise UsageError(f"unknown check '{name}'; pass one of {', '.join(CHECKS)} or a group: {', '.join(groups)}")
        chosen.update(matched)
    chosen.update(need for check in chosen & DERIVED.keys() for need in DERIVED[check])  # the rows it reads
    return [c for c in CHECKS if c in chosen]


class UsageError(Exception):
    pass


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    try:
        checks = select(args.only)
        if args.jobs is not None and args.jobs < 1:
            raise UsageError("--jobs must be at least 1")
        if args.time_budget is not None and not args.time_budget > 0:
            raise UsageError("--time_budget must be a positive number of seconds")
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    scale = Scale(args.dry_run)
    jobs = args.jobs or (1 if args.dry_run else 8)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu-check-"))
    started = time.perf_counter()
    try:
        env = child_env(work, args.dry_run)
        prep = subprocess.run(
            [sys.executable, __file__, "--worker", "prepare", "--workdir", str(work), *dry(args)],
            env=env, capture_output=True, text=True,
        )  # fmt: skip
        if prep.returncode == 2:  # no CUDA device without --dry-run: the worker's one line says so
            print(last_line(prep.stderr), file=sys.stderr)
            return 2
        if prep.returncode:
            print(f"error: preparing the checks failed: {last_line(prep.stderr)}", file=sys.stderr)
            return 1
        info = json.loads((work / "env.json").read_text())
        print(environment_line(info), flush=True)
        deadline = time.time() - (time.perf_counter() - started) + args.time_budget if args.time_budget else None

        def report(done: dict[str, dict], final: bool = False) -> None:
            rows_so_far = [done[c] for c in checks if c in done]
            write_report(rows_so_far, checks, info, time.perf_counter() - started, args, work, final)

        rows = run_checks(checks, work, env, jobs, scale, args.dry_run, deadline, report)
        report({r["check"]: r for r in rows}, final=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if any(r["status"] == "FAILED" for r in rows) else 0


def dry(args) -> list[str]:
    return ["--dry-run"] if args.dry_run else []


def child_env(work: Path, dry_run: bool) -> dict[str, str]:
    """The working tree's package first on the path (a stale installed copy never runs), offline."""
    pkg = work / "pkg"
    shutil.rmtree(pkg, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "src" / "finetune_recipes", pkg / "finetune_recipes", ignore=ignore)
    shutil.copytree(ROOT / "recipes", pkg / "finetune_recipes" / "recipes", ignore=ignore)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pkg), env.get("PYTHONPATH")]))
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if not dry_run:
        env.setdefault("DS_ACCELERATOR", "cuda")  # DeepSpeed's wheel may have been built on a machine without one
    return env


def run_checks(
    checks: list[str], work: Path, env: dict, jobs: int, scale: Scale, dry_run: bool, deadline, report
) -> list[dict]:
    """The side-by-side checks in a pool of `jobs` processes, then the timed ones in one process of their own;
    `report(rows)` as each row arrives; the derived rows last, from the others."""
    runnable = [c for c in checks if c not in DERIVED]
    alone = [c for c in runnable if c.startswith(ALONE)]
    pool = sorted((c for c in runnable if c not in alone), key=lambda c: not c.startswith("resume"))  # longest first
    batches = [[c] for c in pool] + ([alone] if alone else [])
    rows: dict[str, dict] = {}
    pending, running = list(batches), []
    while pending or running:
        if deadline and time.time() > deadline:  # the budget is spent: what has not started never will
            rows.update((c, not_run(c)) for batch in pending for c in batch)
            pending.clear()
        limit = 1 if pending and pending[0] is alone else jobs
        while pending and len(running) < limit and not (pending[0] is alone and running):
            running.append(start_worker(pending.pop(0), work, env, jobs, dry_run, deadline))
        time.sleep(0.2)
        for job in list(running):
            arrived = [r for r in finished_rows(job) if r["check"] not in rows]
            timeout = scale.timeout * (len(job["checks"]) if job["checks"] is alone else 1)
            over_budget = deadline is not None and time.time() > deadline + GRACE
            if job["proc"].poll() is None and (time.perf_counter() - job["start"] > timeout or over_budget):
                stop_worker(job, work)
                job["stopped_for_budget"] = over_budget
            if job["proc"].poll() is not None:
                running.remove(job)
                arrived = [r for r in collect(job, timeout) if r["check"] not in rows]
            for done in arrived:
                rows[done["check"]] = done
                print(format_progress(done), flush=True)
            if arrived:
                report(rows)
    for check in (c for c in checks if c in DERIVED):
        rows[check] = fsdp_against_single(check, rows)
    return [rows[c] for c in checks]


def start_worker(batch: list[str], work: Path, env: dict, jobs: int, dry_run: bool, deadline) -> dict:
    log = work / "logs" / f"{slug(batch[0])}.worker.log"
    log.parent.mkdir(exist_ok=True)
    cmd = [sys.executable, __file__, "--worker", ",".join(batch), "--workdir", str(work), *(["--dry-run"] * dry_run)]
    cmd += ["--deadline", str(deadline)] if deadline else []
    if "OMP_NUM_THREADS" not in os.environ:  # the cores shared out among side-by-side checks; all for a timed one
        side_by_side = 1 if batch[0].startswith(ALONE) else jobs
        env = {**env, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // side_by_side))}
    with log.open("w") as f:  # the child keeps its own descriptor
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    return {"checks": batch, "proc": proc, "start": time.perf_counter(), "log": log}


def stop_worker(job: dict, work: Path) -> None:
    """SIGKILL to the worker's process group (its launches are in it) and to the groups of its own that it
    registered under work/groups (a run its check kills itself: gpu_checks.launch)."""
    os.killpg(job["proc"].pid, signal.SIGKILL)
    job["proc"].wait()
    for group in (work / "groups").glob("*"):
        if group.read_text() == str(job["proc"].pid):
            with contextlib.suppress(ProcessLookupError):  # already gone
                os.killpg(int(group.name), signal.SIGKILL)
            group.unlink()


def finished_rows(job: dict) -> list[dict]:
    """The rows the worker has written so far (each is written whole, by a rename)."""
    paths = (job["log"].parent.parent / "rows" / f"{slug(check)}.json" for check in job["checks"])
    return [json.loads(path.read_text()) for path in paths if path.exists()]


def collect(job: dict, timeout: float) -> list[dict]:
    """Every row of an ended worker: a check it never reported is FAILED with the worker's last line, or not run
    when the worker was stopped at the time budget's end."""
    done = {r["check"]: r for r in finished_rows(job)}
    seconds = round(time.perf_counter() - job["start"], 1)
    out = []
    for check in job["checks"]:
        if check in done:
            out.append(done[check])
        elif job.get("stopped_for_budget"):
            out.append(not_run(check))
        elif job["proc"].returncode == -signal.SIGKILL:
            out.append(row(check, "FAILED", seconds, note=f"timed out after {timeout:.0f} s"))
        else:
            note = last_line(job["log"].read_text(errors="replace")) or f"worker exited {job['proc'].returncode}"
            out.append(row(check, "FAILED", seconds, note=note))
    return out


# ---------------------------------------------------------------------------------------------- workers


def worker(args) -> int:
    from gpu_checks import prepare

    work, scale = Path(args.workdir), Scale(args.dry_run)
    if args.worker == "prepare":
        return prepare(work, scale)
    (work / "rows").mkdir(exist_ok=True)
    names = args.worker.split(",")
    context = {}
    for name in names:
        start = time.perf_counter()
        if args.deadline and time.time() > args.deadline:
            write_row(work, not_run(name))
            continue
        try:
            if name in os.environ.get(FAIL_ENV, "").split(","):
                raise RuntimeError(f"forced failure ({FAIL_ENV})")
            result = run_one(name, work, scale, context)
        except Exception as error:  # one check's failure is its row, never the whole run's
            traceback.print_exc()
            result = row(name, "FAILED", 0, note=last_line(str(error)) or type(error).__name__,
                         traceback=traceback.format_exc()[-4000:])  # fmt: skip
        result["seconds"] = round(time.perf_counter() - start, 1)
        write_row(work, result)
    return 0


def write_row(work: Path, result: dict) -> None:
    """A check's row, written whole (a rename) for the orchestrator, which reads rows as they arrive."""
    path = work / "rows" / f"{slug(result['check'])}.json"
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(result) + "\n")
    partial.replace(path)


def run_one(name: str, work: Path, scale: Scale, context: dict) -> dict:
    import gpu_checks
    import gpu_throughput
    import gpu_timing

    kind, _, rest = name.partition(":")
    if kind in ("single_gpu", "fsdp", "zero2", "zero3"):
        if scale.dry_run and kind == "fsdp":
            return row(name, "skipped (dry run: FSDP needs CUDA)", 0)
        if kind.startswith("zero") and not importable("deepspeed"):
            if scale.dry_run:
                return row(name, "skipped (dry run: deepspeed does not import)", 0)
            raise RuntimeError("deepspeed does not import: carry its wheel (see benchmarks/README.md)")
        return gpu_checks.recipe_check(name, kind, rest, work, scale)
    if kind == "resume":
        return gpu_checks.resume_check(name, rest, work, scale)
    if kind == "packing":
        return gpu_checks.packing_check(name, work, scale)
    if kind == "mfu_peak":
        rate = gpu_timing.matmul_rate(scale, context)
        return row(name, "ok", 0, f"{rate / 1e12:.1f} TFLOP/s ({scale.matmul}³ matmuls)", tflops=rate / 1e12)
    recipe, _, detail = rest.partition(":")
    if kind == "throughput":
        bs, _, variant = detail.partition(":")
        return gpu_throughput.throughput_check(name, recipe, int(bs[2:]), work, scale, context, variant)
    if kind == "profile":
        return gpu_throughput.profile_check(name, recipe, int(detail[2:]), work, scale)
    if kind == "varlen":
        return gpu_throughput.varlen_check(name, recipe, detail, work, scale, context)
    raise ValueError(f"no check {name}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
