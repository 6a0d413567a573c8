"""Pictures as PNG bytes, drawn off-screen: one way to get pyplot and one to turn a figure into a file's content."""

from __future__ import annotations

import io


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
