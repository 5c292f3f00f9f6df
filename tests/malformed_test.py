"""Malformed DICOM never corrupts, aborts or hangs an ingest: the 13 defects of issue 17 and the
other members of their families, each made from a real sts_ibsi series (tests/malformed_cases.py).

The invariant, for every case: the ingest returns (rc 0 from the CLI, no traceback); each bad file
is named with a one-line reason; the summary counts the image slices lost; the good CT series is
indexed exactly as alone. The library API raises our own types with the same reasons.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from unittest import mock

import malformed_cases as cases  # tests/
import numpy as np
import pydicom
import pydicom.encaps
import pydicom.uid
from absl.testing import absltest, parameterized

import data_pipeline
from data_pipeline import dicom_rules, query
from data_pipeline import index as index_lib
from data_pipeline import index_writer as index_writer_lib

PET_IMAGES = len(cases.source_files("PET", "image"))
MR_IMAGES = len(cases.source_files("MR_T1", "image"))
CT_IMAGES = len(cases.source_files("CT", "image"))


def _temp_dir(test) -> str:
    folder = tempfile.mkdtemp()
    test.addCleanup(shutil.rmtree, folder, ignore_errors=True)
    return folder


@absltest.skipUnless(cases.STS_IBSI.is_dir(), "shared IBSI data not found")
class MalformedTestCase(parameterized.TestCase):
    """References: the CT series alone, and the unmutated CT + PET and CT + MR cases."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp()
        alone = cases.build_case(os.path.join(cls.tmp, "alone"), (cases.GOOD,))
        outcome = cases.run_ingest(alone, os.path.join(cls.tmp, "alone_index"))
        assert outcome.error is None, outcome.error
        cls.ct_alone = cases.series_contents(outcome.index_dir, "CT")
        cls.unmutated = {}
        for series in ("PET", "MR_T1"):
            case = cases.build_case(os.path.join(cls.tmp, series), (cases.GOOD, series))
            outcome = cases.run_ingest(case, os.path.join(cls.tmp, f"{series}_index"))
            assert outcome.error is None and not outcome.lines, (outcome.error, outcome.lines)
            modality = cases.FOLDER_MODALITY[series]
            cls.unmutated[series] = cases.series_contents(outcome.index_dir, modality)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)
        super().tearDownClass()

    def case(self, bad="PET", masks=True):
        """A fresh CT + ``bad`` case folder."""
        return cases.build_case(os.path.join(_temp_dir(self), "dicom"), (cases.GOOD, bad), masks)

    def ingest(self, case, mutated, bad="PET", timeout_s=60.0, images=None):
        """Ingests the case and asserts the invariant; returns the outcome.

        Args:
          case: the case folder.
          mutated: the files changed or added, relative to it.
          bad: the series beside the CT one.
          timeout_s: the time limit.
          images: the image files in the case, when not CT's and ``bad``'s.
        """
        outcome = cases.run_ingest(case, os.path.join(_temp_dir(self), "index"), 1, timeout_s)
        modality = cases.FOLDER_MODALITY[bad]
        if images is None:
            images = CT_IMAGES + (PET_IMAGES if bad == "PET" else MR_IMAGES)
        bad_slices = len(self.unmutated[bad]["slices"])
        violations = cases.invariant_violations(
            outcome, self.ct_alone, modality, bad_slices, images, mutated, case
        )
        self.assertEqual(violations, [], outcome.lines)
        return outcome

    def assert_line(self, outcome, name, reason):
        """Exactly one message names ``name`` with a reason matching ``reason``; returns it."""
        matching = [
            line
            for line in outcome.lines
            if line.startswith(f"{name}: ") and re.search(reason, line)
        ]
        self.assertLen(matching, 1, f"{name} / {reason} in {outcome.lines}")
        return matching[0]

    def bad_contents(self, outcome, bad="PET"):
        return cases.series_contents(outcome.index_dir, cases.FOLDER_MODALITY[bad])

    def assert_slices_lost(self, outcome, bad, count):
        """``count`` slices of the bad series are missing from the index and counted as lost."""
        contents = self.bad_contents(outcome, bad)
        indexed = 0 if contents is None else len(contents["slices"])
        self.assertEqual(len(self.unmutated[bad]["slices"]) - indexed, count)
        self.assertEqual(outcome.summary.slices_lost, count)

    def assert_bad_series_intact(self, outcome, bad="PET"):
        self.assertTrue(cases.same_contents(self.bad_contents(outcome, bad), self.unmutated[bad]))


