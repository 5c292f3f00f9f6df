"""Tests for 2.5D context (data_pipeline.context, load_arrays / load_splits with context_slices)."""

import dataclasses
import pathlib
import shutil
import tempfile
import zlib

import numpy as np
from absl.testing import absltest

from data_pipeline import context, index_writer, loader, preprocess
from data_pipeline import index as index_lib
from sarcoma_jax import input_pipeline


@dataclasses.dataclass(frozen=True)
class FakeRecord:
    """Stands in for a SliceRecord: slice `slice_index` of a series, a distinct random image."""

    patient_key: str
    series_key: str
    slice_index: int

    def load(self):
        seed = zlib.crc32(f"{self.series_key}/{self.slice_index}".encode())
        image = np.random.default_rng(seed).normal(0.0, 100.0, (12, 10)).astype(np.float32)
        mask = np.zeros((12, 10), np.uint8)
        mask[2 : 4 + self.slice_index, 3:6] = 1
        return image, mask


class FakeIndex:
    def __init__(self, records):
        self.records = records
        self.queried_patients = []

    def query(self, *, patients):
        self.queried_patients.append(list(patients))
        return [record for record in self.records if record.patient_key in patients]


def _series(patient: str, series_key: str, count: int) -> list[FakeRecord]:
    return [FakeRecord(patient, series_key, i) for i in range(count)]


class NeighboursTest(absltest.TestCase):
    def setUp(self):
        super().setUp()
        self.records = _series("a", "a_ct", 5) + _series("a", "a_pt", 3) + _series("b", "b_ct", 4)
        # Shuffled, as the series' slices could come in any order.
        order = np.random.default_rng(0).permutation(len(self.records))
        self.index = FakeIndex([self.records[i] for i in order])

    def test_series_slices_holds_every_slice_of_the_records_series_in_order(self):
        wanted = [self.records[2], self.records[9]]  # a_ct #2, b_ct #1
        series = context.series_slices(self.index, wanted)
        self.assertEqual(sorted(series), ["a_ct", "b_ct"])
        self.assertEqual([r.slice_index for r in series["a_ct"]], [0, 1, 2, 3, 4])
        self.assertEqual([r.slice_index for r in series["b_ct"]], [0, 1, 2, 3])
        self.assertEqual(self.index.queried_patients, [["a", "b"]])

    def test_neighbours_repeat_the_edge_slices(self):
        series = context.series_slices(self.index, self.records)
        a_ct = series["a_ct"]

        def indices(record, k):
            return [r.slice_index for r in context.neighbours(record, series, k)]

        self.assertEqual(indices(a_ct[0], 2), [0, 0, 0, 1, 2])
        self.assertEqual(indices(a_ct[2], 2), [0, 1, 2, 3, 4])
        self.assertEqual(indices(a_ct[4], 1), [3, 4, 4])
        self.assertEqual(indices(a_ct[3], 0), [3])
        self.assertEqual(indices(series["a_pt"][1], 3), [0, 0, 0, 1, 2, 2, 2])
        for neighbour in context.neighbours(a_ct[1], series, 2):
            self.assertEqual(neighbour.series_key, "a_ct")

    def test_a_record_outside_its_series_is_an_error(self):
        series = context.series_slices(self.index, self.records[:5])
        with self.assertRaisesRegex(ValueError, "slice 7 of series 'a_ct'"):
            context.neighbours(FakeRecord("a", "a_ct", 7), series, 1)

    def test_centre_channel(self):
        images = np.arange(2 * 3 * 3 * 5).reshape(2, 3, 3, 5)
        np.testing.assert_array_equal(context.centre_channel(images), images[..., 2:3])
        single = images[..., :1]
        np.testing.assert_array_equal(context.centre_channel(single), single)


