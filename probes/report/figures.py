"""Figure plumbing shared by the plot modules (:mod:`probes.report.plots`, :mod:`probes.report.roc`).

Plots are drawn with matplotlib's object API on the Agg canvas (no pyplot, no global backend
change); matplotlib is imported only when a figure is made (``pip install featcache[plot]``), so
importing this module, or any module that uses it, never imports matplotlib.
"""

from __future__ import annotations

from pathlib import Path

from featcache.errors import FeatcacheError

__all__ = ["DPI", "matplotlib_agg", "save_png"]

DPI = 150  # so a 6.4 x 4.4 inch plot is 960 x 660 pixels


def matplotlib_agg():
    """``(Figure, FigureCanvasAgg)``, imported now; a missing matplotlib is a one-line error."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise FeatcacheError("plotting needs matplotlib: pip install featcache[plot]") from None
    return Figure, FigureCanvasAgg


def save_png(fig, path) -> Path:
    """Lay out ``fig`` tightly and write it as a PNG at :data:`DPI` (parent folders created)."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI)
    return path