def _image(case, series="PET", k=20) -> pathlib.Path:
    return sorted((pathlib.Path(case) / series / "image").glob("*.dcm"))[k]


def _rtstruct(case, series="PET") -> pathlib.Path:
    return next((pathlib.Path(case) / series / "mask").glob("*.dcm"))


def _rel(case, path) -> str:
    return os.path.relpath(path, case)


class StrayRtstructTest(MalformedTestCase):
    """Defect 1: an RTSTRUCT whose series is absent must not steal another series' mask."""

    @parameterized.parameters("A_PET", "Z_PET")
    def test_uid_reference_beats_geometry_in_any_order(self, folder):
        case = cases.build_case(os.path.join(_temp_dir(self), "dicom"), (cases.GOOD,))
        stray = pathlib.Path(case, folder, "mask", "RS.dcm")
        stray.parent.mkdir(parents=True)
        shutil.copy(cases.source_files("PET", "mask")[0], stray)

        def shift(ds):  # contours moved 30 mm sideways
            for contour in ds.ROIContourSequence[0].ContourSequence:
                points = np.asarray(contour.ContourData, float).reshape(-1, 3)
                points[:, 0] += 30.0
                contour.ContourData = [round(float(v), 4) for v in points.ravel()]

        cases.edit(stray, shift)
        outcome = self.ingest(case, [_rel(case, stray)], images=CT_IMAGES)
        self.assert_line(
            outcome,
            f"{folder}/mask/RS.dcm",
            r"its image series is contoured by CT/mask/RS\.dcm \(that one by the series UID it "
            r"references, this one by geometry only\); skipped$",
        )
        (roi,) = self.ct_alone["rois"]
        self.assertEqual(roi[2:], ("CT/mask/RS.dcm", "series_uid"))

    def test_contour_image_uids_beat_geometry(self):
        case = cases.build_case(os.path.join(_temp_dir(self), "dicom"), (cases.GOOD,))
        ct_uids = [pydicom.dcmread(f).SOPInstanceUID for f in cases.source_files("CT", "image")]

        def reference_ct_slices(ds):  # no present series UID; contour images that are present
            series = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
            series.RTReferencedSeriesSequence[0].SeriesInstanceUID = "1.2.826.0.1.3680043.9.1"
            for contour in ds.ROIContourSequence[0].ContourSequence:
                for image in contour.ContourImageSequence:
                    image.ReferencedSOPInstanceUID = ct_uids[0]

        own = cases.edit(_rtstruct(case, "CT"), reference_ct_slices)
        stray = pathlib.Path(case, "A_PET", "mask", "RS.dcm")
        stray.parent.mkdir(parents=True)
        os.symlink(cases.source_files("PET", "mask")[0], stray)
        outcome = cases.run_ingest(case, os.path.join(_temp_dir(self), "index"))
        self.assert_line(
            outcome,
            "A_PET/mask/RS.dcm",
            r"contoured by CT/mask/RS\.dcm \(that one by its contour image UIDs, this one by "
            r"geometry only\)",
        )
        ct = cases.series_contents(outcome.index_dir, "CT")
        self.assertEqual(ct["rois"][0][2:], ("CT/mask/RS.dcm", "contour_images"))
        self.assertEqual(ct["slices"], self.ct_alone["slices"])
        for ours, alone in zip(ct["arrays"], self.ct_alone["arrays"], strict=True):
            np.testing.assert_array_equal(ours["mask"], alone["mask"])
        self.assertTrue(own.exists())

    def test_a_lost_slice_does_not_unlink_its_series(self):
        # One PET slice unreadable: its contour lies on no slice, yet the RTSTRUCT still names
        # the series by UID and most contours fit, so the other 47 slices keep their masks.
        case = self.case()
        bad = cases.replace_value(_image(case), 0x00280010, b"\x00")  # Rows: 1 byte
        outcome = self.ingest(case, [_rel(case, bad)])
        self.assert_slices_lost(outcome, "PET", 1)
        self.assertEqual(self.bad_contents(outcome)["rois"][0][-1], "series_uid")


