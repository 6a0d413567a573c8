"""Serving fast (issue 40): distil a fine-tuned teacher into a static-vector student on unlabelled text.

    .venv/bin/python benchmarks/distill.py [--seeds 3] [--sets headlines,snippets]   # about 15 minutes, alone

Data, all offline: the headlines and snippets sets of benchmarks/few_shot.py (BBC News, duplicates dropped,
shuffled with seed 0, split 70/15/15 into train / validation / test pools; 5 topics). Each seed draws 64
labelled examples a class (320) from the train pool; the rest of the pool (1,168 texts) is the unlabelled text,
its labels dropped. Validation is the whole validation pool (319), test the whole test pool (320).

Per set and seed, each in its own process with the recipe's defaults:
- the teacher: full_finetune on the 320 labelled texts;
- the same student on the labels alone: static_embeddings (a bag of all-MiniLM-L6-v2's input vectors, a head);
- the distilled student: distill --teacher on the same 320, with 0, 320 (1x) and 1,168 (all the rest, 3.65x)
  unlabelled texts; its teacher scores are cached, so the three runs score each text once.
Speed, once (the first seed's headlines teacher and its student with every unlabelled text): `predict` in this
process on 1,500 headlines after a warm-up (texts/s once loaded), and as whole processes (`finetune-recipes
predict --file`, and the teacher through `pipeline()` with batch 64), the median of 3 interleaved repeats.
Results are kept in results/distill/distill.json as each run ends; a rerun skips what is there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from few_shot import LENGTHS, data_sets, few_shot  # noqa: E402
from predict_speed import PIPELINE  # noqa: E402
from task_shapes import ROOT, run, write_jsonl  # noqa: E402

CLI = str(Path(sys.executable).parent / "finetune-recipes")
PER_CLASS = 64


def files_for(sets: dict, name: str, seed: int, out: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """The labelled sample's train / validation / test files, and the unlabelled files (1x and all the rest)."""
    split = sets[name]
    labelled = few_shot(split["train"], PER_CLASS, seed)
    chosen = {r["text"] for r in labelled}
    rest = [{"text": r["text"]} for r in split["train"] if r["text"] not in chosen]
    folder = out / "data" / name / str(seed)
    files = {"train": write_jsonl(folder / "train.jsonl", labelled)}
    files |= {s: write_jsonl(folder / f"{s}.jsonl", split[s]) for s in ("validation", "test")}
    unlabeled = {
        "1x": write_jsonl(folder / "unlabeled_1x.jsonl", rest[: len(labelled)]),
        "all": write_jsonl(folder / "unlabeled_all.jsonl", rest),
    }
    return files, unlabeled


def accuracy_runs(sets: dict, names: list[str], seeds: int, out: Path, done: dict) -> None:
    for name in names:
        for seed in range(seeds):
            files, unlabeled = files_for(sets, name, seed, out)
            flags = [*(x for s, p in files.items() for x in (f"--{s}_file", str(p))), "--seed", str(seed),
                     "--max_length", str(LENGTHS[name])]  # fmt: skip
            cache = ["--feature_cache_dir", str(out / "cache")]  # the static models' tables, the teacher's scores
            teacher = out / "runs" / f"bbc: {name} teacher seed {seed}"
            plan = {
                "teacher": ("full_finetune", []),
                "labels_only": ("static_embeddings", cache),
                "distill_0": ("distill", [*cache, "--teacher", str(teacher)]),
                "distill_1x": (
                    "distill",
                    [*cache, "--teacher", str(teacher), "--unlabeled_file", str(unlabeled["1x"])],
                ),
                "distill_all": (
                    "distill",
                    [*cache, "--teacher", str(teacher), "--unlabeled_file", str(unlabeled["all"])],
                ),
            }
            for method, (recipe, extra) in plan.items():
                key = f"{name}/{seed}/{method}"
                if key in done:
                    continue
                result = run(f"{name} {method.replace('_', ' ')} seed {seed}", recipe, [*flags, *extra], out)
                if result.get("status") != "ok":
                    raise SystemExit(f"{key} failed: {result.get('status')}")
                done[key] = {
                    "test_accuracy": result.get("test_accuracy"), "wall_time_s": result.get("wall_time_s"),
                    "status": result.get("status"),
                    "test_agreement": result.get("distillation", {}).get("test_agreement"),
                    "unlabeled_texts": result.get("distillation", {}).get("unlabeled_texts"),
                }  # fmt: skip
                print(key, done[key], flush=True)
                (out / "distill.json").write_text(json.dumps(done, indent=1) + "\n")


