"""Tests of IndexWriter, Index (data_pipeline/index.py) and read_clinical on synthetic data."""

import os
import pathlib
import sqlite3
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pandas as pd
from absl.testing import absltest, parameterized

from data_pipeline import clinical, index_writer, slice_store
from data_pipeline import index as index_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
ROWS, COLS = 6, 5
# (patient_key, age, sex, site); STS_004 has no clinical data.
PATIENTS = (
    ("STS_001", 40, "M", "Thigh"),
    ("STS_002", 70, "F", "thigh"),
    ("STS_003", 39.5, "F", "Arm"),
    ("STS_004", None, None, None),
)
# (suffix, modality, sequence) of each patient's series.
SERIES_KINDS = (("CT", "CT", None), ("PT", "PT", None), ("T1", "MR", "T1"), ("T2", "MR", "T2"))
SLICES_PER_SERIES = 3


def synthetic_content(seed: int) -> dict:
    """{(series_key): dict(patient, modality, sequence, images, masks, positions)}, random."""
    rng = np.random.default_rng(seed)
    content = {}
    for patient_key, *_ in PATIENTS:
        for suffix, modality, sequence in SERIES_KINDS:
            images = rng.normal(0.0, 100.0, (SLICES_PER_SERIES, ROWS, COLS)).astype(np.float32)
            masks = rng.random((SLICES_PER_SERIES, ROWS, COLS)) < 0.2
            masks[0] = False  # Every series has a slice without tumour.
            content[f"{patient_key}_{suffix}"] = dict(
                patient_key=patient_key,
                modality=modality,
                sequence=sequence,
                images=images,
                masks=masks,
                positions=np.arange(SLICES_PER_SERIES) * 2.5 - 10.0,
            )
    return content


def write_index(out_dir, content: dict, reverse: bool = False, **writer_kwargs) -> None:
    """Writes `content` with IndexWriter; reverse=True adds everything in the opposite order."""
    order = list(reversed(content)) if reverse else list(content)
    patients = list(reversed(PATIENTS)) if reverse else PATIENTS
    writer = index_writer.IndexWriter(out_dir, provenance={"test": "index_test"}, **writer_kwargs)
    with writer:
        for patient_key, age, sex, site in patients:
            writer.add_patient(patient_key, age=age, sex=sex, site=site)
        for series_key in order:
            series = content[series_key]
            writer.add_series(
                series_key=series_key,
                patient_key=series["patient_key"],
                study_uid="1.2.3",
                series_uid=f"1.2.3.{len(series_key)}",
                modality=series["modality"],
                sequence=series["sequence"],
                description=f"{series_key} description",
                frame_of_reference_uid="1.2.3.9",
                rows=ROWS,
                cols=COLS,
                pixel_spacing=(0.8, 0.9),
                slice_spacing=2.5,
                orientation=(1, 0, 0, 0, 1, 0),
                n_slices=SLICES_PER_SERIES,
                units="HU",
            )
            writer.add_roi(
                series_key=series_key,
                roi_name="GTV_Mass",
                rtstruct_file_rel=f"{series_key}/rt.dcm",
                linked_by="geometry",
            )
            slice_order = range(SLICES_PER_SERIES)
            for slice_index in reversed(slice_order) if reverse else slice_order:
                writer.add_slice(
                    series_key=series_key,
                    slice_index=slice_index,
                    position_mm=series["positions"][slice_index],
                    sop_instance_uid=f"1.2.3.{slice_index}",
                    image=series["images"][slice_index],
                    mask=series["masks"][slice_index],
                )
        for path, message in (("b.dcm", "not DICOM"), ("a.dcm", "truncated")):
            writer.add_warning(path, message)


def make_temp_dir(test_case: absltest.TestCase) -> str:
    """A temporary folder removed after the test (absltest's create_tempdir needs parsed flags)."""
    temp_dir = tempfile.TemporaryDirectory()
    test_case.addCleanup(temp_dir.cleanup)
    return temp_dir.name


def write_text(folder: str, name: str, text: str) -> str:
    path = os.path.join(folder, name)
    with open(path, "w") as text_file:
        text_file.write(text)
    return path