class PixelLengthTest(MalformedTestCase):
    """Defect 2: pixel data of another length than Rows x Columns x BitsAllocated."""

    @parameterized.named_parameters(
        ("columns_minus_one", "Columns", -1),
        ("rows_plus_one", "Rows", 1),
        ("bits_allocated_8", "BitsAllocated", None),
    )
    def test_every_slice_named_and_counted(self, keyword, change):
        case = self.case()
        files = sorted(pathlib.Path(case, "PET", "image").glob("*.dcm"))

        def mutate(ds):
            if change is None:
                ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
            else:
                setattr(ds, keyword, getattr(ds, keyword) + change)

        for path in files:
            cases.edit(path, mutate)
        outcome = self.ingest(case, [_rel(case, f) for f in files])
        for path in files:
            self.assert_line(
                outcome, _rel(case, path), r"pixel data is 1620 bytes, but Rows x Columns .*; "
            )
        self.assert_slices_lost(outcome, "PET", PET_IMAGES)
        self.assert_line(outcome, "PET/mask/RS.dcm", "contoured by CT/mask/RS.dcm")
        with self.assertRaisesRegex(data_pipeline.InputProblem, r"\.dcm: pixel data is 1620 bytes"):
            data_pipeline.load_series(pathlib.Path(case, "PET", "image"))

    def test_one_slice_sheared(self):
        case = self.case()
        bad = cases.edit(_image(case), lambda ds: setattr(ds, "Columns", ds.Columns - 1))
        outcome = self.ingest(case, [_rel(case, bad)])
        self.assert_line(outcome, _rel(case, bad), "pixel data is 1620 bytes")
        self.assert_slices_lost(outcome, "PET", 1)


class ContourDataTest(MalformedTestCase):
    """Defect 3: a contour is never dropped without a word."""

    @parameterized.named_parameters(
        ("not_a_multiple_of_3", lambda t: t.rsplit("\\", 1)[0], "not a multiple of 3"),
        ("nan", lambda t: "nan\\" + t.split("\\", 1)[1], "not finite"),
        ("not_a_number", lambda t: "abc\\" + t.split("\\", 1)[1], "not a list of numbers"),
        ("far_away", lambda t: "9e9\\" + t.split("\\", 1)[1], "more than 10 km"),
    )
    def test_malformed_contour_skips_its_rtstruct(self, change, reason):
        case = self.case()
        rtstruct = cases.replace_contour_text(_rtstruct(case), 4, change)
        outcome = self.ingest(case, [_rel(case, rtstruct)])
        self.assert_line(
            outcome, "PET/mask/RS.dcm", rf"ROI GTV_Mass_PET: contour 5: .*{reason}.*; skipped$"
        )
        self.assert_line(
            outcome, "PET/image", f"image series with no RTSTRUCT; {PET_IMAGES} slices"
        )
        self.assert_slices_lost(outcome, "PET", PET_IMAGES)
        series = data_pipeline.load_series(pathlib.Path(case, "PET", "image"))
        with self.assertRaisesRegex(data_pipeline.InputProblem, f"contour 5: .*{reason}"):
            data_pipeline.load_rtstruct_masks(rtstruct, series, ("GTV_Mass",))

    def test_declared_point_count_must_match(self):
        case = self.case()

        def miscount(ds):
            contour = ds.ROIContourSequence[0].ContourSequence[2]
            contour.NumberOfContourPoints = int(contour.NumberOfContourPoints) + 1

        rtstruct = cases.edit(_rtstruct(case), miscount)
        outcome = self.ingest(case, [_rel(case, rtstruct)])
        self.assert_line(outcome, "PET/mask/RS.dcm", r"contour 3: NumberOfContourPoints is \d+")

    def test_unknown_geometric_type_skips_its_rtstruct(self):
        case = self.case()

        def retype(ds):
            ds.ROIContourSequence[0].ContourSequence[1].ContourGeometricType = "CLOSED_PLANAQ"

        rtstruct = cases.edit(_rtstruct(case), retype)
        outcome = self.ingest(case, [_rel(case, rtstruct)])
        self.assert_line(outcome, "PET/mask/RS.dcm", "contour 2 has ContourGeometricType 'CLOSED_P")

    @parameterized.named_parameters(
        ("two_points", "CLOSED_PLANAR", 2, r"contour 17 has 2 points: no area; ignored$"),
        ("one_point", "CLOSED_PLANAR", 1, r"contour 17 has 1 points: no area; ignored$"),
        ("open_planar", "OPEN_PLANAR", 4, r"contour 17 is OPEN_PLANAR, not an area; ignored$"),
    )
    def test_contour_without_area_is_reported_and_the_mask_kept(self, kind, points, reason):
        case = self.case()

        def add_contour(ds):
            contours = ds.ROIContourSequence[0].ContourSequence
            extra = pydicom.Dataset()
            extra.ContourGeometricType = kind
            extra.NumberOfContourPoints = points
            first = np.asarray(contours[0].ContourData, float).reshape(-1, 3)
            extra.ContourData = [float(v) for v in first[:points].ravel()]
            contours.append(extra)

        rtstruct = cases.edit(_rtstruct(case), add_contour)
        outcome = self.ingest(case, [_rel(case, rtstruct)])
        self.assert_line(outcome, "PET/mask/RS.dcm", "ROI GTV_Mass_PET: " + reason)
        self.assert_bad_series_intact(outcome)
        self.assertEqual(outcome.summary.slices_lost, 0)


