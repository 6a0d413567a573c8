"""Progressive unfreezing as the recipe runs it under FSDP2: a tiny BERT sharded by `fully_shard` (each block,
then the model), thawed by `Thaw(keep_requires_grad=True)`, the frozen gradients dropped before clipping and the
step. `train` is also the single-process reference (`keep_requires_grad=False`, requires_grad switched).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_thaw.py OUT_DIR

writes OUT_DIR/{fp32,bf16}.safetensors, the full weights after training under each MixedPrecisionPolicy
(tests/test_freezing.py runs it: two gloo processes on the CPU, each given the same batch).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tiny import COMMON
from transformers import AutoModelForSequenceClassification, BertConfig

from finetune_recipes.freezing import Thaw, unfreezing_stages
from finetune_recipes.layers import discover_layers

STARTS = [0, 2, 4]  # the head and pooler; then the top block; then the next one: the embeddings never thaw
STEPS = 6


def dropout_free_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = BertConfig(**COMMON, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return AutoModelForSequenceClassification.from_config(config)


def train(model: torch.nn.Module, keep_requires_grad: bool, shard=None) -> torch.nn.Module:
    """STEPS optimizer steps of the recipe's order: thaw, forward, backward, drop, clip, step. `shard(model)`
    (FSDP2) runs before the optimizer is built on the sharded parameters (accelerator.prepare builds it first and
    swaps them in: the same parameters in the end)."""
    layers = discover_layers(model)
    thaw = Thaw(model, layers, unfreezing_stages(layers)[: len(STARTS)], STARTS, lambda _: None, keep_requires_grad)
    if shard is not None:
        shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(5, 100, (8, 12), generator=generator), torch.arange(8) % 3
    for step in range(STEPS):
        thaw(step)
        loss = torch.nn.functional.cross_entropy(model(input_ids=ids).logits.float(), labels)
        loss.backward()
        thaw.drop_frozen_gradients()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model


def main(out: Path) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)

        def shard(model, policy=policy):
            for block in model.bert.encoder.layer:
                fully_shard(block, mesh=mesh, mp_policy=policy)
            fully_shard(model, mesh=mesh, mp_policy=policy)

        model = train(dropout_free_bert(), keep_requires_grad=True, shard=shard)
        weights = {n: p.full_tensor().detach().contiguous() for n, p in model.named_parameters()}
        if dist.get_rank() == 0:
            out.mkdir(parents=True, exist_ok=True)
            save_file(weights, out / f"{name}.safetensors")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
