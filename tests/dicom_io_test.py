"""Tests for DICOM series loading, units, ordering, MR classification and RTSTRUCT masks."""

import dataclasses
import datetime
import functools
import glob
import math
import os
import pathlib
import shutil
import tempfile
import warnings

import numpy as np
import pydicom
from absl.testing import absltest, parameterized
from matplotlib.path import Path as MplPath
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

import data_pipeline
from data_pipeline import dicom_header, dicom_io, dicom_scan, rtstruct

SHARED = pathlib.Path(
    os.environ.get(
        "SARCOMA_JAX_SHARED", pathlib.Path(__file__).resolve().parents[1] / ".." / "shared"
    )
)
STS_IBSI = SHARED / "data" / "sts_ibsi"


def write_image(
    path, *, modality, pixels, position, orientation, spacing, series_uid, frame_uid, extra=None
):
    """Writes one minimal single-frame image; returns its SOPInstanceUID."""
    sop_class = {
        "CT": "1.2.840.10008.5.1.4.1.1.2",
        "PT": "1.2.840.10008.5.1.4.1.1.128",
        "MR": "1.2.840.10008.5.1.4.1.1.4",
    }[modality]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = modality, "TEST_001"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = (
        "1.2.3",
        series_uid,
        frame_uid,
    )
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = [float(v) for v in spacing]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    ds.PixelData = pixels.tobytes()
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return ds.SOPInstanceUID


class LoadSeriesTest(parameterized.TestCase):
    def test_sorted_along_normal_whatever_the_file_order_and_direction(self):
        # A sagittal series (normal along -x... rows along y, columns along z) written with
        # positions decreasing with file name: load_series must sort ascending along the normal.
        orientation = (0, 1, 0, 0, 0, -1)
        normal = np.cross(orientation[:3], orientation[3:])
        with tempfile.TemporaryDirectory() as folder:
            uids = {}
            for i, coordinate in enumerate([9.0, 3.0, 6.0, 0.0]):
                pixels = np.full((4, 5), int(coordinate), np.int16)
                uids[coordinate] = write_image(
                    os.path.join(folder, f"{i}.dcm"),
                    modality="CT",
                    pixels=pixels,
                    position=coordinate * normal,
                    orientation=orientation,
                    spacing=(1, 2),
                    series_uid="1.2.3.4",
                    frame_uid="1.2.3.5",
                    extra={"RescaleSlope": 1, "RescaleIntercept": -1024},
                )
            series = data_pipeline.load_series(folder)
        np.testing.assert_allclose(series.slice_coords, [0, 3, 6, 9])
        np.testing.assert_allclose(series.pixels[:, 0, 0], [-1024, -1021, -1018, -1015])
        self.assertEqual(series.sop_instance_uids, tuple(uids[c] for c in (0.0, 3.0, 6.0, 9.0)))
        self.assertEqual(series.pixels.dtype, np.float32)
        self.assertEqual(series.units, "HU")

    def test_pet_body_weight_suv_with_decay_correction(self):
        injection = datetime.datetime(2020, 1, 1, 10, 0, 0)
        scan = injection + datetime.timedelta(minutes=60)
        drug = pydicom.Dataset()
        drug.RadionuclideTotalDose = 370e6  # Bq
        drug.RadionuclideHalfLife = 6586.2  # s
        drug.RadiopharmaceuticalStartTime = injection.strftime("%H%M%S")
        with tempfile.TemporaryDirectory() as folder:
            write_image(
                os.path.join(folder, "pet.dcm"),
                modality="PT",
                pixels=np.full((2, 2), 1000, np.uint16),
                position=(0, 0, 0),
                orientation=(1, 0, 0, 0, 1, 0),
                spacing=(4, 4),
                series_uid="1.2.3.6",
                frame_uid="1.2.3.5",
                extra={
                    "RescaleSlope": 2.5,
                    "RescaleIntercept": 0,
                    "Units": "BQML",
                    "DecayCorrection": "START",
                    "PatientWeight": 70,
                    "SeriesDate": scan.strftime("%Y%m%d"),
                    "SeriesTime": scan.strftime("%H%M%S"),
                    "RadiopharmaceuticalInformationSequence": pydicom.Sequence([drug]),
                },
            )
            series = data_pipeline.load_series(folder)
        activity_bq_ml = 1000 * 2.5
        decayed_dose = 370e6 * math.exp(-math.log(2) * 3600 / 6586.2)
        expected_suv = activity_bq_ml * 70_000 / decayed_dose
        np.testing.assert_allclose(series.pixels, expected_suv, rtol=1e-5)
        self.assertEqual(series.units, "SUV")

    @parameterized.parameters(
        ({"SeriesDescription": "T1 AX"}, "T1"),
        ({"SeriesDescription": "AX T2FS"}, "T2"),
        ({"SeriesDescription": "COR STIR"}, "STIR"),
        ({"SeriesDescription": "", "EchoTime": 12, "RepetitionTime": 500}, "T1"),
        ({"SeriesDescription": "", "EchoTime": 90, "RepetitionTime": 4000}, "T2"),
        (
            {
                "SeriesDescription": "",
                "InversionTime": 150,
                "ScanningSequence": "IR",
                "EchoTime": 40,
                "RepetitionTime": 5000,
            },
            "STIR",
        ),
        ({"SeriesDescription": "localiser"}, None),
    )
    def test_mr_sequence(self, attributes, expected):
        ds = pydicom.Dataset()
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        self.assertEqual(dicom_header.classify_mr_sequence(ds), expected)

    def test_bad_inputs_raise_one_line_problems(self):
        truncated = pydicom.data.get_testdata_file("MR_truncated.dcm")
        with tempfile.TemporaryDirectory() as folder:
            not_dicom = os.path.join(folder, "notes.txt")
            pathlib.Path(not_dicom).write_text("hello")
            with self.assertRaisesRegex(dicom_io.InputProblem, "not a DICOM file"):
                dicom_io.read_header(not_dicom)
            with self.assertRaisesRegex(dicom_io.InputProblem, "no DICOM image files"):
                data_pipeline.load_series(folder)
        with self.assertRaisesRegex(dicom_io.InputProblem, "MR_truncated.dcm: truncated"):
            data_pipeline.load_series([truncated])