class ImageAttributeTest(MalformedTestCase):
    """Defect 4 and its family: a broken Rows or Columns element, and every other image
    attribute a header can corrupt."""

    @parameterized.named_parameters(
        ("rows_length_3", 0x00280010, b"\x1b\x00\x00", r"Rows|unreadable"),
        ("rows_empty", 0x00280010, b"", r"Rows is not|Rows|BitsAllocated|unreadable"),
        ("columns_4_bytes", 0x00280011, b"\x1e\x00\x1e\x00", r"Columns is not a single integer"),
        ("rescale_slope_text", 0x00281053, b"abc ", r"RescaleSlope"),
        ("rescale_slope_nan", 0x00281053, b"nan ", r"RescaleSlope holds a value that is not"),
        ("rescale_slope_zero", 0x00281053, b"0 ", r"RescaleSlope is 0"),
        ("rescale_intercept_inf", 0x00281052, b"inf ", r"RescaleIntercept holds a value"),
        ("bits_stored_17", 0x00280101, b"\x11\x00", r"BitsStored 17 is outside 1\.\.16"),
        ("representation_2", 0x00280103, b"\x02\x00", r"PixelRepresentation 2 is outside"),
        ("samples_3", 0x00280002, b"\x03\x00", r"not a greyscale image \(SamplesPerPixel 3\)"),
        ("bits_allocated_12", 0x00280100, b"\x0c\x00", r"BitsAllocated 12 is not one of"),
    )
    def test_one_bad_slice(self, tag, value, reason):
        case = self.case()
        bad = cases.replace_value(_image(case), tag, value)
        outcome = self.ingest(case, [_rel(case, bad)])
        self.assert_line(outcome, _rel(case, bad), reason)
        self.assert_slices_lost(outcome, "PET", 1)
        with self.assertRaisesRegex(data_pipeline.InputProblem, re.escape(bad.name)):
            data_pipeline.load_series(pathlib.Path(case, "PET", "image"))

    def test_frames_and_huge_length(self):
        case = self.case()
        two_frames = cases.edit(_image(case, k=3), lambda ds: setattr(ds, "NumberOfFrames", 2))
        huge = cases.writable(_image(case, k=30))
        data = bytearray(huge.read_bytes())
        start = data.index(b"\x28\x00\x10\x00\x02\x00\x00\x00")  # Rows, implicit VR, length 2
        data[start + 4 : start + 8] = b"\xf0\xff\xff\xff"  # length 0xFFFFFFF0
        huge.write_bytes(bytes(data))
        outcome = self.ingest(case, [_rel(case, two_frames), _rel(case, huge)])
        self.assert_line(outcome, _rel(case, two_frames), "2 frames in one file")
        self.assert_line(outcome, _rel(case, huge), "Rows claims 4294967280 bytes|Rows is not a")
        self.assertGreaterEqual(outcome.summary.files_skipped, 2)

    @parameterized.named_parameters(
        ("vr_un", b"UN\x00\x00\x02\x00\x00\x00", True),
        ("vr_garbage", b"Q!\x02\x00", False),
        ("vr_sq", b"SQ\x00\x00\x02\x00\x00\x00", False),
    )
    def test_explicit_vr_of_rows(self, header, readable):
        # MR T1 is explicit VR: Rows is (0028,0010) 'US' 2 <value>.
        case = self.case("MR_T1")
        bad = cases.writable(_image(case, "MR_T1", 10))
        data = bytearray(bad.read_bytes())
        start = data.index(b"\x28\x00\x10\x00US\x02\x00")
        data[start + 4 : start + 8] = header
        bad.write_bytes(bytes(data))
        outcome = self.ingest(case, [_rel(case, bad)], "MR_T1")
        if readable:  # UN with the dictionary's VR US: a valid encoding, read as it is
            self.assert_bad_series_intact(outcome, "MR_T1")
        else:
            self.assert_line(outcome, _rel(case, bad), "")
            self.assert_slices_lost(outcome, "MR_T1", 1)


