"""Predictions files: one row per validation or test document with its text, the truth, the prediction and
the score, so a user can read the errors (and `report` can redraw the pictures from them)."""

from __future__ import annotations

import csv
import io
import json

import numpy as np

from ..config import MULTI, SINGLE
from ..errors import UserError


def prediction_rows(
    problem_type: str, label_names: list[str], scores, references, texts: list[str], thresholds=None
) -> list[dict[str, object]]:
    """Rows in the split's order: id, text, the truth, the prediction and its score(s)."""
    scores, references = np.asarray(scores), np.asarray(references)
    rows = []
    for i, text in enumerate(texts):
        row: dict[str, object] = {"id": i, "text": text}
        if problem_type == SINGLE:
            best = int(scores[i].argmax())
            row |= {
                "label": label_names[int(references[i])],
                "predicted": label_names[best],
                "score": round(float(scores[i, best]), 4),
                "scores": " ".join(f"{n}:{s:.4f}" for n, s in zip(label_names, scores[i], strict=True)),
                "correct": int(best == int(references[i])),
            }
        elif problem_type == MULTI:
            cut = np.full(len(label_names), 0.5) if thresholds is None else np.asarray(thresholds)
            truth = {n for n, v in zip(label_names, references[i], strict=True) if v > 0.5}
            predicted = {n for n, s, t in zip(label_names, scores[i], cut, strict=True) if s >= t}
            row |= {
                "labels": label_list(truth),
                "predicted": label_list(predicted),
                "scores": " ".join(f"{n}:{s:.4f}" for n, s in zip(label_names, scores[i], strict=True)),
                "correct": int(truth == predicted),
            }
        else:
            row |= {
                "target": round(float(references[i]), 6),
                "predicted": round(float(scores[i]), 6),
                "error": round(float(scores[i] - references[i]), 6),
            }
        rows.append(row)
    return rows


def label_list(names) -> str:
    """A multi-label cell: the names as a JSON list, sorted, which survives any character a name holds (a `|`
    joined names that held one into others that do not exist)."""
    return json.dumps(sorted(names), ensure_ascii=False)


def read_label_list(cell: str) -> list[str]:
    """The names of a multi-label cell that label_list wrote."""
    return json.loads(cell)


def to_csv(rows: list[dict[str, object]]) -> str:
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(rows[0]) if rows else ["id"])
    writer.writeheader()
    writer.writerows(rows)
    return table.getvalue()


def read_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def regression_pairs(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(targets, predictions) of a regression predictions file, for the scatter plot."""
    return np.array([float(r["target"]) for r in rows]), np.array([float(r["predicted"]) for r in rows])


def scores_of(row: dict[str, str], label_names: list[str]) -> list[float]:
    """A predictions file row's "scores" column ("name:0.9700 other:0.0300", in label order) as probabilities.
    Read name by name, as written, so a label name may hold spaces and colons."""
    text, at, out = row["scores"], 0, []
    for name in label_names:
        if not text.startswith(f"{name}:", at):
            raise UserError(f"a predictions file's scores {text!r} do not list the run's labels; run it again")
        at += len(name) + 1
        end = text.find(" ", at)
        end = len(text) if end < 0 else end
        out.append(float(text[at:end]))
        at = end + 1
    return out
