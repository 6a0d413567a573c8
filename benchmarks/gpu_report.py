"""The GPU check's report (benchmarks/gpu.py writes it): one table of every check, the throughput and sweep table,
the profiles, and the command that reruns what failed or did not run; Markdown and JSON, rewritten whole as each
row arrives."""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

from gpu_base import DERIVED, slug


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

    def cell(value, form: str) -> str:
        return "" if value is None else format(value, form)

    head = (
        "| check | samples/s | tokens/s | peak GiB | TFLOP/s (N all / no emb.) | MFU vs datasheet (all / no emb.) "
        "| MFU vs measured (all / no emb.) | plain samples/s | recipe/plain | × eager bs128 "
        "| syncs/step (recipe, plain) |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in timed:
        m = r["metrics"]
        datasheet = f"{m['mfu_vendor']:.1%} / {m['mfu_vendor_no_emb']:.1%}" if m["mfu_vendor"] is not None else ""
        syncs = ", ".join(cell(m[k], ".1f") or "-" for k in ("syncs_per_step", "plain_syncs_per_step"))
        lines.append(
            f"| {r['check']} | {m['samples_per_s']:.0f} | {m['tokens_per_s']:.0f} | {m['peak_gib']:.2f} "
            f"| {m['tflops']:.1f} / {m['tflops_no_emb']:.1f} | {datasheet} "
            f"| {m['mfu_measured']:.1%} / {m['mfu_measured_no_emb']:.1%} | {cell(m['plain_samples_per_s'], '.0f')} "
            f"| {cell(m['recipe_over_plain'], '.2f')} | {cell(m['over_eager_bs128'], '.2f')} | {syncs} |"
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
sequence-length term is left out. MFU = FLOPs per token × tokens/s over the card's dense bf16 peak from its
datasheet (gpu_base.DATASHEET_PEAKS) and over the rate `mfu_peak` measured in the same run. samples/s is the
median of 3 windows of the timed steps; syncs/step are counted by CUDA's sync debug mode over the warm-up's
steps after the first."""


def write_report(
    rows: list[dict], checks: list[str], info: dict, wall: float, args, work: Path, final: bool = True
) -> None:
    """The Markdown table and its JSON, rewritten as rows arrive (`final`: once all are in, printed too)."""
    out = Path(args.out)
    md_path = out if out.suffix == ".md" else out / "gpu.md"
    md_path.parent.mkdir(parents=True, exist_ok=True)
    mode = "dry run on the CPU" if args.dry_run else "GPU run"
    progress = "" if final else f", in progress: {len(rows)} of {len(checks)} checks done"
    title = f"# GPU check ({mode}), {time.strftime('%Y-%m-%d %H:%M')}, {wall:.0f} s wall{progress}"
    command = "bash benchmarks/gpu.sh " + shlex.join(sys.argv[1:])
    parts = [title, "", f"`{command.strip()}`", "", environment_line(info), "", markdown_table(rows)]
    rerun = rerun_command(rows, checks, args)
    if rerun:
        parts += ["", f"Rerun what failed or did not run: `{rerun}`"]
    detail = throughput_table(rows)
    if detail:
        parts += ["", detail, "", FORMULAS]
    profiled = profile_table(rows)
    if profiled:
        parts += ["", profiled]
    text = "\n".join(parts) + "\n"
    json_text = json.dumps({"mode": mode, "wall_s": round(wall, 1), "environment": info, "rows": rows}, indent=1)
    for path, content in ((md_path, text), (md_path.with_suffix(".json"), json_text + "\n")):
        partial = path.with_name(path.name + ".partial")
        partial.write_text(content)
        partial.replace(path)  # a reader (or a kill) never meets half a report
    if not final:
        return
    failed = [r for r in rows if r["status"] == "FAILED"]
    if failed:  # each failed check's traceback and the end of its logs, for a machine that is gone once it is read
        tails = [f"==> {r['check']}: traceback <==\n{r['metrics']['traceback']}" for r in failed
                 if r["metrics"].get("traceback")]  # fmt: skip
        for log in sorted((work / "logs").glob("*")):
            if any(slug(r["check"]) in log.name for r in failed):
                tail = log.read_text(errors="replace").replace("\r", "\n").splitlines()[-60:]
                tails.append(f"==> {log.name} <==\n" + "\n".join(tail))
        md_path.with_name(md_path.stem + "-failed-logs.txt").write_text("\n\n".join(tails) + "\n")
    print()
    print(text)
    print(f"Written to {md_path} and {md_path.with_suffix('.json')}")


def rerun_command(rows: list[dict], checks: list[str], args) -> str:
    """The command that reruns what failed or did not run (a derived row with the rows it reads), into a folder
    `rerun` beside this report, under the same flags; "" when nothing is left to run."""
    again = [r["check"] for r in rows if r["status"] == "FAILED" or r["status"].startswith("not run")]
    again += [c for c in checks if c not in {r["check"] for r in rows}]
    again += [d for d, needs in DERIVED.items() if d in checks and set(needs) & set(again) and d not in again]
    if not again:
        return ""
    out = Path(args.out)
    folder = (out.parent if out.suffix == ".md" else out) / "rerun"
    flags = ["--dry-run"] * args.dry_run + (["--time_budget", f"{args.time_budget:g}"] if args.time_budget else [])
    return shlex.join(["bash", "benchmarks/gpu.sh", *flags, "--only", ",".join(again), "--out", str(folder)])
