"""Runs a recipe with PyTorch's deterministic algorithms on, for the GPU check's kill-and-resume comparison.

    accelerate launch --config_file accelerate_configs/single_gpu.yaml benchmarks/deterministic.py \
        recipes/full_finetune.py FLAGS

The recipes have no flag for it (`--seed` seeds the shuffling and the initial head, not the kernels), so
this wrapper turns it on and then runs the recipe file unchanged, as `python recipes/X.py FLAGS` would.
cuBLAS needs CUBLAS_WORKSPACE_CONFIG set before its first call to be deterministic.
"""

import os
import runpy
import sys

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402

# warn_only: an op without a deterministic kernel is named in the log (the check reports it), not fatal
torch.use_deterministic_algorithms(True, warn_only=True)
sys.argv = sys.argv[1:]  # the recipe sees its own path as argv[0]: the checkpoint fingerprint names the recipe by it
runpy.run_path(sys.argv[0], run_name="__main__")
