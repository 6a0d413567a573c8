"""Training throughput of the recipe loop against a plain Accelerate loop, same model, data and batch size.

The plain loop is the shape of Accelerate's `examples/nlp_example.py`: dynamic padding, AdamW, linear
warmup, `accelerator.backward`, nothing else. The recipe loop is `recipes/full_finetune.py`'s `main`, its
own loop (fused AdamW, gradient clipping, no per-step host syncs), first with
its defaults, then with each option on by itself, then all together. Variants run interleaved, several
repeats, each from the same initial weights, and every one is reported as a ratio to the plain loop.

    python benchmarks/throughput.py --steps 12 --repeats 3
    python benchmarks/throughput.py --max_length 512 --batch_size 8 --output benchmarks/results/throughput_512.json
    python benchmarks/throughput.py --train_file benchmarks/results/trust/data/headlines/train.jsonl --max_length 64
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import platform
import runpy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, get_linear_schedule_with_warmup

from finetune_recipes.config import DataArguments, ModelArguments, TrainingArguments
from finetune_recipes.data import build_datasets, build_tokenizer
from finetune_recipes.modeling import build_model

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "full_finetune.py"

VARIANTS = {
    "plain loop": {},
    "recipe loop": {},
    "+ length-grouped batches": {"group_by_length": True},
    "+ packed batches": {"pack_sequences": True},
    "+ bf16 autocast": {"mixed_precision": "bf16"},
    "recipe, all options": {"group_by_length": True, "mixed_precision": "bf16"},
}


def fresh_state() -> None:
    """Accelerate keeps one global state per process; each variant starts its own."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def plain_loop(model, data, tokenizer, batch_size: int, steps: int) -> float:
    """Accelerate's nlp_example, trimmed to `steps` training steps; returns samples per second."""
    fresh_state()
    accelerator = Accelerator(cpu=not torch.accelerator.is_available())
    loader = DataLoader(data.train, shuffle=True, batch_size=batch_size, collate_fn=DataCollatorWithPadding(tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=steps // 10, num_training_steps=steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    model.train()
    samples, start = 0, time.perf_counter()
    for step, batch in enumerate(loader):
        if step == steps:
            break
        outputs = model(**batch)
        accelerator.backward(outputs.loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        samples += batch["labels"].shape[0]
    return samples / (time.perf_counter() - start)


def recipe_loop(
    model, data, tokenizer, batch_size: int, steps: int, max_length: int = 128, train_file=None, **options
) -> float:
    """recipes/full_finetune.py's `main` on the same data (its own copy of the model, seeded); evaluation on
    8 texts only, so the time is the training's. Returns samples per second."""
    fresh_state()
    main = runpy.run_path(str(RECIPE))["main"]
    with tempfile.TemporaryDirectory() as out:
        results = main(
            ModelArguments(),
            DataArguments(
                max_length=max_length,
                train_file=train_file,
                max_eval_samples=8,
                group_by_length=options.get("group_by_length", False),
                pack_sequences=options.get("pack_sequences", False),
            ),
            TrainingArguments(
                per_device_train_batch_size=batch_size,
                max_train_steps=steps,
                logging_steps=10**9,
                mixed_precision=options.get("mixed_precision", "no"),
                output_dir=out,
                overwrite_output_dir=True,
            ),
        )
    return results["train_samples_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="training steps per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--train_file", default=None, help="default: BBC News, embedded")
    parser.add_argument("--output", default="benchmarks/results/throughput.json")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    cli = parser.parse_args()
    chosen = {name: VARIANTS[name] for name in ["plain loop", *cli.variants.split(",")] if name in VARIANTS}

    model_args, data_args = ModelArguments(), DataArguments(max_length=cli.max_length, train_file=cli.train_file)
    tokenizer = build_tokenizer(model_args, data_args)
    data = build_datasets(data_args, tokenizer, seed=42)
    # A fresh copy per run: prepare() under mixed precision patches the model's forward in place.
    initial = build_model(model_args, [str(i) for i in range(5)])

    speeds: dict[str, list[float]] = {name: [] for name in chosen}
    for repeat in range(cli.repeats):
        for name, options in chosen.items():
            model = copy.deepcopy(initial)
            set_seed(repeat)
            recipe = functools.partial(recipe_loop, max_length=cli.max_length, train_file=cli.train_file)
            run = plain_loop if name == "plain loop" else recipe
            speed = run(model, data, tokenizer, cli.batch_size, cli.steps, **options)
            speeds[name].append(speed)
            print(f"repeat {repeat + 1}/{cli.repeats} {name:<26} {speed:7.2f} samples/s", flush=True)

    plain = speeds["plain loop"]
    rows = []
    for name, values in speeds.items():
        ratios = [v / p for v, p in zip(values, plain, strict=True)]  # paired with the same repeat's plain run
        rows.append(
            {
                "variant": name,
                "samples_per_second": statistics.median(values),
                "ratio_median": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
            }
        )
    machine = (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    table = [
        f"{cli.train_file or 'BBC News'}, batch {cli.batch_size}, max_length {cli.max_length}, {cli.steps} steps × "
        f"{cli.repeats} repeats; {machine}",
        "",
        "| variant | samples/s (median) | × plain loop (median, min–max) |",
        "|---|---:|---:|",
    ]
    table += [
        f"| {r['variant']} | {r['samples_per_second']:.2f} | {r['ratio_median']:.2f} "
        f"({r['ratio_min']:.2f}–{r['ratio_max']:.2f}) |"
        for r in rows
    ]
    print("\n".join(table))
    Path(cli.output).parent.mkdir(parents=True, exist_ok=True)
    Path(cli.output).write_text(
        json.dumps({"machine": machine, "args": vars(cli), "rows": rows, "raw": speeds}, indent=2)
    )
    Path(cli.output).with_suffix(".md").write_text("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
