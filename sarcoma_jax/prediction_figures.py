"""Figures of predictions on new series: an overview of slices with contours, evaluation boxes."""

from __future__ import annotations

import math
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure  # not pyplot: no global figure state, no display backend.

from sarcoma_jax import figures

MAX_OVERVIEW_SLICES = 8


def overview_slices(masks: Sequence[np.ndarray], count: int = MAX_OVERVIEW_SLICES) -> np.ndarray:
    """Up to ``count`` slice indices spread evenly over the slices any mask marks (all slices when
    none marks any), in ascending order."""
    marked = np.zeros(masks[0].shape[0], bool)
    for mask in masks:
        if mask is not None:
            marked |= np.asarray(mask).reshape(mask.shape[0], -1).any(axis=1)
    candidates = np.flatnonzero(marked) if marked.any() else np.arange(marked.size)
    chosen = np.linspace(0, candidates.size - 1, min(count, candidates.size)).round().astype(int)
    return candidates[np.unique(chosen)]


def plot_overview(
    pixels: np.ndarray,
    prediction: np.ndarray,
    path: str | pathlib.Path,
    pixel_spacing: Sequence[float] = (1.0, 1.0),
    title: str = "",
    truth: np.ndarray | None = None,
) -> pathlib.Path:
    """Slices of a series with the predicted contour (red) and, if given, the truth (orange).

    Args:
      pixels: (slices, rows, cols) in physical units.
      prediction: bool (slices, rows, cols).
      path: the PNG to write.
      pixel_spacing: (row, column) spacing in mm, so that pixels are drawn with their true aspect.
      title: the figure's title.
      truth: bool (slices, rows, cols) or None.

    Returns:
      The path written.
    """
    shown = overview_slices([prediction, truth])
    columns = min(4, len(shown))
    rows = math.ceil(len(shown) / columns)
    height = 3.0 * rows + 0.7
    figure = Figure(figsize=(3.0 * columns, height))
    # Fixed margins: matplotlib's automatic layouts cost more than drawing the figure.
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.7 / height, hspace=0.12)
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel()
    low, high = np.percentile(pixels, [1, 99.5])
    aspect = float(pixel_spacing[0]) / float(pixel_spacing[1])
    for ax, index in zip(axes, shown, strict=False):
        ax.imshow(pixels[index], cmap="gray", vmin=low, vmax=high, aspect=aspect)
        if truth is not None:
            figures.draw_contour(ax, truth[index], figures.TRUTH_COLOUR)
        figures.draw_contour(ax, prediction[index], figures.PREDICTION_COLOUR)
        ax.set_title(f"slice {index}", fontsize=9)
    for ax in axes:
        ax.axis("off")
    legend = "red: prediction" + ("; orange: truth" if truth is not None else "")
    figure.suptitle(f"{title}\n{legend}" if title else legend, fontsize=10)
    path = pathlib.Path(path)
    figure.savefig(path, dpi=80)
    return path


def plot_evaluation_boxes(per_patient: Sequence[Mapping], path: str | pathlib.Path) -> pathlib.Path:
    """Box plots of 3D Dice and HD95 per checkpoint, each patient a point.

    Args:
      per_patient: evaluation rows with 'checkpoint', 'dice_3d' and 'hd95_mm' (None when
        undefined: not drawn).
      path: the PNG to write.
    """
    names = list(dict.fromkeys(row["checkpoint"] for row in per_patient))
    figure = Figure(figsize=(4 + 1.2 * len(names), 4))
    for ax, key, label in zip(
        figure.subplots(1, 2),
        ("dice_3d", "hd95_mm"),
        ("3D Dice", "HD95 (mm)"),
        strict=True,
    ):
        values = [
            [row[key] for row in per_patient if row["checkpoint"] == n and row[key] is not None]
            for n in names
        ]
        ax.boxplot([v if v else [np.nan] for v in values], showfliers=False)
        for position, column in enumerate(values, start=1):
            jitter = np.linspace(-0.12, 0.12, len(column)) if len(column) > 1 else [0.0]
            ax.plot(position + np.asarray(jitter), column, "o", alpha=0.6, color="tab:blue")
        ax.set_xticks(range(1, len(names) + 1), names)
        ax.set(title=label, ylabel=label)
        if key == "dice_3d":
            ax.set_ylim(0, 1)
    figure.tight_layout()
    path = pathlib.Path(path)
    figure.savefig(path, dpi=100)
    return path
