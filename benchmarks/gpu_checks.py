"""The GPU check's correctness checks (benchmarks/gpu.py runs them, one process each): every recipe through
`accelerate launch` on a small random BERT and planted 3-topic data, kill-and-resume against a run never stopped,
and packed batches against padded ones on the device."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from gpu_base import LAUNCH_CONFIG, LEARNING_RATE, ROOT, Scale, last_line, port_of, row, slug

from finetune_recipes.testing import topic_rows, write_bert, write_csv

SMALL_BERT = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, max_position_embeddings=64
)


def prepare(work: Path, scale: Scale) -> int:
    """Versions and the device; the small BERT and the planted 3-topic CSVs every recipe check shares."""
    import importlib.metadata

    import torch

    versions = {"python": sys.version.split()[0]}
    packages = ("torch", "transformers", "accelerate", "peft", "datasets", "pyarrow", "huggingface_hub", "scikit-learn")
    for package in (*packages, "deepspeed"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "missing"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device = f"{torch.cuda.get_device_name(0)} ({props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda})"
    elif not scale.dry_run:
        print("error: no CUDA device; pass --dry-run to run the checks on the CPU", file=sys.stderr)
        return 2
    else:
        device = f"CPU ({os.cpu_count()} cores), dry run"
    import finetune_recipes

    versions["finetune_recipes"] = str(Path(finetune_recipes.__file__).parent)  # the working tree's copy
    (work / "env.json").write_text(json.dumps({"device": device, "versions": versions}) + "\n")
    write_bert(work / "model", model_max_length=512, **SMALL_BERT)
    write_csv(work / "data" / "train.csv", topic_rows(scale.train_rows, seed=0))
    write_csv(work / "data" / "validation.csv", topic_rows(scale.validation_rows, seed=1))
    # Every recipe reads its files through datasets: when it cannot (a missing or too old dependency), stop now.
    import datasets

    csv_files = {"validation": str(work / "data" / "validation.csv")}
    datasets.load_dataset("csv", data_files=csv_files, cache_dir=str(work / "datasets-smoke"))
    return 0


def launch(
    config: str, script: Path, flags: list, log: Path, port: int | None, env: dict | None = None, wait: bool = True,
    groups: Path | None = None,
):  # fmt: skip
    """`accelerate launch` as a user types it, through `python -m` (no console script needed on PATH). In the
    worker's process group, which the orchestrator kills whole at a timeout; `wait=False` (a run the check kills
    itself) in a group of its own, written to `groups/PGID` with the worker's pid for the orchestrator to find."""
    extra = ["--num_processes", "1", "--main_process_port", str(port)] if port else []
    config_file = ROOT / "accelerate_configs" / config
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file), *extra, str(script)]
    cmd += map(str, flags)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env or os.environ, start_new_session=not wait
        )
    if not wait and groups is not None:
        groups.mkdir(exist_ok=True)
        (groups / str(proc.pid)).write_text(str(os.getpid()))
    if wait:
        proc.wait()
        if proc.returncode:
            raise RuntimeError(last_line(log.read_text(errors="replace")) or f"exit code {proc.returncode}")
    return proc


def recipe_flags(recipe: str, work: Path, out: Path, scale: Scale) -> list:
    flags = [
        "--model_name_or_path", work / "model",
        "--train_file", work / "data" / "train.csv",
        "--validation_file", work / "data" / "validation.csv",
        "--output_dir", out, "--overwrite_output_dir",
        "--max_length", "32",
        "--per_device_train_batch_size", scale.batch_size,
        "--per_device_eval_batch_size", "128",
        "--max_train_steps", scale.steps,
        "--logging_steps", scale.logging_steps,
        "--learning_rate", LEARNING_RATE.get(recipe, 1e-3),
        "--mixed_precision", scale.precision,
        "--seed", "42",
    ]  # fmt: skip
    if recipe in ("feature_extraction", "frozen_base_pooler"):  # they take --feature_cache_dir
        flags += ["--feature_cache_dir", out.parent / "feature-cache"]
    if recipe == "lora":
        flags += ["--merge_adapter"]  # merged/ is what pipeline() loads
    return flags


