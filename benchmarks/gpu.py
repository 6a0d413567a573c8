"""The one-command GPU check: every recipe on one GPU, kill-and-resume, FSDP, DeepSpeed ZeRO, throughput, MFU.

    bash benchmarks/gpu.sh [--dry-run] [--only CHECK,...] [--out DIR|FILE.md] [--jobs N]

Checks (one table row each; `--only` takes names or a group, e.g. `--only single_gpu,resume`):

- single_gpu:RECIPE   the recipe through `accelerate launch` (single_gpu.yaml, bf16) on a small random BERT and
                      planted 3-topic data: the training loss falls, validation accuracy, and the saved output
                      loaded by `pipeline()` on the CPU agrees with the GPU's predictions on >= 99% of texts.
- resume:full_finetune SIGKILL after the first checkpoint, resume from `latest`; max |weight difference| against
                      an uninterrupted run, with default settings and with deterministic algorithms.
- fsdp:RECIPE         as single_gpu, through fsdp.yaml with one process.
- zero2:*, zero3:*    full_finetune and lora, as single_gpu, through deepspeed_zero2.yaml / deepspeed_zero3.yaml.
- throughput:RECIPE:bsN  full_finetune or lora on a BERT-base-sized encoder, sequences of exactly 128 tokens,
                      bf16: samples/s, tokens/s, peak memory, MFU; the recipe against a plain Accelerate loop.
- mfu_peak            the measured bf16 rate of large matrix products, the ceiling for the second MFU.

`--dry-run` runs the same code on the CPU (cpu.yaml, fp32, tiny models, a few steps): FSDP rows are skipped, and
DeepSpeed rows when deepspeed does not import. Exit code: 0 when no check failed, 1 when one did, 2 for a bad
flag or (without --dry-run) no CUDA device. Setting FINETUNE_GPU_FAIL=CHECK,... makes those checks fail on
purpose (the dry-run test uses it).

Each check runs in its own process; the small ones run side by side (`--jobs`), throughput alone at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from tiny import FILLER, SPECIALS, TOPICS, topic_rows, write_csv  # noqa: E402  the planted data the tests learn

RECIPES = ["feature_extraction", "frozen_base_pooler", "progressive_unfreezing", "full_finetune", "llrd", "lora"]
CHECKS = (
    [f"single_gpu:{r}" for r in RECIPES]
    + ["resume:full_finetune"]
    + [f"fsdp:{r}" for r in RECIPES]
    + [f"{z}:{r}" for z in ("zero2", "zero3") for r in ("full_finetune", "lora")]
    + [f"throughput:{r}:bs{b}" for r in ("full_finetune", "lora") for b in (32, 128)]
    + ["mfu_peak"]
)
ALONE = ("throughput", "mfu_peak")  # timed: they run after the others, one process, nothing beside them
LAUNCH_CONFIG = {
    "single_gpu": "single_gpu.yaml",
    "fsdp": "fsdp.yaml",
    "zero2": "deepspeed_zero2.yaml",
    "zero3": "deepspeed_zero3.yaml",
    "resume": "single_gpu.yaml",
}
LEARNING_RATE = {"feature_extraction": 3e-3, "frozen_base_pooler": 3e-3, "lora": 3e-3}  # others: 1e-3
H200_BF16_DENSE_PEAK = 989e12  # FLOP/s, vendor datasheet, SXM, dense
FAIL_ENV = "FINETUNE_GPU_FAIL"


class Scale:
    """Sizes of a GPU run, or of a CPU dry run that walks the same code paths in a few minutes."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run
        self.train_rows, self.validation_rows = (96, 60) if dry_run else (960, 300)
        self.batch_size = 16 if dry_run else 32
        self.steps = 30 if dry_run else 300
        self.logging_steps = 5 if dry_run else 10
        self.checkpoint_every = 10 if dry_run else 50
        self.precision = "no" if dry_run else "bf16"
        # throughput: warm-up steps, timed steps, and the encoder (BERT-base on the GPU, a tiny one on the CPU)
        self.warmup, self.timed = (2, 3) if dry_run else (10, 100)
        self.encoder = (
            dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128) if dry_run else {}
        )
        self.batch_sizes = {32: 4, 128: 8} if dry_run else {32: 32, 128: 128}
        self.matmul = 512 if dry_run else 8192
        self.timeout = 900 if dry_run else 240


