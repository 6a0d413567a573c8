"""Rendering for people: the one Markdown table writer and cell formatter (the card, the evaluation report, the
comparison, the study's trials, the optimizer groups), CSV text, and pictures as PNG bytes. The standard library
only at import: matplotlib loads when a picture is drawn."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence


def cell(value, fmt: str = "{:.4f}") -> str:
    """'–' for a missing or NaN value; a float in `fmt`; an int with thousands separators; else str()."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return fmt.format(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence], right: Sequence[int] = (), fmt: str = "{:.4f}"):
    """A Markdown table of `rows` under `header`, every value through `cell`; the columns `right` (indices)
    right-aligned, as numbers read best."""
    rule = "|" + "".join("---:|" if i in right else "---|" for i in range(len(header)))
    lines = ["| " + " | ".join(header) + " |", rule]
    lines += ["| " + " | ".join(escape(v) if isinstance(v, str) else cell(v, fmt) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def escape(text: str) -> str:
    """A cell's text with its `|` escaped, which would otherwise end the cell (a label name may hold one)."""
    return text.replace("|", "\\|")


def csv_text(rows: list[dict], fieldnames: Sequence[str]) -> str:
    """`rows` as CSV under `fieldnames` (keys a row lacks stay empty; keys beyond them are left out)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(fieldnames), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only: no display, also on a headless server), imported on
    first use: what only reads or writes text never pays for it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(fig, dpi: int = 110) -> bytes:
    """The figure laid out tight, as PNG bytes; the figure is closed."""
    image = io.BytesIO()
    fig.tight_layout()
    fig.savefig(image, format="png", dpi=dpi)
    pyplot().close(fig)
    return image.getvalue()