def losses(log_text: str) -> list[float]:
    """The mean training losses the loop shows in its progress bar every `logging_steps` (`loss=0.1234`)."""
    return [float(v) for v in re.findall(r"loss=([-+0-9.eE]+|nan|inf)", log_text)]


def recipe_check(name: str, kind: str, recipe: str, work: Path, scale: Scale) -> dict:
    """Trains, then checks that the loss fell and that the CPU pipeline agrees with the GPU's predictions."""
    out = work / "runs" / slug(name) / "out"
    log = work / "logs" / f"{slug(name)}.log"
    config = "cpu.yaml" if scale.dry_run else LAUNCH_CONFIG[kind]
    env = {**os.environ, "HF_DATASETS_CACHE": str(out.parent / "datasets-cache")}
    launch(config, ROOT / "recipes" / f"{recipe}.py", recipe_flags(recipe, work, out, scale), log,
           port=None if scale.dry_run or kind == "single_gpu" else port_of(name), env=env)  # fmt: skip
    seen = losses(log.read_text(errors="replace"))
    results = json.loads((out / "results.json").read_text())
    agree, total = agreement(out, recipe, work / "data" / "validation.csv", scale)
    problems = []
    if len(seen) < 2:
        problems.append("fewer than 2 logged losses")
    elif not seen[-1] < seen[0]:
        problems.append(f"loss did not fall ({seen[0]:.4f} -> {seen[-1]:.4f})")
    if agree < 0.99 * total:
        problems.append(f"CPU pipeline agrees with the GPU on {agree}/{total} < 99%")
    accuracy = results["eval_accuracy"]
    loss_text = f"loss {seen[0]:.3f}→{seen[-1]:.3f}" if len(seen) >= 2 else "loss ?"
    summary = f"{loss_text}, acc {accuracy:.3f}, agree {agree}/{total}, {results['steps']} steps"
    return row(
        name, "FAILED" if problems else "ok", 0, summary, "; ".join(problems),
        first_loss=seen[0] if seen else None, last_loss=seen[-1] if seen else None, eval_accuracy=accuracy,
        agreement=agree / total, steps=results["steps"], samples_per_s=results.get("train_samples_per_second"),
        loss_history={str(h["step"]): h["loss"] for h in results.get("loss_history", [])},
        stage_starts=results.get("unfreezing_stage_starts"),
    )  # fmt: skip


def agreement(out: Path, recipe: str, validation: Path, scale: Scale) -> tuple[int, int]:
    """Labels of the saved output on the GPU (the run's precision) against `pipeline()` on the CPU, in fp32."""
    import csv

    import torch
    from transformers import AutoTokenizer, pipeline

    from finetune_recipes.tools.predict import load_classifier, predict

    texts = [r["text"] for r in csv.DictReader(validation.open())]
    device = torch.device("cuda" if torch.cuda.is_available() and not scale.dry_run else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = load_classifier(out).to(device)
    mine = []
    with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=scale.precision == "bf16"):
        for i in range(0, len(texts), 128):
            batch = tokenizer(texts[i : i + 128], truncation=True, max_length=32, padding=True, return_tensors="pt")
            mine += model(**batch.to(device)).logits.argmax(-1).tolist()
    mine = [model.config.id2label[i] for i in mine]
    if recipe == "feature_extraction":  # encoder + feature head: pipeline() cannot load it; predict() is its path
        reference = [r["label"] for r in predict(out, texts)]
    else:
        classifier = pipeline("text-classification", model=str(out / "merged" if recipe == "lora" else out), device=-1)
        reference = [r["label"] for r in classifier(texts, batch_size=64, truncation=True)]
    return sum(a == b for a, b in zip(mine, reference, strict=True)), len(texts)


