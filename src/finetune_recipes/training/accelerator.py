"""The accelerator and its mixed precision: bf16 where the hardware computes it natively, else fp32."""

from __future__ import annotations

import logging
import os

import datasets
import torch
import transformers
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.utils import DistributedType, set_seed, str_to_bool

from ..config import TrainingArguments
from ..errors import UserError
from ..modeling import bf16_supported
from .tracking import TRACKER_PROJECT, trackers

logger = logging.getLogger("finetune_recipes")


def resolve_mixed_precision(requested: str | None) -> str | None:
    """'auto' is bf16 where the hardware computes it natively (AMX / AVX-512 BF16 CPUs, Ampere+ GPUs); fp16 on
    a GPU without bf16 (V100, T4: Accelerate adds the loss scaler fp16 needs); else fp32."""
    if requested != "auto":
        return requested
    device = torch.accelerator.current_accelerator() or torch.device("cpu")
    if bf16_supported(device):
        return "bf16"
    return "fp16" if device.type == "cuda" else "no"


def check_launch(accelerator: Accelerator) -> None:
    """Refuses a launch that would silently run something other than what it asked for."""
    env = os.environ
    # accelerate's simple launcher sets MASTER_ADDR when asked for several processes or machines
    # (`--cpu --num_machines 2`, `--cpu --num_processes 2` without a config) but starts this one process
    # alone; a launch that really starts several sets WORLD_SIZE.
    if (
        accelerator.num_processes == 1
        and str_to_bool(env.get("ACCELERATE_USE_CPU", "false"))  # "False" on a GPU, where clusters set MASTER_ADDR
        and "MASTER_ADDR" in env
        and "WORLD_SIZE" not in env
    ):
        raise UserError(
            "accelerate launch asked for several processes or machines, but this process runs alone; launch with "
            "--config_file accelerate_configs/cpu_2proc.yaml (one machine) or cpu_2node.yaml (one per machine)"
        )
    # Accelerate applies FSDP only on accelerators: on CPUs a launch with fsdp.yaml runs unsharded.
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true" and accelerator.distributed_type != DistributedType.FSDP:
        raise UserError(
            f"the launch asked for FSDP, but Accelerate applies it only on GPUs and this run is "
            f"{accelerator.distributed_type.value}; on CPUs launch with accelerate_configs/cpu_2proc.yaml"
        )


def build_accelerator(args: TrainingArguments, find_unused_parameters: bool = False) -> Accelerator:
    """An Accelerator whose shuffling depends only on (seed, epoch), so processes agree and resumes repeat.

    `find_unused_parameters` is for strategies that change which parameters train mid-run: DDP must
    know every parameter up front and tolerate those that get no gradient in a step.
    """
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if find_unused_parameters else []
    accelerator = Accelerator(
        cpu=not torch.accelerator.is_available(),  # also makes torchrun's processes join one gloo group
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=resolve_mixed_precision(args.mixed_precision),
        log_with=trackers(args.report_to, args.output_dir, TRACKER_PROJECT),
        project_dir=args.output_dir,
        step_scheduler_with_optimizer=False,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=handlers,
    )
    check_launch(accelerator)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logger.setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)
    if not accelerator.is_local_main_process:
        datasets.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    set_seed(args.seed)
    return accelerator


def wrap_blocks_not_embeddings(accelerator, model: torch.nn.Module) -> None:
    """Under FSDP2 with transformer-based wrapping, shard the model's blocks, but not the module that holds
    its input embedding.

    accelerate (1.15) wraps every class of `model._no_split_modules` (BERT's lists BertEmbeddings) and then
    shards the input embedding once more on its own, which fails inside `fully_shard` ("Invariant
    encountered: value was None") when its parent is already sharded. Measured on an H200 with torch 2.11.
    An explicit `fsdp_transformer_layer_cls_to_wrap` in the config is left as the user wrote it.
    """
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None or plugin.fsdp_version != 2 or plugin.transformer_cls_names_to_wrap:
        return
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):  # a head over cached features, or a model without one
        return
    holders = {type(m).__name__ for m in model.modules() if any(c is embeddings for c in m.children())}
    plugin.transformer_cls_names_to_wrap = [
        n for n in getattr(model, "_no_split_modules", None) or [] if n not in holders
    ]


def end_training(accelerator: Accelerator) -> None:
    """Accelerate's `end_training` but for its last act: the trackers finish, and the process group is left to the
    process's end (processes.run_to_end ends a multi-process run with os._exit). Destroyed here, it would be
    destructed when DDP's Reducer is freed as the recipe's main returns, and gloo's destructor hung there on a
    loaded machine (see run_to_end)."""
    for tracker in accelerator.trackers:
        tracker.finish()
