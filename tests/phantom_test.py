"""Tests for the DICOM phantom: valid files, determinism, series, quirks, contours, domain shift."""

import collections
import csv
import os
import pathlib
import subprocess
import sys
import tempfile

import matplotlib.path
import numpy as np
import pydicom
import pydicom.uid
from absl.testing import absltest

from data_pipeline import phantom

_SIZE = dict(image_size=48, num_slices=12)
_NUM_PATIENTS = 4  # quirks are scheduled by patient index % 4, so four patients show them all
_REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

_REQUIRED = {
    "common": (
        "SOPClassUID",
        "SOPInstanceUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "Modality",
        "PatientID",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "ReferringPhysicianName",
        "StudyID",
        "AccessionNumber",
        "SeriesNumber",
        "Manufacturer",
    ),
    "image": (
        "FrameOfReferenceUID",
        "PositionReferenceIndicator",
        "InstanceNumber",
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
        "SliceThickness",
        "Rows",
        "Columns",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "ImageType",
        "PixelData",
    ),
    "CT": ("RescaleIntercept", "RescaleSlope", "KVP", "AcquisitionNumber"),
    "PT": (
        "RescaleIntercept",
        "RescaleSlope",
        "Units",
        "DecayCorrection",
        "CorrectedImage",
        "SeriesType",
        "CountsSource",
        "NumberOfSlices",
        "ImageIndex",
        "FrameReferenceTime",
        "ActualFrameDuration",
        "SeriesTime",
        "AcquisitionTime",
        "PatientWeight",
        "RadiopharmaceuticalInformationSequence",
    ),
    "MR": (
        "ScanningSequence",
        "SequenceVariant",
        "ScanOptions",
        "MRAcquisitionType",
        "EchoTime",
        "RepetitionTime",
        "EchoTrainLength",
    ),
    "RTSTRUCT": (
        "StructureSetLabel",
        "StructureSetDate",
        "StructureSetTime",
        "ReferencedFrameOfReferenceSequence",
        "StructureSetROISequence",
        "ROIContourSequence",
        "RTROIObservationsSequence",
        "OperatorsName",
    ),
}
_SOP_CLASS = {
    "CT": pydicom.uid.CTImageStorage,
    "PT": pydicom.uid.PositronEmissionTomographyImageStorage,
    "MR": pydicom.uid.MRImageStorage,
    "RTSTRUCT": pydicom.uid.RTStructureSetStorage,
}


def _read_all(folder):
    """{relative path: dataset} of every .dcm file, read strictly (no force)."""
    root = pathlib.Path(folder)
    return {
        str(p.relative_to(root)): pydicom.dcmread(p, force=False)
        for p in sorted(root.rglob("*.dcm"))
    }


def _geometry(datasets):
    """Geometry of an image series from its datasets, independent of the phantom's own classes.

    Returns:
      (positions (S, 3) sorted along the normal, row cosine, column cosine, (row, col) spacing mm,
       sop uids in that order, instance numbers in that order).
    """
    orientation = np.array([float(v) for v in datasets[0].ImageOrientationPatient])
    row, col = orientation[:3], orientation[3:]
    normal = np.cross(row, col)
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    order = np.argsort(positions @ normal)
    spacing = tuple(float(v) for v in datasets[0].PixelSpacing)
    sops = [str(datasets[i].SOPInstanceUID) for i in order]
    instances = [int(datasets[i].InstanceNumber) for i in order]
    return positions[order], row, col, spacing, sops, instances


