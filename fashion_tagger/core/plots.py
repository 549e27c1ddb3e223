"""Figures as files: every PNG the project writes (evaluation plots, the model card's and `predict`'s image grids,
tagging's histograms) is drawn off-screen, laid out, saved and closed the same way."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def saved_figure(path: str | Path, *, dpi: int = 100, **subplots: Any) -> Iterator[tuple[Any, Any]]:
    """`plt.subplots(**SUBPLOTS)` drawn with the Agg backend (workers have no display); when the block ends
    without an error the figure is laid out and written to PATH (its folder created). It is always closed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(**subplots)
    try:
        yield fig, axes
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)


@contextmanager
def image_grid(path: str | Path, count: int, *, columns: int = 4, cell_height: float = 4.6,
               dpi: int = 100) -> Iterator[tuple[Any, list[Any]]]:
    """A grid for COUNT images, COLUMNS wide, each cell 3.2 inches wide and CELL_HEIGHT tall with its axes
    hidden; yields the figure and the cells in reading order."""
    columns = max(1, min(columns, count))
    rows = max(1, math.ceil(count / columns))
    with saved_figure(path, dpi=dpi, nrows=rows, ncols=columns, figsize=(3.2 * columns, cell_height * rows),
                      squeeze=False) as (fig, axes):
        cells = list(axes.flat)
        for ax in cells:
            ax.axis("off")
        yield fig, cells