class GeometryTest(MalformedTestCase):
    """Defects 5, 6 and 10 and their family: numeric geometry that is not a geometry."""

    @parameterized.named_parameters(
        ("position_nan", 0x00200032, b"nan\\-20.5\\100.0 ", "ImagePositionPatient holds a value"),
        ("position_inf", 0x00200032, b"-inf\\1\\2 ", "ImagePositionPatient holds a value"),
        ("position_far", 0x00200032, b"1e300\\1\\2 ", "more than 10 km"),
        ("position_2_values", 0x00200032, b"1\\2 ", "ImagePositionPatient has 2 values, not 3"),
        ("orientation_nan", 0x00200037, b"1\\0\\0\\0\\nan\\0 ", "ImageOrientationPatient"),
        ("orientation_zero", 0x00200037, b"0\\0\\0\\0\\0\\0 ", "not unit vectors"),
        ("orientation_skew", 0x00200037, b"1\\0\\0\\0.7071\\0.7071\\0", "not orthogonal"),
        ("spacing_zero", 0x00280030, b"0\\0 ", "PixelSpacing .* is not positive"),
        ("spacing_negative", 0x00280030, b"-4\\-4 ", "PixelSpacing .* is not positive"),
        ("spacing_nan", 0x00280030, b"nan\\4", "PixelSpacing holds a value that is not finite"),
    )
    def test_one_bad_slice(self, tag, value, reason):
        case = self.case()
        bad = cases.replace_value(_image(case), tag, value)
        outcome = self.ingest(case, [_rel(case, bad)])
        self.assert_line(outcome, _rel(case, bad), reason)
        self.assert_slices_lost(outcome, "PET", 1)
        with self.assertRaisesRegex(data_pipeline.InputProblem, re.escape(bad.name)):
            data_pipeline.load_series(pathlib.Path(case, "PET", "image"))

    @parameterized.parameters(b"0\\0 ", b"-4\\-4 ")
    def test_every_slice(self, spacing):
        case = self.case()
        files = sorted(pathlib.Path(case, "PET", "image").glob("*.dcm"))
        for path in files:
            cases.replace_value(path, 0x00280030, spacing)
        outcome = self.ingest(case, [_rel(case, f) for f in files])
        for path in files:
            self.assert_line(outcome, _rel(case, path), "PixelSpacing .* is not positive")
        self.assert_slices_lost(outcome, "PET", PET_IMAGES)
        self.assertNotIn("outside the image", "\n".join(outcome.lines))


