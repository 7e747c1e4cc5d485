"""The evaluation's figures written as PNG files, each on its own matplotlib `Figure` ([`save_figures`])."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def save_figures(
    plot_dir: str | os.PathLike, drawings: dict[str, tuple[Callable[[Figure], object], tuple[float, float]]]
) -> dict[str, str]:
    """Draws each `name: (draw, (width, height))` on its own matplotlib `Figure` (the object API: no pyplot global
    state) and writes it to `plot_dir/name.png` (the folder is created if needed).

    Returns:
        name -> path of the PNG.

    Raises:
        ImportError: matplotlib is missing (`pip install hf_moshi_userpred[plots]`).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("plotting needs matplotlib: pip install 'hf_moshi_userpred[plots]'") from error
    os.makedirs(plot_dir, exist_ok=True)
    paths = {}
    for name, (draw, size) in drawings.items():
        figure = Figure(figsize=size)
        draw(figure)
        paths[name] = os.path.join(os.fspath(plot_dir), f"{name}.png")
        FigureCanvasAgg(figure).print_png(paths[name])
    return paths


__all__ = ["save_figures"]
