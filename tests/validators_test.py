"""Tests for the label-free validators (sarcoma_jax/adda/criteria: entropy, im, snd, dev,
consistency, source_val, soft_confusion) against hand-computed values and plain float64 loops."""

import math

import numpy as np
from absl.testing import absltest
from criteria_test import row, run

from sarcoma_jax.adda.criteria import (
    consistency,
    dev,
    entropy,
    im,
    snd,
    soft_confusion,
    source_val,
)
from sarcoma_jax.adda.segmentation import SegmentationTask
from sarcoma_jax.digits.task import DigitsTask


class StubProbe:
    """What a validator sees, without a model: `outputs_on` is a fixed function of the images."""

    def __init__(self, task, images, outputs_on, source_val=None, features=None, seed=0):
        self.task = task
        self.target_val_images = images
        self.target_val_outputs = outputs_on(images)
        self.outputs_on = outputs_on
        self.source_val = source_val
        self.target_val_features = features
        self.seed = seed

    @property
    def target_val_probabilities(self):
        return self.task.unit_probabilities(self.target_val_outputs)


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


class EntropyAndImTest(absltest.TestCase):
    def test_hand_computed_on_two_pixels(self):
        # One image of two pixels with p = 0.5 and p = 0.9.
        outputs = np.array([_logit(0.5), _logit(0.9)], np.float32).reshape(1, 1, 2, 1)
        probe = StubProbe(SegmentationTask(), np.zeros((1, 1, 2, 1)), lambda images: outputs)
        h = [math.log(2), -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))]
        measured = entropy.Entropy().measure(probe)["entropy"]
        self.assertAlmostEqual(measured, (h[0] + h[1]) / 2, places=6)
        mean_p = 0.7  # H of the mean prediction minus the mean H
        diversity = -(mean_p * math.log(mean_p) + (1 - mean_p) * math.log(1 - mean_p))
        self.assertAlmostEqual(
            im.InformationMaximisation().measure(probe)["im"], diversity - measured, places=6
        )

    def test_im_prefers_confident_and_diverse_to_collapsed(self):
        confident = np.array([20.0, -20.0], np.float32).reshape(1, 1, 2, 1)
        collapsed = np.array([-20.0, -20.0], np.float32).reshape(1, 1, 2, 1)
        scores = [
            im.InformationMaximisation().measure(
                StubProbe(SegmentationTask(), np.zeros((1, 1, 2, 1)), lambda _, o=o: o)
            )["im"]
            for o in (confident, collapsed)
        ]
        self.assertAlmostEqual(scores[0], math.log(2), places=6)
        self.assertAlmostEqual(scores[1], 0.0, places=6)

    def test_digits_units_are_images(self):
        outputs = np.log(np.array([[0.7, 0.2, 0.1] + [1e-300] * 7]))  # one image, 10 classes
        probe = StubProbe(DigitsTask(), np.zeros((1, 28, 28, 1)), lambda images: outputs)
        expected = -sum(p * math.log(p) for p in (0.7, 0.2, 0.1))
        self.assertAlmostEqual(entropy.Entropy().measure(probe)["entropy"], expected, places=6)


class SndTest(absltest.TestCase):
    def test_matches_a_plain_loop(self):
        rng = np.random.default_rng(0)
        features = rng.normal(size=(12, 4))
        tau = 0.05
        normalised = [f / math.sqrt(sum(x * x for x in f)) for f in features]
        entropies = []
        for i, fi in enumerate(normalised):
            logits = [sum(a * b for a, b in zip(fi, fj, strict=True)) / tau for fj in normalised]
            others = [logits[j] for j in range(len(normalised)) if j != i]
            top = max(others)
            weights = [math.exp(v - top) for v in others]
            total = sum(weights)
            entropies.append(-sum(w / total * math.log(w / total) for w in weights))
        # Computed in float32: within 1e-5 of the float64 loop.
        self.assertAlmostEqual(
            snd.soft_neighbourhood_density(features, tau), sum(entropies) / len(entropies), 5
        )

    def test_samples_the_same_units_every_evaluation(self):
        features = np.random.default_rng(1).normal(size=(3, 20, 20, 4))  # 1200 pixel vectors
        validator = snd.SoftNeighbourhoodDensity(num_samples=64)
        probe = StubProbe(SegmentationTask(), np.zeros((3, 20, 20, 1)), lambda i: i, None, features)
        self.assertEqual(validator.measure(probe), validator.measure(probe))


class DevTest(absltest.TestCase):
    def test_hand_computed(self):
        losses = np.array([1.0, 2.0, 4.0])
        d = np.array([0.5, 0.75, 0.2])  # P(target | x): ratios 1, 3, 0.25 (n_s = n_t)
        weights = np.array([1.0, 3.0, 0.25])
        weighted = weights * losses  # 1, 6, 1
        covariance = np.sum((weighted - weighted.mean()) * (weights - weights.mean())) / 2
        variance = np.sum((weights - weights.mean()) ** 2) / 2
        eta = -covariance / variance
        expected = weighted.mean() + eta * weights.mean() - eta
        self.assertAlmostEqual(dev.deep_embedded_validation(losses, d, 3, 3), expected, places=12)

    def test_equal_domains_give_the_source_loss(self):
        # d = 1/2 and n_s = n_t: every weight is 1, Var(w) = 0, and DEV is the mean source loss.
        losses = np.array([0.5, 1.5, 2.5])
        self.assertAlmostEqual(dev.deep_embedded_validation(losses, [0.5] * 3, 3, 3), 1.5)

    def test_domain_classifier_sees_held_out_examples_only(self):
        rng = np.random.default_rng(2)
        source = rng.normal(0.0, 1.0, (20, 3))
        target = rng.normal(3.0, 1.0, (20, 3))  # well separated
        d = dev.target_probabilities(source, target, seed=0)
        self.assertEqual(d.shape, (20,))
        self.assertLess(float(np.mean(d)), 0.2)  # source examples look like source