def _fill_reference(polygons_rc, shape):
    """Even-odd fill by matplotlib's point-in-polygon on pixel centres: an independent reference."""
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    centres = np.stack([rows.ravel(), cols.ravel()], axis=1).astype(float)
    inside = np.zeros(shape[0] * shape[1], bool)
    for polygon in polygons_rc:
        inside ^= MplPath(polygon).contains_points(centres)
    return inside.reshape(shape)


class RasteriseTest(parameterized.TestCase):
    @parameterized.named_parameters(
        ("axial", (1, 0, 0, 0, 1, 0), (1.0, 1.0)),
        ("axial_flipped_nonsquare", (-1, 0, 0, 0, -1, 0), (0.7, 1.3)),
        ("coronal", (1, 0, 0, 0, 0, -1), (1.0, 2.0)),
        (
            "oblique",
            (math.cos(0.3), math.sin(0.3), 0, -0.6 * math.sin(0.3), 0.6 * math.cos(0.3), -0.8),
            (0.9, 1.1),
        ),
    )
    def test_matches_point_in_polygon_reference(self, orientation, spacing):
        rng = np.random.default_rng(0)
        orientation = np.array(orientation, float)
        normal = dicom_io.slice_normal(orientation)
        rows, cols, num_slices = 24, 30, 3
        origin = np.array([10.0, -20.0, 5.0])
        positions = np.array([origin + k * 2.5 * normal for k in range(num_slices)])
        series = dicom_io.Series(
            pixels=np.zeros((num_slices, rows, cols), np.float32),
            positions=positions,
            orientation=orientation,
            pixel_spacing=np.array(spacing),
            sop_instance_uids=("a", "b", "c"),
            series_instance_uid="s",
            study_instance_uid="t",
            frame_of_reference_uid="f",
            modality="CT",
            sequence=None,
            patient_id="p",
            description="",
            units="HU",
            files=(),
        )
        # Two overlapping random star polygons on slice 1 (pixel coordinates), one on slice 2.
        polygons = {1: [], 2: []}
        for k, count in ((1, 2), (2, 1)):
            for _ in range(count):
                angles = np.sort(rng.uniform(0, 2 * np.pi, 12))
                radius = rng.uniform(3, 9, 12)
                centre = rng.uniform([8, 8], [rows - 8, cols - 8])
                polygons[k].append(
                    np.stack(
                        [centre[0] + radius * np.sin(angles), centre[1] + radius * np.cos(angles)],
                        axis=1,
                    )
                )
        contours = []
        for k, polygon_list in polygons.items():
            for polygon_rc in polygon_list:
                points = (
                    positions[k]
                    + np.outer(polygon_rc[:, 1] * spacing[1], orientation[:3])
                    + np.outer(polygon_rc[:, 0] * spacing[0], orientation[3:])
                )
                contours.append(rtstruct.Contour(points_mm=points, referenced_sop_uids=()))
        mask, warnings = rtstruct.rasterise(contours, series)
        self.assertEqual(warnings, [])
        self.assertFalse(mask[0].any())
        for k, polygon_list in polygons.items():
            expected = _fill_reference(polygon_list, (rows, cols))
            disagreement = np.sum(mask[k] != expected)
            # Pixel centres exactly on an edge may go either way; they are rare for random polygons.
            self.assertLessEqual(disagreement, 2, f"slice {k}")
            self.assertGreater(expected.sum(), 20)

    def test_contour_outside_image_and_off_slices_are_reported(self):
        series = dicom_io.Series(
            pixels=np.zeros((2, 10, 10), np.float32),
            positions=np.array([[0, 0, 0], [0, 0, 3.0]]),
            orientation=np.array([1.0, 0, 0, 0, 1, 0]),
            pixel_spacing=np.array([1.0, 1.0]),
            sop_instance_uids=("a", "b"),
            series_instance_uid="s",
            study_instance_uid="t",
            frame_of_reference_uid="f",
            modality="CT",
            sequence=None,
            patient_id="p",
            description="",
            units="HU",
            files=(),
        )
        square = np.array([[0, 0], [4, 0], [4, 4], [0, 4]], float)
        outside = rtstruct.Contour(np.c_[square + 50, np.zeros(4)], ())
        off_slice = rtstruct.Contour(np.c_[square, np.full(4, 9.0)], ())
        mask, warnings = rtstruct.rasterise([outside, off_slice], series, "GTV", "rt.dcm")
        self.assertFalse(mask.any())
        self.assertLen(warnings, 2)
        self.assertIn("outside the image", warnings[0])
        self.assertIn("lies on no slice", warnings[1])

    def test_roi_chosen_by_name_pattern_not_index(self):
        self.assertEqual(rtstruct.select_rois(["GTV_Edema", "GTV_Mass_CT"]), "GTV_Mass_CT")
        self.assertEqual(rtstruct.select_rois(["Body", "gtv1"]), "gtv1")
        self.assertIsNone(rtstruct.select_rois(["Body", "PTV"]))


