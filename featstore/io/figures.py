"""Figures as files: headless matplotlib, and PNGs written the one atomic way (``featstore.io.atomic``)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from featstore.io.atomic import atomic_write

__all__ = ["pyplot", "save_figure"]


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend: commands write PNGs and never open windows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike, *, dpi: int = 90) -> Path:
    """Write ``fig`` as a PNG atomically (its folder is created) and close it.

    Args:
        fig: a matplotlib figure.
        path: the PNG to write.
        dpi: resolution.
    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # The temporary's name does not end in .png, so the format is given, not inferred.
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    finally:
        pyplot().close(fig)
    return path
