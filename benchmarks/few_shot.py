"""Few labels (issue 29): the contrastive recipe beside the `setfit` library itself, feature extraction, full
fine-tuning, progressive unfreezing and TF-IDF, at 8, 16 and 64 labelled examples a class, 5 seeds each.

    pip install -e '.[bench]'                      # setfit, from the package index
    .venv/bin/python benchmarks/few_shot.py [--sizes 8,16,64] [--seeds 5] [--sets headlines,snippets]

Data, all offline: the BBC News articles of benchmarks/task_shapes.py (exact duplicates dropped, shuffled with
seed 0, split 70/15/15 into train / validation / test pools), 5 topics. Two harder sets than whole articles:
- *headlines*: each article's first line (about 10 words), max_length 32;
- *snippets*: 16 consecutive words from the article's body (its first line left out), at a position drawn per
  article (seed 0), max_length 48: a passage that may not name its topic at all.
Each seed draws its own few-shot sample from the train pool: `size` articles of each topic (random.Random(seed)).
Every method sees the same sample; validation is 160 of the validation pool, test the whole test pool (320).

The contrastive recipe and setfit get the same body (all-MiniLM-L6-v2), the same pairs budget (20 rounds:
2 x 20 pairs an example), batch 16, one epoch at 2e-5 with 10% warm-up, and the same head type (scikit-learn's
logistic regression). setfit runs in this process (model load, training and predicting the test pool are timed);
each recipe in its own process (its wall time includes its imports). The other recipes run with their defaults.
Results are kept in results/few_shot/few_shot.json as each run ends; a rerun skips what is there.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from task_shapes import ROOT, articles, baseline, pools, run, write_jsonl  # noqa: E402

RECIPES = ("contrastive", "feature_extraction", "full_finetune", "progressive_unfreezing")
METHODS = ("contrastive", "setfit", *RECIPES[1:], "tfidf")
LENGTHS = {"headlines": 32, "snippets": 48}
BODY = "sentence-transformers/all-MiniLM-L6-v2"


def snippet(text: str, rng: random.Random, words: int = 16) -> str:
    body = " ".join(text.splitlines()[1:]).split()
    start = rng.randrange(max(1, len(body) - words))
    return " ".join(body[start : start + words])


def data_sets() -> dict[str, dict[str, list[dict]]]:
    split, rng = pools(articles()), random.Random(0)
    sets: dict[str, dict[str, list[dict]]] = {"headlines": {}, "snippets": {}}
    for name, rows in split.items():
        sets["headlines"][name] = [{"text": t.splitlines()[0], "label": y} for t, y in rows]
        sets["snippets"][name] = [{"text": snippet(t, rng), "label": y} for t, y in rows]
    return sets


def few_shot(rows: list[dict], size: int, seed: int) -> list[dict]:
    """`size` examples of each label, drawn with `seed`, in a shuffled order."""
    rng, sample = random.Random(seed), []
    for label in sorted({r["label"] for r in rows}):
        sample += rng.sample([r for r in rows if r["label"] == label], size)
    rng.shuffle(sample)
    return sample


def run_setfit(train: list[dict], test: list[dict], max_length: int, seed: int, out: Path) -> dict:
    """The setfit library on the same sample: its own pairs (num_iterations 20), CosineSimilarityLoss, and its
    default head (scikit-learn's LogisticRegression)."""
    from datasets import Dataset
    from setfit import SetFitModel, Trainer, TrainingArguments

    from finetune_recipes.modeling import resolve_model_path

    start = time.perf_counter()
    model = SetFitModel.from_pretrained(resolve_model_path(BODY))
    args = TrainingArguments(
        batch_size=16,
        num_epochs=1,
        num_iterations=20,
        body_learning_rate=2e-5,
        warmup_proportion=0.1,
        max_length=max_length,
        seed=seed,
        report_to="none",
        output_dir=str(out / "setfit"),
        save_strategy="no",
    )  # fmt: skip (no checkpoints)
    Trainer(model=model, args=args, train_dataset=Dataset.from_list(train)).train()
    predicted = model.predict([r["text"] for r in test], batch_size=64)
    accuracy = statistics.mean(float(p == r["label"]) for p, r in zip(predicted, test, strict=True))
    return {"test_accuracy": accuracy, "wall_time_s": round(time.perf_counter() - start, 1), "status": "ok"}


def one(method: str, files: dict[str, Path], split: dict, length: int, seed: int, out: Path, name: str) -> dict:
    flags = [*(x for s, p in files.items() for x in (f"--{s}_file", str(p))), "--max_length", str(length),
             "--max_eval_samples", "160", "--max_train_samples", "100000", "--seed", str(seed)]  # fmt: skip
    if method == "setfit":
        return run_setfit(split["train"], split["test"], length, seed, out)
    if method == "tfidf":
        return baseline(name, flags)
    cache = ["--feature_cache_dir", str(out / "cache")] if method == "feature_extraction" else []
    return run(name, method, [*flags, *cache], out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "few_shot"))
    parser.add_argument("--sizes", default="8,16,64")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--sets", default="headlines,snippets")
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # setfit asks the Hub for nothing it needs here
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "few_shot.json"
    done = json.loads(store.read_text()) if store.exists() else {}
    sets = data_sets()
    for set_name in args.sets.split(","):
        for size in map(int, args.sizes.split(",")):
            for seed in range(args.seeds):
                split = {"train": few_shot(sets[set_name]["train"], size, seed),
                         "validation": sets[set_name]["validation"], "test": sets[set_name]["test"]}  # fmt: skip
                files = {s: write_jsonl(out / "data" / set_name / f"{size}-{seed}" / f"{s}.jsonl", rows)
                         for s, rows in split.items()}  # fmt: skip
                for method in args.methods.split(","):
                    key = f"{set_name}/{size}/{seed}/{method}"
                    if key in done:
                        continue
                    row = one(method, files, split, LENGTHS[set_name], seed, out, key.replace("/", " "))
                    done[key] = {k: row.get(k) for k in ("test_accuracy", "wall_time_s", "status", "steps")}
                    print(key, done[key], flush=True)
                    store.write_text(json.dumps(done, indent=1) + "\n")
    print(summary(done))


