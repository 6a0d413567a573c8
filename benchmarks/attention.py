"""Training-step speed of the pretrained MiniLM on this CPU: attention kernel (SDPA or eager) × attention dropout
(the model's 0.1 or 0) × sequence length. One process, configurations interleaved, median of the repeats.

    .venv/bin/python benchmarks/attention.py [--lengths 128,512] [--batch_size 8] [--steps 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch
from transformers import AutoModelForSequenceClassification

from finetune_recipes.modeling import resolve_model_path

MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def step_seconds(model, optimizer, batch: dict, steps: int) -> float:
    """Seconds per optimizer step (forward, backward, AdamW), after one warm-up step."""
    model.train()
    for i in range(steps + 1):
        if i == 1:
            start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="128,512")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    path = resolve_model_path(MODEL)
    configs = list(itertools.product([int(n) for n in args.lengths.split(",")], ["sdpa", "eager"], [0.1, 0.0]))
    models = {}
    for impl, dropout in {(c[1], c[2]) for c in configs}:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=5, attn_implementation=impl, attention_probs_dropout_prob=dropout
        )
        models[impl, dropout] = (model, torch.optim.AdamW(model.parameters(), lr=1e-5))
    times: dict[tuple, list[float]] = {c: [] for c in configs}
    for _ in range(args.repeats):
        for length, impl, dropout in configs:
            ids = torch.randint(1000, 20000, (args.batch_size, length))
            batch = {
                "input_ids": ids,
                "attention_mask": torch.ones_like(ids),
                "labels": torch.zeros(args.batch_size, dtype=torch.long),
            }
            times[length, impl, dropout].append(step_seconds(*models[impl, dropout], batch, args.steps))
    print(f"batch {args.batch_size}, {args.steps} steps × {args.repeats} repeats, torch {torch.__version__}")
    print("| length | attention | attention dropout | samples/s | tokens/s | vs SDPA + dropout 0.1 |")
    print("|---:|---|---:|---:|---:|---:|")
    for length, impl, dropout in configs:
        median = statistics.median(times[length, impl, dropout])
        base = statistics.median(times[length, "sdpa", 0.1])
        rate = args.batch_size / median
        print(f"| {length} | {impl} | {dropout} | {rate:.1f} | {rate * length:,.0f} | {base / median:.2f}× |")


if __name__ == "__main__":
    main()
