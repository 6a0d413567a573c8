"""Task shapes on data built honestly from the bundled BBC News corpus: long documents (windows against
truncation), multi-label, regression, and imbalanced classes, each against its TF-IDF baseline.

    .venv/bin/python benchmarks/task_shapes.py [--out benchmarks/results/task_shapes] [--only windows,multi,...]

How the data is built (seeded, from the 2,225 articles, duplicates dropped):
- the articles are split 70/15/15 into train, validation and test pools first, so no article (nor any part
  of one) is in two splits;
- multi-label: 1,000 / 200 / 200 documents, each 1 to 3 articles of its split's pool joined by a blank line;
  labels = the set of their topics;
- regression: the same documents; target = the share of the document's words that come from its first
  article (1.0 for a single article);
- imbalanced: headlines only (an article's first line, a harder task than whole articles), with "tech" cut
  to 5% of every split.
Each run is a recipe in its own process, timed; results.json is read back. Feature extraction shares one
feature cache per data set, so its wall time counts encoding once (the first run of a data set pays it).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from finetune_recipes.data import load_bbc_news  # noqa: E402
from finetune_recipes.tools.compare import tfidf_baseline  # noqa: E402

FE, FT = "feature_extraction", "full_finetune"
COMMON = ["--max_length", "128", "--seed", "42", "--per_device_eval_batch_size", "64"]


def articles() -> list[tuple[str, str]]:
    raw = load_bbc_news()["train"]
    seen, rows = set(), []
    for text, label in zip(raw["text"], raw["label"], strict=True):
        if text not in seen:
            seen.add(text)
            rows.append((text, label))
    random.Random(0).shuffle(rows)
    return rows


def pools(rows: list) -> dict[str, list]:
    n = len(rows)
    return {
        "train": rows[: int(0.7 * n)],
        "validation": rows[int(0.7 * n) : int(0.85 * n)],
        "test": rows[int(0.85 * n) :],
    }


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_multi(out: Path) -> dict[str, Path]:
    """Documents of 1-3 articles: topics as labels, the first article's share of words as the target."""
    sizes = {"train": 1000, "validation": 200, "test": 200}
    files = {}
    for seed, (split, pool) in enumerate(pools(articles()).items()):
        rng = random.Random(seed)
        rows = []
        for _ in range(sizes[split]):
            parts = rng.sample(pool, rng.randint(1, 3))
            words = [len(text.split()) for text, _ in parts]
            rows.append(
                {
                    "text": "\n\n".join(text for text, _ in parts),
                    "labels": sorted({label for _, label in parts}),
                    "first_share": round(words[0] / sum(words), 4),
                }
            )
        files[split] = write_jsonl(out / "multi" / f"{split}.jsonl", rows)
    return files


def build_skewed(out: Path, rare: str = "tech", share: float = 0.05) -> dict[str, Path]:
    """Headlines only, with `rare` cut to `share` of every split."""
    files = {}
    for split, pool in pools(articles()).items():
        common = [(t, y) for t, y in pool if y != rare]
        keep = max(2, round(share * len(common) / (1 - share)))
        rows = common + [(t, y) for t, y in pool if y == rare][:keep]
        random.Random(1).shuffle(rows)
        files[split] = write_jsonl(
            out / "skewed" / f"{split}.jsonl", [{"text": t.splitlines()[0], "label": y} for t, y in rows]
        )
    return files