@absltest.skipUnless(STS_IBSI.is_dir(), "shared IBSI data not found")
class ReferenceMaskTest(parameterized.TestCase):
    """The masks of all 39 real series equal the published reference masks."""

    @parameterized.parameters("CT", "PET", "MR_T1")
    def test_reference_masks(self, modality):
        patients = sorted(os.listdir(STS_IBSI / "dicom"))
        self.assertLen(patients, 13)
        for patient in patients:
            folder = STS_IBSI / "dicom" / patient / modality
            series = data_pipeline.load_series(folder / "image")
            (rtstruct_path,) = glob.glob(str(folder / "mask" / "*.dcm"))
            masks = data_pipeline.load_rtstruct_masks(
                rtstruct_path, series, roi_patterns=("GTV_Mass",)
            )
            (mask,) = masks.values()
            reference = np.load(STS_IBSI / "reference_masks" / f"{patient}_{modality}.npz")
            self.assertEqual(series.sop_instance_uids, tuple(reference["sop_instance_uids"]))
            expected = reference["mask"]
            dice = 2 * np.sum(mask & expected) / (mask.sum() + expected.sum())
            self.assertGreaterEqual(dice, 0.999, f"{patient} {modality}")
            self.assertTrue(np.all(np.diff(series.slice_coords) > 0))


if __name__ == "__main__":
    absltest.main()


