"""Round trips of known masks through the DICOM-SEG, RTSTRUCT and NIfTI writers, no model needed.

Every geometry the ingest reads (files in reversed order, flipped axes, non-square pixels and grids,
oblique, sagittal and coronal slices) and every shape an RTSTRUCT must express (a ring with its
hole, two islands, an island inside a hole, a region touching the image border) goes through each
writer and back through an independent reader: highdicom for the SEG (exact), our ingest's
load_rtstruct_masks for the RTSTRUCT (Dice >= 0.98; in fact exact), nibabel for the NIfTI (voxels
and the affine against the DICOM formula written out here), and dcmqi's segimage2itkimage (the
converter 3D Slicer uses) for the SEG's geometry in world coordinates. Where dicom3tools is
installed (apt-get install dicom3tools), its IOD validator dciodvfy checks both DICOM objects.
"""

import json
import math
import os
import pathlib
import shutil
import subprocess
import tempfile

import highdicom
import nibabel
import numpy as np
import pydicom
import scipy.ndimage
from absl.testing import absltest, parameterized
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from data_pipeline import dicom_io, nifti_writer, rtstruct, rtstruct_writer, seg_writer

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SOURCE_IDENTIFIERS = {
    "PatientName": "Test^Patient",
    "PatientID": "WRITER_TEST_01",
    "PatientBirthDate": "19700101",
    "PatientSex": "F",
    "StudyID": "S1",
    "AccessionNumber": "A1",
    "StudyDate": "20200102",
    "StudyTime": "101010",
    "ReferringPhysicianName": "Ref^Doc",
}
# Identifying attributes of the source outside the patient and study modules: not to be copied.
NOT_TO_COPY = {
    "InstitutionName": "General Hospital",
    "StationName": "CT01",
    "OperatorsName": "Op^Erator",
    "PerformingPhysicianName": "Perf^Doc",
}
GEOMETRIES = {
    # name: (ImageOrientationPatient, PixelSpacing (row, col), rows, cols, files descending)
    "axial": ((1, 0, 0, 0, 1, 0), (1.0, 1.0), 24, 24, False),
    "reversed_file_order": ((1, 0, 0, 0, 1, 0), (0.9, 0.9), 24, 24, True),
    "flipped_axes_nonsquare_pixels": ((-1, 0, 0, 0, -1, 0), (0.7, 1.3), 24, 24, False),
    "nonsquare_grid": ((1, 0, 0, 0, 1, 0), (0.8, 1.1), 20, 33, True),
    "oblique": (
        (math.cos(0.3), math.sin(0.3), 0, -0.6 * math.sin(0.3), 0.6 * math.cos(0.3), -0.8),
        (0.9, 1.1),
        26,
        22,
        False,
    ),
    "sagittal": ((0, 1, 0, 0, 0, -1), (1.2, 0.8), 24, 28, True),
    "coronal": ((1, 0, 0, 0, 0, -1), (1.0, 2.0), 24, 24, False),
}
SLICE_SPACING_MM = 2.5


def disc(shape, centre, radius):
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


def known_masks(rows: int, cols: int) -> np.ndarray:
    """(6, rows, cols): empty, a ring with a hole, two islands, an island inside a ring's hole, a
    region cut by the image border, empty."""
    shape = (rows, cols)
    centre = (rows / 2 - 0.5, cols / 2 - 0.5)
    masks = np.zeros((6, rows, cols), bool)
    masks[1] = disc(shape, centre, 7) & ~disc(shape, centre, 3)
    masks[2] = disc(shape, (5, 5), 3) | disc(shape, (rows - 6, cols - 7), 4)
    masks[3] = (disc(shape, centre, 8) & ~disc(shape, centre, 5)) | disc(shape, centre, 1.5)
    masks[4] = disc(shape, (0, cols - 1), 6)
    return masks