def run(name: str, recipe: str, flags: list[str], out: Path) -> dict:
    """One recipe run in its own process: its results.json, wall time and the command."""
    section = next((k for k in ("multi", "skewed") if f"/{k}/" in " ".join(flags)), "bbc")
    label = "regression" if "first_share" in flags else section  # the same documents: its own folder
    target = out / "runs" / f"{label}: {name}"
    cmd = [sys.executable, str(ROOT / "recipes" / f"{recipe}.py"), *COMMON, *flags]
    cmd += ["--output_dir", str(target), "--overwrite_output_dir"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = round(time.perf_counter() - start, 1)
    if proc.returncode:
        print(proc.stderr[-3000:], file=sys.stderr)
        return {"name": name, "status": f"failed ({proc.returncode})", "wall_time_s": wall}
    results = json.loads((target / "results.json").read_text())
    shown = " ".join(c.replace(str(ROOT) + "/", "") for c in cmd[1:])
    return {"name": name, **results, "wall_time_s": wall, "command": shown, "status": "ok"}


def baseline(name: str, flags: list[str]) -> dict:
    start = time.perf_counter()
    row = tfidf_baseline([*COMMON, *flags])
    return {"name": name, **row, "wall_time_s": round(time.perf_counter() - start, 1), "status": "ok"}


def table(rows: list[dict], metrics: list[str]) -> str:
    head = ["run", *metrics, "wall time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        values = [f"{r[m]:.4f}" if isinstance(r.get(m), float) else "–" for m in metrics]
        lines.append(f"| {r['name']} | " + " | ".join(values) + f" | {r['wall_time_s']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "task_shapes"))
    parser.add_argument("--only", default="windows,multi,regression,imbalance")
    args = parser.parse_args()
    out, only = Path(args.out), args.only.split(",")
    out.mkdir(parents=True, exist_ok=True)
    cache = ["--feature_cache_dir", str(out / "feature_cache")]
    fe = ["--learning_rate", "1e-2", "--num_train_epochs", "10", "--per_device_train_batch_size", "32", *cache]
    ft = ["--learning_rate", "5e-5", "--num_train_epochs", "2", "--per_device_train_batch_size", "16"]
    windows = ["--long_documents", "windows", "--window_stride", "32"]
    sections = []

    if "windows" in only:  # BBC News as shipped, 10% held out for validation
        rows = [
            baseline("TF-IDF + logistic regression (whole articles)", []),
            run("feature extraction, truncate at 128", FE, fe, out),
            run("feature extraction, windows of 128", FE, [*fe, *windows], out),
            run("full fine-tuning, 600 articles, truncate", FT, [*ft, "--max_train_samples", "600"], out),
            run("full fine-tuning, 600 articles, windows", FT, [*ft, "--max_train_samples", "600", *windows], out),
        ]  # fmt: skip
        sections.append(("BBC News: long documents at max_length 128", rows, ["eval_accuracy", "eval_f1_macro"]))

    if "multi" in only or "regression" in only:
        files = build_multi(out / "data")
        flags = [x for split, path in files.items() for x in (f"--{split}_file", str(path))]
    if "multi" in only:
        ml = [*flags, "--label_column", "labels"]
        rows = [
            baseline("TF-IDF + one-vs-rest logistic regression", ml),
            run("feature extraction, truncate", FE, [*fe, *ml], out),
            run("feature extraction, windows", FE, [*fe, *ml, *windows], out),
        ]
        keys = ["eval_f1_micro", "eval_f1_macro", "test_f1_micro", "test_f1_micro_tuned", "test_subset_accuracy_tuned"]
        sections.append(("Multi-label: 1-3 BBC articles per document, labels = their topics", rows, keys))
    if "regression" in only:
        reg = [*flags, "--label_column", "first_share", "--problem_type", "regression"]
        rows = [
            baseline("TF-IDF + ridge", reg),
            run("feature extraction, truncate", FE, [*fe, *reg], out),
            run("feature extraction, windows", FE, [*fe, *reg, *windows], out),
        ]
        keys = ["eval_mse", "eval_pearson", "eval_r2", "test_mse", "test_r2"]
        sections.append(("Regression: share of a document's words from its first article", rows, keys))
    if "imbalance" in only:
        files = build_skewed(out / "data")
        sk = [x for split, path in files.items() for x in (f"--{split}_file", str(path))]
        rows = [
            baseline("TF-IDF + logistic regression", sk),
            run("feature extraction, no weighting", FE, [*fe, *sk], out),
            run("feature extraction, --class_weights balanced", FE, [*fe, *sk, "--class_weights", "balanced"], out),
            run("feature extraction, --sampler weighted", FE, [*fe, *sk, "--sampler", "weighted"], out),
        ]  # fmt: skip
        sections.append(
            ("Imbalanced: BBC headlines, tech cut to 5%", rows, ["eval_accuracy", "eval_f1_macro", "test_f1_macro"])
        )

    text = []
    for title, rows, keys in sections:
        text += [f"### {title}", "", table(rows, keys), ""]
        text += [f"- {r['name']}: `{r['command']}`" for r in rows if "command" in r] + [""]
    report = "\n".join(text)
    (out / f"{'_'.join(only)}.md").write_text(report)
    (out / f"{'_'.join(only)}.json").write_text(json.dumps(sections, indent=1, default=str))
    print(report)


if __name__ == "__main__":
    main()