def _read(read, path, fast_paths=True):
    """read(path), or the InputProblem's text; fast_paths=False: pydicom's reader does all the
    reading, as before the scanner existed."""
    try:
        return read(path, fast_paths=fast_paths)
    except dicom_io.InputProblem as problem:
        return str(problem)


def _scanned(path):
    """Whether the header scanner reads this file itself (else it leaves it to pydicom)."""
    return dicom_scan.scan_header(path, dicom_header._SCAN_TAGS) is not None


_header = functools.partial(_read, dicom_io.read_header)
_header_by_pydicom = functools.partial(_read, dicom_io.read_header, fast_paths=False)
_structure = functools.partial(_read, rtstruct.read_rtstruct)
_structure_by_pydicom = functools.partial(_read, rtstruct.read_rtstruct, fast_paths=False)


class HeaderScanTest(absltest.TestCase):
    """The fast header scanner against pydicom's reader: equal headers, equal pixels."""

    def assert_same_headers(self, files):
        scanned = 0
        for path in files:
            expected, got = _header_by_pydicom(path), _header(path)
            scanned += _scanned(path)
            if (
                isinstance(expected, dicom_io.Header)
                and expected.pixel_offset is None
                and (isinstance(got, dicom_io.Header) and got.pixel_offset is not None)
            ):
                # pydicom decodes the pixels (pixel_array); the scanner locates them in the file.
                np.testing.assert_array_equal(
                    dicom_io._physical_values(got), dicom_io._physical_values(expected), path
                )
                got = dataclasses.replace(got, pixel_offset=None, pixel_dtype=None)
            self.assertEqual(got, expected, path)
        return scanned

    def test_phantom(self):
        from data_pipeline import phantom

        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        phantom.write_phantom(folder, 2, seed=3, progress=False)
        files = sorted(glob.glob(os.path.join(folder, "**", "*"), recursive=True))
        files = [f for f in files if os.path.isfile(f)]
        dicom_files = [f for f in files if f.endswith(".dcm")]
        self.assertGreater(len(dicom_files), 100)
        self.assertEqual(self.assert_same_headers(files), len(dicom_files))

    def test_real_data(self):
        if not STS_IBSI.is_dir():
            self.skipTest(f"{STS_IBSI} is absent")
        files = sorted(str(p) for p in (STS_IBSI / "dicom").rglob("*") if p.is_file())
        self.assertGreater(self.assert_same_headers(files), 0.95 * len(files))

    def test_pydicom_test_files(self):
        # Big endian, deflated, compressed, implicit VR, truncated, not DICOM at all: the scanner
        # reads what it can and leaves the rest to pydicom, with the same result either way.
        # The files pydicom ships (get_testdata_files would try to download the others).
        shipped = pathlib.Path(pydicom.data.__file__).parent / "test_files"
        files = sorted(str(p) for p in shipped.rglob("*") if p.is_file())
        self.assertGreater(len(files), 50)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about the broken ones
            self.assert_same_headers(files)
        # Its NumberOfFrames '1A' is malformed, but an RTDOSE is no image ingest reads: the header
        # is read without looking at its image attributes (tests/malformed_test.py checks images).
        header = dicom_io.read_header(str(shipped / "badVR.dcm"))
        self.assertEqual((header.modality, header.rows), ("RTDOSE", None))

    def test_implicit_vr_nested_sequences_and_latin1_text(self):
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        path = os.path.join(folder, "pt.dcm")
        write_image(
            path,
            modality="PT",
            pixels=np.arange(12, dtype=np.uint16).reshape(3, 4),
            position=(0, 0, 5),
            orientation=(1, 0, 0, 0, 1, 0),
            spacing=(2, 2),
            series_uid="1.2.9",
            frame_uid="1.2.10",
        )
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SeriesDescription = "Oberschenkel rechts, Größe"
        ds.Units, ds.PatientWeight, ds.DecayCorrection = "BQML", 70.0, "START"
        ds.SeriesDate, ds.SeriesTime = "20200101", "120000"
        drug = pydicom.Dataset()
        drug.RadionuclideTotalDose, drug.RadionuclideHalfLife = 3.7e8, 6586.2
        drug.RadiopharmaceuticalStartTime = "110000"
        code = pydicom.Dataset()  # a sequence inside the sequence item
        code.CodeValue, code.CodingSchemeDesignator = "C-111A1", "SRT"
        drug.RadionuclideCodeSequence = [code]
        ds.RadiopharmaceuticalInformationSequence = [drug]
        ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=True)
        self.assertTrue(_scanned(path))
        self.assert_same_headers([path])
        header = dicom_io.read_header(path)
        self.assertEqual(header.description, "Oberschenkel rechts, Größe")
        self.assertEqual(header.units, "SUV")
        decay = math.exp(-math.log(2) * 3600 / 6586.2)
        self.assertAlmostEqual(header.units_factor, 70e3 / (3.7e8 * decay))


