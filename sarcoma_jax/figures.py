"""Figures of a segmentation run: training curves, the thesis' §15-2 example slices, and
augmented training slices."""

import pathlib
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure  # not pyplot: no global figure state, no display backend.
from matplotlib.ticker import MaxNLocator

TRUTH_COLOUR = "orange"  # thesis Figure 15-2: orange = ground truth, red = prediction.
PREDICTION_COLOUR = "red"


def plot_training_curves(
    history: Sequence[Mapping[str, float]],
    path: str | pathlib.Path,
    loss_label: str = "BCE summed over pixels",
) -> pathlib.Path:
    """Train and val loss, and val F1 / Dice / AUC, against epochs.

    Args:
      history: one dict per epoch with 'epoch', 'train_loss', 'val_loss', 'val_f1', 'val_dice',
        'val_auc'.
      path: the PNG to write.
      loss_label: what the loss is (sarcoma_jax/losses.py LABELS), for the axis.

    Returns:
      The path written.
    """
    epochs = [row["epoch"] for row in history]
    figure = Figure(figsize=(10, 4))
    loss_axes, score_axes = figure.subplots(1, 2)
    loss_axes.plot(epochs, [row["train_loss"] for row in history], "o-", label="train")
    loss_axes.plot(epochs, [row["val_loss"] for row in history], "s-", label="val")
    loss_axes.set(xlabel="epoch", ylabel=f"{loss_label}, mean over images", title="loss")
    loss_axes.legend()
    for key, marker in (("val_f1", "o-"), ("val_dice", "s-"), ("val_auc", "^-")):
        score_axes.plot(epochs, [row[key] for row in history], marker, label=key)
    score_axes.set(xlabel="epoch", ylim=(0, 1), title="validation")
    score_axes.legend()
    for axes in (loss_axes, score_axes):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.tight_layout()
    path = pathlib.Path(path)
    figure.savefig(path, dpi=100)
    return path


def draw_contour(axes, mask: np.ndarray, colour: str) -> None:
    """Draws the outline of a boolean mask (rows, cols) on matplotlib axes, if it has one."""
    if mask.any() and not mask.all():
        axes.contour(mask.astype(np.float32), levels=[0.5], colors=colour, linewidths=1.2)


def plot_segmentation_examples(
    images: np.ndarray,
    masks: np.ndarray,
    probs: np.ndarray,
    path: str | pathlib.Path,
    titles: Sequence[str] | None = None,
    threshold: float = 0.5,
) -> pathlib.Path:
    """Thesis Figure 15-2: per slice, the image with truth (orange) and predicted (red) contours,
    and beside it the probability map (lighter = more probably tumour).

    Args:
      images: (n, h, w, 1) in [0, 1].
      masks: (n, h, w, 1) truth.
      probs: (n, h, w, 1) predicted probabilities.
      path: the PNG to write.
      titles: optional caption per slice.
      threshold: probability at which a pixel is predicted tumour.

    Returns:
      The path written.
    """
    num_slices = images.shape[0]
    figure = Figure(figsize=(6, 3 * num_slices))
    axes = figure.subplots(num_slices, 2, squeeze=False)
    for row in range(num_slices):
        image_axes, prob_axes = axes[row]
        image_axes.imshow(images[row, ..., 0], cmap="gray", vmin=0, vmax=1)
        draw_contour(image_axes, masks[row, ..., 0] > 0, TRUTH_COLOUR)
        draw_contour(image_axes, probs[row, ..., 0] >= threshold, PREDICTION_COLOUR)
        prob_axes.imshow(probs[row, ..., 0], cmap="gray", vmin=0, vmax=1)
        if titles is not None:
            image_axes.set_title(titles[row], fontsize=8)
        prob_axes.set_title("probability", fontsize=8)
        for axis in (image_axes, prob_axes):
            axis.set_xticks([])
            axis.set_yticks([])
    figure.tight_layout()
    path = pathlib.Path(path)
    figure.savefig(path, dpi=100)
    return path


def plot_augmented_examples(
    images: np.ndarray,
    masks: np.ndarray,
    augmented_images: np.ndarray,
    augmented_masks: np.ndarray,
    path: str | pathlib.Path,
    titles: Sequence[str] | None = None,
) -> pathlib.Path:
    """Per slice, the training image with its truth contour (orange), then augmented draws of it.

    Args:
      images: (n, h, w, 1) in [0, 1].
      masks: (n, h, w, 1) truth.
      augmented_images: (n, draws, h, w, 1); intensities may leave [0, 1] (shown clipped).
      augmented_masks: (n, draws, h, w, 1).
      path: the PNG to write.
      titles: optional caption per slice.

    Returns:
      The path written.
    """
    num_slices, num_draws = augmented_images.shape[:2]
    figure = Figure(figsize=(2.2 * (num_draws + 1), 2.3 * num_slices))
    axes = figure.subplots(num_slices, num_draws + 1, squeeze=False)
    for row in range(num_slices):
        panels = [(images[row], masks[row], titles[row] if titles else "original")] + [
            (augmented_images[row, d], augmented_masks[row, d], f"augmented {d + 1}")
            for d in range(num_draws)
        ]
        for column, (image, mask, title) in enumerate(panels):
            axis = axes[row, column]
            axis.imshow(image[..., 0], cmap="gray", vmin=0, vmax=1)
            draw_contour(axis, mask[..., 0] > 0, TRUTH_COLOUR)
            axis.set_title(title, fontsize=8)
            axis.set_xticks([])
            axis.set_yticks([])
    figure.tight_layout()
    path = pathlib.Path(path)
    figure.savefig(path, dpi=100)
    return path