# ---------------------------------------------------------------------------------------------- orchestration


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
            for row in collect(job, timeout):
                rows[row["check"]] = row
                print(format_progress(row), flush=True)
    return [rows[c] for c in checks]


def start_worker(batch: list[str], work: Path, env: dict, jobs: int, dry_run: bool) -> dict:
    log = work / "logs" / f"{batch[0].replace(':', '_')}.worker.log"
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
        path = job["log"].parent.parent / "rows" / f"{check.replace(':', '_')}.json"
        if path.exists():
            out.append(json.loads(path.read_text()))
            continue
        if job["proc"].returncode == -signal.SIGKILL:
            note = f"timed out after {timeout:.0f} s"
        else:
            note = last_line(job["log"].read_text(errors="replace")) or f"worker exited {job['proc'].returncode}"
        out.append(row(check, "FAILED", seconds, note=note))
    return out


def row(check: str, status: str, seconds: float, summary: str = "", note: str = "", **metrics) -> dict:
    return {"check": check, "status": status, "seconds": round(seconds, 1), "summary": summary, "note": note,
            "metrics": metrics}  # fmt: skip


def last_line(text: str) -> str:
    """The error that ended a log: the last `SomethingError: ...` or `error: ...` line (a launcher's banner of
    ===== and its ChildFailedError come after the worker's own error), else the last line that is not a
    progress bar."""
    lines = [line.strip() for line in re.split(r"[\r\n]+", text or "")]
    lines = [line for line in lines if line and not re.search(r"\d+%\||\d+/\d+ \[", line)]
    errors = [
        line for line in lines
        if re.match(r"(\[rank\d+\]: )?(\w+\.)*\w*(Error|Exception)\b|error: ", line) and "ChildFailedError" not in line
    ]  # fmt: skip
    return (errors or lines or [""])[-1][:300]


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
    command = "bash benchmarks/gpu.sh " + " ".join(shlex_quote(a) for a in sys.argv[1:])
    parts = [title, "", f"`{command.strip()}`", "", environment_line(info), "", markdown_table(rows)]
    detail = throughput_table(rows)
    if detail:
        parts += ["", detail, "", FORMULAS]
    text = "\n".join(parts) + "\n"
    md_path.write_text(text)
    md_path.with_suffix(".json").write_text(
        json.dumps({"mode": mode, "wall_s": round(wall, 1), "environment": info, "rows": rows}, indent=1) + "\n"
    )
    failed = [r for r in rows if r["status"] == "FAILED"]
    if failed:  # the end of each failed check's logs beside the table, for a machine that is gone once it is read
        tails = []
        for log in sorted((work / "logs").glob("*")):
            if any(r["check"].replace(":", "_") in log.name for r in failed) or log.name.startswith("throughput"):
                tail = log.read_text(errors="replace").replace("\r", "\n").splitlines()[-60:]
                tails.append(f"==> {log.name} <==\n" + "\n".join(tail))
        md_path.with_name(md_path.stem + "-failed-logs.txt").write_text("\n\n".join(tails) + "\n")
    print()
    print(text)
    print(f"Written to {md_path} and {md_path.with_suffix('.json')}")


def shlex_quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


# ---------------------------------------------------------------------------------------------- workers


def worker(args) -> int:
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
        (work / "rows" / f"{name.replace(':', '_')}.json").write_text(json.dumps(result) + "\n")
    return 0


def run_one(name: str, work: Path, scale: Scale, context: dict) -> dict:
    kind, _, rest = name.partition(":")
    if kind in ("single_gpu", "fsdp", "zero2", "zero3"):
        if scale.dry_run and kind == "fsdp":
            return row(name, "skipped (dry run: FSDP needs CUDA)", 0)
        if kind.startswith("zero") and not importable("deepspeed"):
            if scale.dry_run:
                return row(name, "skipped (dry run: deepspeed does not import)", 0)
            raise RuntimeError("deepspeed does not import: carry its wheel (see benchmarks/README.md)")
        return recipe_check(name, kind, rest, work, scale)
    if kind == "resume":
        return resume_check(name, rest, work, scale)
    if kind == "mfu_peak":
        rate = matmul_rate(scale, context)
        return row(name, "ok", 0, f"{rate / 1e12:.1f} TFLOP/s ({scale.matmul}³ matmuls)", tflops=rate / 1e12)
    if kind == "throughput":
        recipe, bs = rest.split(":")
        return throughput_check(name, recipe, int(bs[2:]), work, scale, context)
    raise ValueError(f"no check {name}")


def importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def prepare(work: Path, scale: Scale) -> int:
    """Versions and the device; the small BERT and the planted 3-topic CSVs every recipe check shares."""
    import importlib.metadata

    import torch

    versions = {"python": sys.version.split()[0]}
    packages = ("torch", "transformers", "accelerate", "peft", "datasets", "pyarrow", "huggingface_hub", "scikit-learn")
    for package in (*packages, "deepspeed"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "missing"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device = f"{torch.cuda.get_device_name(0)} ({props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda})"
    elif not scale.dry_run:
        print("error: no CUDA device; pass --dry-run to run the checks on the CPU", file=sys.stderr)
        return 2
    else:
        device = f"CPU ({os.cpu_count()} cores), dry run"
    import finetune_recipes

    versions["finetune_recipes"] = str(Path(finetune_recipes.__file__).parent)  # the working tree's copy
    (work / "env.json").write_text(json.dumps({"device": device, "versions": versions}) + "\n")
    write_small_bert(work / "model")
    write_csv(work / "data" / "train.csv", topic_rows(scale.train_rows, seed=0))
    write_csv(work / "data" / "validation.csv", topic_rows(scale.validation_rows, seed=1))
    # Every recipe reads its files through datasets: when it cannot (a missing or too old dependency), stop now.
    import datasets

    csv_files = {"validation": str(work / "data" / "validation.csv")}
    datasets.load_dataset("csv", data_files=csv_files, cache_dir=str(work / "datasets-smoke"))
    return 0


def write_small_bert(path: Path, vocab: list[str] | None = None, **config) -> Path:
    """A BERT with random weights saved with a WordPiece tokenizer over `vocab`: nothing downloaded."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    words = vocab or SPECIALS + sorted({w for text in TOPICS.values() for w in text.split()} | set(FILLER))
    path.mkdir(parents=True, exist_ok=True)
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}, model_max_length=512).save_pretrained(path)
    torch.manual_seed(0)
    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
    settings = {"vocab_size": len(words), "max_position_embeddings": 64, **small} if vocab is None else config
    BertModel(BertConfig(**settings)).save_pretrained(path)
    return path


def launch(
    config: str, script: Path, flags: list, log: Path, port: int | None, env: dict | None = None, wait: bool = True
):
    """`accelerate launch` as a user types it, through `python -m` (no console script needed on PATH)."""
    extra = ["--num_processes", "1", "--main_process_port", str(port)] if port else []
    config_file = ROOT / "accelerate_configs" / config
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file), *extra, str(script)]
    cmd += map(str, flags)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env or os.environ, start_new_session=True
        )
    if wait:
        proc.wait()
        if proc.returncode:
            raise RuntimeError(last_line(log.read_text(errors="replace")) or f"exit code {proc.returncode}")
    return proc


def recipe_flags(recipe: str, work: Path, out: Path, scale: Scale) -> list:
    flags = [
        "--model_name_or_path", work / "model",
        "--train_file", work / "data" / "train.csv",
        "--validation_file", work / "data" / "validation.csv",
        "--output_dir", out, "--overwrite_output_dir",
        "--max_length", "32",
        "--per_device_train_batch_size", scale.batch_size,
        "--per_device_eval_batch_size", "128",
        "--max_train_steps", scale.steps,
        "--logging_steps", scale.logging_steps,
        "--learning_rate", LEARNING_RATE.get(recipe, 1e-3),
        "--mixed_precision", scale.precision,
        "--seed", "42",
    ]  # fmt: skip
    if recipe in ("feature_extraction", "frozen_base_pooler"):  # they take --feature_cache_dir
        flags += ["--feature_cache_dir", out.parent / "feature-cache"]
    if recipe == "lora":
        flags += ["--merge_adapter"]  # merged/ is what pipeline() loads
    return flags


def port_of(name: str) -> int:
    return 29600 + 4 * CHECKS.index(name)


def losses(log_text: str) -> list[float]:
    """The mean training losses the loop shows in its progress bar every `logging_steps` (`loss=0.1234`)."""
    return [float(v) for v in re.findall(r"loss=([-+0-9.eE]+|nan|inf)", log_text)]


def recipe_check(name: str, kind: str, recipe: str, work: Path, scale: Scale) -> dict:
    """Trains, then checks that the loss fell and that the CPU pipeline agrees with the GPU's predictions."""
    out = work / "runs" / name.replace(":", "_") / "out"
    log = work / "logs" / f"{name.replace(':', '_')}.log"
    config = "cpu.yaml" if scale.dry_run else LAUNCH_CONFIG[kind]
    env = {**os.environ, "HF_DATASETS_CACHE": str(out.parent / "datasets-cache")}
    launch(config, ROOT / "recipes" / f"{recipe}.py", recipe_flags(recipe, work, out, scale), log,
           port=None if scale.dry_run or kind == "single_gpu" else port_of(name), env=env)  # fmt: skip
    seen = losses(log.read_text(errors="replace"))
    results = json.loads((out / "results.json").read_text())
    agree, total = agreement(out, recipe, work / "data" / "validation.csv", scale)
    problems = []
    if len(seen) < 2:
        problems.append("fewer than 2 logged losses")
    elif not seen[-1] < seen[0]:
        problems.append(f"loss did not fall ({seen[0]:.4f} -> {seen[-1]:.4f})")
    if agree < 0.99 * total:
        problems.append(f"CPU pipeline agrees with the GPU on {agree}/{total} < 99%")
    accuracy = results["eval_accuracy"]
    loss_text = f"loss {seen[0]:.3f}→{seen[-1]:.3f}" if len(seen) >= 2 else "loss ?"
    summary = f"{loss_text}, acc {accuracy:.3f}, agree {agree}/{total}, {results['steps']} steps"
    return row(
        name, "FAILED" if problems else "ok", 0, summary, "; ".join(problems),
        first_loss=seen[0] if seen else None, last_loss=seen[-1] if seen else None, eval_accuracy=accuracy,
        agreement=agree / total, steps=results["steps"], samples_per_s=results.get("train_samples_per_second"),
    )  # fmt: skip


def agreement(out: Path, recipe: str, validation: Path, scale: Scale) -> tuple[int, int]:
    """Labels of the saved output on the GPU (the run's precision) against `pipeline()` on the CPU, in fp32."""
    import csv

    import torch
    from transformers import AutoTokenizer, pipeline

    from finetune_recipes.predict import load_classifier, predict

    texts = [r["text"] for r in csv.DictReader(validation.open())]
    device = torch.device("cuda" if torch.cuda.is_available() and not scale.dry_run else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = load_classifier(out).to(device)
    mine = []
    with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=scale.precision == "bf16"):
        for i in range(0, len(texts), 128):
            batch = tokenizer(texts[i : i + 128], truncation=True, max_length=32, padding=True, return_tensors="pt")
            mine += model(**batch.to(device)).logits.argmax(-1).tolist()
    mine = [model.config.id2label[i] for i in mine]
    if recipe == "feature_extraction":  # encoder + feature head: pipeline() cannot load it; predict() is its path
        reference = [r["label"] for r in predict(out, texts)]
    else:
        classifier = pipeline("text-classification", model=str(out / "merged" if recipe == "lora" else out), device=-1)
        reference = [r["label"] for r in classifier(texts, batch_size=64, truncation=True)]
    return sum(a == b for a, b in zip(mine, reference, strict=True)), len(texts)


def resume_check(name: str, recipe: str, work: Path, scale: Scale) -> dict:
    """SIGKILL once the first checkpoint is complete, resume from `latest`, compare with a run never stopped."""
    from concurrent.futures import ThreadPoolExecutor

    modes = {"default": ROOT / "recipes" / f"{recipe}.py", "deterministic": ROOT / "benchmarks" / "deterministic.py"}
    base = work / "runs" / name.replace(":", "_")
    config = "cpu.yaml" if scale.dry_run else LAUNCH_CONFIG["resume"]

    def flags(mode: str, which: str) -> list:
        out = base / f"{mode}-{which}"
        extra = ["--checkpointing_steps", scale.checkpoint_every, "--save_total_limit", "2"]
        prefix = [ROOT / "recipes" / f"{recipe}.py"] if mode == "deterministic" else []
        return [*prefix, *recipe_flags(recipe, work, out, scale), *extra]

    def env(mode: str) -> dict:
        extra = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"} if mode == "deterministic" else {}
        return {**os.environ, "HF_DATASETS_CACHE": str(base / f"datasets-cache-{mode}"), **extra}

    def straight(mode: str) -> None:
        launch(config, modes[mode], flags(mode, "straight"), base / "logs" / f"{mode}-straight.log", None, env(mode))

    def killed_and_resumed(mode: str) -> int:
        out = base / f"{mode}-resumed"
        first = out / "checkpoints" / f"step_{scale.checkpoint_every}" / "index.json"  # written last: complete
        proc = launch(config, modes[mode], flags(mode, "resumed"), base / "logs" / f"{mode}-killed.log", None,
                      env(mode), wait=False)  # fmt: skip
        deadline = time.monotonic() + scale.timeout
        while not first.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"{mode} run ended before its first checkpoint ({proc.returncode})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{mode} run wrote no checkpoint in {scale.timeout} s")
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)  # accelerate launch does not pass SIGKILL on: the whole group
        proc.wait()
        if (out / "results.json").exists():
            raise RuntimeError(f"{mode} run finished before it was killed: raise the steps")
        steps_done = max(
            int(m[1]) for p in (out / "checkpoints").iterdir() if (m := re.fullmatch(r"step_(\d+)", p.name))
        )
        launch(config, modes[mode], [*flags(mode, "resumed"), "--resume_from_checkpoint", "latest"],
               base / "logs" / f"{mode}-resume.log", None, env(mode))  # fmt: skip
        return steps_done

    with ThreadPoolExecutor(max_workers=1 if scale.dry_run else 4) as pool:
        futures = {(m, w): pool.submit(f, m) for m in modes for w, f in (("s", straight), ("r", killed_and_resumed))}
        killed_at = {m: futures[(m, "r")].result() for m in modes}
        for m in modes:
            futures[(m, "s")].result()
    for log in (base / "logs").glob("*.log"):
        shutil.copy(log, work / "logs" / f"{name.replace(':', '_')}-{log.name}")

    metrics, problems = {}, []
    for mode in modes:
        diff, same_metrics = compare_runs(base / f"{mode}-straight", base / f"{mode}-resumed")
        metrics[f"max_abs_diff_{mode}"] = diff
        metrics[f"same_metrics_{mode}"] = same_metrics
        metrics[f"killed_after_step_{mode}"] = killed_at[mode]
    logs = "".join(p.read_text(errors="replace") for p in (base / "logs").glob("deterministic-*.log"))
    ops = sorted(set(re.findall(r"(\S+) does not have a deterministic implementation", logs)))
    metrics["nondeterministic_ops"] = ops
    if metrics["max_abs_diff_deterministic"] != 0 or not metrics["same_metrics_deterministic"]:
        problems.append("deterministic resume differs from the uninterrupted run")
    notes = [*problems, *([f"ops without a deterministic kernel: {', '.join(ops)}"] if ops else [])]
    summary = (
        f"max abs Δw default {metrics['max_abs_diff_default']:.2e}, deterministic "
        f"{metrics['max_abs_diff_deterministic']:.2e}; metrics equal: default {metrics['same_metrics_default']}, "
        f"deterministic {metrics['same_metrics_deterministic']}; killed after step {killed_at['default']}"
    )
    return row(name, "FAILED" if problems else "ok", 0, summary, "; ".join(notes), **metrics)


