"""benchmarks/gpu.sh on the CPU (--dry-run): the same script and code paths the GPU run takes, tiny and short."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # benchmarks/ is a folder of scripts, not a package
import gpu  # noqa: E402
import gpu_base  # noqa: E402
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


def test_only_takes_names_and_groups_in_order_of_priority():
    assert gpu.select("mfu_peak,single_gpu:lora") == ["single_gpu:lora", "mfu_peak"]
    assert gpu.select("zero3") == ["zero3:full_finetune", "zero3:lora"]
    assert gpu.select("varlen") == ["varlen:full_finetune:padded", "varlen:full_finetune:packed"]
    assert gpu.select("throughput:full_finetune:bs128") == ["throughput:full_finetune:bs128"]  # a name, not a group
    assert gpu.select("fsdp_vs_single") == [  # a derived row brings the rows it reads
        "single_gpu:progressive_unfreezing", "single_gpu:full_finetune", "fsdp:progressive_unfreezing",
        "fsdp:full_finetune", "fsdp_vs_single:progressive_unfreezing",
    ]  # fmt: skip
    everything = gpu.select("")
    assert len(everything) == len(gpu.CHECKS) == 37 and len(set(everything)) == 37
    # the priority: correctness, MFU at batch 128, its profile, packed against padded, LoRA, then the sweep
    first_timed = everything.index("mfu_peak")
    assert not any(c.startswith(gpu.ALONE) for c in everything[:first_timed])
    assert everything[first_timed + 1 : first_timed + 4] == [
        "throughput:full_finetune:bs128", "profile:full_finetune:bs128", "varlen:full_finetune:padded",
    ]  # fmt: skip
    assert everything.index("throughput:lora:bs128") < min(everything.index(c) for c in gpu_base.SWEEP)
    with pytest.raises(gpu.UsageError, match="unknown check 'zero4'"):
        gpu.select("zero4")


def unfreezing_rows(**changes) -> dict[str, dict]:
    """The four rows fsdp_against_single reads: logged losses, stage starts, speed."""
    losses = {"progressive_unfreezing": [1.10, 0.90, 0.50], "full_finetune": [1.10, 0.60, 0.20]}
    rows = {}
    for recipe, curve in losses.items():
        for kind, shift in (("single_gpu", 0.0), ("fsdp", 0.004)):
            history = {str(10 * (i + 1)): x + shift for i, x in enumerate(curve)}  # results.json's, by step
            metrics = {"loss_history": history, "stage_starts": [0, 10, 20], "samples_per_s": 100.0}
            rows[f"{kind}:{recipe}"] = {"status": "ok", "metrics": {**metrics, **changes.get(f"{kind}:{recipe}", {})}}
    return rows


def test_unfreezing_under_fsdp2_is_judged_against_full_finetunings_difference():
    name = "fsdp_vs_single:progressive_unfreezing"
    same = gpu_base.fsdp_against_single(name, unfreezing_rows())
    assert same["status"] == "ok" and same["metrics"]["loss_gap"] == pytest.approx(0.004)
    assert same["metrics"]["limit"] == pytest.approx(3 * 0.004 + 0.01)
    drifted = unfreezing_rows(**{"fsdp:progressive_unfreezing": {"loss_history": {"10": 1.104, "20": 0.95, "30": 0.5}}})
    assert "losses differ by 0.0500 > 0.0220" in gpu_base.fsdp_against_single(name, drifted)["note"]
    staged = unfreezing_rows(**{"fsdp:progressive_unfreezing": {"stage_starts": [0, 12, 20]}})
    assert "stages start at [0, 12, 20] under FSDP2" in gpu_base.fsdp_against_single(name, staged)["note"]
    short = unfreezing_rows(**{"fsdp:progressive_unfreezing": {"loss_history": {"10": 1.1}}})
    assert gpu_base.fsdp_against_single(name, short)["status"] == "FAILED"  # different steps logged: no verdict
    no_noise = unfreezing_rows(**{"fsdp:full_finetune": {"loss_history": {}}})  # an infinite limit passes nothing
    assert "full fine-tuning's two runs logged different steps" in gpu_base.fsdp_against_single(name, no_noise)["note"]
    missing = unfreezing_rows()
    missing["fsdp:full_finetune"]["status"] = "skipped (dry run: FSDP needs CUDA)"
    assert gpu_base.fsdp_against_single(name, missing)["status"] == "skipped (needs fsdp:full_finetune ok)"


def test_the_clock_takes_the_median_window_and_counts_syncs_only_where_cuda_reports_them(monkeypatch):
    import warnings

    import gpu_timing
    import torch

    scale = gpu_base.Scale(dry_run=True)
    scale.warmup, scale.timed = 2, 6
    clock = gpu_timing.StepClock(scale)
    assert clock.ends == [4, 6, 8]
    clock.marks = {0: 0.0, 1: 5.0, 2: 6.0, 4: 8.0, 6: 9.0, 8: 30.0}  # windows of 2 steps: 2 s, 1 s, 21 s
    assert clock.rate(per_step=10) == pytest.approx(10.0)  # 20 samples in 2 s: the stall does not count
    assert clock.first_step_extra() == pytest.approx(5.0 - 24.0 / 6)
    assert clock.syncs_per_step() is None  # no CUDA: nothing counted
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    counter = gpu_timing.SyncCounter()
    counter.start()
    for _ in range(3):
        warnings.warn(gpu_timing.SyncCounter.MESSAGE, UserWarning, stacklevel=1)  # as torch reports each one
    warnings.warn("something else", UserWarning, stacklevel=1)
    counter.stop()
    assert counter.count == 3 and modes == ["warn", "default"]


def test_a_spent_time_budget_leaves_checks_not_run_and_says_how_to_rerun_them(tmp_path):
    work = tmp_path / "work"
    (work / "rows").mkdir(parents=True)
    args = ["--worker", "mfu_peak,packing", "--workdir", str(work), "--dry-run", "--deadline", str(time.time() - 1)]
    assert gpu.main(args) == 0
    written = {p.name: json.loads(p.read_text())["status"] for p in (work / "rows").iterdir()}
    assert written == {"mfu_peak.json": "not run (time budget)", "packing.json": "not run (time budget)"}
    proc = gpu_sh("--dry-run", "--only", "mfu_peak,packing", "--time_budget", "0.001", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr  # nothing failed: it did not run
    report = (tmp_path / "gpu.md").read_text()
    assert [cells[1] for cells in table_rows(report).values()] == ["not run (time budget)"] * 2
    rerun = f"bash benchmarks/gpu.sh --dry-run --time_budget 0.001 --only packing,mfu_peak --out {tmp_path / 'rerun'}"
    assert f"Rerun what failed or did not run: `{rerun}`" in report


def test_losses_are_read_from_the_progress_bar_and_errors_from_the_last_line():
    bar = "train:  17%|█▋ | 5/30 [00:03<00:14, loss=1.1034, lr=2.78e-03]\rtrain:  33%|██ | 10/30 [loss=0.25, lr=2e-3]"
    assert gpu_checks.losses(bar) == [1.1034, 0.25]
    assert gpu.last_line("Traceback ...\nValueError: boom\r\ntrain:  40%|████ | 12/30 [00:14<00:25]\n") == (
        "ValueError: boom"
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--only", "single_gpu:bogus"], "unknown check 'single_gpu:bogus'"),
        (["--time_budget", "0"], "--time_budget must be a positive number of seconds"),
    ],
)
def test_a_bad_flag_is_one_line_and_exit_code_2(flags, message, tmp_path):
    proc = gpu_sh("--dry-run", *flags, "--out", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr
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
    sweep = ["foreach", "efficient", "flash+masked"]
    checks = ",".join([
        "single_gpu:full_finetune", "packing", "zero2:full_finetune", "throughput:lora:bs128",
        "throughput:full_finetune:bs128", "throughput:full_finetune:bs128:compiled", "profile:full_finetune:bs128",
        "varlen", "mfu_peak", *(f"throughput:full_finetune:bs128:{v}" for v in sweep),
    ])  # fmt: skip
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
    lora = report["throughput:lora:bs128"]["metrics"]
    assert lora["samples_per_s"] > 0 and lora["plain_samples_per_s"] > 0 and lora["recipe_over_plain"] > 0
    assert 0 < lora["n_trainable"] < lora["n_no_emb"] < lora["n_all"]
    assert lora["syncs_per_step"] is None and lora["mfu_vendor"] is None  # no CUDA, no datasheet on a CPU
    assert report["mfu_peak"]["metrics"]["tflops"] > 0
    packing = report["packing"]["metrics"]
    assert packing["bert_fp32_max_diff"] <= 1e-4 and packing["roberta_fp32_max_diff"] <= 1e-4
    assert packing["bert_rows"] < packing["texts"]
    compiled = report["throughput:full_finetune:bs128:compiled"]["metrics"]
    assert compiled["first_step_extra_s"] > 0 and compiled["over_eager_bs128"] > 0
    assert compiled["plain_samples_per_s"] is None  # a lever's row is measured against the eager row
    # the sweep: each lever's row against the eager one; a backend this device lacks is a skipped row
    assert report["throughput:full_finetune:bs128:foreach"]["metrics"]["over_eager_bs128"] > 0
    assert report["throughput:full_finetune:bs128:flash+masked"]["metrics"]["levers"] == ["flash", "masked"]
    assert report["throughput:full_finetune:bs128:efficient"]["status"] == "skipped (no efficient kernel)"
    profile = report["profile:full_finetune:bs128"]["metrics"]
    assert len(profile["top"]) > 5 and abs(sum(t["share"] for t in profile["top"]) - 1) < 0.5
    text = out.read_text()
    assert "| op | self ms | share | calls |" in text and "| × eager bs128 |" in text
    padded, packed = (report[f"varlen:full_finetune:{layout}"]["metrics"] for layout in ("padded", "packed"))
    assert 0 < padded["padding_share"] < 1 and packed["packed_over_padded"] > 0
    assert packed["mean_loss"] == pytest.approx(padded["mean_loss"], rel=0.05)  # the same texts, order and seed
