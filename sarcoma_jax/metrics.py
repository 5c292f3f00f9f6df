"""Segmentation metrics of SPEC §4: F1, pooled Dice, accuracy, exact ROC AUC, zero-ratio (host)."""

import numpy as np

METRIC_NAMES = ("f1", "dice", "accuracy", "auc", "zero_ratio")


def _per_image(array: np.ndarray) -> np.ndarray:
    """(N, ...) -> (N, pixels)."""
    array = np.asarray(array)
    return array.reshape(array.shape[0], -1)


def dice_per_image(predictions: np.ndarray, truths: np.ndarray) -> np.ndarray:
    """Dice of each image's boolean prediction against its truth; empty vs empty scores 1.

    Args:
      predictions: bool (N, ...).
      truths: bool (N, ...).

    Returns:
      float64 (N,).
    """
    predictions, truths = _per_image(predictions), _per_image(truths)
    overlap = np.logical_and(predictions, truths).sum(axis=1, dtype=np.int64)
    total = predictions.sum(axis=1, dtype=np.int64) + truths.sum(axis=1, dtype=np.int64)
    return np.where(total == 0, 1.0, 2.0 * overlap / np.maximum(total, 1))


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact ROC AUC = P(score_pos > score_neg) + P(equal) / 2, as sklearn's roc_auc_score.

    Written out (one np.unique, counts per distinct score) rather than calling sklearn because
    sklearn builds the whole ROC curve in float64 copies, which is about twice as slow and needs
    several times the memory on the millions of pixels of a split. Counts are integers, so the
    result is exact in float64.

    Args:
      scores: any shape, higher = more likely positive.
      labels: same shape, bool or {0, 1}.

    Returns:
      AUC in [0, 1], or nan when only one class is present.
    """
    scores = np.asarray(scores).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    positives = int(labels.sum())
    negatives = labels.size - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    distinct_scores, score_index = np.unique(scores, return_inverse=True)
    score_index = score_index.ravel()
    positive_counts = np.bincount(score_index[labels], minlength=distinct_scores.size)
    negative_counts = np.bincount(score_index[~labels], minlength=distinct_scores.size)
    negatives_below = np.cumsum(negative_counts) - negative_counts
    wins = np.sum(positive_counts * (negatives_below + 0.5 * negative_counts), dtype=np.float64)
    return float(wins / (float(positives) * float(negatives)))


def segmentation_metrics(
    probs: np.ndarray, masks: np.ndarray, threshold: float = 0.5
) -> dict[str, float]:
    """All SPEC §4 metrics for a set of images.

    Args:
      probs: (N, h, w[, 1]) tumour probabilities (or any score; see threshold).
      masks: same shape, truth in {0, 1} (or bool).
      threshold: a pixel is predicted tumour when probs >= threshold.

    Returns:
      f1: mean over images of per-image Dice (empty truth and empty prediction = 1);
      dice: Dice pooled over all pixels of all images;
      accuracy: pixel accuracy;
      auc: exact pixel ROC AUC (nan if the truth has one class only);
      zero_ratio: mean over images of the fraction of truth pixels that are 0 (thesis Table
        15-5: the accuracy of predicting all zeros).
    """
    probs = _per_image(probs)
    truths = _per_image(masks).astype(bool)
    if probs.shape != truths.shape:
        raise ValueError(f"probs {probs.shape} and masks {truths.shape} differ in shape")
    if probs.shape[0] == 0:
        raise ValueError("no images to score")
    predictions = probs >= threshold
    overlap = np.logical_and(predictions, truths).sum(dtype=np.int64)
    total = predictions.sum(dtype=np.int64) + truths.sum(dtype=np.int64)
    return {
        "f1": float(np.mean(dice_per_image(predictions, truths))),
        "dice": 1.0 if total == 0 else float(2.0 * overlap / total),
        "accuracy": float(np.mean(predictions == truths)),
        "auc": roc_auc(probs, truths),
        "zero_ratio": float(np.mean(1.0 - truths.mean(axis=1))),
    }