def compare_runs(a: Path, b: Path) -> tuple[float, bool]:
    """Max |difference| over every saved weight, and whether the evaluation history and final metrics match."""
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    if wa.keys() != wb.keys():
        raise RuntimeError(f"the two runs saved different weights: {sorted(wa.keys() ^ wb.keys())[:3]}")
    diff = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    keys = ("eval_accuracy", "eval_f1_macro", "steps", "history")
    return diff, all(ra[k] == rb[k] for k in keys)


# ---------------------------------------------------------------------------------------------- throughput


def matmul_rate(scale: Scale, context: dict) -> float:
    """FLOP/s of n×n×n bf16 matrix products (3 warm-ups, 10 timed with CUDA events); fp32 on the CPU."""
    if "matmul" in context:
        return context["matmul"]
    import torch

    n, cuda = scale.matmul, torch.cuda.is_available() and not scale.dry_run
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(10):
            a @ b
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1000
    else:
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        seconds = time.perf_counter() - t
    context["matmul"] = 10 * 2 * n**3 / seconds
    return context["matmul"]


def throughput_inputs(work: Path, scale: Scale, bs: int) -> tuple[Path, Path]:
    """The encoder (BERT-base's shape, random weights) and CSVs of texts of exactly 126 words = 128 tokens."""
    model = work / "bert-base"
    if not (model / "config.json").exists():
        words = SPECIALS + [f"w{i}" for i in range(30522 - len(SPECIALS))]
        write_small_bert(model, vocab=words, vocab_size=len(words), **scale.encoder)
    rng = random.Random(bs)
    rows = (scale.warmup + scale.timed + 1) * bs
    data = work / "throughput-data" / f"bs{bs}"
    if not (data / "train.csv").exists():
        for split, n in (("train", rows), ("validation", bs)):
            texts = (" ".join(f"w{rng.randrange(1000)}" for _ in range(126)) for _ in range(n))
            write_csv(data / f"{split}.csv", [{"text": t, "label": f"c{i % 3}"} for i, t in enumerate(texts)])
    return model, data