class FileNameAndSpecialFileTest(MalformedTestCase):
    """Defects 7 and 8 and their family: names that are not UTF-8, files that are not files."""

    def test_junk_with_a_name_that_is_not_utf8(self):
        case = self.case()
        junk = os.fsencode(case) + b"/PET/image/junk\xff\xfe.dcm"
        with open(junk, "wb") as file:
            file.write(b"\x00" * 500)
        outcome = self.ingest(case, ["PET/image/junk\udcff\udcfe.dcm"])
        self.assert_line(outcome, "PET/image/junk\\xff\\xfe.dcm", "not a DICOM file")
        self.assert_bad_series_intact(outcome)

    def test_good_slice_with_such_a_name_and_a_newline_is_still_read(self):
        case = self.case()
        slice_path = _image(case, k=7)
        os.rename(slice_path, os.fsencode(slice_path.parent) + b"/slice\xe9\n7.dcm")
        junk = pathlib.Path(case, "PET", "image", "notes\n.txt")
        junk.write_text("a note")
        outcome = self.ingest(case, [_rel(case, junk)])
        self.assert_bad_series_intact(outcome)
        self.assert_line(outcome, "PET/image/notes\\n.txt", "not a DICOM file")

    @parameterized.named_parameters(
        ("fifo", "fifo", r"not a regular file \(a FIFO\)"),
        ("socket", "socket", r"not a regular file \(a socket\)"),
        ("character_device", "devzero", r"not a regular file \(a character device\)"),
        ("broken_link", "broken", r"unreadable \(No such file or directory\)"),
        ("link_loop", "loop", r"unreadable \(Too many levels of symbolic links\)"),
        ("empty_file", "empty", r"not a DICOM file"),
    )
    def test_special_file_is_named_and_nothing_hangs(self, kind, reason):
        case = self.case()
        rng = mock.Mock()
        rng.choice = lambda options: kind if kind in options else options[0]
        (added,) = cases.add_special_file(case, "PET", rng)
        outcome = self.ingest(case, [added], timeout_s=30.0)
        self.assert_line(outcome, added, reason + ".*; skipped$")
        self.assert_bad_series_intact(outcome)
        self.assertEqual(outcome.summary.files_skipped, 1)

    def test_folder_named_dcm(self):
        case = self.case()
        pathlib.Path(case, "PET", "image", "empty.dcm").mkdir()
        outcome = self.ingest(case, [])
        self.assert_line(outcome, "PET/image/empty.dcm", "empty folder")
        self.assert_bad_series_intact(outcome)


class OddSliceTest(MalformedTestCase):
    """Defect 9: a slice unlike the rest of its series is named, not the series' first file."""

    def test_another_size(self):
        case = self.case()

        def crop(ds):
            pixels = ds.pixel_array[:-2]
            ds.Rows = pixels.shape[0]
            ds.PixelData = pixels.tobytes()

        bad = cases.edit(_image(case), crop)
        outcome = self.ingest(case, [_rel(case, bad)])
        self.assert_line(
            outcome,
            _rel(case, bad),
            r"its size \(25, 30\) differs from the rest of its series "
            r"\(\(27, 30\)\); slice skipped$",
        )
        self.assert_slices_lost(outcome, "PET", 1)
        with self.assertRaisesRegex(data_pipeline.InputProblem, re.escape(bad.name) + ": its size"):
            data_pipeline.load_series(pathlib.Path(case, "PET", "image"))

    @parameterized.named_parameters(
        ("orientation", "ImageOrientationPatient", [0.0, 1.0, 0.0, -1.0, 0.0, 0.0], "orientation"),
        ("patient", "PatientID", "STS_999", "patient_id"),
        ("frame", "FrameOfReferenceUID", "1.2.826.0.1.3680043.9.7", "frame_of_reference_uid"),
        ("pixel_spacing", "PixelSpacing", [4.0, 4.0], "pixel_spacing"),
    )
    def test_another_value(self, keyword, value, field):
        case = self.case()
        bad = cases.edit(_image(case), lambda ds: setattr(ds, keyword, value))
        outcome = self.ingest(case, [_rel(case, bad)])
        self.assert_line(outcome, _rel(case, bad), f"its {field} .* differs from the rest")
        self.assert_slices_lost(outcome, "PET", 1)


