#!/usr/bin/env bash
# The one-command GPU check (benchmarks/gpu.py says what it checks): every recipe on one GPU, kill-and-resume,
# FSDP, DeepSpeed ZeRO-2/3, throughput, MFU, a profile and a sweep of speed levers, in order of priority; one
# table, rewritten as rows arrive, as Markdown and JSON; exit code 1 when a check failed, 2 for a bad flag.
#
#   bash benchmarks/gpu.sh [--dry-run] [--only CHECK,...] [--time_budget S] [--out DIR|FILE.md] [--jobs N]
#   PYTHON=.venv/bin/python bash benchmarks/gpu.sh --dry-run --out /tmp/gpu   # the same code on the CPU
#
# Every launch goes through `$PYTHON -m accelerate.commands.launch` and the working tree's own package, so it
# runs where the dependencies sit on PYTHONPATH (pip install --target) and no console script is on PATH.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec "${PYTHON:-python3}" benchmarks/gpu.py "$@"
