"""Training speed and peak memory of a real-size decoder on this CPU: the shape of Qwen3-0.6B with random weights
(no pretrained decoder is offline, so no quality is measured or claimed), full fine-tuning and LoRA, each with
and without gradient checkpointing, beside MiniLM-L6 (the embedded default) for scale.

    python benchmarks/decoders.py                       # 20 steps after 3 of warm-up, as issue 41 asks
    python benchmarks/decoders.py --steps 4 --warmup 1  # what fits a 2-core session (benchmarks/README.md)

Each configuration runs in a process of its own, so its peak resident memory (ru_maxrss) is its own. Random token
ids, max length 128, batch 8, AdamW, bf16 autocast where the CPU computes bf16 natively (the recipes' `auto`).
Writes benchmarks/results/decoders.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "decoders.json"
MODELS = ("qwen3-0.6b-shape", "minilm-l6")
MODES = ("full", "full+checkpointing", "lora", "lora+checkpointing")


def build(model_name: str):
    import torch
    import transformers

    from finetune_recipes.modeling import build_model

    if model_name == "minilm-l6":
        return build_model("sentence-transformers/all-MiniLM-L6-v2", ["a", "b", "c"]), 30522
    config = transformers.Qwen3Config(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, num_labels=3, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.AutoModelForSequenceClassification.from_config(config), config.vocab_size


def one(model_name: str, mode: str, steps: int, warmup: int, batch: int, length: int) -> dict:
    import torch

    from finetune_recipes.layers import block_linears, discover_layers, stored_transposed
    from finetune_recipes.modeling import bf16_supported

    model, vocab = build(model_name)
    if mode.startswith("lora"):
        from peft import LoraConfig, TaskType, get_peft_model

        layers = discover_layers(model)
        targets = block_linears(model, layers)["attention"]
        config = LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=32, target_modules=targets,
                            fan_in_fan_out=stored_transposed(model, targets),
                            modules_to_save=sorted({n.split(".")[0] for n, _ in layers.head}))  # fmt: skip
        model = get_peft_model(model, config)
    if mode.endswith("checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    bf16 = bf16_supported(torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    seconds = 0.0
    for step in range(warmup + steps):
        ids = torch.randint(1, vocab, (batch, length), generator=generator)
        labels = torch.randint(0, 3, (batch,), generator=generator)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            seconds += time.perf_counter() - start
    return {
        "model": model_name,
        "mode": mode,
        "samples_per_s": round(steps * batch / seconds, 2),
        "s_per_step": round(seconds / steps, 2),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "trainable_params": sum(p.numel() for p in trainable),
        "total_params": sum(p.numel() for p in model.parameters()),
        "precision": "bf16 autocast" if bf16 else "fp32",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = (args.steps, args.warmup, args.batch, args.length)
    if args.one:
        print(json.dumps(one(*args.one, *sizes)))
        return
    rows = []
    for model_name in args.models.split(","):
        for mode in args.modes.split(","):
            cmd = [sys.executable, __file__, "--one", model_name, mode, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--batch", str(args.batch), "--length", str(args.length)]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"sizes": dict(zip(("steps", "warmup", "batch", "length"), sizes, strict=True)),
                                   "rows": rows}, indent=1) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