def expected_keys(content: dict, keep) -> list[tuple[str, int]]:
    """(series_key, slice_index) of slices for which keep(series, patient_row, mask) holds,
    sorted by patient, series, slice: the order Index.query promises."""
    patient_rows = {row[0]: row for row in PATIENTS}
    keys = []
    for series_key, series in content.items():
        for slice_index in range(SLICES_PER_SERIES):
            if keep(series, patient_rows[series["patient_key"]], series["masks"][slice_index]):
                keys.append((series["patient_key"], series_key, slice_index))
    return [(series_key, slice_index) for _, series_key, slice_index in sorted(keys)]


class IndexQueryTest(parameterized.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.content = synthetic_content(seed=0)
        cls.temp_dir = tempfile.TemporaryDirectory()
        cls.out_dir = cls.temp_dir.name
        write_index(cls.out_dir, cls.content, seed=3)
        cls.index = index_lib.Index(cls.out_dir)

    @classmethod
    def tearDownClass(cls):
        cls.temp_dir.cleanup()
        super().tearDownClass()

    def keys(self, records):
        return [(record.series_key, record.slice_index) for record in records]

    def test_round_trip_of_images_masks_and_tumour_counts(self):
        records = self.index.query()
        self.assertLen(records, len(self.content) * SLICES_PER_SERIES)
        for record in records:
            series = self.content[record.series_key]
            image, mask = record.load()
            self.assertEqual(image.dtype, np.float32)
            self.assertEqual(mask.dtype, np.uint8)
            np.testing.assert_array_equal(image, series["images"][record.slice_index])
            np.testing.assert_array_equal(mask, series["masks"][record.slice_index])
            expected_pixels = int(series["masks"][record.slice_index].sum())
            self.assertEqual(record.tumor_pixels, expected_pixels)
            self.assertEqual(record.has_tumor, expected_pixels > 0)
            self.assertEqual(record.position_mm, series["positions"][record.slice_index])
            self.assertEqual(record.patient_key, series["patient_key"])
            self.assertTrue(os.path.isabs(record.path))

    @parameterized.named_parameters(
        ("all", {}, lambda s, p, m: True),
        ("ct", {"modality": "CT"}, lambda s, p, m: s["modality"] == "CT"),
        ("pet_alias", {"modality": "PET"}, lambda s, p, m: s["modality"] == "PT"),
        ("mr", {"modality": "MR"}, lambda s, p, m: s["modality"] == "MR"),
        ("t2_domain", {"modality": "t2"}, lambda s, p, m: s["sequence"] == "T2"),
        (
            "ct_or_t1",
            {"modality": ["CT", "T1"]},
            lambda s, p, m: s["modality"] == "CT" or s["sequence"] == "T1",
        ),
        ("sequence", {"sequence": "T1"}, lambda s, p, m: s["sequence"] == "T1"),
        ("tumour", {"has_tumor": True}, lambda s, p, m: m.any()),
        ("no_tumour", {"has_tumor": False}, lambda s, p, m: not m.any()),
        ("site_any_case", {"site": "THIGH"}, lambda s, p, m: p[3] in ("Thigh", "thigh")),
        ("age_inclusive", {"age": (40, 70)}, lambda s, p, m: p[1] is not None and 40 <= p[1] <= 70),
        ("age_open_low", {"age": (None, 40)}, lambda s, p, m: p[1] is not None and p[1] <= 40),
        (
            "patients",
            {"patients": ["STS_003", "STS_001"]},
            lambda s, p, m: p[0] in ("STS_001", "STS_003"),
        ),
        (
            "combined",
            {"modality": "PT", "site": "thigh", "age": (41, None), "has_tumor": True},
            lambda s, p, m: s["modality"] == "PT" and p[0] == "STS_002" and m.any(),
        ),
    )
    def test_query_filters(self, filters, keep):
        self.assertEqual(self.keys(self.index.query(**filters)), expected_keys(self.content, keep))

    @parameterized.named_parameters(
        ("no_patients", {"patients": []}),
        ("unknown_patient", {"patients": ["STS_999"]}),
        ("site", {"site": "shoulder"}),
        ("age", {"age": (80, 90)}),
        ("injection_is_a_value", {"site": "x' OR '1'='1"}),
        ("ct_with_sequence", {"modality": "CT", "sequence": "T2"}),
    )
    def test_query_that_matches_nothing_returns_empty_list(self, filters):
        self.assertEqual(self.index.query(**filters), [])

    @parameterized.named_parameters(
        ("modality", {"modality": "XR"}),
        ("split", {"split": "training"}),
        ("age", {"age": 40}),
    )
    def test_bad_filter_raises_value_error(self, filters):
        with self.assertRaises(ValueError):
            self.index.query(**filters)

    def test_splits_partition_the_slices(self):
        by_split = {
            split: self.keys(self.index.query(split=split)) for split in ("train", "val", "test")
        }
        all_keys = self.keys(self.index.query())
        self.assertCountEqual(sum(by_split.values(), []), all_keys)
        for split, keys in by_split.items():
            self.assertTrue(
                all(record.split == split for record in self.index.query(split=split)), split
            )
            self.assertLen(set(keys), len(keys))

    def test_tables_and_summary(self):
        patients = {row["patient_key"]: row for row in self.index.patients()}
        self.assertEqual(sorted(patients), [row[0] for row in PATIENTS])
        self.assertEqual(patients["STS_003"]["age"], 39.5)
        self.assertEqual(patients["STS_002"]["sex"], "F")
        self.assertIsNone(patients["STS_004"]["site"])
        self.assertEqual(patients["STS_001"]["n_slices"], len(SERIES_KINDS) * SLICES_PER_SERIES)
        series = {row["series_key"]: row for row in self.index.series()}
        self.assertEqual(series["STS_001_T2"]["sequence"], "T2")
        self.assertEqual(series["STS_001_T2"]["orientation"], [1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
        self.assertEqual(
            [
                series["STS_001_T2"][name]
                for name in ("pixel_spacing_row_mm", "pixel_spacing_col_mm")
            ],
            [0.8, 0.9],
        )
        self.assertLen(self.index.rois(), len(self.content))
        self.assertEqual([row["path"] for row in self.index.warnings()], ["a.dcm", "b.dcm"])
        summary = self.index.summary()
        num_tumour = sum(
            int(series["masks"][i].any())
            for series in self.content.values()
            for i in range(SLICES_PER_SERIES)
        )
        self.assertEqual(summary["patients"], len(PATIENTS))
        self.assertEqual(summary["series"], {"CT": 4, "PT": 4, "MR_T1": 4, "MR_T2": 4})
        self.assertEqual(summary["slices"], len(self.content) * SLICES_PER_SERIES)
        self.assertEqual(summary["slices_with_tumor"], num_tumour)
        self.assertEqual(sum(summary["slices_per_split"].values()), summary["slices"])
        self.assertEqual(summary["warnings"], 2)
        meta = self.index.meta()
        self.assertEqual((meta["split_scheme"], meta["seed"]), ("patient", 3))
        self.assertEqual(meta["created_by"]["test"], "index_test")

    def test_schema_has_no_identifying_columns(self):
        connection = sqlite3.connect(os.path.join(self.out_dir, "index.sqlite"))
        try:
            columns = {
                row[1].lower()
                for table in ("patients", "series", "slices")
                for row in connection.execute(f"PRAGMA table_info({table})")
            }
        finally:
            connection.close()
        self.assertTrue({"patient_key", "age", "sex", "site"} <= columns)
        self.assertFalse({"patient_name", "name", "birth_date", "birthdate"} & columns)


class IndexWriterTest(absltest.TestCase):
    def setUp(self):
        super().setUp()
        self.content = synthetic_content(seed=1)
        self.out_dir = make_temp_dir(self)

    def leftovers(self):
        return sorted(name for name in os.listdir(self.out_dir) if name.startswith("."))

    def test_same_input_in_any_order_gives_identical_files(self):
        other_dir = make_temp_dir(self)
        write_index(self.out_dir, self.content)
        write_index(other_dir, self.content, reverse=True)
        for relative in ["index.sqlite", "slices/STS_002_T1/0001.npz"]:
            with (
                open(os.path.join(self.out_dir, relative), "rb") as first,
                open(os.path.join(other_dir, relative), "rb") as second,
            ):
                self.assertEqual(first.read(), second.read(), relative)
        self.assertEqual(self.leftovers(), [])

    def test_missing_index_raises_one_line_value_error(self):
        with self.assertRaises(index_lib.IndexNotFoundError) as raised:
            index_lib.Index(self.out_dir)
        self.assertIsInstance(raised.exception, ValueError)
        self.assertNotIn("\n", str(raised.exception))
        self.assertIn(self.out_dir, str(raised.exception))

    def test_not_an_index_raises_bad_index_error(self):
        with open(os.path.join(self.out_dir, "index.sqlite"), "w") as not_sqlite:
            not_sqlite.write("plain text")
        with self.assertRaises(index_lib.BadIndexError):
            index_lib.Index(self.out_dir)

    def test_exception_in_with_block_keeps_old_index_and_removes_staging(self):
        write_index(self.out_dir, self.content)
        before = index_lib.Index(self.out_dir).query()
        with self.assertRaisesRegex(RuntimeError, "interrupted"):
            with index_writer.IndexWriter(self.out_dir) as writer:
                writer.add_patient("STS_009")
                raise RuntimeError("interrupted")
        after = index_lib.Index(self.out_dir).query()
        self.assertEqual(before, after)
        self.assertEqual(self.leftovers(), [])

    def test_killed_writer_leaves_old_index_and_next_writer_cleans_up(self):
        write_index(self.out_dir, self.content)
        script = textwrap.dedent(f"""
            import os, numpy as np
            from data_pipeline import index_writer
            writer = index_writer.IndexWriter({self.out_dir!r})
            writer.add_patient("STS_009")
            writer.add_series(series_key="S9", patient_key="STS_009", study_uid="1",
                              series_uid="2", modality="CT", sequence=None, description="",
                              frame_of_reference_uid="3", rows=2, cols=2, pixel_spacing=(1, 1),
                              slice_spacing=1, orientation=(1, 0, 0, 0, 1, 0), n_slices=1,
                              units="HU")
            writer.add_slice(series_key="S9", slice_index=0, position_mm=0.0,
                             sop_instance_uid="4", image=np.zeros((2, 2)),
                             mask=np.zeros((2, 2), bool))
            os._exit(9)
            """)
        completed = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, check=False)
        self.assertEqual(completed.returncode, 9)
        self.assertLen(self.leftovers(), 1)  # The dead writer's staging folder.
        self.assertLen(index_lib.Index(self.out_dir).query(), len(self.content) * SLICES_PER_SERIES)
        self.assertEqual(index_lib.Index(self.out_dir).query(patients=["STS_009"]), [])
        write_index(self.out_dir, self.content)
        self.assertEqual(self.leftovers(), [])

    def test_interrupted_commit_leaves_no_half_index(self):
        write_index(self.out_dir, self.content)
        writer = index_writer.IndexWriter(self.out_dir)
        writer.add_patient("STS_009")
        original_replace = os.replace

        def failing_replace(source, target):
            raise KeyboardInterrupt("killed while moving the index in")

        os.replace = failing_replace
        try:
            with self.assertRaises(KeyboardInterrupt):
                writer.commit()
        finally:
            os.replace = original_replace
        with self.assertRaises(index_lib.IndexNotFoundError):
            index_lib.Index(self.out_dir)

    def test_recommit_replaces_old_slices(self):
        write_index(self.out_dir, self.content)
        with index_writer.IndexWriter(self.out_dir) as writer:
            writer.add_patient("STS_009")
        self.assertEqual(index_lib.Index(self.out_dir).query(), [])
        self.assertEqual(os.listdir(os.path.join(self.out_dir, "slices")), [])
        self.assertEqual(self.leftovers(), [])

    def test_inconsistent_input_is_refused(self):
        with self.assertRaisesRegex(ValueError, "folder"):
            with index_writer.IndexWriter(self.out_dir) as writer:
                writer.add_slice(
                    series_key="../escape",
                    slice_index=0,
                    position_mm=0.0,
                    sop_instance_uid=None,
                    image=np.zeros((2, 2)),
                    mask=np.zeros((2, 2)),
                )
        with self.assertRaisesRegex(ValueError, "never added"):
            with index_writer.IndexWriter(self.out_dir) as writer:
                writer.add_slice(
                    series_key="S1",
                    slice_index=0,
                    position_mm=0.0,
                    sop_instance_uid=None,
                    image=np.zeros((2, 2)),
                    mask=np.zeros((2, 2)),
                )
        with self.assertRaisesRegex(ValueError, "modality"):
            with index_writer.IndexWriter(self.out_dir) as writer:
                writer.add_patient("P")
                writer.add_series(
                    series_key="S1",
                    patient_key="P",
                    study_uid="1",
                    series_uid="2",
                    modality="XR",
                    sequence=None,
                    description="",
                    frame_of_reference_uid="3",
                    rows=2,
                    cols=2,
                    pixel_spacing=(1, 1),
                    slice_spacing=1,
                    orientation=(1, 0, 0, 0, 1, 0),
                    n_slices=1,
                    units="HU",
                )
        self.assertFalse(os.path.exists(os.path.join(self.out_dir, "index.sqlite")))
        self.assertEqual(self.leftovers(), [])

    def test_slice_file_written_by_a_worker(self):
        with index_writer.IndexWriter(self.out_dir) as writer:
            writer.add_patient("P")
            writer.add_series(
                series_key="S1",
                patient_key="P",
                study_uid="1",
                series_uid="2",
                modality="PT",
                sequence=None,
                description="",
                frame_of_reference_uid="3",
                rows=2,
                cols=3,
                pixel_spacing=(1, 1),
                slice_spacing=1,
                orientation=(1, 0, 0, 0, 1, 0),
                n_slices=1,
                units="SUV",
            )
            image = np.arange(6, dtype=np.float32).reshape(2, 3)
            mask = np.array([[0, 1, 1], [0, 0, 1]], bool)
            tumor_pixels = slice_store.write_slice(
                writer.staging_dir / index_lib.slice_relpath("S1", 0), image, mask
            )
            writer.add_slice_file(
                series_key="S1",
                slice_index=0,
                position_mm=1.5,
                sop_instance_uid="9",
                tumor_pixels=tumor_pixels,
            )
        (record,) = index_lib.Index(self.out_dir).query(modality="PT")
        self.assertEqual(record.tumor_pixels, 3)
        loaded_image, loaded_mask = record.load()
        np.testing.assert_array_equal(loaded_image, image)
        np.testing.assert_array_equal(loaded_mask, mask.astype(np.uint8))


class ReadClinicalTest(absltest.TestCase):
    def test_csv_with_title_row_and_varied_headers(self):
        path = write_text(
            make_temp_dir(self),
            "clinical.csv",
            (
                "Clinical data of the STS collection\n"
                "Patient ID,Age (years),Gender,Site of primary STS,Grade\n"
                "STS_001,45,male,Thigh,3\n"
                "STS_002,,F,, \n"
                "12,61.5,x,Arm\n"
            ),
        )
        self.assertEqual(
            clinical.read_clinical(path),
            {
                "STS_001": {"age": 45.0, "sex": "M", "site": "Thigh"},
                "STS_002": {"age": None, "sex": "F", "site": None},
                "12": {"age": 61.5, "sex": "x", "site": "Arm"},
            },
        )

    def test_semicolon_csv_without_optional_columns(self):
        path = write_text(make_temp_dir(self), "c.csv", "patient_id;weight\nA;70\n")
        self.assertEqual(
            clinical.read_clinical(path), {"A": {"age": None, "sex": None, "site": None}}
        )

    def test_xlsx(self):
        path = os.path.join(make_temp_dir(self), "clinical.xlsx")
        pd.DataFrame(
            {
                "PATIENTID": ["STS_010", 7],
                "AGE": [40, None],
                "Sex": ["F", "M"],
                "site": ["Knee", None],
            }
        ).to_excel(path, index=False)
        self.assertEqual(
            clinical.read_clinical(path),
            {
                "STS_010": {"age": 40.0, "sex": "F", "site": "Knee"},
                "7": {"age": None, "sex": "M", "site": None},
            },
        )

    def test_malformed_files_raise_one_line_error_naming_the_file(self):
        folder = make_temp_dir(self)
        cases = {
            "no_id.csv": "name,age\nx,3\n",
            "broken.xlsx": "this is not a zip file",
            "twice.csv": "id,age\nA,1\nA,2\n",
            "table.json": "{}",
        }
        for name, text in cases.items():
            path = write_text(folder, name, text)
            with self.assertRaises(clinical.ClinicalFileError, msg=name) as raised:
                clinical.read_clinical(path)
            self.assertIsInstance(raised.exception, ValueError)
            self.assertIn(name, str(raised.exception))
            self.assertNotIn("\n", str(raised.exception))
        with self.assertRaisesRegex(clinical.ClinicalFileError, "not found"):
            clinical.read_clinical(os.path.join(folder, "absent.csv"))


if __name__ == "__main__":
    absltest.main()