class ConsistencyTest(absltest.TestCase):
    def test_equivariant_map_is_fully_consistent_and_a_biased_one_is_not(self):
        rng = np.random.default_rng(3)
        images = rng.uniform(-0.5, 0.5, size=(9, 8, 8, 1)).astype(np.float32)
        task = SegmentationTask()
        # Pixelwise, and the sign of a pixel survives scaling: flips and intensity changes keep
        # its predictions.
        equivariant = StubProbe(task, images, lambda x: 3.0 * x)
        self.assertEqual(consistency.Consistency().measure(equivariant)["consistency"], 1.0)

        def leftward(x):  # depends on the column: a flip changes what it predicts
            return x - np.linspace(0.0, 1.0, x.shape[2]).reshape(1, 1, -1, 1)

        biased = consistency.Consistency().measure(StubProbe(task, images, leftward))
        self.assertLess(biased["consistency"], 1.0)
        # Only the intensity transforms for digits (a mirrored digit is another digit).
        digits_probe = StubProbe(DigitsTask(), images, lambda x: x.reshape(len(x), -1)[:, :10])
        self.assertIn("consistency", consistency.Consistency().measure(digits_probe))


    def test_every_third_image_one_transform_each_by_hand(self):
        # 7 images, 3 transforms: images 0, 3, 6 are used; 0 gets intensity x0.9, 3 gets x1.1,
        # 6 the flip. The map predicts tumour where x >= its column's threshold (0.05, 0.05,
        # 0.05, 0.35): scaling moves pixels across 0.05, and the last column's higher threshold
        # makes the flip matter.
        thresholds = np.array([0.05, 0.05, 0.05, 0.35], np.float32).reshape(1, 1, 4, 1)
        images = np.zeros((7, 1, 4, 1), np.float32)
        images[0, 0, :, 0] = [0.052, 0.3, 0.0, 0.0]  # x0.9: 0.0468 drops out; Dice(2, 1) = 2/3
        images[3, 0, :, 0] = [0.048, 0.0, 0.0, 0.0]  # x1.1: 0.0528 comes in; Dice(0, 1) = 0
        images[6, 0, :, 0] = [0.3, 0.3, 0.3, 0.0]  # 1110; flipped 0111 -> 0110 -> back 0110: 4/5
        images[[1, 2, 4, 5]] = 1.0  # never used
        probe = StubProbe(SegmentationTask(), images, lambda x: x - thresholds)
        measured = consistency.Consistency().measure(probe)["consistency"]
        self.assertAlmostEqual(measured, (2 / 3 + 0.0 + 4 / 5) / 3, places=12)

class SourceValTest(absltest.TestCase):
    def test_is_the_task_metric_on_source_val(self):
        masks = np.zeros((2, 4, 4, 1), np.uint8)
        masks[0, :2] = 1
        probe = StubProbe(SegmentationTask(), np.zeros((2, 4, 4, 1)), lambda x: x)
        probe.source_val = {"image": np.zeros((2, 4, 4, 1), np.float32), "mask": masks}
        probe.source_val_outputs = np.where(masks > 0, 5.0, -5.0).astype(np.float32)
        self.assertEqual(source_val.SourceVal().measure(probe)["source_val"], 1.0)


class SegmentationLossTest(absltest.TestCase):
    def test_per_image_loss_is_the_summed_pixel_bce(self):
        logits = np.array([[2.0, -1.0], [0.5, 8.0]], np.float32).reshape(2, 1, 2, 1)
        masks = np.array([[1, 0], [0, 0]], np.uint8).reshape(2, 1, 2, 1)
        expected = []
        for image_logits, image_masks in zip(
            logits.reshape(2, 2), masks.reshape(2, 2), strict=True
        ):
            total = 0.0
            for x, y in zip(image_logits, image_masks, strict=True):
                p = 1 / (1 + math.exp(-float(x)))
                total += -(y * math.log(p) + (1 - y) * math.log1p(-p))
            expected.append(total)
        got = SegmentationTask().per_image_loss(logits, {"mask": masks})
        np.testing.assert_allclose(got, expected, rtol=1e-9)


class SoftConfusionTest(absltest.TestCase):
    def test_window_of_soft_recall_and_specificity(self):
        criterion = soft_confusion.SoftConfusionStop(window_size=2, delay=0)
        rows = [
            row(0, before_da=True),
            row(1, soft_recall=0.9, soft_specificity=0.2, recall=1.0, specificity=0.0),
            row(2, soft_recall=0.6, soft_specificity=0.5, recall=1.0, specificity=1.0),
        ]
        _, flags, scores = run(criterion, rows)
        # 1 - mean(|0.9 - .5| + |0.2 - .5|, |0.6 - .5| + |0.5 - .5|) = 1 - (0.7 + 0.1) / 2
        self.assertAlmostEqual(scores[2], 0.6, places=6)
        self.assertEqual(flags, [False, False, True])


if __name__ == "__main__":
    absltest.main()