def timing_hook(scale: Scale, marks: dict):
    """mark(step): the time (after a device sync) at the warm-up's end and at the timed steps' end."""
    import torch

    def mark(step: int) -> None:
        if step in (scale.warmup, scale.warmup + scale.timed):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks[step] = time.perf_counter()
            if torch.cuda.is_available():
                marks[f"peak_{step}"] = torch.cuda.max_memory_allocated()

    return mark


def fresh_state() -> None:
    """Accelerate keeps one global state per process; each measurement starts its own."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def parameter_counts(model) -> dict[str, int]:
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    embeddings = sum(p.numel() for n, p in params.items() if ".embeddings." in f".{n}")
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    return {"n_all": total, "n_no_emb": total - embeddings, "n_trainable": trainable}


def recipe_throughput(recipe: str, bs: int, model: Path, data: Path, work: Path, scale: Scale) -> dict:
    """The recipe file run in this process as `python recipes/X.py FLAGS`, its loss meter timing the steps."""
    import runpy

    import torch

    import finetune_recipes

    fresh_state()
    marks, counts = {}, {}
    real_start, real_meter = finetune_recipes.start_training, finetune_recipes.LossMeter
    mark = timing_hook(scale, marks)

    def timed_start(accelerator, model, *rest):
        counts.update(parameter_counts(accelerator.unwrap_model(model)))
        return real_start(accelerator, model, *rest)

    class TimedMeter(real_meter):  # the loop adds each batch's loss once its step is taken: the time after step N
        steps = 0

        def add(self, loss, samples: int) -> None:
            super().add(loss, samples)
            self.steps += 1
            mark(self.steps)

    out = work / "runs" / f"throughput-{recipe}-bs{bs}"
    flags = [
        "--model_name_or_path", model, "--train_file", data / "train.csv", "--validation_file", data / "validation.csv",
        "--output_dir", out, "--overwrite_output_dir", "--max_length", "128",
        "--per_device_train_batch_size", bs, "--per_device_eval_batch_size", bs,
        "--max_train_steps", scale.warmup + scale.timed + 1, "--logging_steps", scale.warmup + scale.timed + 1,
        "--mixed_precision", scale.precision, "--learning_rate", "1e-4",
    ]  # fmt: skip
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    argv = sys.argv
    sys.argv = [str(ROOT / "recipes" / f"{recipe}.py"), *map(str, flags)]
    finetune_recipes.start_training, finetune_recipes.LossMeter = timed_start, TimedMeter
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as error:  # run_cli turns a UserError into exit code 2
        raise RuntimeError(f"{recipe} exited with code {error.code}") from None
    finally:
        finetune_recipes.start_training, finetune_recipes.LossMeter, sys.argv = real_start, real_meter, argv
        shutil.rmtree(out, ignore_errors=True)
    end = scale.warmup + scale.timed
    return {"seconds": marks[end] - marks[scale.warmup], "peak": marks.get(f"peak_{end}", 0), **counts}


def plain_throughput(recipe: str, bs: int, model_path: Path, data: Path, scale: Scale) -> float:
    """Accelerate's nlp_example loop (AdamW, prepare, accelerator.backward) on the same model and batches."""
    import csv

    import torch
    from accelerate import Accelerator
    from torch.utils.data import DataLoader
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    fresh_state()
    accelerator = Accelerator(cpu=scale.dry_run, mixed_precision=scale.precision)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    texts = [r["text"] for r in csv.DictReader((data / "train.csv").open())]
    encoded = tokenizer(texts, truncation=True, max_length=128)
    pairs = zip(encoded["input_ids"], encoded["attention_mask"], strict=True)
    rows = [{"input_ids": ids, "attention_mask": mask, "labels": i % 3} for i, (ids, mask) in enumerate(pairs)]
    collate = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8)
    loader = DataLoader(rows, batch_size=bs, shuffle=True, collate_fn=collate, drop_last=True)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=3)
    if recipe == "lora":  # the recipe's adapters: the same targets, found the same way
        from peft import LoraConfig, TaskType, get_peft_model

        from finetune_recipes import block_linears, discover_layers

        layers = discover_layers(model)
        targets = block_linears(model, layers)["attention"]
        config = LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.1,
                            target_modules=targets, modules_to_save=["classifier"])  # fmt: skip
        model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()
    marks = {}
    mark = timing_hook(scale, marks)
    for step, batch in enumerate(loader):
        mark(step)
        if step == scale.warmup + scale.timed:
            break
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    accelerator.end_training()
    return scale.timed * bs / (marks[scale.warmup + scale.timed] - marks[scale.warmup])