def resume_check(name: str, recipe: str, work: Path, scale: Scale) -> dict:
    """SIGKILL once the first checkpoint is complete, resume from `latest`, compare with a run never stopped."""
    from concurrent.futures import ThreadPoolExecutor

    modes = {"default": ROOT / "recipes" / f"{recipe}.py", "deterministic": ROOT / "benchmarks" / "deterministic.py"}
    base = work / "runs" / slug(name)
    config = "cpu.yaml" if scale.dry_run else LAUNCH_CONFIG["resume"]

    def flags(mode: str, which: str) -> list:
        out = base / f"{mode}-{which}"
        extra = ["--checkpointing_steps", scale.checkpoint_every, "--save_total_limit", "2"]
        prefix = [ROOT / "recipes" / f"{recipe}.py"] if mode == "deterministic" else []
        return [*prefix, *recipe_flags(recipe, work, out, scale), *extra]

    def env(mode: str) -> dict:
        extra = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"} if mode == "deterministic" else {}
        return {**os.environ, "HF_DATASETS_CACHE": str(base / f"datasets-cache-{mode}"), **extra}

    def straight(mode: str) -> None:
        launch(config, modes[mode], flags(mode, "straight"), base / "logs" / f"{mode}-straight.log", None, env(mode))

    def killed_and_resumed(mode: str) -> int:
        out = base / f"{mode}-resumed"
        first = out / "checkpoints" / f"step_{scale.checkpoint_every}" / "index.json"  # written last: complete
        proc = launch(config, modes[mode], flags(mode, "resumed"), base / "logs" / f"{mode}-killed.log", None,
                      env(mode), wait=False, groups=work / "groups")  # fmt: skip
        deadline = time.monotonic() + scale.timeout
        while not first.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"{mode} run ended before its first checkpoint ({proc.returncode})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{mode} run wrote no checkpoint in {scale.timeout} s")
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)  # accelerate launch does not pass SIGKILL on: the whole group
        proc.wait()
        (work / "groups" / str(proc.pid)).unlink(missing_ok=True)
        if (out / "results.json").exists():
            raise RuntimeError(f"{mode} run finished before it was killed: raise the steps")
        steps_done = max(
            int(m[1]) for p in (out / "checkpoints").iterdir() if (m := re.fullmatch(r"step_(\d+)", p.name))
        )
        launch(config, modes[mode], [*flags(mode, "resumed"), "--resume_from_checkpoint", "latest"],
               base / "logs" / f"{mode}-resume.log", None, env(mode))  # fmt: skip
        return steps_done

    with ThreadPoolExecutor(max_workers=1 if scale.dry_run else 4) as pool:
        futures = {(m, w): pool.submit(f, m) for m in modes for w, f in (("s", straight), ("r", killed_and_resumed))}
        killed_at = {m: futures[(m, "r")].result() for m in modes}
        for m in modes:
            futures[(m, "s")].result()
    for log in (base / "logs").glob("*.log"):
        shutil.copy(log, work / "logs" / f"{slug(name)}-{log.name}")

    metrics, problems = {}, []
    for mode in modes:
        diff, same_metrics = compare_runs(base / f"{mode}-straight", base / f"{mode}-resumed")
        metrics[f"max_abs_diff_{mode}"] = diff
        metrics[f"same_metrics_{mode}"] = same_metrics
        metrics[f"killed_after_step_{mode}"] = killed_at[mode]
    logs = "".join(p.read_text(errors="replace") for p in (base / "logs").glob("deterministic-*.log"))
    ops = sorted(set(re.findall(r"(\S+) does not have a deterministic implementation", logs)))
    metrics["nondeterministic_ops"] = ops
    if metrics["max_abs_diff_deterministic"] != 0 or not metrics["same_metrics_deterministic"]:
        problems.append("deterministic resume differs from the uninterrupted run")
    notes = [*problems, *([f"ops without a deterministic kernel: {', '.join(ops)}"] if ops else [])]
    summary = (
        f"max abs Δw default {metrics['max_abs_diff_default']:.2e}, deterministic "
        f"{metrics['max_abs_diff_deterministic']:.2e}; metrics equal: default {metrics['same_metrics_default']}, "
        f"deterministic {metrics['same_metrics_deterministic']}; killed after step {killed_at['default']}"
    )
    return row(name, "FAILED" if problems else "ok", 0, summary, "; ".join(notes), **metrics)