def speed(sets: dict, out: Path, repeats: int = 3) -> dict:
    texts = [r["text"] for split in sets["headlines"].values() for r in split][:1500]
    file = out / "texts.txt"
    file.write_text("".join(t + "\n" for t in texts))
    teacher, student = (out / "runs" / f"bbc: headlines {m} seed 0" for m in ("teacher", "distill all"))
    # predict() loads its model on every call: the call on 1,500 texts, and the marginal rate between 1,500 and
    # 3,000 texts (what the loading costs cancels out: texts/s once loaded), the median of 3 after a warm-up.
    code = (
        "import statistics, sys, time\nfrom finetune_recipes.tools.predict import predict\n"
        "texts = open(sys.argv[2]).read().splitlines()\npredict(sys.argv[1], texts[:64])\n"
        "def timed(batch):\n    start = time.perf_counter(); predict(sys.argv[1], batch)\n"
        "    return time.perf_counter() - start\n"
        "one, two = zip(*[(timed(texts), timed(texts * 2)) for _ in range(3)])\n"
        "print(len(texts) / statistics.median(one), len(texts) / statistics.median(b - a for a, b in zip(one, two)))"
    )
    loaded = {}
    for name, model in (("teacher", teacher), ("student", student)):
        out_ = subprocess.run([sys.executable, "-c", code, str(model), str(file)], check=True, capture_output=True,
                              text=True, cwd=ROOT).stdout.split()  # fmt: skip
        loaded[name] = {"per_call": float(out_[-2]), "marginal": float(out_[-1])}
    commands = {
        "student": [CLI, "predict", "--model", str(student), "--file", str(file), "--format", "jsonl"],
        "teacher": [CLI, "predict", "--model", str(teacher), "--file", str(file), "--format", "jsonl"],
        "teacher_pipeline": [sys.executable, "-c", PIPELINE, str(teacher), str(file), str(out / "labels.txt")],
    }
    walls: dict[str, list[float]] = {k: [] for k in commands}
    for _ in range(repeats):  # interleaved: the machine's noise falls on every variant alike
        for name, cmd in commands.items():
            start = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
            walls[name].append(time.perf_counter() - start)
    first = [CLI, "predict", "--model", str(student), texts[0]]
    start = time.perf_counter()
    subprocess.run(first, check=True, capture_output=True, cwd=ROOT)
    return {
        "loaded_texts_per_s": loaded, "whole_process_s": {k: statistics.median(v) for k, v in walls.items()},
        "student_one_text_process_s": time.perf_counter() - start, "texts": len(texts),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distill"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--sets", default="headlines,snippets")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    done = json.loads((out / "distill.json").read_text()) if (out / "distill.json").exists() else {}
    sets = data_sets()
    accuracy_runs(sets, args.sets.split(","), args.seeds, out, done)
    if "speed" not in done:
        done["speed"] = speed(sets, out)
        (out / "distill.json").write_text(json.dumps(done, indent=1) + "\n")
    print(json.dumps(done["speed"], indent=1))
    print(summary(done, args.sets.split(","), args.seeds))


def summary(done: dict, names: list[str], seeds: int) -> str:
    """Per set: each method's test accuracy (mean ± std), the student over the teacher, and the paired gains."""
    lines = ["| set | teacher | labels only | distilled, 0 unlabelled | 1x | all (3.65x) | all / teacher | "
             "all − labels only (per seed) | agreement with the teacher (all) |", "|---|" + "---:|" * 8]  # fmt: skip
    for name in names:
        got = {m: [done[f"{name}/{s}/{m}"]["test_accuracy"] for s in range(seeds)]
               for m in ("teacher", "labels_only", "distill_0", "distill_1x", "distill_all")}  # fmt: skip
        cells = [f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}" for v in got.values()]
        ratio = statistics.mean(a / t for a, t in zip(got["distill_all"], got["teacher"], strict=True))
        gains = ", ".join(f"{a - b:+.3f}" for a, b in zip(got["distill_all"], got["labels_only"], strict=True))
        agree = statistics.mean(done[f"{name}/{s}/distill_all"]["test_agreement"] for s in range(seeds))
        lines.append(f"| {name} | {' | '.join(cells)} | {ratio:.1%} | {gains} | {agree:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