def write_series(folder, orientation, spacing, rows, cols, masks, descending, extra=None):
    """A CT series written with pydicom, one file per slice; returns the file paths (file order).

    Slice k lies at origin + k * 2.5 mm along the normal; with ``descending`` the files (names and
    InstanceNumbers) run the other way, so only sorting along the normal puts them in order.
    """
    orientation = np.asarray(orientation, float)
    normal = dicom_io.slice_normal(orientation)
    origin = np.array([10.0, -20.0, 5.0])
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    count = len(masks)
    paths = []
    for k in range(count):
        file_index = count - 1 - k if descending else k
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 3, file_index + 1
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        for keyword, value in {**SOURCE_IDENTIFIERS, **NOT_TO_COPY, **(extra or {})}.items():
            setattr(ds, keyword, value)
        ds.Manufacturer = "test"
        ds.ImagePositionPatient = [float(v) for v in origin + k * SLICE_SPACING_MM * normal]
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.PixelSpacing = [float(v) for v in spacing]
        ds.SliceThickness = SLICE_SPACING_MM
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (1000 + 200 * masks[k]).astype(np.int16).tobytes()
        path = os.path.join(folder, f"{file_index:03d}.dcm")
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def headers(series):
    return [pydicom.dcmread(path, stop_before_pixels=True) for path in series.files]


def dice(a, b):
    return 2 * np.sum(a & b) / (a.sum() + b.sum())


def world_ras(series, k, row, col):
    """Pixel centre (row, col) of sorted slice k in RAS mm, by the DICOM formula (PS3.3
    C.7.6.2.1.1) on the file's own attributes: the independent reference for affines."""
    ds = pydicom.dcmread(series.files[k], stop_before_pixels=True)
    iop = np.array(ds.ImageOrientationPatient, float)
    dr, dc = (float(v) for v in ds.PixelSpacing)
    lps = np.array(ds.ImagePositionPatient, float) + col * dc * iop[:3] + row * dr * iop[3:]
    return lps * np.array([-1.0, -1.0, 1.0])


ALGORITHM = seg_writer.Algorithm(
    name="test algorithm",
    version="0.0.1",
    parameters={"git_commit": "abc123", "checkpoint": "checkpoints/best/4", "criterion": "best"},
)


