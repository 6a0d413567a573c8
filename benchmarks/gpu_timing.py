"""How the GPU check times training (gpu_throughput.py's checks use it): a recipe run in this process with its
loss meter as the clock, a plain Accelerate loop beside it, the levers the sweep turns, host-device syncs
counted, and the inputs: a BERT-base-shaped encoder and texts of exact token lengths."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path

from gpu_base import ROOT, Scale

from finetune_recipes.testing import SPECIALS, write_bert, write_csv

WINDOWS = 3  # the timed steps are this many windows; a rate is their median (one stall does not move it)
LEVERS = ("compiled", "foreach", "flash", "efficient", "math", "masked")


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


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class SyncCounter:
    """Host-device synchronisations between start() and stop(), as CUDA's sync debug mode reports them (a
    warning for each); `count` stays None without CUDA, where nothing waits for a device."""

    MESSAGE = "called a synchronizing CUDA operation"

    def __init__(self):
        self.count, self._catcher, self._caught = None, None, []

    def start(self) -> None:
        import torch

        if not torch.cuda.is_available():
            return
        self._catcher = warnings.catch_warnings(record=True)
        self._caught = self._catcher.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> None:
        import torch

        if self._catcher is None:
            return
        torch.cuda.set_sync_debug_mode("default")
        self._catcher.__exit__(None, None, None)
        self.count = sum(self.MESSAGE in str(w.message) for w in self._caught)
        self._catcher = None


class StepClock:
    """Times a loop by its optimizer steps: `start()` before the first, `tick(step)` after each. The device is
    synced at the steps it marks (the first, the warm-up's end, each timed window's end); syncs are counted
    from the first step's end to the warm-up's (compiles and allocations are done by then); a profiler, if
    given, records `scale.profiled` steps after the warm-up."""

    def __init__(self, scale: Scale, profiler=None):
        self.scale, self.profiler = scale, profiler
        self.ends = [scale.warmup + round(k * scale.timed / WINDOWS) for k in range(1, WINDOWS + 1)]
        self.marks, self.peak_bytes, self.syncs = {}, 0, SyncCounter()

    @property
    def last(self) -> int:
        return self.ends[-1]

    def start(self) -> None:
        self.marks[0] = time.perf_counter()

    def tick(self, step: int) -> None:
        import torch

        warmup = self.scale.warmup
        if step == warmup:
            self.syncs.stop()  # before the clock's own sync
        if step in (1, warmup, *self.ends):
            sync()
            self.marks[step] = time.perf_counter()
            if torch.cuda.is_available():
                self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated())
        if step == 1:
            self.syncs.start()
        if self.profiler is not None and step == warmup:
            self.profiler.start()
        elif self.profiler is not None and step == warmup + self.scale.profiled:
            self.profiler.stop()

    def rate(self, per_step: float) -> float:
        """`per_step` units (samples, tokens) a second: the median of the timed windows' rates."""
        edges = [self.scale.warmup, *self.ends]
        return statistics.median(
            (b - a) * per_step / (self.marks[b] - self.marks[a]) for a, b in zip(edges, edges[1:], strict=False)
        )

    def first_step_extra(self) -> float:
        """The first step's time beyond a timed step's: a compile's cost, paid once."""
        timed = (self.marks[self.last] - self.marks[self.scale.warmup]) / (self.last - self.scale.warmup)
        return self.marks[1] - self.marks[0] - timed

    def close(self) -> None:
        """Sync counting and the profiler stopped, if a run ended (or failed) while they ran."""
        self.syncs.stop()
        if self.profiler is not None and getattr(self.profiler, "running", False):
            self.profiler.stop()

    def syncs_per_step(self) -> float | None:
        counted = self.scale.warmup - 1
        return None if self.syncs.count is None or counted < 1 else self.syncs.count / counted


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


def foreach_adamw(groups, learning_rate):
    """The recipes' build_optimizer with AdamW's foreach kernels, not the fused one: the sweep's `foreach`."""
    import torch

    return torch.optim.AdamW([dict(g) for g in groups], lr=learning_rate, foreach=True)