def _even_odd_fill(polygons_rc, rows, cols):
    """Even-odd fill at pixel centres with matplotlib (an independent reference rasteriser)."""
    centres = np.stack(np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij"), -1)
    inside = np.zeros((rows, cols), bool)
    for polygon in polygons_rc:
        inside ^= (
            matplotlib.path.Path(polygon)
            .contains_points(centres.reshape(-1, 2))
            .reshape(rows, cols)
        )
    return inside


def _dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


class PhantomTest(absltest.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.TemporaryDirectory()
        cls.root = pathlib.Path(cls.tmp.name) / "phantom"
        cls.keys = phantom.write_phantom(cls.root, _NUM_PATIENTS, seed=0, progress=False, **_SIZE)
        cls.datasets = _read_all(cls.root)
        cls.by_series = collections.defaultdict(list)
        for ds in cls.datasets.values():
            cls.by_series[str(ds.SeriesInstanceUID)].append(ds)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()
        super().tearDownClass()

    def _image_series(self, patient_id):
        return [
            series
            for series in self.by_series.values()
            if series[0].PatientID == patient_id and series[0].Modality != "RTSTRUCT"
        ]

    def _structures(self):
        return [s[0] for s in self.by_series.values() if s[0].Modality == "RTSTRUCT"]

    def test_patient_keys_and_clinical_csv(self):
        self.assertEqual(self.keys, [f"PHANTOM_{i:03d}" for i in range(_NUM_PATIENTS)])
        self.assertCountEqual([p.name for p in self.root.iterdir() if p.is_dir()], self.keys)
        with open(self.root / "clinical.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        self.assertEqual(list(rows[0]), ["patient_id", "age", "sex", "site"])
        self.assertEqual([r["patient_id"] for r in rows], self.keys)
        for row in rows:
            self.assertBetween(int(row["age"]), 18, 90)
            self.assertIn(row["sex"], ("M", "F"))
            self.assertIn(row["site"], phantom.SITES)

    def test_files_are_valid_dicom_with_required_attributes(self):
        self.assertLen(self.datasets, sum(len(s) for s in self.by_series.values()))
        for path, ds in self.datasets.items():
            modality = ds.Modality
            self.assertEqual(ds.file_meta.MediaStorageSOPClassUID, _SOP_CLASS[modality], path)
            self.assertEqual(ds.file_meta.MediaStorageSOPInstanceUID, ds.SOPInstanceUID, path)
            self.assertEqual(ds.SOPClassUID, _SOP_CLASS[modality], path)
            required = _REQUIRED["common"] + _REQUIRED[modality]
            if modality != "RTSTRUCT":
                required += _REQUIRED["image"]
            for keyword in required:
                self.assertIn(keyword, ds, f"{path} lacks {keyword}")
            self.assertTrue(ds.PatientID.startswith("PHANTOM_"), path)
            self.assertEqual(str(ds.PatientName), "ANONYMIZED", path)
            self.assertEqual(ds.PatientBirthDate, "", path)
            if modality != "RTSTRUCT":
                pixels = ds.pixel_array
                self.assertEqual(pixels.shape, (ds.Rows, ds.Columns), path)
                self.assertEqual(ds.BitsStored, 16)
                self.assertEqual(ds.PhotometricInterpretation, "MONOCHROME2")
        ct = next(ds for ds in self.datasets.values() if ds.Modality == "CT")
        self.assertEqual(ct.pixel_array.dtype, np.int16)
        self.assertEqual((float(ct.RescaleIntercept), float(ct.RescaleSlope)), (-1024.0, 1.0))
        pet = next(ds for ds in self.datasets.values() if ds.Modality == "PT")
        self.assertEqual(pet.pixel_array.dtype, np.uint16)
        self.assertEqual(pet.Units, "BQML")
        self.assertEqual(pet.DecayCorrection, "START")
        drug = pet.RadiopharmaceuticalInformationSequence[0]
        self.assertEqual(float(drug.RadionuclideHalfLife), 6586.2)
        self.assertGreater(float(drug.RadionuclideTotalDose), 1e8)

    def test_pet_rescale_slope_varies_per_slice(self):
        for series in self.by_series.values():
            if series[0].Modality == "PT":
                self.assertGreater(len({float(ds.RescaleSlope) for ds in series}), 1)

    def test_same_seed_same_bytes_other_seed_differs(self):
        with tempfile.TemporaryDirectory() as tmp:
            again, other = pathlib.Path(tmp) / "again", pathlib.Path(tmp) / "other"
            # A patient's files do not depend on how many patients are written.
            phantom.write_phantom(again, 2, seed=0, progress=False, **_SIZE)
            phantom.write_phantom(other, 2, seed=1, progress=False, **_SIZE)
            for key in ("PHANTOM_000", "PHANTOM_001"):
                first = sorted((self.root / key).rglob("*.dcm"))
                second = sorted((again / key).rglob("*.dcm"))
                self.assertEqual(
                    [p.relative_to(self.root) for p in first],
                    [p.relative_to(again) for p in second],
                )
                for a, b in zip(first, second, strict=True):
                    self.assertEqual(a.read_bytes(), b.read_bytes(), a)
            self.assertNotEqual(phantom.tree_digest(again), phantom.tree_digest(other))
            ct = [p for p in (other / "PHANTOM_000").rglob("*.dcm")]
            other_uids = {str(pydicom.dcmread(p).SOPInstanceUID) for p in ct}
            self.assertFalse(other_uids & {str(ds.SOPInstanceUID) for ds in self.datasets.values()})

    def test_series_studies_and_frames_of_reference(self):
        sequences = collections.Counter()
        for key in self.keys:
            series = {}
            for s in self._image_series(key):
                ds = s[0]
                if ds.Modality == "MR":
                    name = "T1" if "T1" in ds.SeriesDescription else "T2"
                    is_stir = "IR" in ds.ScanningSequence
                    sequences["STIR" if is_stir else name] += 1
                    if is_stir:
                        self.assertIn("STIR", ds.SeriesDescription)
                        self.assertBetween(float(ds.InversionTime), 100, 200)
                    if name == "T1":
                        self.assertLess(float(ds.EchoTime), 30)
                        self.assertLess(float(ds.RepetitionTime), 1000)
                    else:
                        self.assertGreater(float(ds.EchoTime), 30)
                        self.assertGreater(float(ds.RepetitionTime), 2000)
                else:
                    name = ds.Modality
                self.assertNotIn(name, series, key)
                series[name] = ds
            self.assertCountEqual(series, ["CT", "PT", "T1", "T2"], key)
            ct, pt, t1, t2 = (series[n] for n in ("CT", "PT", "T1", "T2"))
            self.assertEqual(ct.FrameOfReferenceUID, pt.FrameOfReferenceUID)
            self.assertEqual(ct.StudyInstanceUID, pt.StudyInstanceUID)
            self.assertEqual(t1.FrameOfReferenceUID, t2.FrameOfReferenceUID)
            self.assertEqual(t1.StudyInstanceUID, t2.StudyInstanceUID)
            self.assertNotEqual(ct.FrameOfReferenceUID, t1.FrameOfReferenceUID)
            self.assertNotEqual(ct.StudyInstanceUID, t1.StudyInstanceUID)
            # PET at lower resolution than CT.
            self.assertGreater(float(pt.PixelSpacing[0]), 2 * float(ct.PixelSpacing[0]))
            self.assertLess(pt.Rows, ct.Rows)
        self.assertGreaterEqual(sequences["STIR"], 1)
        self.assertGreaterEqual(sequences["T2"], 1)
        self.assertEqual(sequences["T1"], _NUM_PATIENTS)

    def test_one_rtstruct_per_image_series_with_both_rois(self):
        structures = self._structures()
        image_uids = {uid for uid, s in self.by_series.items() if s[0].Modality != "RTSTRUCT"}
        referenced = []
        for ds in structures:
            frame = ds.ReferencedFrameOfReferenceSequence[0]
            series_ref = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
            uid = str(series_ref.SeriesInstanceUID)
            referenced.append(uid)
            self.assertIn(uid, image_uids)
            images = self.by_series[uid]
            self.assertEqual(frame.FrameOfReferenceUID, images[0].FrameOfReferenceUID)
            self.assertEqual(ds.StudyInstanceUID, images[0].StudyInstanceUID)
            self.assertEqual(
                {str(i.ReferencedSOPInstanceUID) for i in series_ref.ContourImageSequence},
                {str(im.SOPInstanceUID) for im in images},
            )
            names = [str(roi.ROIName) for roi in ds.StructureSetROISequence]
            self.assertCountEqual(names, phantom.ROI_NAMES)
            numbers = {int(roi.ROINumber) for roi in ds.StructureSetROISequence}
            self.assertEqual({int(c.ReferencedROINumber) for c in ds.ROIContourSequence}, numbers)
            for roi_contour in ds.ROIContourSequence:
                self.assertNotEmpty(roi_contour.ContourSequence)
                for contour in roi_contour.ContourSequence:
                    self.assertEqual(contour.ContourGeometricType, "CLOSED_PLANAR")
                    self.assertEqual(len(contour.ContourData), 3 * contour.NumberOfContourPoints)
        self.assertCountEqual(referenced, image_uids)

    def test_tcia_quirks_present(self):
        descending = shuffled = non_square = non_axial = False
        for series in self.by_series.values():
            if series[0].Modality == "RTSTRUCT":
                continue
            positions, row, col, spacing, _, instances = _geometry(series)
            steps = np.diff(instances)
            descending |= bool(np.all(steps < 0))
            shuffled |= bool(np.any(steps < 0) and np.any(steps > 0))
            non_square |= spacing[0] != spacing[1]
            normal = np.cross(row, col)
            non_axial |= series[0].Modality == "MR" and abs(normal[2]) < 0.999
        self.assertTrue(descending, "no series numbered against its slice direction")
        self.assertTrue(shuffled, "no series with InstanceNumber in random order")
        self.assertTrue(non_square, "no series with non-square pixels")
        self.assertTrue(non_axial, "no non-axial MR series")
        structures = self._structures()
        without_images = [
            ds
            for ds in structures
            if not any(
                "ContourImageSequence" in c
                for rc in ds.ROIContourSequence
                for c in rc.ContourSequence
            )
        ]
        self.assertNotEmpty(without_images)
        self.assertLess(len(without_images), len(structures))
        first_roi = {str(ds.StructureSetROISequence[0].ROIName) for ds in structures}
        self.assertCountEqual(first_roi, phantom.ROI_NAMES)  # ROI order varies
        descriptions = {str(ds.SeriesDescription) for ds in structures}
        self.assertTrue({"RTstructCT", "RTStructCT"} & descriptions)
        self.assertGreater(len(descriptions), 4)

    def test_contours_lie_on_slices_inside_the_image_and_fill_to_the_true_mask(self):
        for key in self.keys:
            plan = phantom.plan_patient(0, int(key.split("_")[1]), **_SIZE)
            for name, series_plan in plan.series.items():
                images = self.by_series[series_plan.series_uid]
                positions, row, col, spacing, sops, _ = _geometry(images)
                self.assertEqual(tuple(sops), series_plan.sop_uids)
                rows, cols = images[0].Rows, images[0].Columns
                normal = np.cross(row, col)
                slice_coords = positions @ normal
                structure = next(
                    s[0]
                    for s in self.by_series.values()
                    if s[0].Modality == "RTSTRUCT"
                    and s[0].SeriesInstanceUID == series_plan.structure.series_uid
                )
                numbers = {
                    int(r.ROINumber): str(r.ROIName) for r in structure.StructureSetROISequence
                }
                truth = phantom.true_masks(plan, name)
                for roi_contour in structure.ROIContourSequence:
                    roi = numbers[int(roi_contour.ReferencedROINumber)]
                    per_slice = collections.defaultdict(list)
                    for contour in roi_contour.ContourSequence:
                        points = np.array([float(v) for v in contour.ContourData]).reshape(-1, 3)
                        along = points @ normal
                        k = int(np.argmin(np.abs(slice_coords - along.mean())))
                        np.testing.assert_allclose(along, slice_coords[k], atol=1e-2)
                        relative = points - positions[k]
                        rc = np.stack(
                            [relative @ col / spacing[0], relative @ row / spacing[1]], -1
                        )
                        self.assertTrue(
                            np.all(rc >= -0.5) and np.all(rc <= [rows - 0.5, cols - 0.5])
                        )
                        if "ContourImageSequence" in contour:
                            self.assertEqual(
                                contour.ContourImageSequence[0].ReferencedSOPInstanceUID, sops[k]
                            )
                        per_slice[k].append(rc)
                    filled = np.zeros_like(truth[roi])
                    for k, polygons in per_slice.items():
                        filled[k] = _even_odd_fill(polygons, rows, cols)
                    self.assertGreater(truth[roi].sum(), 0, (key, name, roi))
                    self.assertGreater(_dice(filled, truth[roi]), 0.99, (key, name, roi))
                self.assertTrue(np.all(truth["GTV_Edema"] >= truth["GTV_Mass"]))

    def test_pet_suv_from_headers(self):
        for key in self.keys:
            plan = phantom.plan_patient(0, int(key.split("_")[1]), **_SIZE)
            pet_plan = plan.series["PT"]
            images = self.by_series[pet_plan.series_uid]
            images = sorted(images, key=lambda ds: pet_plan.sop_uids.index(ds.SOPInstanceUID))
            ds = images[0]
            drug = ds.RadiopharmaceuticalInformationSequence[0]
            hours = lambda t: int(t[:2]) + int(t[2:4]) / 60 + int(t[4:6]) / 3600
            elapsed_s = 3600 * (hours(ds.SeriesTime) - hours(drug.RadiopharmaceuticalStartTime))
            decayed_dose = float(drug.RadionuclideTotalDose) * 0.5 ** (
                elapsed_s / float(drug.RadionuclideHalfLife)
            )
            suv = (
                np.stack(
                    [
                        im.pixel_array * float(im.RescaleSlope) + float(im.RescaleIntercept)
                        for im in images
                    ]
                )
                * float(ds.PatientWeight)
                * 1000.0
                / decayed_dose
            )
            points = pet_plan.frame.to_anatomy(pet_plan.geometry.voxel_centres())
            labels = plan.anatomy.labels(points)
            muscle = np.median(suv[labels == phantom.Tissue.MUSCLE])
            self.assertBetween(muscle, 0.45, 0.95, key)  # muscle SUV ~0.7 after blur and noise
            self.assertGreater(suv[labels == phantom.Tissue.MASS].max(), 2.5, key)
            self.assertLess(np.median(suv[labels == phantom.Tissue.AIR]), 0.1, key)

    def test_modalities_show_the_tumour_differently(self):
        # Contrast tumour - muscle after per-image min-max, on the slice with most tumour.
        contrasts = collections.defaultdict(list)
        for key in self.keys:
            plan = phantom.plan_patient(0, int(key.split("_")[1]), **_SIZE)
            for name, series_plan in plan.series.items():
                images = sorted(
                    self.by_series[series_plan.series_uid],
                    key=lambda ds, sp=series_plan: sp.sop_uids.index(ds.SOPInstanceUID),
                )
                mass = phantom.true_masks(plan, name)["GTV_Mass"]
                k = int(np.argmax(mass.sum(axis=(1, 2))))
                image = images[k].pixel_array.astype(np.float64) * float(
                    images[k].get("RescaleSlope", 1.0)
                )
                image = (image - image.min()) / (image.max() - image.min())
                points = series_plan.frame.to_anatomy(series_plan.geometry.voxel_centres()[k])
                muscle = plan.anatomy.labels(points) == phantom.Tissue.MUSCLE
                contrasts[name].append(image[mass[k]].mean() - image[muscle].mean())
        ct, pt, t1, t2 = (np.mean(contrasts[n]) for n in ("CT", "PT", "T1", "T2"))
        self.assertLess(abs(ct), 0.05)  # CT: a low-contrast mass
        self.assertGreater(pt, 0.2)  # PET: a hot lesion
        self.assertLess(abs(t1), 0.1)  # T1: iso- to hypointense
        self.assertGreater(t2, 0.25)  # T2 / STIR: bright
        self.assertGreater(pt, 5 * abs(ct))

    def test_ingest_reader_matches_true_masks(self):
        try:
            from data_pipeline import load_rtstruct_masks, load_series
        except ImportError:
            self.skipTest("data_pipeline.load_series is not available yet")
        plan = phantom.plan_patient(0, 1, **_SIZE)  # coronal STIR, non-square T1, shuffled T1
        for name, series_plan in plan.series.items():
            series = load_series(self.root / plan.key / series_plan.folder)
            rtstruct = next((self.root / plan.key / series_plan.structure.folder).glob("*.dcm"))
            masks = load_rtstruct_masks(rtstruct, series)
            truth = phantom.true_masks(plan, name)
            for roi in phantom.ROI_NAMES:
                self.assertGreater(_dice(masks[roi], truth[roi]), 0.9, (name, roi))

    def test_cli(self):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "cli")
            command = [sys.executable, "-m", "data_pipeline.phantom", "--out", out]
            small = ["--patients", "1", "--seed", "3", "--image_size", "16", "--num_slices", "6"]
            env = dict(os.environ, PYTHONPATH=str(_REPO_ROOT))
            done = subprocess.run(
                command + small, capture_output=True, text=True, env=env, cwd=_REPO_ROOT
            )
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertIn("wrote 1 patients", done.stdout)
            self.assertTrue(os.path.isfile(os.path.join(out, "clinical.csv")))
            for arguments in (small, ["--patients", "0"]):
                done = subprocess.run(
                    command + arguments, capture_output=True, text=True, env=env, cwd=_REPO_ROOT
                )
                self.assertNotEqual(done.returncode, 0)
                self.assertNotIn("Traceback", done.stderr)
                self.assertLen(done.stderr.strip().splitlines(), 1, done.stderr)
                self.assertStartsWith(done.stderr, "error:")


if __name__ == "__main__":
    absltest.main()
