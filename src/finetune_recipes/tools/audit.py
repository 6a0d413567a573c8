"""The label audit: which training labels the out-of-fold predictions of a cv most doubt. Confident learning by
`cleanlab` (its find_label_issues and label quality scores, multi-label included); for regression, the largest
out-of-fold residuals. `finetune-recipes cv ... --find_label_issues`, or `finetune-recipes audit CV_DIR`."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..config import MULTI, REGRESSION, SINGLE
from ..errors import UserError
from ..rendering import cell, markdown_table
from ..reporting.predictions import label_list, read_label_list

SHOWN = 20  # the worst, listed in cv.md


def import_cleanlab():
    try:
        import cleanlab
    except ImportError:
        raise UserError("the label audit needs cleanlab: pip install 'finetune-recipes[cv]'") from None
    return cleanlab


def label_issues(oof: list[dict], plan: dict) -> list[dict]:
    """The examples whose given label the out-of-fold probabilities doubt, worst first: id, text, the given and
    the suggested label, and cleanlab's label quality score (0 worst, 1 best; regression: the residual)."""
    from .cv_report import references, scores

    kind, names = plan["problem_type"], plan["label_names"]
    probs, given = scores(oof, kind, names), references(oof, kind, names)
    if kind == REGRESSION:
        residual = probs - given
        order = np.argsort(-np.abs(residual), kind="stable")[: max(SHOWN, len(oof) // 20)]
        return [
            _row(i + 1, oof[j], oof[j]["target"], oof[j]["predicted"], float(residual[j])) for i, j in enumerate(order)
        ]
    import_cleanlab()
    if kind == SINGLE:
        from cleanlab.filter import find_label_issues
        from cleanlab.rank import get_label_quality_scores

        labels = given.astype(int)
        flagged = find_label_issues(labels, probs, return_indices_ranked_by="self_confidence")
        quality = get_label_quality_scores(labels, probs)
        suggested = [names[k] for k in probs.argmax(1)]
        given_names = [names[k] for k in labels]
    else:
        from cleanlab.multilabel_classification import get_label_quality_scores
        from cleanlab.multilabel_classification.filter import find_label_issues

        labels = [list(np.flatnonzero(row > 0.5)) for row in given]
        flagged = find_label_issues(labels, probs, return_indices_ranked_by="self_confidence")
        quality = get_label_quality_scores(labels, probs)
        suggested = [label_list(n for n, p in zip(names, row, strict=True) if p >= 0.5) for row in probs]
        given_names = [oof[j]["labels"] for j in range(len(oof))]
    return [_row(i + 1, oof[j], given_names[j], suggested[j], float(quality[j])) for i, j in enumerate(flagged)]


def audit(oof: list[dict], plan: dict) -> tuple[list[dict], str]:
    """(label issue rows, their section of cv.md): what cv_report.write_outputs takes as its `audit`."""
    issues = label_issues(oof, plan)
    return issues, issues_section(issues, plan)


def _row(rank: int, example: dict, given, suggested, score: float) -> dict:
    return {"rank": rank, "id": example["id"], "text": example["text"], "given": given, "suggested": suggested,
            "score": round(score, 6)}  # fmt: skip


def issues_section(issues: list[dict], plan: dict) -> str:
    """cv.md's section: how many were flagged per given label, and the worst SHOWN."""
    kind = plan["problem_type"]
    if kind == REGRESSION:
        title = f"## The largest out-of-fold residuals ({len(issues)} listed in label_issues.csv)"
        counts = ""
    else:
        title = f"## Label issues: {len(issues)} examples whose label the out-of-fold predictions doubt (cleanlab)"
        per = {n: 0 for n in plan["label_names"]}
        for row in issues:
            for name in read_label_list(row["given"]) if kind == MULTI else [row["given"]]:
                per[name] = per.get(name, 0) + 1
        counts = markdown_table(["given label", "flagged"], [[n, c] for n, c in per.items()], right=(1,)) + "\n\n"
    shown = [
        [r["rank"], r["id"], _short(r["text"]), r["given"], r["suggested"], cell(r["score"])] for r in issues[:SHOWN]
    ]
    score = "residual" if kind == REGRESSION else "label quality (0 worst)"
    worst = markdown_table(["rank", "id", "text", "given", "suggested", score], shown, right=(0, 1, 5))
    return f"{title}\n\n{counts}The worst {min(SHOWN, len(issues))} ([label_issues.csv](label_issues.csv)):\n\n{worst}"


def _short(text: str, width: int = 80) -> str:
    text = " ".join(text.split()).replace("|", "/")
    return text if len(text) <= width else text[: width - 1] + "…"


def main(cv_dir: str | Path) -> list[str]:
    """`finetune-recipes audit CV_DIR`: the audit of a finished cv, written into it (label_issues.csv, cv.md)."""
    from ..ownership import adopt_earlier, lock_output_dir
    from .cv_report import read_plan, write_outputs, written_before_manifests

    out = Path(cv_dir)
    plan, runs = read_plan(out)
    adopt_earlier(
        out, "cv", ("cv.json", "folds"), written_before_manifests
    )  # a cv from before manifests: its files are its own
    import_cleanlab()
    lock = lock_output_dir(out, None)
    try:
        return write_outputs(out, plan, runs, audit=audit)
    finally:
        os.close(lock)