class RtstructScanTest(absltest.TestCase):
    """The RTSTRUCT contour scanner against pydicom's reader: equal structure sets."""

    def assert_same_structures(self, paths):
        scanned = 0
        for path in paths:
            expected, got = _structure_by_pydicom(path), _structure(path)
            scanned += rtstruct._scan_rtstruct(path) is not None
            if isinstance(expected, str):
                self.assertEqual(got, expected, path)
                continue
            for field in (
                "path",
                "patient_id",
                "frame_of_reference_uids",
                "referenced_series_uids",
                "description",
            ):
                self.assertEqual(getattr(got, field), getattr(expected, field), (path, field))
            self.assertEqual(list(got.rois), list(expected.rois), path)
            for name, contours in expected.rois.items():
                self.assertLen(got.rois[name], len(contours))
                for ours, theirs in zip(got.rois[name], contours, strict=True):
                    np.testing.assert_array_equal(ours.points_mm, theirs.points_mm)
                    self.assertEqual(ours.referenced_sop_uids, theirs.referenced_sop_uids)
        return scanned

    def _phantom_rtstructs(self):
        from data_pipeline import phantom

        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        phantom.write_phantom(folder, 2, seed=5, progress=False)
        paths = [
            str(p)
            for p in pathlib.Path(folder).rglob("*.dcm")
            if dicom_io.read_header(str(p)).modality == "RTSTRUCT"
        ]
        self.assertNotEmpty(paths)
        return folder, paths

    def test_phantom_and_its_variants(self):
        folder, paths = self._phantom_rtstructs()
        self.assertEqual(self.assert_same_structures(paths), len(paths))
        # The same structure set in implicit VR, with sequences of defined length, and with a
        # contour that is not closed planar; then cut short, and as big endian (pydicom's).
        ds = pydicom.dcmread(paths[0])
        ds.ROIContourSequence[0].ContourSequence[0].ContourGeometricType = "OPEN_PLANAR"
        variants = []
        for name, implicit in (("implicit.dcm", True), ("explicit.dcm", False)):
            variant = os.path.join(folder, name)
            for element in ds.iterall():
                if element.VR == "SQ":
                    element.is_undefined_length = implicit
            ds.file_meta.TransferSyntaxUID = (
                pydicom.uid.ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
            )
            ds.save_as(variant, enforce_file_format=True)
            variants.append(variant)
        truncated = os.path.join(folder, "truncated.dcm")
        data = pathlib.Path(paths[0]).read_bytes()
        pathlib.Path(truncated).write_bytes(data[: len(data) // 2])
        big_endian = os.path.join(folder, "big_endian.dcm")
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRBigEndian
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom deprecates writing big endian
            pydicom.filewriter.dcmwrite(
                big_endian, ds, implicit_vr=False, little_endian=False, force_encoding=True
            )
        self.assertEqual(self.assert_same_structures(variants), 2)
        self.assertEqual(self.assert_same_structures([truncated, big_endian]), 0)
        open_planar = _structure(variants[0])
        first_roi = next(iter(open_planar.rois))
        self.assertLen(open_planar.rois[first_roi], len(_structure(paths[0]).rois[first_roi]) - 1)
        self.assertRegex(_structure(truncated), "unreadable (DICOM|RTSTRUCT)")

    def test_real_data(self):
        if not STS_IBSI.is_dir():
            self.skipTest(f"{STS_IBSI} is absent")
        paths = sorted(str(p) for p in (STS_IBSI / "dicom").rglob("mask/*.dcm"))
        self.assertLen(paths, 39)
        self.assertEqual(self.assert_same_structures(paths), 39)
