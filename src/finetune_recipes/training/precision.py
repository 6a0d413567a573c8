"""The accelerator and its mixed precision: bf16 where the hardware computes it natively, else fp32."""

from __future__ import annotations

import logging
import os

import datasets
import torch
import transformers
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.utils import DistributedType, set_seed, str_to_bool

from .. import hardware
from ..config import TrainingArguments, UserError
from ..errors import DISTRIBUTED
from .tracking import TRACKER_PROJECT, trackers

logger = logging.getLogger("finetune_recipes")


def resolve_mixed_precision(requested: str | None) -> str | None:
    """'auto' is bf16 where the hardware computes it natively (AMX / AVX-512 BF16 CPUs, Ampere+ GPUs); fp16 on
    a GPU without bf16 (V100, T4: Accelerate adds the loss scaler fp16 needs); else fp32."""
    if requested != "auto":
        return requested
    device = torch.accelerator.current_accelerator() or torch.device("cpu")
    if hardware.bf16_supported(device):
        return "bf16"
    return "fp16" if device.type == "cuda" else "no"


def pad_multiple(accelerator: Accelerator) -> int | None:
    """Tensor cores and AMX tiles want sequence lengths in multiples of 8 under mixed precision."""
    return 8 if accelerator.mixed_precision in ("fp16", "bf16") else None


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
    if accelerator.num_processes > 1:
        DISTRIBUTED.append(accelerator)  # its process group outlives the run: see errors.run_to_end
    if find_unused_parameters and accelerator.distributed_type == DistributedType.FSDP:
        # Measured on an H200 (torch 2.11, accelerate 1.15): a block thawed after FSDP2 has sharded the model
        # fails in backward ("attempting to assign a gradient with dtype BFloat16 to a tensor with grad_dtype
        # Float"); frozen-throughout parameters (pooler, LoRA) are fine.
        raise UserError(
            "this recipe changes which parameters train mid-run, which FSDP2 does not follow; launch it with "
            "accelerate_configs/multi_gpu.yaml (DDP) or a DeepSpeed config instead of fsdp.yaml"
        )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logger.setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)
    if not accelerator.is_local_main_process:
        datasets.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    set_seed(args.seed)
    return accelerator
