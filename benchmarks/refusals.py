"""Issue 27's probe cases, rerun through the real command line: each case's exit code, its last stderr line,
its wall time, and whether the folder it was told to write to was left as it was.

    python benchmarks/refusals.py            # about 2 minutes on 2 cores: one process per case, in turn

Every case here must end with exit code 2 and one `error:` line (a refusal) or exit 0 with a warning; the
table shows what each does now. The seconds are the start-up cost the issue measured at 11-15 s for a
refusal of bad data: they are wall time of a fresh process, so run this alone. First it times the plainest
refusal, `python recipes/full_finetune.py --train_file nope.csv`, three times: what a typo in a path costs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from finetune_recipes.testing import regression_rows, topic_rows, write_csv, write_tiny_bert

ROOT = Path(__file__).resolve().parents[1]

CLI = str(Path(sys.executable).parent / "finetune-recipes")


def recipe(name: str) -> list[str]:
    return [sys.executable, str(ROOT / "recipes" / f"{name}.py")]


def cases(tmp: Path, model: Path, train: Path, dev: Path) -> dict[str, list[str]]:
    """name -> command line; every one writes (or would write) to tmp/out."""
    base = ["--model_name_or_path", str(model), "--train_file", str(train), "--validation_file", str(dev),
            "--max_length", "32", "--output_dir", str(tmp / "out")]  # fmt: skip
    write_csv(tmp / "dup.csv", [{"text": r["text"], "a": 1, "b": 0} for r in topic_rows(20, 0)])
    write_csv(tmp / "zero.csv", [{"text": r["text"], "a": 0, "b": 1} for r in topic_rows(20, 0)])
    write_csv(tmp / "huge.csv", [{**r, "score": float(r["score"]) * 1e300} for r in regression_rows(20, 0)])
    write_csv(tmp / "flat_dev.csv", [{**r, "score": 4.5} for r in regression_rows(10, 1)])
    write_csv(tmp / "reg.csv", regression_rows(20, 0))
    (tmp / "nan.vec").write_text("2 3\ngoal 0.1 nan 0.3\nwin 0.2 0.1 0.0\n")
    (tmp / "big.vec").write_text("2 3\ngoal 0.1 1e39 0.3\nwin 0.2 0.1 0.0\n")
    (tmp / "wrong_dim.vec").write_text("2 5\ngoal 0.1 0.2 0.3\nwin 0.2 0.1 0.0\n")
    (tmp / "vectors.vec.gz").write_bytes(b"\x1f\x8b\x08\x00binary")
    (tmp / "space.yaml").write_text("learning_rate: {low: -1.0, high: 0.1}\n")
    (tmp / "space_out.yaml").write_text("output_dir: {choices: [a, b]}\n")
    (tmp / "space_key.yaml").write_text("learning_rate: {lo: 3, high: 4}\n")
    ff = recipe("full_finetune")
    return {
        "label_columns a,a,b": [*ff, *base, "--train_file", str(tmp / "dup.csv"), "--label_columns", "a,a,b"],
        "label column never positive in train": [
            *ff, *base, "--train_file", str(tmp / "zero.csv"), "--validation_file", str(tmp / "dup.csv"),
            "--label_columns", "a,b"],
        "label_column with label_columns": [
            *ff, *base, "--train_file", str(tmp / "dup.csv"), "--label_column", "a", "--label_columns", "a,b"],
        "class_weights {positive: true}": [*ff, *base, "--class_weights", '{"sport": true}'],
        "learning_rate 0": [*ff, *base, "--learning_rate", "0"],
        "missing label column": [*ff, *base, "--label_column", "topic"],
        "missing train file": [*ff, *base, "--train_file", str(tmp / "none.csv")],
        "regression targets near 1e300": [
            *ff, *base, "--train_file", str(tmp / "huge.csv"), "--validation_file", str(tmp / "huge.csv"),
            "--label_column", "score", "--problem_type", "regression"],
        "constant validation target, rank by pearson": [
            *ff, *base, "--train_file", str(tmp / "reg.csv"), "--validation_file", str(tmp / "flat_dev.csv"),
            "--label_column", "score", "--metric_for_best_model", "pearson"],
        "vectors with nan": [*recipe("static_embeddings"), *base, "--embeddings_file", str(tmp / "nan.vec")],
        "vectors beyond float32": [*recipe("static_embeddings"), *base, "--embeddings_file", str(tmp / "big.vec")],
        "vectors header of another dimension": [
            *recipe("static_embeddings"), *base, "--embeddings_file", str(tmp / "wrong_dim.vec")],
        "gzip vectors file": [*recipe("static_embeddings"), *base, "--embeddings_file", str(tmp / "vectors.vec.gz")],
        "tune: space with a negative rate": [
            CLI, "tune", "full_finetune", "--search_space", str(tmp / "space.yaml"), *base[:-2],
            "--output_dir", str(tmp / "out")],
        "tune: space naming output_dir": [
            CLI, "tune", "full_finetune", "--search_space", str(tmp / "space_out.yaml"), *base[:-2],
            "--output_dir", str(tmp / "out")],
        "tune: space with an unknown key": [
            CLI, "tune", "full_finetune", "--search_space", str(tmp / "space_key.yaml"), *base[:-2],
            "--output_dir", str(tmp / "out")],
        "compare --recipes a,a": [CLI, "compare", "--recipes", "llrd,llrd", *base],
        "predict --model FILE": [CLI, "predict", "--model", str(train), "goal win"],
        "predict: no model directory": [CLI, "predict", "--model", str(tmp / "none"), "goal win"],
        "export --model FILE": [CLI, "export", "--model", str(train), "--onnx", "--output_dir", str(tmp / "out")],
    }  # fmt: skip


def run(name: str, cmd: list[str], out: Path) -> dict:
    before = sorted(p.name for p in out.iterdir()) if out.exists() else None
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env={**os.environ})
    seconds = time.perf_counter() - start
    after = sorted(p.name for p in out.iterdir()) if out.exists() else None
    shutil.rmtree(out, ignore_errors=True)  # each case starts without it
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return {
        "case": name,
        "exit": proc.returncode,
        "seconds": round(seconds, 1),
        "one error line": len(errors) == 1 and lines[-1] == errors[0],
        "traceback": "Traceback" in proc.stderr,
        "folder unchanged": before == after,
        "last line": lines[-1][:150] if lines else "",
    }


def missing_file_seconds(tmp: Path, repeats: int = 3) -> list[float]:
    """Wall time of `python recipes/full_finetune.py --train_file nope.csv` (a refusal, exit code 2), each run."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        cmd = [*recipe("full_finetune"), "--train_file", "nope.csv", "--output_dir", str(tmp / "out")]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, timeout=600)
        times.append(round(time.perf_counter() - start, 2))
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error:"), proc.stderr
    return times


def main() -> None:
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        missing = missing_file_seconds(tmp)
        print(f"python recipes/full_finetune.py --train_file nope.csv: {', '.join(map(str, missing))} s (exit 2)\n")
        model = write_tiny_bert(tmp / "tiny-bert")
        train = write_csv(tmp / "train.csv", topic_rows(40, 0))
        dev = write_csv(tmp / "dev.csv", topic_rows(15, 1))
        rows = [run(case, cmd, tmp / "out") for case, cmd in cases(tmp, model, train, dev).items()]
    header = ["case", "exit", "seconds", "one error line", "traceback", "folder unchanged", "last line"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(row[k]).replace("|", "\\|") for k in header) + " |")
    (ROOT / "benchmarks" / "results").mkdir(exist_ok=True)
    results = {"missing train file, seconds": missing, "cases": rows}
    (ROOT / "benchmarks" / "results" / "refusals.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
