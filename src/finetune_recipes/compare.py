"""`finetune-recipes compare`: every strategy on the same data, model, seed and budget, in one table."""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from .catalog import list_recipes, recipes_dir
from .config import DataArguments, ModelArguments, TrainingArguments, UserError, parse_config

COLUMNS = [  # results key, title, format
    ("strategy", "strategy", "{}"),
    ("eval_accuracy", "accuracy", "{:.4f}"),
    ("eval_f1_macro", "macro-F1", "{:.4f}"),
    ("trainable_params", "trainable params", "{:,}"),
    ("wall_time_s", "wall time (s)", "{:.1f}"),
    ("train_runtime_s", "train time (s)", "{:.1f}"),
    ("train_samples_per_second", "train samples/s", "{:.1f}"),
    ("peak_memory_mb", "peak memory (MB)", "{:,.0f}"),
    ("status", "status", "{}"),
]
ORDER = ["feature_extraction", "frozen_base_pooler", "progressive_unfreezing", "full_finetune", "llrd", "lora"]


def run_recipe(recipe: str, out: Path, shared: list[str]) -> dict:
    """One recipe in its own process (clean memory peak, failures isolated); its results plus wall time."""
    log = out / "logs" / f"{recipe}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    extra = ["--feature_cache_dir", str(out / "feature_cache")] if recipe == "feature_extraction" else []
    cmd = [sys.executable, str(recipes_dir() / f"{recipe}.py"), *shared, *extra]
    cmd += ["--output_dir", str(out / recipe), "--overwrite_output_dir"]
    start = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = round(time.perf_counter() - start, 1)
    if code != 0:
        return {"strategy": recipe, "wall_time_s": wall, "status": f"failed ({code}): see {log}"}
    results = json.loads((out / recipe / "results.json").read_text())
    return {"strategy": recipe, **results, "wall_time_s": wall, "status": "ok"}


def tfidf_baseline(shared: list[str]) -> dict:
    """TF-IDF + logistic regression on exactly the recipes' train and validation texts."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    from .data import raw_splits

    _, data_args, args = parse_config(
        ModelArguments,
        DataArguments,
        TrainingArguments,
        args=shared,
        default_config=recipes_dir() / "configs" / "full_finetune.yaml",
    )
    start = time.perf_counter()
    splits, _ = raw_splits(data_args, args.seed)
    columns = [c for c in (data_args.text_column, data_args.text_pair_column) if c]

    def texts(split):
        return [" ".join(row) for row in zip(*(splits[split][c] for c in columns), strict=True)]

    vectorizer = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=2)
    features = vectorizer.fit_transform(texts("train"))
    train_start = time.perf_counter()
    classifier = LogisticRegression(C=10.0, max_iter=2000).fit(features, splits["train"]["labels"])
    train_time = time.perf_counter() - train_start
    predictions = classifier.predict(vectorizer.transform(texts("validation")))
    references = splits["validation"]["labels"]
    return {
        "strategy": "tfidf_logreg",
        "eval_accuracy": accuracy_score(references, predictions),
        "eval_f1_macro": f1_score(references, predictions, average="macro"),
        "trainable_params": int(classifier.coef_.size + classifier.intercept_.size),
        "wall_time_s": round(time.perf_counter() - start, 1),
        "train_runtime_s": round(train_time, 2),
        "train_samples_per_second": round(len(splits["train"]) / train_time, 1),
        "status": "ok",
    }


def cell(value, fmt: str = "{:.4f}") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return fmt.format(value)


def write_table(rows: list[dict], out: Path, command: str) -> str:
    """comparison.md (with the machine and the command) and comparison.csv; returns the Markdown."""
    header = [title for _, title, _ in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(row.get(key), fmt) for key, _, fmt in COLUMNS) + " |" for row in rows]
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"
    markdown = "\n".join([*lines, "", f"Machine: {machine}. Command: `{command}`", ""])
    (out / "comparison.md").write_text(markdown)
    with (out / "comparison.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[key for key, _, _ in COLUMNS], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return markdown


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy and wall time per strategy, side by side (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    done = [r for r in rows if r.get("status") == "ok"]
    if not done:
        return
    names = [r["strategy"] for r in done]
    fig, (acc, wall) = plt.subplots(1, 2, figsize=(11, 4.2))
    acc.barh(names, [r["eval_accuracy"] for r in done], color="#4c72b0")
    acc.set(xlabel="validation accuracy", xlim=(min(r["eval_accuracy"] for r in done) - 0.02, 1.0))
    wall.barh(names, [r["wall_time_s"] for r in done], color="#dd8452")
    wall.set(xlabel="wall time (s)")
    wall.set_yticklabels([])
    for ax, key, fmt in ((acc, "eval_accuracy", "{:.3f}"), (wall, "wall_time_s", "{:.0f}")):
        for i, r in enumerate(done):
            ax.text(r[key], i, " " + fmt.format(r[key]), va="center", fontsize=8)
    fig.suptitle("Transfer-learning strategies on the same data, seed and budget")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="finetune-recipes compare",
        description="Runs recipes one after another on the same data, seed and budget. Any other flag "
        "(--model_name_or_path, --train_file, --num_train_epochs, --seed, ...) goes to every recipe.",
    )
    parser.add_argument("--recipes", default=",".join(ORDER), help="comma-separated recipe names")
    parser.add_argument("--output_dir", default="outputs/compare")
    parser.add_argument("--no_baseline", action="store_true", help="skip the TF-IDF + logistic regression row")
    known, shared = parser.parse_known_args(argv)
    recipes = [r for r in known.recipes.split(",") if r]
    unknown = [r for r in recipes if r not in list_recipes()]
    if unknown:
        raise UserError(f"no recipe '{unknown[0]}'; recipes: {', '.join(list_recipes())}")
    parse_config(ModelArguments, DataArguments, TrainingArguments, args=shared)  # bad flags fail before hours of work
    out = Path(known.output_dir)
    shutil.rmtree(out / "feature_cache", ignore_errors=True)  # feature extraction pays for its encoding
    out.mkdir(parents=True, exist_ok=True)
    rows = [] if known.no_baseline else [tfidf_baseline(shared)]
    progress = tqdm(recipes, desc="compare", unit="recipe")
    for recipe in progress:
        progress.set_postfix_str(recipe)
        row = run_recipe(recipe, out, shared)
        rows.append(row)
        tqdm.write(f"{recipe}: {row['status']}, accuracy {cell(row.get('eval_accuracy'))}, {row['wall_time_s']} s")
    command = "finetune-recipes compare " + " ".join(argv or [])
    print(write_table(rows, out, command.strip()))
    plot(rows, out / "comparison.png")
    print(f"Wrote {out / 'comparison.md'}, comparison.csv and comparison.png")
