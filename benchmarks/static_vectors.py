"""Static word vectors against TF-IDF and feature extraction, on BBC News and on BBC headlines (harder).

    .venv/bin/python benchmarks/static_vectors.py [--out benchmarks/results/static_vectors] [--only bbc,headlines]

Data: BBC News as the recipes ship it (2,225 articles, duplicates dropped, 10% held out for validation);
and headlines only (each article's first line, about 10 words), from the same articles split 70/15/15
into train / validation / test pools (the split of benchmarks/task_shapes.py). Every run is a recipe in
its own process, timed as a whole (model load, vectors, training, evaluation, saving); results.json is read
back. The static runs use the recipe's defaults (20 epochs, learning rate 1e-2, batch 32) and vary the
vectors (the encoder's input table; model2vec's distillation) and the encoder (bag, BiLSTM), frozen or
fine-tuned. The TF-IDF row is `compare`'s baseline on the same split (whole texts).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from task_shapes import COMMON, FE, ROOT, articles, baseline, pools, run, table, write_jsonl  # noqa: E402

ST = "static_embeddings"


def build_headlines(out: Path) -> dict[str, Path]:
    return {
        split: write_jsonl(
            out / "headlines" / f"{split}.jsonl", [{"text": t.splitlines()[0], "label": y} for t, y in pool]
        )
        for split, pool in pools(articles()).items()
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "static_vectors"))
    parser.add_argument("--only", default="bbc,headlines")
    args = parser.parse_args()
    out, only = Path(args.out), args.only.split(",")
    out.mkdir(parents=True, exist_ok=True)
    sets = {"bbc": ("BBC News (whole articles, max_length 128)", [])}
    files = build_headlines(out / "data")
    sets["headlines"] = (
        "BBC headlines (first line of each article)",
        [x for split, path in files.items() for x in (f"--{split}_file", str(path))],
    )
    sections = []
    for key in only:
        title, data = sets[key]
        cache = ["--feature_cache_dir", str(out / "cache" / key)]
        static = [*data, *cache, "--embeddings", "table"]
        lstm, tuned = ["--encoder", "lstm"], ["--freeze_embeddings", "false"]
        rows = [
            baseline("TF-IDF + logistic regression", data),
            run("static: input table, bag, frozen", ST, static, out / key),
            run("static: input table, bag, fine-tuned", ST, [*static, *tuned], out / key),
            run("static: input table, BiLSTM, frozen", ST, [*static, *lstm], out / key),
            run("static: input table, BiLSTM, fine-tuned", ST, [*static, *lstm, *tuned], out / key),
            run("static: model2vec distilled, bag, frozen", ST, [*data, *cache, "--embeddings", "distill"], out / key),
            run("feature extraction (mean pooling, linear head)", FE, [*data, *cache], out / key),
        ]  # fmt: skip
        metrics = ["eval_accuracy", "eval_f1_macro"] + (["test_accuracy"] if key == "headlines" else [])
        sections.append((title, rows, metrics))
    text = []
    for title, rows, keys in sections:
        text += [f"### {title}", "", table(rows, keys), ""]
        text += [f"- {r['name']}: `{r['command']}`" for r in rows if "command" in r] + [""]
    report = "\n".join(text) + f"\nCommon flags: `{' '.join(COMMON)}`.\n"
    (out / f"{'_'.join(only)}.md").write_text(report)
    (out / f"{'_'.join(only)}.json").write_text(json.dumps(sections, indent=1, default=str))
    print(report)


if __name__ == "__main__":
    main()
