"""The one-command GPU check: every recipe on one GPU, kill-and-resume, FSDP, DeepSpeed ZeRO, packed batches,
throughput, MFU and a profile.

    bash benchmarks/gpu.sh [--dry-run] [--only CHECK,...] [--out DIR|FILE.md] [--jobs N]

Checks (one table row each; `--only` takes names or a group, e.g. `--only single_gpu,resume`):

- single_gpu:RECIPE   the recipe through `accelerate launch` (single_gpu.yaml, bf16) on a small random BERT and
                      planted 3-topic data: the training loss falls, validation accuracy, and the saved output
                      loaded by `pipeline()` on the CPU agrees with the GPU's predictions on >= 99% of texts.
- resume:full_finetune SIGKILL after the first checkpoint, resume from `latest`; max |weight difference| against
                      an uninterrupted run, with default settings and with deterministic algorithms.
- packing             packed against padded logits per text on the device (BERT and RoBERTa shapes), fp32 and bf16.
- fsdp:RECIPE         as single_gpu, through fsdp.yaml with one process.
- zero2:*, zero3:*    full_finetune and lora, as single_gpu, through deepspeed_zero2.yaml / deepspeed_zero3.yaml.
- throughput:RECIPE:bsN[:compiled]  full_finetune or lora on a BERT-base-sized encoder, sequences of exactly 128
                      tokens, bf16: samples/s, tokens/s, peak memory, MFU; the recipe against a plain Accelerate
                      loop; `compiled` under torch.compile (inductor), its compile time apart.
- profile:RECIPE:bsN  torch.profiler over 20 steps of that throughput check (full_finetune, lora): top ops by self
                      CUDA time, GPU idle share.
- varlen:RECIPE:padded|packed  texts of BBC News' token lengths capped at 512, batch 32: real tokens/s, padded
                      batches against --pack_sequences, and the mean loss of each.
- mfu_peak            the measured bf16 rate of large matrix products, the ceiling for the second MFU.

`--dry-run` runs the same code on the CPU (cpu.yaml, fp32, tiny models, a few steps): FSDP rows are skipped, and
DeepSpeed rows when deepspeed does not import. Exit code: 0 when no check failed, 1 when one did, 2 for a bad
flag or (without --dry-run) no CUDA device. Setting FINETUNE_GPU_FAIL=CHECK,... makes those checks fail on
purpose (the dry-run test uses it).

Each check runs in its own process; the small ones run side by side (`--jobs`), the timed ones alone at the end.
The checks live in gpu_checks.py (correctness) and gpu_throughput.py (speed); what they share in gpu_base.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from gpu_base import ALONE, CHECKS, FAIL_ENV, ROOT, Scale, importable, last_line, row, slug


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="on the CPU: tiny models, a few steps")
    parser.add_argument("--only", default="", help="comma-separated checks or groups (single_gpu, fsdp, ...)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu.md"), help="a .md file or a dir")
    parser.add_argument("--jobs", type=int, default=None, help="checks run side by side (default 8 GPU, 1 CPU)")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def select(only: str) -> list[str]:
    """The checks `--only` names, in table order; a name that is neither a check nor a group is a UsageError."""
    if not only:
        return list(CHECKS)
    chosen = set()
    for name in filter(None, (n.strip() for n in only.split(","))):
        matched = [c for c in CHECKS if c == name or c.startswith(name + ":")]
        if not matched:
            groups = sorted({c.split(":")[0] for c in CHECKS})
            raise UsageError(f"unknown check '{name}'; pass one of {', '.join(CHECKS)} or a group: {', '.join(groups)}")
        chosen.update(matched)
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
        rows = run_checks(checks, work, env, jobs, scale, args.dry_run)
        wall = time.perf_counter() - started
        write_report(rows, info, wall, args, work)
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


def run_checks(checks: list[str], work: Path, env: dict, jobs: int, scale: Scale, dry_run: bool) -> list[dict]:
    """The side-by-side checks in a pool of `jobs` processes, then the timed ones in one process of their own."""
    alone = [c for c in checks if c.startswith(ALONE)]
    pool = sorted((c for c in checks if c not in alone), key=lambda c: not c.startswith("resume"))  # longest first
    batches = [[c] for c in pool] + ([alone] if alone else [])
    rows: dict[str, dict] = {}
    pending, running = list(batches), []
    while pending or running:
        limit = 1 if pending and pending[0] is alone else jobs
        while pending and len(running) < limit and not (pending[0] is alone and running):
            batch = pending.pop(0)
            running.append(start_worker(batch, work, env, jobs, dry_run))
        time.sleep(0.2)
        for job in list(running):
            timeout = scale.timeout * (len(job["checks"]) if job["checks"] is alone else 1)
            if job["proc"].poll() is None and time.perf_counter() - job["start"] < timeout:
                continue
            if job["proc"].poll() is None:
                os.killpg(job["proc"].pid, signal.SIGKILL)
                job["proc"].wait()
            running.remove(job)
            for done in collect(job, timeout):
                rows[done["check"]] = done
                print(format_progress(done), flush=True)
    return [rows[c] for c in checks]


def start_worker(batch: list[str], work: Path, env: dict, jobs: int, dry_run: bool) -> dict:
    log = work / "logs" / f"{slug(batch[0])}.worker.log"
    log.parent.mkdir(exist_ok=True)
    cmd = [sys.executable, __file__, "--worker", ",".join(batch), "--workdir", str(work), *(["--dry-run"] * dry_run)]
    if "OMP_NUM_THREADS" not in os.environ:  # the cores shared out among side-by-side checks; all for a timed one
        side_by_side = 1 if batch[0].startswith(ALONE) else jobs
        env = {**env, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // side_by_side))}
    with log.open("w") as f:  # the child keeps its own descriptor
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    return {"checks": batch, "proc": proc, "start": time.perf_counter(), "log": log}


def collect(job: dict, timeout: float) -> list[dict]:
    """The rows the worker wrote; a check it never reported is FAILED with the worker's last line."""
    seconds = round(time.perf_counter() - job["start"], 1)
    out = []
    for check in job["checks"]:
        path = job["log"].parent.parent / "rows" / f"{slug(check)}.json"
        if path.exists():
            out.append(json.loads(path.read_text()))
            continue
        if job["proc"].returncode == -signal.SIGKILL:
            note = f"timed out after {timeout:.0f} s"
        else:
            note = last_line(job["log"].read_text(errors="replace")) or f"worker exited {job['proc'].returncode}"
        out.append(row(check, "FAILED", seconds, note=note))
    return out