class WritersRoundTripTest(parameterized.TestCase):
    def setUp(self):
        super().setUp()
        self.folder = pathlib.Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.folder, ignore_errors=True)

    def load(self, name):
        orientation, spacing, rows, cols, descending = GEOMETRIES[name]
        masks = known_masks(rows, cols)
        images = self.folder / "images"
        images.mkdir()
        write_series(images, orientation, spacing, rows, cols, masks, descending)
        series = dicom_io.load_series(images)
        # The series is sorted along the normal whatever the file order; the masks were drawn in
        # that order (slice k at origin + k * 2.5 mm).
        np.testing.assert_allclose(np.diff(series.slice_coords), SLICE_SPACING_MM, atol=1e-6)
        return series, masks

    @parameterized.parameters(*GEOMETRIES)
    def test_seg_read_back_by_highdicom_equals_the_mask(self, name):
        series, masks = self.load(name)
        path = self.folder / "seg.dcm"
        seg_writer.write_seg(headers(series), masks, path, ALGORITHM)
        seg = highdicom.seg.segread(path)
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=list(series.sop_instance_uids), segment_numbers=[1]
        )
        np.testing.assert_array_equal(pixels[..., 0].astype(bool), masks)
        self.assertEqual(seg.SegmentationType, "BINARY")
        (segment,) = seg.SegmentSequence
        self.assertEqual(segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue, "49755003")
        self.assertEqual(segment.SegmentedPropertyTypeCodeSequence[0].CodeValue, "108369006")
        self.assertEqual(segment.SegmentAlgorithmType, "AUTOMATIC")
        (algorithm,) = segment.SegmentationAlgorithmIdentificationSequence
        self.assertEqual(algorithm.AlgorithmName, "test algorithm")
        self.assertEqual(algorithm.AlgorithmVersion, "0.0.1")
        self.assertIn("git_commit=abc123", algorithm.AlgorithmParameters)
        self.assertIn("checkpoint=checkpoints/best/4", algorithm.AlgorithmParameters)
        self.assertEqual(algorithm.AlgorithmFamilyCodeSequence[0].CodeValue, "123110")
        (referenced,) = seg.ReferencedSeriesSequence
        self.assertEqual(referenced.SeriesInstanceUID, series.series_instance_uid)
        self.assertEqual(
            {item.ReferencedSOPInstanceUID for item in referenced.ReferencedInstanceSequence},
            set(series.sop_instance_uids),
        )
        self.assertNotEqual(seg.SeriesInstanceUID, series.series_instance_uid)
        self.assert_patient_and_study_copied_and_nothing_else(seg)

    @parameterized.parameters(*GEOMETRIES)
    def test_rtstruct_read_back_by_the_ingest(self, name):
        series, masks = self.load(name)
        path = self.folder / "rtstruct.dcm"
        _, count = rtstruct_writer.write_rtstruct(
            series, headers(series), masks.astype(np.float32), 0.5, path
        )
        # Slices 1-4: 2 (ring), 2 (islands), 3 (ring, hole, island in the hole), 1 (border).
        self.assertEqual(count, 8)
        (read_back,) = rtstruct.load_rtstruct_masks(path, series).values()
        self.assertGreaterEqual(dice(read_back, masks), 0.98)
        np.testing.assert_array_equal(read_back, masks)  # exact, in fact
        structure = rtstruct.read_rtstruct(path)
        geometry, how, warnings = rtstruct.link_rtstruct(
            structure, [rtstruct.SeriesGeometry.of(series)]
        )
        self.assertEqual(
            (geometry.series_instance_uid, how, warnings),
            (series.series_instance_uid, "series_uid", []),
        )
        ds = pydicom.dcmread(path)
        self.assertEqual(ds.Modality, "RTSTRUCT")
        self.assertEqual(ds.StructureSetROISequence[0].ROIGenerationAlgorithm, "AUTOMATIC")
        frame = ds.ReferencedFrameOfReferenceSequence[0]
        self.assertEqual(frame.FrameOfReferenceUID, series.frame_of_reference_uid)
        (study,) = frame.RTReferencedStudySequence
        self.assertEqual(study.ReferencedSOPInstanceUID, series.study_instance_uid)
        (referenced,) = study.RTReferencedSeriesSequence
        self.assertEqual(referenced.SeriesInstanceUID, series.series_instance_uid)
        self.assertLen(referenced.ContourImageSequence, len(series.sop_instance_uids))
        # Each contour references the image of its own slice.
        normal = series.normal
        for contour in ds.ROIContourSequence[0].ContourSequence:
            self.assertEqual(contour.ContourGeometricType, "CLOSED_PLANAR")
            points = np.array(contour.ContourData, float).reshape(-1, 3)
            self.assertEqual(len(points), contour.NumberOfContourPoints)
            k = int(np.argmin(np.abs(series.slice_coords - (points @ normal).mean())))
            self.assertLess(np.ptp(points @ normal), 1e-3)
            (image,) = contour.ContourImageSequence
            self.assertEqual(image.ReferencedSOPInstanceUID, series.sop_instance_uids[k])
        self.assert_patient_and_study_copied_and_nothing_else(ds)

    @parameterized.parameters(*GEOMETRIES)
    def test_nifti_voxels_and_affine(self, name):
        series, masks = self.load(name)
        path = self.folder / "mask.nii.gz"
        self.assertEqual(nifti_writer.write_nifti(masks, series, path), "")
        image = nibabel.load(path)
        data = np.asarray(image.dataobj)
        self.assertEqual(data.shape, (masks.shape[2], masks.shape[1], masks.shape[0]))
        np.testing.assert_array_equal(np.transpose(data, (2, 1, 0)), masks)
        rows, cols = masks.shape[1:]
        for k, row, col in [(0, 0, 0), (5, rows - 1, 0), (3, 2, cols - 1), (2, 7, 5)]:
            voxel = image.affine @ np.array([col, row, k, 1.0])
            np.testing.assert_allclose(voxel[:3], world_ras(series, k, row, col), atol=1e-4)
        self.assertEqual(int(image.header["sform_code"]), 1)

    @parameterized.parameters(*GEOMETRIES)
    def test_dcmqi_reads_our_seg_in_the_right_place(self, name):
        converter = shutil.which("segimage2itkimage")
        if converter is None:
            self.skipTest("dcmqi's segimage2itkimage is not installed (pip install dcmqi)")
        series, masks = self.load(name)
        seg_path = self.folder / "seg.dcm"
        seg_writer.write_seg(headers(series), masks, seg_path, ALGORITHM)
        out = self.folder / "dcmqi"
        out.mkdir()
        subprocess.run(
            [converter, "--inputDICOM", str(seg_path), "--outputDirectory", str(out), "-t", "nii"],
            check=True,
            capture_output=True,
        )
        meta = json.loads((out / "meta.json").read_text())
        self.assertEqual(meta["segmentAttributes"][0][0]["SegmentLabel"], seg_writer.SEGMENT_LABEL)
        image = nibabel.load(out / "1.nii.gz")
        # Every voxel dcmqi marks, carried to world coordinates and back through our NIfTI affine,
        # lands on a voxel centre of our grid, and the two sets of voxels are equal.
        ours, _ = nifti_writer.affine(series)
        ijk = np.argwhere(np.asarray(image.dataobj) > 0)
        world = image.affine @ np.c_[ijk, np.ones(len(ijk))].T
        ours_ijk = (np.linalg.inv(ours) @ world)[:3].T
        np.testing.assert_allclose(ours_ijk, np.round(ours_ijk), atol=1e-3)
        col, row, k = np.round(ours_ijk).astype(int).T
        found = np.zeros_like(masks)
        found[k, row, col] = True
        np.testing.assert_array_equal(found, masks)

    @parameterized.parameters("oblique", "sagittal")
    def test_dciodvfy_finds_no_errors_in_either_object(self, name):
        validator = shutil.which("dciodvfy")
        if validator is None:
            self.skipTest("dicom3tools' dciodvfy is not installed (apt-get install dicom3tools)")
        series, masks = self.load(name)
        seg_writer.write_seg(headers(series), masks, self.folder / "seg.dcm", ALGORITHM)
        rtstruct_writer.write_rtstruct(
            series, headers(series), masks.astype(float), 0.5, self.folder / "rt.dcm"
        )
        for file, iod in (("seg.dcm", "Segmentation"), ("rt.dcm", "RTStructureSet")):
            result = subprocess.run(
                [validator, str(self.folder / file)], capture_output=True, text=True
            )
            report = result.stdout + result.stderr
            self.assertIn(iod, report)
            self.assertNotIn("Error", report, report)
            self.assertNotIn("Warning", report, report)

    def test_rtstruct_of_a_probability_map_matches_its_threshold(self):
        orientation, spacing, rows, cols, descending = GEOMETRIES["oblique"]
        rng = np.random.default_rng(0)
        probabilities = scipy.ndimage.gaussian_filter(rng.random((6, rows, cols)), (0, 2.5, 2.5))
        probabilities = (probabilities - probabilities.min()) / np.ptp(probabilities)
        images = self.folder / "images"
        images.mkdir()
        write_series(images, orientation, spacing, rows, cols, probabilities > 0.5, descending)
        series = dicom_io.load_series(images)
        path = self.folder / "rtstruct.dcm"
        rtstruct_writer.write_rtstruct(series, headers(series), probabilities, 0.55, path)
        (read_back,) = rtstruct.load_rtstruct_masks(path, series).values()
        expected = probabilities >= 0.55
        self.assertGreater(expected.sum(), 200)
        self.assertGreaterEqual(dice(read_back, expected), 0.98)

    def test_empty_masks_are_written_and_read_back(self):
        series, masks = self.load("axial")
        empty = np.zeros_like(masks)
        seg_writer.write_seg(headers(series), empty, self.folder / "seg.dcm", ALGORITHM)
        pixels = highdicom.seg.segread(self.folder / "seg.dcm").get_pixels_by_source_instance(
            source_sop_instance_uids=list(series.sop_instance_uids), segment_numbers=[1]
        )
        self.assertFalse(pixels.any())
        _, count = rtstruct_writer.write_rtstruct(
            series, headers(series), empty.astype(np.float32), 0.5, self.folder / "rt.dcm"
        )
        self.assertEqual(count, 0)
        self.assertFalse(
            rtstruct.read_rtstruct(self.folder / "rt.dcm").rois[rtstruct_writer.ROI_NAME]
        )

    def test_mismatched_inputs_are_refused(self):
        series, masks = self.load("axial")
        with self.assertRaisesRegex(ValueError, "does not match"):
            seg_writer.write_seg(headers(series), masks[:, :-1], self.folder / "s.dcm", ALGORITHM)
        with self.assertRaisesRegex(ValueError, "not the series' images"):
            rtstruct_writer.write_rtstruct(
                series, headers(series)[::-1], masks.astype(float), 0.5, self.folder / "r.dcm"
            )

    def test_irregular_slice_spacing_is_reported_by_the_nifti_writer(self):
        series, masks = self.load("axial")
        series.positions = series.positions.copy()
        series.positions[-1] += series.normal * 1.0
        warning = nifti_writer.write_nifti(masks, series, self.folder / "m.nii.gz")
        self.assertIn("not evenly spaced", warning)

    def assert_patient_and_study_copied_and_nothing_else(self, ds):
        for keyword, value in SOURCE_IDENTIFIERS.items():
            self.assertEqual(str(ds.get(keyword)), value, keyword)
        for keyword, value in NOT_TO_COPY.items():
            self.assertNotEqual(str(ds.get(keyword, "")), value, keyword)


if __name__ == "__main__":
    absltest.main()
