"""What a run hands on besides the model: the model card, the evaluation report and pictures, the predictions
files, and the Hub upload. `render` draws the first three from what the run saved, so `finetune-recipes report`
can redraw them for a finished run."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import yaml

from ..atomic import atomic_write
from ..config import REGRESSION
from ..errors import UserError, first_line
from ..ownership import file_hash, lock_output_dir, refuse_unowned, rendered_hashes, write_manifest
from .card import render_card, render_report
from .predictions import prediction_rows, read_csv, regression_pairs, to_csv

PICTURES = (
    "confusion_matrix.png",
    "per_label_scores.png",
    "predicted_vs_true.png",
    "training_curves.png",
    "reliability.png",
)
REPORT_FILES = ("README.md", "eval_report.md", *PICTURES)


def render(
    results: dict, config: dict, label_names: list[str], files: set[str], out: Path, predictions: dict[str, str]
) -> dict[str, str | bytes]:
    """README.md (the card), eval_report.md and the pictures of a run whose output directory is `out`.

    `predictions` maps predictions_<split>.csv to its text (regression draws its scatter from it); `files`
    are the names the directory holds (the card's usage snippet depends on the kind of model saved)."""
    from .plots import evaluation_pictures  # matplotlib: loaded when a picture is drawn, not by what imports this

    pairs = None
    if results["task"]["problem_type"] == REGRESSION:
        split = "test" if "predictions_test.csv" in predictions else "validation"
        if f"predictions_{split}.csv" in predictions:
            pairs = regression_pairs(read_csv(predictions[f"predictions_{split}.csv"]))
    name = config.get("hub_model_id") or out.name
    where = config["hub_model_id"] if config.get("push_to_hub") else str(out)  # where its readers will load it from
    return {
        "README.md": render_card(results, config, label_names, files, where, name),
        "eval_report.md": render_report(results),
        **evaluation_pictures(results, label_names, pairs),
    }


def render_saved(out: Path) -> dict[str, str | bytes]:
    """The card, report and pictures of the run saved in `out`, drawn from its files alone (results.json,
    recipe_config.yaml, config.json, the predictions files), so `finetune-recipes report` redraws them the same."""
    needed = ("results.json", "recipe_config.yaml", "config.json")
    missing = [n for n in needed if not (out / n).is_file()]
    if not out.is_dir() or missing:
        what = "does not exist" if not out.is_dir() else f"holds no finished run (no {missing[0]})"
        raise UserError(f"{out} {what}; pass `report` a recipe's output_dir")
    results, config, model_config = (read_saved(out / n) for n in needed)
    results["model_type"] = model_config.get("model_type")  # the card's snippet: a class to register first?
    label_names = [model_config["id2label"][str(i)] for i in range(len(model_config["id2label"]))]
    predictions = {p.name: p.read_text() for p in out.glob("predictions_*.csv")}
    files = {p.name for p in out.iterdir()}
    return render(results, config, label_names, files, out, predictions)


def read_saved(file: Path) -> dict:
    """A file the run saved, as a mapping; a damaged one (truncated, edited) is one line naming it."""
    try:
        text = file.read_text(encoding="utf-8")
        value = yaml.safe_load(text) if file.suffix == ".yaml" else json.loads(text)
    except (OSError, ValueError, yaml.YAMLError) as error:
        raise UserError(f"{file} is damaged ({first_line(error)}); restore it or train the run again") from None
    if not isinstance(value, dict):
        raise UserError(f"{file} is damaged (it holds no mapping); restore it or train the run again")
    return value


def report(path: str | Path) -> list[str]:
    """Redraws the card, report and pictures of a finished run in `path`; returns the names written."""
    out = Path(path)
    rendered = render_saved(out)
    lock = lock_output_dir(out, None)  # no run may be writing there meanwhile
    try:
        hashes = rendered_hashes(out)
        refuse_unowned(out, rendered, "`report`")  # a run only ever replaces what a run wrote
        edited = [
            n for n in rendered if (out / n).exists() and n in hashes and file_hash((out / n).read_bytes()) != hashes[n]
        ]
        for name in edited:  # the user's edits to a card are theirs: kept, and said
            print(f"{out / name} was edited since it was written: kept (remove it for a new one)", file=sys.stderr)
            rendered.pop(name)
        write_manifest(out, rendered, set(), {n: file_hash(c) for n, c in rendered.items()})
        for name, content in rendered.items():
            atomic_write(out / name, content)
    finally:
        os.close(lock)
    return list(rendered)


__all__ = ["PICTURES", "REPORT_FILES", "prediction_rows", "render", "render_saved", "report", "to_csv"]
