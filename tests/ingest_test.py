"""Tests for the ingest: phantom and real data, determinism, atomicity, layouts and bad input."""

import filecmp
import glob
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from unittest import mock

import numpy as np
import pydicom
from absl.testing import absltest

from data_pipeline import index as index_lib
from data_pipeline import ingest as ingest_lib
from data_pipeline import phantom, series_finder, workers

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("SARCOMA_JAX_SHARED", REPO / ".." / "shared"))
STS_IBSI = SHARED / "data" / "sts_ibsi"


def _ingest(dicom_dir, out_dir, **kwargs):
    lines = []
    summary = ingest_lib.ingest(
        str(dicom_dir), str(out_dir), progress=False, log=lines.append, **kwargs
    )
    return summary, lines


def _index_contents(out_dir):
    """Every slice record and its arrays, for comparing two indexes."""
    records = index_lib.Index(out_dir).query()
    return [
        (
            r.patient_key,
            r.modality,
            r.sequence,
            r.split,
            r.slice_index,
            r.position_mm,
            r.has_tumor,
            *r.load(),
        )
        for r in records
    ]


class IngestPhantomTest(absltest.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp()
        cls.dicom = os.path.join(cls.tmp, "dicom")
        phantom.write_phantom(cls.dicom, 3, seed=1, image_size=32, num_slices=8, progress=False)
        cls.index_dir = os.path.join(cls.tmp, "index")
        cls.summary, cls.lines = _ingest(
            cls.dicom, cls.index_dir, clinical=os.path.join(cls.dicom, "clinical.csv")
        )

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp)
        super().tearDownClass()

    def test_summary_and_index(self):
        self.assertEqual(self.summary.patients, 3)
        self.assertEqual(self.summary.files_skipped, 0, self.lines)
        self.assertEqual(self.summary.slices_lost, 0, self.lines)
        self.assertEqual(self.summary.series["CT"], 3)
        self.assertEqual(self.summary.series["PT"], 3)
        self.assertEqual(self.summary.series["T1"], 3)
        self.assertEqual(self.summary.series["T2"] + self.summary.series["STIR"], 3)
        records = index_lib.Index(self.index_dir).query()
        self.assertLen(records, self.summary.slices)
        tumour = [r for r in records if r.has_tumor]
        self.assertLen(tumour, self.summary.tumour_slices)
        self.assertGreater(len(tumour), 0)
        image, mask = tumour[0].load()
        self.assertEqual(image.dtype, np.float32)
        self.assertEqual(mask.shape, image.shape)
        self.assertEqual(int(mask.sum()), tumour[0].tumor_pixels)

    def test_masks_agree_with_the_phantoms_truth(self):
        # Rasterised RTSTRUCT contours against the voxel masks the phantom drew them from.
        for key in {r.patient_key for r in index_lib.Index(self.index_dir).query()}:
            records = index_lib.Index(self.index_dir).query(modality="CT", patients=[key])
            mask = np.stack([r.load()[1] for r in records]).astype(bool)
            plan = phantom.plan_patient(1, int(key.rsplit("_", 1)[1]), image_size=32, num_slices=8)
            truth = phantom.true_masks(plan, "CT")["GTV_Mass"]
            dice = 2 * np.sum(mask & truth) / (mask.sum() + truth.sum())
            self.assertGreater(dice, 0.85, key)

    def test_same_input_same_index_and_workers_agree(self):
        with tempfile.TemporaryDirectory() as out:
            _ingest(self.dicom, out, workers=2, clinical=os.path.join(self.dicom, "clinical.csv"))
            first, second = _index_contents(self.index_dir), _index_contents(out)
            self.assertEqual(len(first), len(second))
            for a, b in zip(first, second, strict=True):
                self.assertEqual(a[:7], b[:7])
                np.testing.assert_array_equal(a[7], b[7])
                np.testing.assert_array_equal(a[8], b[8])
            npz = sorted(glob.glob(os.path.join(self.index_dir, "slices", "*", "*.npz")))
            for path in npz[:20]:
                self.assertTrue(filecmp.cmp(path, path.replace(self.index_dir, out), shallow=False))

    def test_a_cohort_of_links_to_patient_folders_reads_as_the_folders(self):
        # A cohort put together from links to each patient's folder, plus a second link to one of
        # them and a link back up to the cohort: the same index as the real folder, each folder
        # read once, the two extra links named and skipped (not read twice, not walked forever).
        with tempfile.TemporaryDirectory() as tmp:
            cohort = os.path.join(tmp, "cohort")
            os.makedirs(os.path.join(cohort, "extra"))
            patients = sorted(p for p in os.listdir(self.dicom) if p.startswith("PHANTOM"))
            for patient in patients:
                os.symlink(os.path.join(self.dicom, patient), os.path.join(cohort, patient))
            os.symlink(os.path.join(self.dicom, patients[0]), os.path.join(cohort, "zz_again"))
            os.symlink(cohort, os.path.join(cohort, "extra", "up"))
            clinical = os.path.join(self.dicom, "clinical.csv")
            summary, lines = _ingest(cohort, os.path.join(tmp, "index"), clinical=clinical)
            again = f"zz_again: the same folder as '{patients[0]}', read already; skipped"
            up = "extra/up: the same folder as the top folder, read already; skipped"
            self.assertEqual(sorted(lines), [up, again])
            self.assertEqual(summary.files_skipped, 0)
            self.assertEqual(summary.slices, self.summary.slices)
            linked = _index_contents(os.path.join(tmp, "index"))
            real = _index_contents(self.index_dir)
            self.assertEqual([a[:7] for a in linked], [b[:7] for b in real])
            for a, b in zip(linked, real, strict=True):
                np.testing.assert_array_equal(a[7], b[7])
                np.testing.assert_array_equal(a[8], b[8])
            # The folder reader of predict and evaluate finds the same series the same way.
            scan_lines = []
            scan = series_finder.scan_dicom_dir(cohort, log=scan_lines.append)
            real_scan = series_finder.scan_dicom_dir(self.dicom)
            self.assertEqual(sorted(scan.images), sorted(real_scan.images))
            self.assertEqual(
                {uid: len(h) for uid, h in scan.images.items()},
                {uid: len(h) for uid, h in real_scan.images.items()},
            )
            self.assertEqual(sorted(scan_lines), [up, again])

    def test_layout_does_not_matter(self):
        # All files of all patients in one flat folder with meaningless names: same index.
        with tempfile.TemporaryDirectory() as tmp:
            flat = os.path.join(tmp, "flat")
            os.makedirs(flat)
            for i, path in enumerate(
                sorted(glob.glob(os.path.join(self.dicom, "**", "*.dcm"), recursive=True))
            ):
                shutil.copy(path, os.path.join(flat, f"{(i * 7919) % 100003:06d}"))
            _ingest(
                flat, os.path.join(tmp, "index"), clinical=os.path.join(self.dicom, "clinical.csv")
            )
            first = _index_contents(self.index_dir)
            second = _index_contents(os.path.join(tmp, "index"))
            self.assertEqual([a[:7] for a in first], [b[:7] for b in second])

    def test_interrupted_ingest_leaves_the_old_index(self):
        with tempfile.TemporaryDirectory() as out:
            _ingest(self.dicom, out)
            before = _index_contents(out)
            sqlite_bytes = pathlib.Path(out, "index.sqlite").read_bytes()
            calls = []

            def fail_on_second(*args, **kwargs):
                calls.append(1)
                if len(calls) == 2:
                    raise KeyboardInterrupt
                return original(*args, **kwargs)

            original = ingest_lib._write_series
            with mock.patch.object(ingest_lib, "_write_series", fail_on_second):
                with self.assertRaises(KeyboardInterrupt):
                    _ingest(self.dicom, out, seed=5)
            self.assertEqual(pathlib.Path(out, "index.sqlite").read_bytes(), sqlite_bytes)
            self.assertEqual(sorted(os.listdir(out)), ["index.sqlite", "slices"])
            after = _index_contents(out)
            self.assertEqual([a[:7] for a in before], [b[:7] for b in after])

    def test_interrupted_first_ingest_leaves_no_index(self):
        with tempfile.TemporaryDirectory() as out:
            with mock.patch.object(ingest_lib, "_write_series", side_effect=RuntimeError("boom")):
                with self.assertRaises(RuntimeError):
                    _ingest(self.dicom, out)
            self.assertEqual(os.listdir(out), [])
            with self.assertRaisesRegex(index_lib.IndexNotFoundError, "index"):
                index_lib.Index(out)


