"""Tests for sarcoma_jax.metrics against scikit-learn and hand-computed values."""

import numpy as np
from absl.testing import absltest, parameterized
from sklearn import metrics as sk_metrics

from sarcoma_jax import baseline, metrics


def _random_case(seed: int, num_images: int = 6, size: int = 8, levels: int | None = None):
    """Probabilities (n, s, s, 1) and masks; `levels` quantises probs to force ties."""
    rng = np.random.default_rng(seed)
    probs = rng.random((num_images, size, size, 1)).astype(np.float32)
    if levels is not None:
        probs = np.round(probs * levels) / levels
    masks = (rng.random(probs.shape) < 0.3 + 0.4 * probs).astype(np.uint8)
    return probs, masks


class SegmentationMetricsTest(parameterized.TestCase):
    @parameterized.named_parameters(
        ("continuous", 0, None),
        ("ties_10_levels", 1, 10),
        ("ties_3_levels", 2, 3),
        ("ties_at_threshold", 3, 2),  # probs in {0, 0.5, 1}: many exactly at the threshold
    )
    def test_matches_sklearn(self, seed, levels):
        probs, masks = _random_case(seed, levels=levels)
        masks[0] = 0  # an image without tumour
        result = metrics.segmentation_metrics(probs, masks)

        predictions = (probs >= 0.5).reshape(probs.shape[0], -1)
        truths = masks.reshape(masks.shape[0], -1)
        per_image_f1 = [
            sk_metrics.f1_score(truth, prediction, zero_division=1.0)
            for truth, prediction in zip(truths, predictions, strict=True)
        ]
        self.assertAlmostEqual(result["f1"], np.mean(per_image_f1), places=12)
        self.assertAlmostEqual(
            result["dice"], sk_metrics.f1_score(truths.ravel(), predictions.ravel()), places=12
        )
        self.assertAlmostEqual(
            result["accuracy"],
            sk_metrics.accuracy_score(truths.ravel(), predictions.ravel()),
            places=12,
        )
        self.assertAlmostEqual(
            result["auc"], sk_metrics.roc_auc_score(truths.ravel(), probs.ravel()), places=12
        )
        self.assertAlmostEqual(result["zero_ratio"], 1.0 - truths.mean(), places=12)

    def test_empty_truth_and_empty_prediction_scores_one(self):
        probs = np.zeros((2, 4, 4, 1), np.float32)
        masks = np.zeros((2, 4, 4, 1), np.uint8)
        probs[1, :2, :2] = 0.9
        masks[1, :2, :2] = 1
        result = metrics.segmentation_metrics(probs, masks)
        self.assertEqual(result["f1"], 1.0)  # image 0 empty-empty = 1, image 1 perfect = 1
        self.assertEqual(result["dice"], 1.0)
        self.assertEqual(result["accuracy"], 1.0)

    def test_hand_computed_values(self):
        # Image 0: truth 4 pixels, prediction 2 of them plus 2 wrong -> Dice 2*2/(4+4) = 0.5.
        # Image 1: truth 2 pixels, nothing predicted -> Dice 0. Image 2: empty-empty -> 1.
        probs = np.zeros((3, 4, 4), np.float32)
        masks = np.zeros((3, 4, 4), np.uint8)
        masks[0, 0, :4] = 1
        probs[0, 0, :2] = 0.7
        probs[0, 1, :2] = 0.6
        masks[1, 3, :2] = 1
        probs[1, 3, :2] = 0.4
        result = metrics.segmentation_metrics(probs, masks)
        self.assertAlmostEqual(result["f1"], (0.5 + 0.0 + 1.0) / 3)
        self.assertAlmostEqual(result["dice"], 2 * 2 / (4 + 2 + 4))  # pooled: TP 2, |P| 4, |T| 6
        self.assertAlmostEqual(result["accuracy"], 1 - 6 / 48)  # 2 FN + 2 FP + 2 FN
        self.assertAlmostEqual(result["zero_ratio"], np.mean([12 / 16, 14 / 16, 1.0]))

    def test_exact_auc_with_ties_by_hand(self):
        # positives score 0.8, 0.5; negatives 0.5, 0.2. Pairs: (0.8>0.5) 1, (0.8>0.2) 1,
        # (0.5=0.5) 0.5, (0.5>0.2) 1 -> 3.5 / 4.
        auc = metrics.roc_auc(np.array([0.8, 0.5, 0.5, 0.2]), np.array([1, 1, 0, 0]))
        self.assertEqual(auc, 3.5 / 4)

    def test_auc_from_logits_keeps_what_float32_sigmoids_tie(self):
        # Logits above ~17 all round to 1.0 as float32 sigmoids, where they would tie; ranked as
        # logits they keep their order. Scored with threshold 0 (p >= 0.5) as the loops do.
        rng = np.random.default_rng(0)
        labels = rng.uniform(size=(3, 6, 6)) > 0.5
        logits = np.where(labels, 20.0, 18.0) + rng.uniform(0, 1, labels.shape)
        logits = logits.astype(np.float32)
        result = metrics.segmentation_metrics(logits, labels, threshold=0.0)
        expected = sk_metrics.roc_auc_score(labels.ravel(), logits.astype(np.float64).ravel())
        self.assertEqual(result["auc"], expected)
        self.assertEqual(result["auc"], 1.0)  # every positive logit above every negative one
        sigmoids = 1.0 / (1.0 + np.exp(-logits.astype(np.float32)))
        self.assertEqual(len(np.unique(sigmoids)), 1)  # float32 probabilities: all 1.0, one tie
        self.assertEqual(metrics.roc_auc(sigmoids, labels), 0.5)
        # F1 at logit 0 is F1 at p = 0.5: everything is predicted tumour here.
        self.assertAlmostEqual(
            result["f1"], metrics.segmentation_metrics(sigmoids, labels)["f1"], places=12
        )

    def test_auc_single_class_is_nan(self):
        self.assertTrue(np.isnan(metrics.roc_auc(np.array([0.1, 0.9]), np.array([0, 0]))))

    def test_threshold_argument(self):
        probs, masks = _random_case(4)
        at_03 = metrics.segmentation_metrics(probs, masks, threshold=0.3)
        predictions = probs >= 0.3
        self.assertAlmostEqual(at_03["accuracy"], np.mean(predictions == (masks > 0)))

    def test_shape_mismatch_raises(self):
        with self.assertRaises(ValueError):
            metrics.segmentation_metrics(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))


class IntensityThresholdBaselineTest(absltest.TestCase):
    def test_grid_search_matches_brute_force(self):
        rng = np.random.default_rng(5)
        images = (np.round(rng.random((12, 6, 6, 1)) * 20) / 20).astype(np.float32)  # ties on grid
        masks = ((images < 0.3) & (rng.random(images.shape) < 0.9)).astype(np.uint8)  # dark tumour
        masks[0] = 0
        grid = np.linspace(0, 1, 11).astype(np.float32)
        for polarity in baseline.POLARITIES:
            scores = baseline.polarity_scores(images, polarity)
            brute = [
                np.mean(
                    [
                        sk_metrics.f1_score(m.ravel(), s.ravel() >= t, zero_division=1.0)
                        for s, m in zip(scores, masks, strict=True)
                    ]
                )
                for t in grid
            ]
            np.testing.assert_allclose(
                baseline.mean_dice_per_threshold(scores, masks, grid, chunk_size=5), brute
            )
        rule = baseline.fit_intensity_threshold(images, masks, num_thresholds=11)
        self.assertEqual(rule.polarity, "dark")
        self.assertAlmostEqual(rule.evaluate(images, masks)["f1"], rule.train_f1, places=12)


if __name__ == "__main__":
    absltest.main()
