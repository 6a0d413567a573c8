"""What the machine computes natively: a torch-only check that training, encoding and prediction share."""

from __future__ import annotations

import torch


def bf16_supported(device: torch.device) -> bool:
    """bf16 pays off on GPUs that have it and on CPUs with AVX-512 BF16 or AMX; elsewhere it is emulated."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False
