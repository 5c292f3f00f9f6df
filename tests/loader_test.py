"""Tests for data_pipeline.loader: in-memory arrays, shuffled training and ordered eval batches."""

import dataclasses
import itertools

import numpy as np
import skimage.transform
from absl.testing import absltest, parameterized

from data_pipeline import loader


@dataclasses.dataclass(frozen=True)
class FakeRecord:
    """Stands in for data_pipeline.index.SliceRecord: a slice of a given shape and seed."""

    patient_key: str
    seed: int
    shape: tuple[int, int]

    def load(self):
        rng = np.random.default_rng(self.seed)
        image = rng.normal(0.0, 500.0, size=self.shape).astype(np.float32)
        mask = np.zeros(self.shape, np.uint8)
        mask[: self.shape[0] // 2, : self.shape[1] // 3] = 1
        return image, mask


def numbered_source(num_examples: int, size: int = 4) -> dict[str, np.ndarray]:
    """An array source whose example i has every image pixel equal to i (and mask i % 2)."""
    ids = np.arange(num_examples)
    return {
        "image": np.broadcast_to(ids[:, None, None, None], (num_examples, size, size, 1)).astype(
            np.float32
        ),
        "mask": np.broadcast_to(ids[:, None, None, None] % 2, (num_examples, size, size, 1)).astype(
            np.uint8
        ),
        "patient_key": np.array([f"p{i}" for i in ids]),
    }


class ListSource:
    """A random-access source like a tfds data source: len() and [i] -> dict of one example."""

    def __init__(self, arrays):
        self._arrays = arrays

    def __len__(self):
        return len(self._arrays["image"])

    def __getitem__(self, index):
        return {
            "image": self._arrays["image"][index],
            "mask": self._arrays["mask"][index],
            "patient_key": self._arrays["patient_key"][index].encode(),
        }


def ids_of(batch) -> list[int]:
    return [int(value) for value in batch["image"][:, 0, 0, 0]]


class LoadArraysTest(absltest.TestCase):
    def test_shapes_dtypes_values(self):
        records = [
            FakeRecord("a", 0, (64, 64)),
            FakeRecord("a", 1, (30, 50)),
            FakeRecord("b", 2, (128, 100)),
        ]
        arrays = loader.load_arrays(records, image_size=16)
        self.assertEqual(arrays["image"].shape, (3, 16, 16, 1))
        self.assertEqual(arrays["image"].dtype, np.float32)
        self.assertEqual(arrays["mask"].shape, (3, 16, 16, 1))
        self.assertEqual(arrays["mask"].dtype, np.uint8)
        self.assertEqual(list(arrays["patient_key"]), ["a", "a", "b"])
        for i, record in enumerate(records):
            image, mask = record.load()
            resized = skimage.transform.resize(
                image.astype(np.float64),
                (16, 16),
                order=0,
                anti_aliasing=False,
                preserve_range=True,
            )
            expected = (resized - resized.min()) / (resized.max() - resized.min())
            np.testing.assert_allclose(arrays["image"][i, ..., 0], expected, atol=1e-6)
            expected_mask = skimage.transform.resize(
                mask, (16, 16), order=0, anti_aliasing=False, preserve_range=True
            )
            np.testing.assert_array_equal(arrays["mask"][i, ..., 0], expected_mask)

    def test_empty(self):
        arrays = loader.load_arrays([], image_size=8)
        self.assertEqual(arrays["image"].shape, (0, 8, 8, 1))
        self.assertEqual(arrays["mask"].shape, (0, 8, 8, 1))
        self.assertEqual(loader.num_examples(arrays), 0)


class TrainBatchesTest(parameterized.TestCase):
    def test_shapes_and_dtypes(self):
        batch = next(loader.train_batches(numbered_source(7, size=5), batch_size=3, seed=0))
        self.assertEqual(set(batch), {"image", "mask"})
        self.assertEqual(batch["image"].shape, (3, 5, 5, 1))
        self.assertEqual(batch["image"].dtype, np.float32)
        self.assertEqual(batch["mask"].shape, (3, 5, 5, 1))
        self.assertEqual(batch["mask"].dtype, np.uint8)

    def test_same_seed_same_stream(self):
        source = numbered_source(11)
        first = [ids_of(b) for b in itertools.islice(loader.train_batches(source, 4, seed=5), 12)]
        again = [ids_of(b) for b in itertools.islice(loader.train_batches(source, 4, seed=5), 12)]
        self.assertEqual(first, again)

    def test_different_seeds_differ(self):
        source = numbered_source(11)
        seed_0 = [ids_of(b) for b in itertools.islice(loader.train_batches(source, 4, seed=0), 6)]
        seed_1 = [ids_of(b) for b in itertools.islice(loader.train_batches(source, 4, seed=1), 6)]
        self.assertNotEqual(seed_0, seed_1)

    @parameterized.parameters((10, 5), (11, 4), (3, 5), (1, 1))
    def test_every_example_once_per_epoch_and_epochs_reshuffled(self, num_examples, batch_size):
        epochs = 4
        num_batches = -(-epochs * num_examples // batch_size)
        batches = list(
            itertools.islice(
                loader.train_batches(numbered_source(num_examples), batch_size, seed=3),
                num_batches,
            )
        )
        self.assertTrue(all(len(ids_of(b)) == batch_size for b in batches))
        stream = [i for b in batches for i in ids_of(b)]
        orders = [stream[e * num_examples : (e + 1) * num_examples] for e in range(epochs)]
        for order in orders:
            self.assertEqual(sorted(order), list(range(num_examples)))
        if num_examples >= 10:
            self.assertGreater(len({tuple(order) for order in orders}), 1)
            self.assertNotEqual(orders[0], list(range(num_examples)))

    def test_masks_travel_with_their_images(self):
        for batch in itertools.islice(loader.train_batches(numbered_source(9), 4, seed=2), 5):
            np.testing.assert_array_equal(batch["mask"][:, 0, 0, 0], np.array(ids_of(batch)) % 2)

    def test_random_access_source_gives_the_same_stream(self):
        arrays = numbered_source(9)
        from_arrays = itertools.islice(loader.train_batches(arrays, 4, seed=7), 5)
        from_source = itertools.islice(loader.train_batches(ListSource(arrays), 4, seed=7), 5)
        for expected, batch in zip(from_arrays, from_source, strict=True):
            np.testing.assert_array_equal(expected["image"], batch["image"])
            np.testing.assert_array_equal(expected["mask"], batch["mask"])
            self.assertEqual(batch["image"].dtype, np.float32)

    def test_resumes_from_state(self):
        source = numbered_source(13)
        iterator = loader.train_batches(source, 4, seed=9)
        for _ in range(3):
            next(iterator)
        state = iterator.get_state()
        expected = [ids_of(next(iterator)) for _ in range(4)]
        resumed = loader.train_batches(source, 4, seed=9)
        resumed.set_state(state)
        self.assertEqual([ids_of(next(resumed)) for _ in range(4)], expected)

    def test_without_threads(self):
        source = numbered_source(6)
        threaded = itertools.islice(loader.train_batches(source, 4, seed=1), 3)
        inline = itertools.islice(loader.train_batches(source, 4, seed=1, num_threads=0), 3)
        self.assertEqual([ids_of(b) for b in threaded], [ids_of(b) for b in inline])

    def test_empty_source_raises(self):
        with self.assertRaisesRegex(ValueError, "no training examples"):
            loader.train_batches(numbered_source(0), 2, seed=0)

    def test_bad_arrays_raise(self):
        source = numbered_source(4)
        source["mask"] = source["mask"][:3]
        with self.assertRaises(ValueError):
            loader.train_batches(source, 2, seed=0)
        with self.assertRaises(ValueError):
            loader.train_batches(numbered_source(4), 0, seed=0)


class EvalBatchesTest(parameterized.TestCase):
    @parameterized.parameters((10, 5), (11, 4), (3, 5), (1, 1))
    def test_one_ordered_pass(self, num_examples, batch_size):
        batches = list(loader.eval_batches(numbered_source(num_examples), batch_size))
        self.assertLen(batches, -(-num_examples // batch_size))
        self.assertEqual([i for b in batches for i in ids_of(b)], list(range(num_examples)))
        sizes = [len(b["image"]) for b in batches]
        self.assertTrue(all(size == batch_size for size in sizes[:-1]))
        self.assertEqual(sizes[-1], num_examples - batch_size * (len(batches) - 1))
        self.assertEqual(batches[-1]["mask"].dtype, np.uint8)

    def test_random_access_source(self):
        batches = list(loader.eval_batches(ListSource(numbered_source(7)), 3))
        self.assertEqual([ids_of(b) for b in batches], [[0, 1, 2], [3, 4, 5], [6]])

    def test_empty_source_gives_no_batches(self):
        self.assertEqual(list(loader.eval_batches(numbered_source(0), 4)), [])


if __name__ == "__main__":
    absltest.main()