class BadInputTest(absltest.TestCase):
    """Each bad input gets one line naming the file and the reason; the rest is ingested."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp()
        cls.dicom = os.path.join(cls.tmp, "dicom")
        phantom.write_phantom(cls.dicom, 2, seed=2, image_size=32, num_slices=6, progress=False)
        cls.clinical = os.path.join(cls.dicom, "clinical.csv")
        cls.clean, _ = _ingest(cls.dicom, os.path.join(cls.tmp, "clean"), clinical=cls.clinical)
        bad = os.path.join(cls.dicom, "bad")
        os.makedirs(os.path.join(bad, "empty_series"))
        shutil.copy(
            pydicom.data.get_testdata_file("MR_truncated.dcm"), os.path.join(bad, "trunc.dcm")
        )
        pathlib.Path(bad, "readme.txt").write_text("not dicom")
        ct_files = sorted(
            p
            for p in glob.glob(os.path.join(cls.dicom, "**", "*.dcm"), recursive=True)
            if pydicom.dcmread(p, stop_before_pixels=True).Modality == "CT"
        )
        ct_file, cls.cut_file = ct_files[0], ct_files[-1]
        # An interrupted copy: a slice of a contoured series cut short.
        cut_bytes = pathlib.Path(cls.cut_file).read_bytes()
        pathlib.Path(cls.cut_file).write_bytes(cut_bytes[: len(cut_bytes) - 100])
        no_pixels = pydicom.dcmread(ct_file)
        del no_pixels.PixelData
        for keyword in ("Rows", "Columns"):
            delattr(no_pixels, keyword)
        no_pixels.SOPInstanceUID = no_pixels.file_meta.MediaStorageSOPInstanceUID = "1.2.3.999.1"
        no_pixels.SeriesInstanceUID = "1.2.3.999"
        no_pixels.save_as(os.path.join(bad, "no_pixels.dcm"))
        structures = sorted(
            p
            for p in glob.glob(os.path.join(cls.dicom, "**", "*.dcm"), recursive=True)
            if pydicom.dcmread(p, stop_before_pixels=True).Modality == "RTSTRUCT"
        )
        # An RTSTRUCT in a frame of reference no series has (and naming no present series).
        foreign = pydicom.dcmread(structures[0])
        for frame in foreign.ReferencedFrameOfReferenceSequence:
            frame.FrameOfReferenceUID = "1.2.3.998"
            for study in frame.get("RTReferencedStudySequence", []):
                for series in study.RTReferencedSeriesSequence:
                    series.SeriesInstanceUID = "1.2.3.997"
                    series.ContourImageSequence = pydicom.Sequence()
        for roi in foreign.StructureSetROISequence:
            roi.ReferencedFrameOfReferenceUID = "1.2.3.998"
        for roi_contour in foreign.ROIContourSequence:
            for contour in roi_contour.ContourSequence:
                if "ContourImageSequence" in contour:
                    del contour.ContourImageSequence
        foreign.SOPInstanceUID = foreign.file_meta.MediaStorageSOPInstanceUID = "1.2.3.996.1"
        foreign.SeriesInstanceUID = "1.2.3.996"
        foreign.save_as(os.path.join(bad, "foreign_frame.dcm"))
        # One contour moved 10 m sideways in the last patient's first RTSTRUCT (edited in place).
        cls.moved_structure = structures[-1]
        shifted = pydicom.dcmread(cls.moved_structure)
        contour = shifted.ROIContourSequence[0].ContourSequence[0]
        data = np.asarray(contour.ContourData, float).reshape(-1, 3)
        data[:, 0] += 10_000
        contour.ContourData = [float(v) for v in data.ravel()]
        shifted.save_as(cls.moved_structure)
        cls.summary, cls.lines = _ingest(
            cls.dicom, os.path.join(cls.tmp, "index"), clinical=cls.clinical
        )

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp)
        super().tearDownClass()

    def _line_for(self, name, reason):
        matching = [line for line in self.lines if name in line and reason in line]
        self.assertLen(matching, 1, f"{name} / {reason} in {self.lines}")
        self.assertNotIn("\n", matching[0])

    def test_each_problem_reported_once_and_counted(self):
        self._line_for("trunc.dcm", "truncated")
        self._line_for(os.path.basename(self.cut_file), "truncated")
        self._line_for("readme.txt", "not a DICOM file")
        self._line_for("no_pixels.dcm", "without pixel data")
        self._line_for("foreign_frame.dcm", "FrameOfReferenceUID matches no image series")
        self._line_for(os.path.basename(self.moved_structure), "outside the image")
        self._line_for("empty_series", "empty folder")
        # Five bad files, three of them image slices (trunc.dcm, the cut CT slice, the CT object
        # without pixels); the cut slice's series is still ingested without that slice.
        self.assertEqual(self.summary.files_skipped, self.clean.files_skipped + 5)
        self.assertEqual(self.summary.slices_lost, self.clean.slices_lost + 3)
        self.assertEqual(self.summary.patients, 2)
        self.assertEqual(self.summary.series, self.clean.series)
        self.assertEqual(self.summary.slices, self.clean.slices - 1)

    def test_cli_reports_without_traceback(self):
        with tempfile.TemporaryDirectory() as out:
            result = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "data_pipeline.ingest",
                    f"--dicom_dir={self.dicom}",
                    f"--out_dir={out}",
                    f"--clinical={self.clinical}",
                ],
                capture_output=True,
                text=True,
                cwd=REPO,
                check=False,
            )
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertNotIn("Traceback", result.stderr)
            self.assertIn(f"files skipped  {self.clean.files_skipped + 5}", result.stdout)
            self.assertIn(f"slices lost    {self.clean.slices_lost + 3}", result.stdout)
            self.assertIn("patients       2", result.stdout)

    def test_cli_empty_or_missing_folder_is_one_line_error(self):
        with tempfile.TemporaryDirectory() as empty:
            for dicom_dir, reason in ((empty, "empty folder"), (empty + "/nope", "no such folder")):
                result = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "data_pipeline.ingest",
                        f"--dicom_dir={dicom_dir}",
                        f"--out_dir={empty}/out",
                    ],
                    capture_output=True,
                    text=True,
                    cwd=REPO,
                    check=False,
                )
                self.assertEqual(result.returncode, 1)
                self.assertNotIn("Traceback", result.stderr)
                self.assertIn(reason, result.stderr)
                self.assertLen(result.stderr.strip().splitlines(), 1)


@absltest.skipUnless(STS_IBSI.is_dir(), "shared IBSI data not found")
class RealDataIngestTest(absltest.TestCase):
    def test_index_masks_equal_reference_masks(self):
        # Two patients, each series' files linked (not copied) into one folder per patient.
        patients = ["STS_002", "STS_026"]
        with tempfile.TemporaryDirectory() as tmp:
            for patient in patients:
                folder = os.path.join(tmp, "dicom", patient)
                os.makedirs(folder)
                for path in glob.glob(str(STS_IBSI / "dicom" / patient / "*" / "*" / "*.dcm")):
                    name = "_".join(pathlib.Path(path).parts[-3:])
                    os.symlink(path, os.path.join(folder, name))
            summary, lines = _ingest(os.path.join(tmp, "dicom"), os.path.join(tmp, "index"))
            self.assertEqual(summary.patients, 2)
            index = index_lib.Index(os.path.join(tmp, "index"))
            for patient in patients:
                for modality, name in (("CT", "CT"), ("PT", "PET"), ("MR", "MR_T1")):
                    records = index.query(modality=modality, patients=[patient])
                    mask = np.stack([r.load()[1] for r in records]).astype(bool)
                    reference = np.load(STS_IBSI / "reference_masks" / f"{patient}_{name}.npz")
                    np.testing.assert_array_equal(mask, reference["mask"], f"{patient} {name}")
            rois = {row["linked_by"] for row in index.rois()}
            self.assertEqual(rois, {"series_uid"})


class SharedMapTest(absltest.TestCase):
    def test_results_in_order_with_this_thread_working_too(self):
        import concurrent.futures
        import threading
        import time

        def work(item):
            time.sleep(0.002)
            return item * item, threading.get_ident()

        with concurrent.futures.ThreadPoolExecutor(1) as executor:
            results = list(workers.shared_map(executor, work, list(range(60))))
        self.assertEqual([value for value, _ in results], [i * i for i in range(60)])
        here = threading.get_ident()
        ran_here = [i for i, (_, thread) in enumerate(results) if thread == here]
        # This thread took items from the back, the worker from the front; both did some.
        self.assertNotEmpty(ran_here)
        self.assertLess(len(ran_here), 60)
        self.assertEqual(ran_here, list(range(60 - len(ran_here), 60)))

    def test_without_executor_is_map(self):
        self.assertEqual(list(workers.shared_map(None, abs, [-2, 3, -4])), [2, 3, 4])


if __name__ == "__main__":
    absltest.main()