def summary(done: dict) -> str:
    """The table: test accuracy mean ± std over the seeds and the mean wall time per run, by set and size; then
    the contrastive recipe's paired difference (same sample, same seed) to setfit and to feature extraction."""
    lines = ["| set | per class | " + " | ".join(METHODS) + " | recipe − setfit | recipe − feature_extraction |",
             "|---|---:|" + "---:|" * (len(METHODS) + 2)]  # fmt: skip
    keys = sorted({tuple(k.split("/")[:2]) for k in done}, key=lambda k: (k[0], int(k[1])))
    for set_name, size in keys:
        accuracy = {m: {int(k.split("/")[2]): v["test_accuracy"] for k, v in done.items()
                        if k.startswith(f"{set_name}/{size}/") and k.endswith(f"/{m}") and v.get("test_accuracy")}
                    for m in METHODS}  # fmt: skip
        cells = []
        for method in METHODS:
            rows = [v for k, v in done.items() if k.startswith(f"{set_name}/{size}/") and k.endswith(f"/{method}")]
            values = list(accuracy[method].values())
            wall = f"{statistics.mean(r['wall_time_s'] for r in rows):.0f} s" if rows else ""
            cells.append(f"{spread(values)} ({wall}, n={len(values)})" if values else "–")
        for peer in ("setfit", "feature_extraction"):
            seeds = sorted(set(accuracy["contrastive"]) & set(accuracy[peer]))
            paired = [accuracy["contrastive"][s] - accuracy[peer][s] for s in seeds]
            cells.append(spread(paired, "+") if seeds else "–")
        lines.append(f"| {set_name} | {size} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def spread(values: list[float], sign: str = "") -> str:
    deviation = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):{sign}.3f} ± {deviation:.3f}"


if __name__ == "__main__":
    main()
