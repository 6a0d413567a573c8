"""Every strategy tuned with the same budget, then run with several seeds, on BBC News and on a harder set.

    .venv/bin/python benchmarks/tuning.py [--out benchmarks/results/tuning] [--only headlines,bbc]
                                          [--trials 8] [--seeds 3] [--phase studies|compare|defaults|all]

Data, built offline from the BBC News corpus the package ships (duplicates dropped):
- bbc: the recipes' default data set, 400 training articles (`--max_train_samples 400`, a seeded sample of
  train), max_length 64 (the first 50 words or so); compare and tune hold out 10% of the articles as test
  (stratified, seed 0) and 10% of the rest as validation.
- headlines: few-shot headlines: each article's first line (about 10 words), 64 training headlines per class
  (320), validation and test pools of about 330 each (the 70/15/15 split of benchmarks/task_shapes.py),
  max_length 32. Harder: TF-IDF drops from 0.97 to about 0.6 here.

Phase `studies` runs `finetune-recipes tune` for each recipe (an SQLite study per recipe and data set, so an
interrupted run resumes where it stopped); phase `compare` runs `finetune-recipes compare --trials N --seeds
K`, which finds those studies finished, trains each strategy's best configuration with K seeds, and writes
the table with mean ± std on test and the verdict. Phase `defaults` (not part of `all`) runs `compare --seeds
K` with each recipe's own defaults, untuned, into `defaults/SET` (not inside the tuned comparison's folder,
which compare keeps to what it wrote): the check that a default holds, for
example LLRD's against full fine-tuning's (`--recipes full_finetune,llrd`).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from task_shapes import ROOT, articles, pools, write_jsonl  # noqa: E402

from finetune_recipes.tools.compare import ORDER  # noqa: E402

CLI = str(Path(sys.executable).parent / "finetune-recipes")


def build_headlines(out: Path, per_class: int = 64) -> list[str]:
    """Few-shot headlines: the first `per_class` training articles of each class, first line only."""
    split = pools(articles())
    counts: dict[str, int] = {}
    train = []
    for text, label in split["train"]:
        if counts.get(label, 0) < per_class:
            counts[label] = counts.get(label, 0) + 1
            train.append((text, label))
    files = {}
    for name, rows in (("train", train), ("validation", split["validation"]), ("test", split["test"])):
        rows = [{"text": t.splitlines()[0], "label": y} for t, y in rows]
        files[name] = write_jsonl(out / "data" / "headlines" / f"{name}.jsonl", rows)
    return [x for name, path in files.items() for x in (f"--{name}_file", str(path))] + ["--max_length", "32"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tuning"))
    parser.add_argument("--only", default="headlines,bbc")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--phase", choices=["studies", "compare", "defaults", "all"], default="all")
    parser.add_argument("--recipes", default=",".join(ORDER))
    args = parser.parse_args()
    out = Path(args.out)
    sets = {
        "headlines": build_headlines(out),
        "bbc": ["--max_train_samples", "400", "--max_length", "64"],
    }
    common = ["--seed", "42", "--per_device_eval_batch_size", "64"]
    for key in args.only.split(","):
        flags = [*sets[key], *common]
        where = out / key
        if args.phase in ("studies", "all"):
            for recipe in args.recipes.split(","):
                study = ["--n_trials", str(args.trials), "--output_dir", str(where / "studies" / recipe)]
                subprocess.run([CLI, "tune", recipe, *study, *flags], check=False)
        if args.phase in ("compare", "all"):
            cmd = [CLI, "compare", "--recipes", args.recipes, "--output_dir", str(where), "--overwrite_output_dir"]
            cmd += ["--trials", str(args.trials), "--seeds", str(args.seeds), *flags]
            subprocess.run(cmd, check=True)
        if args.phase == "defaults":
            cmd = [CLI, "compare", "--recipes", args.recipes, "--output_dir", str(out / "defaults" / key)]
            cmd += ["--overwrite_output_dir", "--seeds", str(args.seeds), *flags]
            subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
