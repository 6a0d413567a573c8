"""Progressive unfreezing's early stages: does running the frozen lower blocks under `torch.no_grad()` save
anything over what the recipe does today (the frozen blocks' parameters have requires_grad False)?

Autograd records an operation only when one of its inputs requires a gradient. While the embeddings and
the lower blocks are frozen (progressive unfreezing thaws the embeddings last), nothing below the first
trainable block requires one, so no graph is built and no activation is kept for the frozen prefix
either way. This measures that claim: the bytes autograd saves for backward (`saved_tensors_hooks`) and
the step time, per stage, for the model as the recipe trains it ("today") and with the frozen blocks run
under `no_grad` and in eval mode ("no_grad + eval": no dropout in them either).

    .venv/bin/python benchmarks/frozen_prefix.py [--batch_size 16] [--length 128] [--steps 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from transformers import AutoModelForSequenceClassification

from finetune_recipes.freezing import set_trainable, unfreezing_stages
from finetune_recipes.layers import discover_layers
from finetune_recipes.modeling import resolve_model_path

MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def run_block(block, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    out = block(hidden, attention_mask=mask)
    return out[0] if isinstance(out, tuple) else out


def forward(model, batch: dict, frozen_blocks: int, prefix_no_grad: bool) -> torch.Tensor:
    """The classifier's loss; with `prefix_no_grad`, embeddings and the first `frozen_blocks` blocks run
    under no_grad in eval mode, the rest as usual."""
    if not prefix_no_grad:
        return model(**batch).loss
    bert = model.bert
    mask = None  # the batch has no padding (transformers 5 builds its masks inside the model)
    blocks = bert.encoder.layer
    with torch.no_grad():
        bert.embeddings.eval()
        hidden = bert.embeddings(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"])
        for block in blocks[:frozen_blocks]:
            block.eval()
            hidden = run_block(block, hidden, mask)
    for block in blocks[frozen_blocks:]:
        block.train()
        hidden = run_block(block, hidden, mask)
    logits = model.classifier(model.dropout(bert.pooler(hidden)))
    return torch.nn.functional.cross_entropy(logits, batch["labels"])


def measure(model, optimizer, batch, frozen_blocks: int, prefix_no_grad: bool, steps: int) -> tuple[float, int]:
    """(seconds per step, bytes saved for backward in one step)."""
    saved = [0]

    def pack(tensor):
        saved[0] += tensor.numel() * tensor.element_size()
        return tensor

    model.train()
    for i in range(steps + 1):
        if i == 1:
            start = time.perf_counter()
        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if i == 0 else contextlib.nullcontext()
        with hooks:
            loss = forward(model, batch, frozen_blocks, prefix_no_grad)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / steps, saved[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(resolve_model_path(MODEL), num_labels=5)
    layers = discover_layers(model)
    stages = unfreezing_stages(layers)
    blocks = len(model.bert.encoder.layer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batch = {
        "input_ids": torch.randint(1000, 20000, (args.batch_size, args.length)),
        "token_type_ids": torch.zeros(args.batch_size, args.length, dtype=torch.long),
        "attention_mask": torch.ones(args.batch_size, args.length, dtype=torch.long),
        "labels": torch.randint(0, 5, (args.batch_size,)),
    }
    print("| stage | frozen blocks | variant | saved for backward (MB) | s/step (median) | vs today |")
    print("|---:|---:|---|---:|---:|---:|")
    for stage in range(0, min(len(stages), blocks + 1), 2):  # 0 (head only), 2 and 4 blocks thawed, ...
        set_trainable(model, layers, stages[stage])
        frozen = blocks - stage
        results = {False: [], True: []}
        sizes = {}
        for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
            for variant in (False, True):
                seconds, saved = measure(model, optimizer, batch, frozen, variant, args.steps)
                results[variant].append(seconds)
                sizes[variant] = saved
        today = statistics.median(results[False])
        for variant, name in ((False, "today"), (True, "no_grad + eval")):
            median = statistics.median(results[variant])
            print(
                f"| {stage} | {frozen} | {name} | {sizes[variant] / 2**20:.1f} | {median:.3f} | {today / median:.2f}× |"
            )


if __name__ == "__main__":
    main()
