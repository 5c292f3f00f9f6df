"""Tests of the split schemes (data_pipeline/splits.py) and of the splits stored in an index."""

import collections
import hashlib
import tempfile

import numpy as np
from absl.testing import absltest, parameterized

from data_pipeline import index as index_lib
from data_pipeline import index_writer, splits, vocabulary


def reference_rank(patient_keys, seed):
    """The contract's ranking, written out independently: ascending sha256 hex digest."""
    return sorted(
        patient_keys, key=lambda key: hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()
    )


def patient_keys(count):
    return [f"STS_{number:03d}" for number in range(1, count + 1)]


class SplitFunctionsTest(parameterized.TestCase):
    @parameterized.parameters(
        # n, max(1, round-half-up(0.15 n)) worked by hand; fewer than 3 patients hold out none.
        (1, 0),
        (2, 0),
        (3, 1),
        (6, 1),
        (7, 1),
        (10, 2),
        (13, 2),
        (20, 3),
        (30, 5),
        (51, 8),
    )
    def test_num_holdout_patients(self, num_patients, expected):
        self.assertEqual(splits.num_holdout_patients(num_patients), expected)

    @parameterized.parameters((1, 0), (2, 1), (13, 6), (14, 7), (49, 7), (51, 7))
    def test_num_thesis_withheld(self, num_patients, expected):
        self.assertEqual(splits.num_thesis_withheld(num_patients), expected)

    @parameterized.parameters(0, 1, 123)
    def test_rank_matches_reference(self, seed):
        keys = patient_keys(20)
        self.assertEqual(splits.rank_patients(keys, seed), reference_rank(keys, seed))
        self.assertNotEqual(splits.rank_patients(keys, seed), splits.rank_patients(keys, seed + 1))

    @parameterized.parameters(3, 13, 51)
    def test_patient_scheme(self, num_patients):
        keys = patient_keys(num_patients)
        assigned = splits.patient_scheme_splits(reversed(keys), seed=5)
        ranked = reference_rank(keys, 5)
        num_holdout = splits.num_holdout_patients(num_patients)
        self.assertEqual(sorted(assigned), sorted(keys))
        self.assertEqual(
            {key for key in keys if assigned[key] == "test"}, set(ranked[:num_holdout])
        )
        self.assertEqual(
            {key for key in keys if assigned[key] == "val"},
            set(ranked[num_holdout : 2 * num_holdout]),
        )
        self.assertEqual(
            collections.Counter(assigned.values())["train"], num_patients - 2 * num_holdout
        )

    def test_thesis_scheme_slices(self):
        keys = patient_keys(20)
        withheld = set(reference_rank(keys, 2)[:7])
        positions = np.arange(-40.0, 40.0, 1.5)
        slices = [(key, position) for key in keys for position in positions]
        assigned = splits.assign_slice_splits("thesis", 2, keys, slices)
        per_patient = collections.defaultdict(collections.Counter)
        for (key, _), split in zip(slices, assigned, strict=True):
            per_patient[key][split] += 1
        self.assertEqual({key for key in keys if per_patient[key]["train"] == 0}, withheld)
        for key in keys:
            if key in withheld:
                # 54 slices each: all on one side would have probability 2^-53.
                self.assertEqual(set(per_patient[key]), {"val", "test"}, key)
            else:
                self.assertEqual(set(per_patient[key]), {"train"}, key)

    def test_withheld_slice_split_uses_position_rounded_to_a_tenth_mm(self):
        for position in np.linspace(-50.0, 50.0, 41):
            split = splits.withheld_slice_split("STS_001", position, seed=0)
            self.assertIn(split, ("val", "test"))
            self.assertEqual(splits.withheld_slice_split("STS_001", position + 0.0301, 0), split)
            self.assertEqual(splits.withheld_slice_split("STS_001", position - 0.0301, 0), split)
        self.assertEqual(splits.position_key(-0.04), "0.0")
        self.assertEqual(splits.position_key(12.349), "12.3")
        # The hash of the text the contract names, computed independently.
        digest = hashlib.sha256(b"4:STS_007:-12.5").digest()
        self.assertEqual(
            splits.withheld_slice_split("STS_007", -12.5, seed=4),
            "val" if digest[0] % 2 == 0 else "test",
        )

    def test_bad_input(self):
        with self.assertRaisesRegex(ValueError, "scheme"):
            splits.assign_slice_splits("random", 0, ["A"], [("A", 0.0)])
        with self.assertRaisesRegex(ValueError, "never added"):
            splits.assign_slice_splits("patient", 0, ["A"], [("B", 0.0)])