class CompressedSliceTest(MalformedTestCase):
    """Defect 11: an undecodable compressed slice: one line, one slice lost, the rest kept."""

    def jpeg_ls_slice(self, case):
        def recompress(ds):
            ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGLSLossless
            ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8" + b"\x17" * 300])
            ds["PixelData"].VR = "OB"

        return cases.edit(_image(case, k=11), recompress)

    def test_undecodable_data(self):
        case = self.case()
        bad = self.jpeg_ls_slice(case)
        outcome = self.ingest(case, [_rel(case, bad)])
        self.assert_line(outcome, _rel(case, bad), r"pixel data unreadable .*; slice skipped$")
        self.assert_slices_lost(outcome, "PET", 1)
        # The command line too: pydicom logs the failed decode with a traceback, which ingest
        # words in one line instead.
        with tempfile.TemporaryDirectory() as out:
            result = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "data_pipeline.ingest",
                    f"--dicom_dir={case}",
                    f"--out_dir={out}",
                ],
                capture_output=True,
                text=True,
                cwd=cases.REPO,
                check=False,
                timeout=120,
            )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertIn(f"{_rel(case, bad)}: pixel data unreadable", result.stderr)

    def test_no_decoder(self):
        case = self.case()
        bad = self.jpeg_ls_slice(case)
        decoder = mock.Mock(is_available=False)
        with mock.patch.object(dicom_rules.pydicom.pixels, "get_decoder", return_value=decoder):
            outcome = self.ingest(case, [_rel(case, bad)])
        self.assert_line(
            outcome, _rel(case, bad), r"compressed as JPEG-LS Lossless .*, which no installed"
        )
        self.assert_slices_lost(outcome, "PET", 1)


class CommandLineTest(MalformedTestCase):
    def test_many_bad_things_at_once(self):
        case = self.case()
        os.mkfifo(pathlib.Path(case, "PET", "image", "pipe.dcm"))
        with open(os.fsencode(case) + b"/junk\xff.dcm", "wb") as junk:
            junk.write(b"DICM" * 10)
        cases.replace_value(_image(case, k=2), 0x00280010, b"\x1b\x00\x00")
        cases.replace_value(_image(case, k=9), 0x00200032, b"nan\\0\\0 ")
        cases.replace_contour_text(_rtstruct(case), 0, lambda t: t.rsplit("\\", 1)[0])
        with tempfile.TemporaryDirectory() as out:
            result = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "data_pipeline.ingest",
                    f"--dicom_dir={case}",
                    f"--out_dir={out}",
                ],
                capture_output=True,
                text=True,
                cwd=cases.REPO,
                check=False,
                timeout=120,
            )
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertNotIn("Traceback", result.stderr)
            messages = [
                line
                for line in result.stderr.replace("\r", "\n").splitlines()
                if line.strip() and "it/s" not in line and "%|" not in line
            ]
            self.assertLen(messages, 6, messages)  # FIFO, junk, 2 slices, RTSTRUCT, PET series
            self.assertTrue(all(re.match(r"^[^ ]+: ", line) for line in messages), messages)
            self.assertIn(f"slices lost    {PET_IMAGES}", result.stdout)
            self.assertIn("files skipped  5", result.stdout)
            self.assertTrue(cases.same_contents(cases.series_contents(out, "CT"), self.ct_alone))


@absltest.skipUnless(cases.STS_IBSI.is_dir(), "shared IBSI data not found")
class KilledParentTest(absltest.TestCase):
    """Defect 12: SIGKILL of an ingest with --workers 2 leaves no process behind."""

    def session(self, sid: int) -> list[int]:
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.getsid(int(entry)) == sid:
                        pids.append(int(entry))
                except (ProcessLookupError, PermissionError):
                    continue
        return pids

    def test_no_process_survives(self):
        for extra_wait_s in (0.0, 2.0):
            with tempfile.TemporaryDirectory() as out:
                process = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "data_pipeline.ingest",
                        f"--dicom_dir={cases.STS_IBSI / 'dicom'}",
                        f"--out_dir={out}",
                        "--workers=2",
                    ],
                    cwd=cases.REPO,
                    start_new_session=True,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                try:
                    deadline = time.monotonic() + 60
                    # The parent, the resource tracker, the forkserver and a worker.
                    while len(self.session(process.pid)) < 4 and time.monotonic() < deadline:
                        time.sleep(0.05)
                    self.assertLen(self.session(process.pid), 4)
                    time.sleep(extra_wait_s)
                    os.kill(process.pid, signal.SIGKILL)
                    process.wait()
                    deadline = time.monotonic() + 10
                    while self.session(process.pid) and time.monotonic() < deadline:
                        time.sleep(0.1)
                    self.assertEqual(self.session(process.pid), [], f"after {extra_wait_s} s")
                finally:
                    for pid in self.session(process.pid):
                        os.kill(pid, signal.SIGKILL)