def throughput_check(name: str, recipe: str, bs: int, work: Path, scale: Scale, context: dict) -> dict:
    import csv

    import torch
    from transformers import AutoTokenizer

    peak_measured = matmul_rate(scale, context)
    bs = scale.batch_sizes[bs]
    model, data = throughput_inputs(work, scale, bs)

    with (data / "train.csv").open() as f:
        sample = next(csv.DictReader(f))["text"]
    if len(AutoTokenizer.from_pretrained(model)(sample)["input_ids"]) != 128:
        raise RuntimeError("the throughput texts are not exactly 128 tokens")
    measured = recipe_throughput(recipe, bs, model, data, work, scale)
    plain = plain_throughput(recipe, bs, model, data, scale)
    samples = scale.timed * bs / measured["seconds"]
    tokens = samples * 128
    if recipe == "lora":
        per_token = {k: 4 * measured[k] + 2 * measured["n_trainable"] for k in ("n_all", "n_no_emb")}
    else:
        per_token = {k: 6 * measured[k] for k in ("n_all", "n_no_emb")}
    flops = {k: v * tokens for k, v in per_token.items()}
    vendor = H200_BF16_DENSE_PEAK
    metrics = dict(
        batch_size=bs, samples_per_s=samples, tokens_per_s=tokens, peak_gib=measured["peak"] / 2**30,
        n_all=measured["n_all"], n_no_emb=measured["n_no_emb"], n_trainable=measured["n_trainable"],
        tflops=flops["n_all"] / 1e12, tflops_no_emb=flops["n_no_emb"] / 1e12,
        mfu_vendor=flops["n_all"] / vendor, mfu_vendor_no_emb=flops["n_no_emb"] / vendor,
        mfu_measured=flops["n_all"] / peak_measured, mfu_measured_no_emb=flops["n_no_emb"] / peak_measured,
        measured_peak_tflops=peak_measured / 1e12, plain_samples_per_s=plain, recipe_over_plain=samples / plain,
        timed_steps=scale.timed, warmup_steps=scale.warmup, torch_threads=torch.get_num_threads(),
    )  # fmt: skip
    summary = (
        f"{samples:.0f} samples/s, {tokens / 1e3:.0f}k tok/s, {metrics['peak_gib']:.2f} GiB, "
        f"MFU {metrics['mfu_vendor']:.1%}/{metrics['mfu_vendor_no_emb']:.1%} of 989, "
        f"{metrics['mfu_measured']:.1%}/{metrics['mfu_measured_no_emb']:.1%} of measured, "
        f"recipe/plain {metrics['recipe_over_plain']:.2f}"
    )
    return row(name, "ok", 0, summary, **metrics)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