def write_split_index(out_dir, keys, scheme, seed, reverse=False):
    """An index in which every patient has a CT and a PT series on the same slice positions
    (the PT ones off by a few hundredths of a mm) and an MR T2 series on other positions."""
    rng = np.random.default_rng(0)
    order = list(reversed(keys)) if reverse else list(keys)
    with index_writer.IndexWriter(out_dir, split_scheme=scheme, seed=seed) as writer:
        for key in order:
            writer.add_patient(key, age=50, site="thigh")
            for modality, sequence, positions in (
                ("CT", None, np.arange(8) * 3.0),
                ("PT", None, np.arange(8) * 3.0 + 0.02),
                ("MR", "T2", np.arange(5) * 4.1 + 100.0),
            ):
                series_key = f"{key}_{sequence or modality}"
                writer.add_series(
                    series_key=series_key,
                    patient_key=key,
                    study_uid="1",
                    series_uid=series_key,
                    modality=modality,
                    sequence=sequence,
                    description="",
                    frame_of_reference_uid="2",
                    rows=4,
                    cols=4,
                    pixel_spacing=(1, 1),
                    slice_spacing=3.0,
                    orientation=(1, 0, 0, 0, 1, 0),
                    n_slices=len(positions),
                    units="",
                )
                for slice_index, position in enumerate(positions):
                    writer.add_slice(
                        series_key=series_key,
                        slice_index=slice_index,
                        position_mm=position,
                        sop_instance_uid=None,
                        image=rng.random((4, 4)),
                        mask=rng.random((4, 4)) < 0.5,
                    )


class StoredSplitsTest(parameterized.TestCase):
    def make_index(self, keys, scheme, seed, reverse=False):
        temp_dir = tempfile.TemporaryDirectory()
        self.addCleanup(temp_dir.cleanup)
        write_split_index(temp_dir.name, keys, scheme, seed, reverse)
        return index_lib.Index(temp_dir.name)

    def split_of_each_slice(self, index):
        return {(r.series_key, r.slice_index): r.split for r in index.query()}

    @parameterized.parameters("patient", "thesis")
    def test_stable_across_writers_insertion_order_and_queries(self, scheme):
        keys = patient_keys(15)
        first = self.make_index(keys, scheme, seed=7)
        second = self.make_index(keys, scheme, seed=7, reverse=True)
        stored = self.split_of_each_slice(first)
        self.assertEqual(stored, self.split_of_each_slice(second))
        for filters in (
            {"modality": "CT"},
            {"has_tumor": True},
            {"site": "THIGH"},
            {"patients": keys[:4]},
            {"split": "val"},
            {"age": (40, 60)},
        ):
            for record in first.query(**filters):
                self.assertEqual(record.split, stored[(record.series_key, record.slice_index)])
        self.assertNotEqual(stored, self.split_of_each_slice(self.make_index(keys, scheme, 8)))

    def test_patient_scheme_in_index_is_disjoint(self):
        keys = patient_keys(13)
        index = self.make_index(keys, "patient", seed=1)
        patients_per_split = {
            split: {record.patient_key for record in index.query(split=split)}
            for split in vocabulary.SPLITS
        }
        ranked = reference_rank(keys, 1)
        self.assertEqual(patients_per_split["test"], set(ranked[:2]))
        self.assertEqual(patients_per_split["val"], set(ranked[2:4]))
        self.assertEqual(patients_per_split["train"], set(ranked[4:]))
        for patient in index.patients():
            self.assertLen(patient["splits"], 1)

    @parameterized.parameters((4, 2), (13, 6), (15, 7))
    def test_thesis_scheme_in_index(self, num_patients, num_withheld):
        keys = patient_keys(num_patients)
        index = self.make_index(keys, "thesis", seed=3)
        withheld = set(reference_rank(keys, 3)[:num_withheld])
        self.assertEqual({r.patient_key for r in index.query(split=["val", "test"])}, withheld)
        self.assertEqual({r.patient_key for r in index.query(split="train")}, set(keys) - withheld)
        self.assertNotEqual(index.query(split="val"), [])
        self.assertNotEqual(index.query(split="test"), [])
        ct_split = {(r.patient_key, r.slice_index): r.split for r in index.query(modality="CT")}
        pt_split = {(r.patient_key, r.slice_index): r.split for r in index.query(modality="PT")}
        self.assertEqual(ct_split, pt_split)  # Co-registered slices share their split.
        self.assertEqual(index.meta()["split_scheme"], "thesis")


if __name__ == "__main__":
    absltest.main()