def sdpa_backend(levers) -> contextlib.AbstractContextManager:
    """SDPA held to the one backend `levers` names (flash, efficient, math), else left to choose."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "math": SDPBackend.MATH}  # fmt: skip
    chosen = [backends[lever] for lever in levers if lever in backends]
    return sdpa_kernel(chosen) if chosen else contextlib.nullcontext()


def recipe_throughput(
    recipe: str, bs: int, model: Path, data: Path, work: Path, scale: Scale, flags=(), levers=(), profiler=None
) -> dict:
    """The recipe file run in this process as `python recipes/X.py FLAGS`, its loss meter ticking the clock.
    Levers: `compiled` sets ACCELERATE_DYNAMO_BACKEND=INDUCTOR while it runs (as `accelerate launch
    --dynamo_backend inductor` does), `foreach` swaps in foreach_adamw, flash/efficient/math hold SDPA."""
    import runpy
    from unittest import mock

    import torch

    from finetune_recipes import kit  # what the recipe imports its names from

    fresh_state()
    clock, counts, losses = StepClock(scale, profiler), {}, []
    real_claim, real_trackers = kit.claim_outputs, kit.start_trackers

    def counted_claim(accelerator, model, *rest):  # the prepared model: its parameters, with and without embeddings
        counts.update(parameter_counts(accelerator.unwrap_model(model)))
        return real_claim(accelerator, model, *rest)

    def timed_trackers(*args):  # the recipe's last call before its loop: the clock starts
        real_trackers(*args)
        clock.start()

    class TimedMeter(kit.LossMeter):  # the loop adds each batch's loss once its step is taken
        steps = 0  # the optimizer steps taken (one batch each: no accumulation here)

        def add(self, loss, samples: int) -> None:
            super().add(loss, samples)
            self.steps += 1
            losses.append(loss)
            clock.tick(self.steps)

    out = work / "runs" / f"throughput-{recipe}-bs{bs}"
    argv = recipe_argv(recipe, bs, model, data, out, max(clock.last, scale.warmup + scale.profiled) + 1, scale, flags)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    env = {"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"} if "compiled" in levers else {}
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, out, ignore_errors=True)
        stack.callback(clock.close)
        swaps = dict(claim_outputs=counted_claim, start_trackers=timed_trackers, LossMeter=TimedMeter)
        if "foreach" in levers:
            swaps["build_optimizer"] = foreach_adamw
        stack.enter_context(mock.patch.multiple(kit, **swaps))
        stack.enter_context(mock.patch.object(sys, "argv", argv))
        stack.enter_context(mock.patch.dict(os.environ, env))
        stack.enter_context(sdpa_backend(levers))
        try:
            runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as error:  # run_cli turns a UserError into exit code 2
            raise RuntimeError(f"{recipe} exited with code {error.code}") from None
    timed = losses[scale.warmup : clock.last]
    return {
        "samples_per_s": clock.rate(bs), "seconds": clock.marks[clock.last] - clock.marks[scale.warmup],
        "peak": clock.peak_bytes, "first_step_extra_s": clock.first_step_extra(),
        "syncs_per_step": clock.syncs_per_step(), "mean_loss": float(torch.stack([x.float() for x in timed]).mean()),
        **counts,
    }  # fmt: skip


def recipe_argv(recipe: str, bs: int, model: Path, data: Path, out: Path, steps: int, scale: Scale, flags) -> list:
    """`python recipes/RECIPE.py` and its flags for a timed run of `steps` optimizer steps."""
    return [str(ROOT / "recipes" / f"{recipe}.py"), *map(str, [
        "--model_name_or_path", model, "--train_file", data / "train.csv", "--validation_file", data / "validation.csv",
        "--output_dir", out, "--overwrite_output_dir", "--max_length", "128",
        "--per_device_train_batch_size", bs, "--per_device_eval_batch_size", bs,
        "--max_train_steps", steps, "--logging_steps", steps,
        "--mixed_precision", scale.precision, "--learning_rate", "1e-4", *flags,
    ])]  # fmt: skip


def plain_throughput(recipe: str, bs: int, model_path: Path, data: Path, scale: Scale) -> dict:
    """Accelerate's nlp_example loop (AdamW, prepare, accelerator.backward) on the same model and batches:
    samples/s and syncs per step, counted as for the recipe."""
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
    clock = StepClock(scale)
    clock.start()
    for step, batch in enumerate(loader, start=1):
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        clock.tick(step)
        if step == clock.last:
            break
    accelerator.end_training()
    return {"samples_per_s": clock.rate(bs), "syncs_per_step": clock.syncs_per_step()}