class QueryTest(absltest.TestCase):
    """Defect 13: an index with the wrong columns, a very long patient list, a corrupt file."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.mkdtemp()
        cls.index_dir = os.path.join(cls.tmp, "index")
        with index_writer_lib.IndexWriter(cls.index_dir) as writer:
            for k in range(3):
                key = f"STS_{k:03d}"
                writer.add_patient(key)
                writer.add_series(
                    series_key=f"S{k}",
                    patient_key=key,
                    study_uid="1",
                    series_uid=f"2.{k}",
                    modality="CT",
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
                writer.add_slice(
                    series_key=f"S{k}",
                    slice_index=0,
                    position_mm=0.0,
                    sop_instance_uid="4",
                    image=np.zeros((2, 2)),
                    mask=np.eye(2),
                )

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)
        super().tearDownClass()

    def run_query(self, index_dir):
        return subprocess.run(
            [sys.executable, "-m", "data_pipeline.query", f"--index={index_dir}"],
            capture_output=True,
            text=True,
            cwd=cases.REPO,
            check=False,
        )

    def test_wrong_columns(self):
        broken = os.path.join(self.tmp, "wrong_columns")
        shutil.copytree(self.index_dir, broken)
        connection = sqlite3.connect(os.path.join(broken, "index.sqlite"))
        with connection:
            connection.execute("ALTER TABLE slices RENAME COLUMN has_tumor TO tumour")
        connection.close()
        with self.assertRaisesRegex(index_lib.BadIndexError, "table slices lacks has_tumor"):
            index_lib.Index(broken)
        result = self.run_query(broken)
        self.assertEqual(result.returncode, query.EXIT_ERROR)
        self.assertNotIn("Traceback", result.stderr)
        self.assertLen(result.stderr.strip().splitlines(), 1)

    def test_corrupt_file(self):
        broken = os.path.join(self.tmp, "corrupt")
        shutil.copytree(self.index_dir, broken)
        path = pathlib.Path(broken, "index.sqlite")
        data = bytearray(path.read_bytes())
        data[100:4096] = b"\xab" * (4096 - 100)
        path.write_bytes(bytes(data))
        with self.assertRaises(index_lib.BadIndexError):
            index_lib.Index(broken).query()
        result = self.run_query(broken)
        self.assertEqual(result.returncode, query.EXIT_ERROR)
        self.assertNotIn("Traceback", result.stderr)

    def test_300000_patients(self):
        index = index_lib.Index(self.index_dir)
        names = [f"P{k:06d}" for k in range(300_000)] + ["STS_001"]
        (record,) = index.query(patients=names)
        self.assertEqual(record.patient_key, "STS_001")
        self.assertLen(index.query(patients=[]), 0)
        self.assertLen(index.query(patients=["STS_000", "STS_002"]), 2)
        self.assertLen(index.query(site=[f"s{k}" for k in range(50_000)]), 0)

    def test_malformed_meta(self):
        broken = os.path.join(self.tmp, "meta")
        shutil.copytree(self.index_dir, broken)
        connection = sqlite3.connect(os.path.join(broken, "index.sqlite"))
        with connection:
            connection.execute("UPDATE meta SET value = 'x' WHERE key = 'created_by'")
        connection.close()
        with self.assertRaisesRegex(index_lib.BadIndexError, "meta table is malformed"):
            index_lib.Index(broken).meta()
        self.assertEqual(json.loads(json.dumps(index_lib.Index(self.index_dir).meta()))["seed"], 0)


if __name__ == "__main__":
    absltest.main()
