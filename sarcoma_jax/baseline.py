"""Baseline without learning: one intensity threshold on the preprocessed image, fit on train."""

import dataclasses

import numpy as np

from sarcoma_jax import metrics

POLARITIES = ("bright", "dark")  # tumour where image >= t, or where image <= t


@dataclasses.dataclass(frozen=True)
class IntensityThreshold:
    """Predicts tumour where `score(image) >= score_threshold`.

    The score is the image itself for 'bright' and 1 - image for 'dark' tumours, so both polarities
    are one rule and the score doubles as the ranking for the AUC.
    """

    polarity: str
    score_threshold: float
    train_f1: float

    def scores(self, images: np.ndarray) -> np.ndarray:
        return polarity_scores(images, self.polarity)

    def evaluate(self, images: np.ndarray, masks: np.ndarray) -> dict[str, float]:
        """`metrics.segmentation_metrics` of this rule on (n, h, w, 1) images in [0, 1]."""
        return metrics.segmentation_metrics(
            self.scores(images), masks, threshold=self.score_threshold
        )

    def dice_per_image(self, images: np.ndarray, masks: np.ndarray) -> np.ndarray:
        """Each image's Dice (empty-empty = 1): the per-image values whose mean is evaluate's f1."""
        predictions = self.scores(images) >= self.score_threshold
        return metrics.dice_per_image(predictions, np.asarray(masks) > 0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def polarity_scores(images: np.ndarray, polarity: str) -> np.ndarray:
    """Per-pixel tumour score in [0, 1] for images in [0, 1]."""
    if polarity == "bright":
        return np.asarray(images, np.float32)
    if polarity == "dark":
        return 1.0 - np.asarray(images, np.float32)
    raise ValueError(f"unknown polarity {polarity!r}; use one of {POLARITIES}")


def _dice_per_image_and_threshold(
    scores: np.ndarray, truths: np.ndarray, thresholds: np.ndarray
) -> np.ndarray:
    """(n, k) Dice of `scores >= t`; scores and truths are (n, pixels)."""
    num_images = scores.shape[0]
    num_bins = thresholds.size + 1
    # reached[i, p] = number of thresholds t with scores[i, p] >= t, in [0, k].
    reached = np.searchsorted(thresholds, scores, side="right")
    flat_bins = reached + num_bins * np.arange(num_images)[:, None]
    counts = np.bincount(flat_bins.ravel(), minlength=num_images * num_bins)
    true_counts = np.bincount(flat_bins[truths], minlength=num_images * num_bins)
    counts = counts.reshape(num_images, num_bins)
    true_counts = true_counts.reshape(num_images, num_bins)
    # Pixels predicted at threshold j are those that reach more than j thresholds: bins j+1..k.
    predicted = np.cumsum(counts[:, ::-1], axis=1)[:, ::-1][:, 1:]
    true_positives = np.cumsum(true_counts[:, ::-1], axis=1)[:, ::-1][:, 1:]
    total = predicted + truths.sum(axis=1)[:, None]
    return np.where(total == 0, 1.0, 2.0 * true_positives / np.maximum(total, 1))


def mean_dice_per_threshold(
    scores: np.ndarray, masks: np.ndarray, thresholds: np.ndarray, chunk_size: int = 128
) -> np.ndarray:
    """Mean per-image Dice (empty-empty = 1) of `scores >= t` for every t in `thresholds`.

    One pass over the pixels: each pixel's bin is the number of thresholds it reaches, and per-image
    counts of predicted and true-positive pixels at every threshold follow from cumulative sums, so
    a grid of 101 thresholds costs about what one threshold would. Images go in chunks to bound
    memory.

    Args:
      scores: (n, ...) per-pixel scores.
      masks: (n, ...) truth, nonzero = tumour.
      thresholds: (k,) ascending.
      chunk_size: images per chunk.

    Returns:
      float64 (k,).
    """
    thresholds = np.asarray(thresholds)
    if np.any(np.diff(thresholds) <= 0):
        raise ValueError("thresholds must be strictly ascending")
    num_images = scores.shape[0]
    scores = np.asarray(scores).reshape(num_images, -1)
    truths = np.asarray(masks).reshape(num_images, -1) != 0
    dice_sums = np.zeros(thresholds.size, np.float64)
    for start in range(0, num_images, chunk_size):
        chunk = slice(start, start + chunk_size)
        dice_sums += _dice_per_image_and_threshold(scores[chunk], truths[chunk], thresholds).sum(0)
    return dice_sums / num_images


def fit_intensity_threshold(
    images: np.ndarray, masks: np.ndarray, num_thresholds: int = 101
) -> IntensityThreshold:
    """The polarity and threshold (grid 0, 1/(k-1), ..., 1) with the highest mean per-image Dice.

    Ties go to the first polarity in POLARITIES and the lowest threshold.
    """
    # float32 like the scores, so fitting (float32 vs float32) and `evaluate` (float32 array vs a
    # Python float that is an exact float32 value) make the same comparisons, ties included.
    grid = np.linspace(0.0, 1.0, num_thresholds).astype(np.float32)
    best = None
    for polarity in POLARITIES:
        dice = mean_dice_per_threshold(polarity_scores(images, polarity), masks, grid)
        candidate = (float(dice.max()), polarity, float(grid[int(np.argmax(dice))]))
        if best is None or candidate[0] > best[0]:
            best = candidate
    train_f1, polarity, score_threshold = best
    return IntensityThreshold(polarity, score_threshold, train_f1)
