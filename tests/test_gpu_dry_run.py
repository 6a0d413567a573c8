"""benchmarks/gpu.sh on the CPU (--dry-run): the same script and code paths the GPU run takes, tiny and short."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # benchmarks/ is a folder of scripts, not a package
import gpu  # noqa: E402
import gpu_checks  # noqa: E402


def gpu_sh(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), *args],
        capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHON": sys.executable, **(env or {})},
    )  # fmt: skip


def table_rows(markdown: str) -> dict[str, list[str]]:
    """check name -> its cells, from the first table of the report."""
    rows = {}
    for line in markdown.splitlines():
        if rows and not line.startswith("|"):
            break  # the end of the first table
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("| ") and cells[0] not in ("check",) and not cells[0].startswith("---"):
            rows.setdefault(cells[0], cells)
    return rows


def test_only_takes_names_and_groups_in_table_order():
    assert gpu.select("mfu_peak,single_gpu:lora") == ["single_gpu:lora", "mfu_peak"]
    assert gpu.select("zero3") == ["zero3:full_finetune", "zero3:lora"]
    assert gpu.select("varlen") == ["varlen:full_finetune:padded", "varlen:full_finetune:packed"]
    assert len(gpu.select("")) == len(gpu.CHECKS) == 28
    with pytest.raises(gpu.UsageError, match="unknown check 'zero4'"):
        gpu.select("zero4")


def test_losses_are_read_from_the_progress_bar_and_errors_from_the_last_line():
    bar = "train:  17%|█▋ | 5/30 [00:03<00:14, loss=1.1034, lr=2.78e-03]\rtrain:  33%|██ | 10/30 [loss=0.25, lr=2e-3]"
    assert gpu_checks.losses(bar) == [1.1034, 0.25]
    assert gpu.last_line("Traceback ...\nValueError: boom\r\ntrain:  40%|████ | 12/30 [00:14<00:25]\n") == (
        "ValueError: boom"
    )


def test_an_unknown_check_is_one_line_and_exit_code_2(tmp_path):
    proc = gpu_sh("--dry-run", "--only", "single_gpu:bogus", "--out", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unknown check 'single_gpu:bogus'" in proc.stderr
    assert not list(tmp_path.iterdir())


def test_a_failed_check_is_its_row_and_exit_code_1(tmp_path):
    proc = gpu_sh("--dry-run", "--only", "mfu_peak,fsdp:lora", "--out", str(tmp_path), env={gpu.FAIL_ENV: "mfu_peak"})
    assert proc.returncode == 1, proc.stderr
    rows = table_rows((tmp_path / "gpu.md").read_text())
    assert list(rows) == ["fsdp:lora", "mfu_peak"]
    assert rows["mfu_peak"][1] == "FAILED" and "forced failure" in rows["mfu_peak"][4]
    assert rows["fsdp:lora"][1] == "skipped (dry run: FSDP needs CUDA)"
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert [r["status"] for r in report["rows"]] == ["skipped (dry run: FSDP needs CUDA)", "FAILED"]
    assert (tmp_path / "gpu-failed-logs.txt").exists()


@pytest.mark.slow
def test_dry_run_trains_a_recipe_and_measures_throughput(tmp_path):
    out = tmp_path / "report.md"
    checks = (
        "single_gpu:full_finetune,packing,zero2:full_finetune,throughput:lora:bs32,"
        "throughput:full_finetune:bs128:compiled,profile:full_finetune:bs128,varlen,mfu_peak"
    )
    proc = gpu_sh("--dry-run", "--only", checks, "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = table_rows(out.read_text())
    assert list(rows) == gpu.select(checks)
    assert rows["zero2:full_finetune"][1].startswith(("ok", "skipped (dry run"))
    report = {r["check"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    recipe = report["single_gpu:full_finetune"]
    assert recipe["status"] == "ok"
    assert recipe["metrics"]["last_loss"] < recipe["metrics"]["first_loss"]
    assert recipe["metrics"]["agreement"] == 1.0  # fp32 on the CPU both times: the same labels
    timed = report["throughput:lora:bs32"]["metrics"]
    assert timed["samples_per_s"] > 0 and timed["plain_samples_per_s"] > 0
    assert 0 < timed["n_trainable"] < timed["n_no_emb"] < timed["n_all"]
    assert report["mfu_peak"]["metrics"]["tflops"] > 0
    packing = report["packing"]["metrics"]
    assert packing["bert_fp32_max_diff"] <= 1e-4 and packing["roberta_fp32_max_diff"] <= 1e-4
    assert packing["bert_rows"] < packing["texts"]
    compiled = report["throughput:full_finetune:bs128:compiled"]["metrics"]
    assert compiled["first_step_extra_s"] > 0 and compiled["samples_per_s"] > 0
    profile = report["profile:full_finetune:bs128"]["metrics"]
    assert len(profile["top"]) > 5 and abs(sum(t["share"] for t in profile["top"]) - 1) < 0.5
    assert "| op | self ms | share | calls |" in out.read_text()
    padded, packed = (report[f"varlen:full_finetune:{layout}"]["metrics"] for layout in ("padded", "packed"))
    assert 0 < padded["padding_share"] < 1 and packed["packed_over_padded"] > 0
    assert packed["mean_loss"] == pytest.approx(padded["mean_loss"], rel=0.05)  # the same texts, order and seed