def compare_runs(a: Path, b: Path) -> tuple[float, bool]:
    """Max |difference| over every saved weight, and whether the evaluation history and final metrics match."""
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    if wa.keys() != wb.keys():
        raise RuntimeError(f"the two runs saved different weights: {sorted(wa.keys() ^ wb.keys())[:3]}")
    diff = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    keys = ("eval_accuracy", "eval_f1_macro", "steps", "history")
    return diff, all(ra[k] == rb[k] for k in keys)


def packing_check(name: str, work: Path, scale: Scale) -> dict:
    """Logits per text, packed against padded, on the device: a BERT and a RoBERTa (positions from padding_idx + 1)
    of 4 blocks with random weights, 64 texts of BBC News' token lengths. fp32 must agree to 1e-4 as on the CPU;
    bf16 is reported (its rounding differs with the layout), with how often the argmax agrees."""
    import torch
    from gpu_throughput import bbc_lengths
    from transformers import AutoModelForSequenceClassification, BertConfig, RobertaConfig

    from finetune_recipes.packing import PackedCollator, accept_packed, check_packable

    device = "cuda" if torch.cuda.is_available() and not scale.dry_run else "cpu"
    rng = random.Random(0)
    lengths = bbc_lengths(64, scale.varlen_cap, rng)
    sizes = dict(vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
    metrics, problems = {}, []
    for arch, config_class in (("bert", BertConfig), ("roberta", RobertaConfig)):
        config = config_class(**sizes, max_position_embeddings=scale.varlen_cap + 2, num_labels=3)
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa").to(device).eval()
        check_packable(model)
        pad = config.pad_token_id or 0
        texts = [[rng.randrange(5, 1000) for _ in range(n)] for n in lengths]
        width = max(lengths)
        padded = {
            "input_ids": torch.tensor([t + [pad] * (width - len(t)) for t in texts]),
            "attention_mask": torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in texts]),
        }
        packed = PackedCollator(SimpleNamespace(pad_token_id=pad), scale.varlen_cap)([{"input_ids": t} for t in texts])
        accept_packed(model)
        for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            with torch.no_grad(), torch.autocast(device, dtype, enabled=precision == "bf16"):
                expected = model(**{k: v.to(device) for k, v in padded.items()}).logits.float()
                got = model(**{k: v.to(device) for k, v in packed.items()}).logits.float()
            metrics[f"{arch}_{precision}_max_diff"] = (got - expected).abs().max().item()
            metrics[f"{arch}_{precision}_argmax_agree"] = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
        metrics[f"{arch}_rows"], metrics["texts"] = packed["input_ids"].shape[0], len(texts)
        if metrics[f"{arch}_fp32_max_diff"] > 1e-4:
            problems.append(f"{arch} fp32 packed logits differ by {metrics[f'{arch}_fp32_max_diff']:.2g}")
    summary = ", ".join(
        f"{a}: fp32 Δ {metrics[f'{a}_fp32_max_diff']:.1e}, bf16 Δ {metrics[f'{a}_bf16_max_diff']:.1e} "
        f"(argmax {metrics[f'{a}_bf16_argmax_agree']:.0%})"
        for a in ("bert", "roberta")
    )
    return row(name, "FAILED" if problems else "ok", 0, f"{summary}; 64 texts in {metrics['bert_rows']} rows",
               "; ".join(problems), **metrics)  # fmt: skip