class LoadArraysWithContextTest(absltest.TestCase):
    def test_each_channel_is_the_neighbour_preprocessed_alone(self):
        records = _series("a", "a_ct", 4) + _series("b", "b_ct", 2)
        series = context.series_slices(FakeIndex(records), records)
        wanted = [records[0], records[2], records[5]]
        arrays = loader.load_arrays(wanted, image_size=8, context_slices=2, series=series)
        self.assertEqual(arrays["image"].shape, (3, 8, 8, 5))
        self.assertEqual(arrays["mask"].shape, (3, 8, 8, 1))
        self.assertEqual(list(arrays["patient_key"]), ["a", "a", "b"])
        alone = loader.load_arrays(records, image_size=8)  # one slice in, the reference path
        position = {(r.series_key, r.slice_index): i for i, r in enumerate(records)}
        for i, record in enumerate(wanted):
            for channel, neighbour in enumerate(context.neighbours(record, series, 2)):
                np.testing.assert_array_equal(
                    arrays["image"][i, ..., channel],
                    alone["image"][position[(neighbour.series_key, neighbour.slice_index)], ..., 0],
                )
            # The mask and the middle channel are the slice's own.
            own = position[(record.series_key, record.slice_index)]
            np.testing.assert_array_equal(arrays["mask"][i], alone["mask"][own])
            np.testing.assert_array_equal(
                context.centre_channel(arrays["image"][i]), alone["image"][own]
            )
        # Slice 0 of a_ct: channels 0, 1 and 2 are all slice 0 (the edge repeated).
        np.testing.assert_array_equal(arrays["image"][0, ..., 0], arrays["image"][0, ..., 2])

    def test_context_needs_the_series(self):
        with self.assertRaisesRegex(ValueError, "needs the records' series"):
            loader.load_arrays(_series("a", "a_ct", 2), image_size=8, context_slices=1)


class IndexContextTest(absltest.TestCase):
    """With a real index: neighbours come from every slice of the series, tumour or not."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = pathlib.Path(tempfile.mkdtemp(prefix="context_test_"))
        cls.addClassCleanup(shutil.rmtree, cls.tmp, ignore_errors=True)
        cls.images = {}
        with index_writer.IndexWriter(cls.tmp / "index", split_scheme="patient", seed=0) as writer:
            for patient in range(4):
                patient_key = f"P{patient}"
                series_key = f"{patient_key}_CT"
                writer.add_patient(patient_key)
                writer.add_series(
                    series_key=series_key,
                    patient_key=patient_key,
                    study_uid=f"1.{patient}",
                    series_uid=f"1.{patient}.1",
                    modality="CT",
                    sequence=None,
                    description="CT",
                    frame_of_reference_uid=f"1.{patient}.0",
                    rows=8,
                    cols=8,
                    pixel_spacing=(1.0, 1.0),
                    slice_spacing=2.0,
                    orientation=(1, 0, 0, 0, 1, 0),
                    n_slices=5,
                    units="HU",
                )
                for slice_index in range(5):
                    # Constant images 100 * slice + 10 * patient over a ramp, tumour in slices 1-3.
                    image = np.add.outer(np.arange(8.0), np.arange(8.0)) * (slice_index + 1)
                    image = image.astype(np.float32) + 100 * slice_index + 10 * patient
                    mask = np.zeros((8, 8), np.uint8)
                    if 1 <= slice_index <= 3:
                        mask[2:5, 2:5] = 1
                    cls.images[(series_key, slice_index)] = (image, mask)
                    writer.add_slice(
                        series_key=series_key,
                        slice_index=slice_index,
                        position_mm=2.0 * slice_index,
                        sop_instance_uid=None,
                        image=image,
                        mask=mask,
                    )
        cls.index = index_lib.Index(cls.tmp / "index")

    def test_load_splits_with_context(self):
        records = input_pipeline.query_splits(self.index, "CT")  # tumour slices 1-3
        splits = input_pipeline.load_splits(records, 8, context_slices=1, index=self.index)
        for split, split_records in records.items():
            arrays = splits[split]
            self.assertEqual(arrays["image"].shape, (len(split_records), 8, 8, 3))
            for i, record in enumerate(split_records):
                self.assertIn(record.slice_index, (1, 2, 3))
                for channel, offset in enumerate((-1, 0, 1)):
                    image, _ = self.images[(record.series_key, record.slice_index + offset)]
                    expected, _ = preprocess.preprocess(image, image, image_size=8)
                    np.testing.assert_array_equal(
                        arrays["image"][i, ..., channel], expected[..., 0]
                    )
                _, mask = self.images[(record.series_key, record.slice_index)]
                np.testing.assert_array_equal(arrays["mask"][i, ..., 0], mask)
        # Without context: one channel, equal to the middle one.
        plain = input_pipeline.load_splits(records, 8)
        np.testing.assert_array_equal(
            plain["train"]["image"], context.centre_channel(splits["train"]["image"])
        )

    def test_bad_context_slices_is_a_config_error(self):
        data_config = {"source": "phantom", "modality": "CT", "image_size": 32}
        for bad in (-1, 1.5, True):
            with self.assertRaisesRegex(
                input_pipeline.ConfigError, "config.data.context_slices must be an integer >= 0"
            ):
                input_pipeline.validate_data_config({**data_config, "context_slices": bad})
        input_pipeline.validate_data_config({**data_config, "context_slices": 2})


if __name__ == "__main__":
    absltest.main()