def format_progress(r: dict) -> str:
    return f"[{r['status']}] {r['check']} {r['seconds']} s {r['summary']} {r['note']}".rstrip()


def environment_line(info: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    return f"{info['device']}; {versions}"


def markdown_table(rows: list[dict]) -> str:
    lines = ["| check | status | s | result | note |", "|---|---|---:|---|---|"]
    for r in rows:
        summary, note = (r[k].replace("|", "\\|") for k in ("summary", "note"))
        lines.append(f"| {r['check']} | {r['status']} | {r['seconds']} | {summary} | {note} |")
    return "\n".join(lines)


def throughput_table(rows: list[dict]) -> str:
    timed = [r for r in rows if r["check"].startswith("throughput") and r["status"] == "ok"]
    if not timed:
        return ""
    head = (
        "| check | samples/s | tokens/s | peak GiB | TFLOP/s (N all / no emb.) | MFU vs 989 (all / no emb.) "
        "| MFU vs measured (all / no emb.) | plain samples/s | recipe/plain |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in timed:
        m = r["metrics"]
        lines.append(
            f"| {r['check']} | {m['samples_per_s']:.0f} | {m['tokens_per_s']:.0f} | {m['peak_gib']:.2f} "
            f"| {m['tflops']:.1f} / {m['tflops_no_emb']:.1f} | {m['mfu_vendor']:.1%} / {m['mfu_vendor_no_emb']:.1%} "
            f"| {m['mfu_measured']:.1%} / {m['mfu_measured_no_emb']:.1%} | {m['plain_samples_per_s']:.0f} "
            f"| {m['recipe_over_plain']:.2f} |"
        )
    return "\n".join(lines)


def profile_table(rows: list[dict]) -> str:
    """The profiled steps' top ops: what the time goes to, and how long the GPU waited."""
    lines = []
    for r in (r for r in rows if r["check"].startswith("profile") and r["status"] == "ok"):
        m = r["metrics"]
        idle = "" if m["idle_share"] is None else f", GPU idle {m['idle_share']:.1%} of {m['wall_s']:.2f} s"
        lines += [f"{r['check']}{idle}:", "", "| op | self ms | share | calls |", "|---|---:|---:|---:|"]
        lines += [f"| `{t['op']}` | {t['self_ms']:.1f} | {t['share']:.1%} | {t['calls']} |" for t in m["top"]]
    return "\n".join(lines)


FORMULAS = """FLOPs per token: full fine-tuning 6·N (forward 2·N, backward 4·N); LoRA 4·N + 2·N_trainable (forward 2·N,
activation gradients through every layer, frozen ones too, 2·N, weight gradients of the adapters and the head
2·N_trainable). N counts every parameter ("all") or all but the embeddings ("no emb."); attention's
sequence-length term is left out. MFU = FLOPs per token × tokens/s over the H200's dense bf16 peak (989 TFLOP/s,
vendor) and over the rate `mfu_peak` measured in the same run."""


def write_report(rows: list[dict], info: dict, wall: float, args, work: Path) -> None:
    out = Path(args.out)
    md_path = out if out.suffix == ".md" else out / "gpu.md"
    md_path.parent.mkdir(parents=True, exist_ok=True)
    mode = "dry run on the CPU" if args.dry_run else "GPU run"
    title = f"# GPU check ({mode}), {time.strftime('%Y-%m-%d %H:%M')}, {wall:.0f} s wall"
    command = "bash benchmarks/gpu.sh " + shlex.join(sys.argv[1:])
    parts = [title, "", f"`{command.strip()}`", "", environment_line(info), "", markdown_table(rows)]
    detail = throughput_table(rows)
    if detail:
        parts += ["", detail, "", FORMULAS]
    profiled = profile_table(rows)
    if profiled:
        parts += ["", profiled]
    text = "\n".join(parts) + "\n"
    md_path.write_text(text)
    md_path.with_suffix(".json").write_text(
        json.dumps({"mode": mode, "wall_s": round(wall, 1), "environment": info, "rows": rows}, indent=1) + "\n"
    )
    failed = [r for r in rows if r["status"] == "FAILED"]
    if failed:  # the end of each failed check's logs beside the table, for a machine that is gone once it is read
        tails = []
        for log in sorted((work / "logs").glob("*")):
            if any(slug(r["check"]) in log.name for r in failed) or log.name.startswith("throughput"):
                tail = log.read_text(errors="replace").replace("\r", "\n").splitlines()[-60:]
                tails.append(f"==> {log.name} <==\n" + "\n".join(tail))
        md_path.with_name(md_path.stem + "-failed-logs.txt").write_text("\n\n".join(tails) + "\n")
    print()
    print(text)
    print(f"Written to {md_path} and {md_path.with_suffix('.json')}")


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
        try:
            if name in os.environ.get(FAIL_ENV, "").split(","):
                raise RuntimeError(f"forced failure ({FAIL_ENV})")
            result = run_one(name, work, scale, context)
        except Exception as error:  # one check's failure is its row, never the whole run's
            traceback.print_exc()
            result = row(name, "FAILED", 0, note=last_line(str(error)) or type(error).__name__)
        result["seconds"] = round(time.perf_counter() - start, 1)
        (work / "rows" / f"{slug(name)}.json").write_text(json.dumps(result) + "\n")
    return 0


def run_one(name: str, work: Path, scale: Scale, context: dict) -> dict:
    import gpu_checks
    import gpu_throughput

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
        rate = gpu_throughput.matmul_rate(scale, context)
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
