"""The phantom's image series as DICOM datasets: CT in HU, PET in Bq/ml, MR T1/T2/STIR."""

from __future__ import annotations

import datetime

import numpy as np
import pydicom
import pydicom.uid
import scipy.ndimage
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence

from data_pipeline.phantom.anatomy import Tissue
from data_pipeline.phantom.plan import SERIES_NAMES, PatientPlan, SeriesPlan

F18_HALF_LIFE_S = 6586.2
# In-plane supersampling of the PET grid before blurring (partial volume).
_PET_SUPERSAMPLING = 3

# Mean value per tissue (indexed by Tissue) before per-patient variation, noise and blur.
_CT_HU = np.array([-1000.0, -100.0, 45.0, 1100.0, 20.0, 30.0, 60.0, 22.0])
_PET_SUV = np.array([0.02, 0.3, 0.7, 0.4, 1.1, 1.2, 6.0, 0.6])  # MASS scaled per patient.
_MR_SIGNAL = {
    "T1": np.array([0.0, 1000.0, 420.0, 30.0, 900.0, 400.0, 370.0, 250.0]),
    "T2": np.array([0.0, 120.0, 300.0, 20.0, 130.0, 750.0, 900.0, 1300.0]),
    "STIR": np.array([0.0, 60.0, 220.0, 15.0, 70.0, 800.0, 950.0, 1400.0]),
}


def _pet_decay_factor(plan: PatientPlan) -> float:
    """Fraction of the injected activity left at the PET series start."""
    start = datetime.datetime.strptime(plan.pet_series_time, "%H%M%S")
    injection = datetime.datetime.strptime(plan.injection_time, "%H%M%S")
    elapsed_s = (start - injection).total_seconds()
    return 2.0 ** (-elapsed_s / F18_HALF_LIFE_S)


def _series_rng(plan: PatientPlan, series_name: str) -> np.random.Generator:
    return np.random.default_rng([plan.seed, plan.index, 2, SERIES_NAMES.index(series_name)])


def _tissue_image(plan: PatientPlan, series: SeriesPlan, table: np.ndarray, supersampling: int):
    """Piecewise-constant tissue values with tumour texture at the voxel centres (or supersampled).

    Returns:
      (values float64 (slices, rows*s, cols*s), points in patient mm (..., 3)).
    """
    points_patient = series.geometry.voxel_centres(supersampling)
    points = series.frame.to_anatomy(points_patient)
    labels = plan.anatomy.labels(points)
    values = (table * plan.contrast_jitter)[labels]
    for tissues, strength in ((labels == Tissue.MUSCLE, 0.03), (labels >= Tissue.EDEMA, 0.12)):
        values[tissues] *= 1.0 + strength * plan.anatomy.texture(points[tissues])
    return values, points_patient


def _ct_hu(plan: PatientPlan, series: SeriesPlan) -> np.ndarray:
    """CT in HU: small tumour contrast, sharp, Gaussian noise (slices, rows, cols)."""
    values, _ = _tissue_image(plan, series, _CT_HU, 1)
    values = scipy.ndimage.gaussian_filter(values, sigma=(0.0, 0.6, 0.6))
    values += _series_rng(plan, series.name).normal(0.0, 12.0, values.shape)
    return np.clip(values, -1024, 3071)


def _pet_bqml(plan: PatientPlan, series: SeriesPlan) -> np.ndarray:
    """PET activity in Bq/ml, decay corrected to the series start (slices, rows, cols).

    A hot viable rim around a cold necrotic core, blurred (FWHM ~7 mm) with count-like noise.
    """
    table = _PET_SUV.copy()
    table[Tissue.MASS] = plan.mass_suv
    s = _PET_SUPERSAMPLING
    suv, _ = _tissue_image(plan, series, table, s)
    slices, rows, cols = suv.shape
    suv = suv.reshape(slices, rows // s, s, cols // s, s).mean(axis=(2, 4))
    geometry = series.geometry
    sigma_mm = 7.0 / 2.355
    sigma = (
        sigma_mm / geometry.slice_spacing_mm,
        sigma_mm / geometry.pixel_spacing_mm[0],
        sigma_mm / geometry.pixel_spacing_mm[1],
    )
    suv = scipy.ndimage.gaussian_filter(suv, sigma)
    noise = _series_rng(plan, series.name).normal(0.0, 1.0, suv.shape)
    suv = np.maximum(suv + 0.12 * np.sqrt(suv * 0.7) * noise, 0.0)
    bq_per_ml_per_suv = plan.injected_dose_bq * _pet_decay_factor(plan) / (plan.weight_kg * 1000.0)
    return suv * bq_per_ml_per_suv


def _mr_signal(plan: PatientPlan, series: SeriesPlan) -> np.ndarray:
    """MR magnitude (slices, rows, cols): the sequence's contrast, bias field, Rician noise."""
    values, points = _tissue_image(plan, series, _MR_SIGNAL[series.sequence], 1)
    values = scipy.ndimage.gaussian_filter(values, sigma=(0.0, 0.5, 0.5))
    rng = _series_rng(plan, series.name)
    centred_dm = (points - points.reshape(-1, 3).mean(axis=0)) / 100.0  # decimetres
    gradient = rng.normal(0.0, 0.2, 3)
    curvature = rng.normal(0.0, 0.15, 3)
    bias = np.exp(centred_dm @ gradient + (centred_dm**2) @ curvature)
    sigma = 0.03 * _MR_SIGNAL[series.sequence][Tissue.MUSCLE]
    real = values * bias + rng.normal(0.0, sigma, values.shape)
    imaginary = rng.normal(0.0, sigma, values.shape)
    return np.hypot(real, imaginary)


def _ds(value: float, decimals: int = 6) -> float:
    """A float whose shortest repr fits a DICOM DS (16 characters)."""
    return round(float(value), decimals)


def _file_meta(sop_class_uid: str, sop_uid: str, implicit_vr: bool) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = (
        pydicom.uid.ImplicitVRLittleEndian if implicit_vr else pydicom.uid.ExplicitVRLittleEndian
    )
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    return meta


def common_dataset(
    plan: PatientPlan,
    sop_class_uid: str,
    sop_uid: str,
    implicit_vr: bool,
    modality: str,
    study_uid: str,
    series_uid: str,
    series_number: int,
    description: str,
    series_time: str,
) -> Dataset:
    """SOP common, patient, general study, general series and equipment modules."""
    is_mr = study_uid == plan.mr_study_uid
    date = plan.mr_date if is_mr else plan.petct_date
    study_time = "083000" if is_mr else plan.petct_study_time
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class_uid, sop_uid, implicit_vr)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = date
    ds.SeriesDate = date
    ds.StudyTime = study_time
    ds.SeriesTime = series_time
    ds.AccessionNumber = ""
    ds.Modality = modality
    ds.Manufacturer = "sarcoma_jax phantom"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "MR" if is_mr else "PETCT"
    ds.SeriesDescription = description
    ds.PatientName = "ANONYMIZED"
    ds.PatientID = plan.key
    ds.PatientBirthDate = ""
    ds.PatientSex = plan.sex
    ds.PatientAge = f"{plan.age:03d}Y"
    ds.PatientSize = plan.height_m
    ds.PatientWeight = plan.weight_kg
    ds.PatientIdentityRemoved = "YES"
    ds.BodyPartExamined = "EXTREMITY"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    return ds


def image_datasets(plan: PatientPlan, series: SeriesPlan) -> list[Dataset]:
    """The image files of one series (slices ascending along the normal)."""
    geometry = series.geometry
    if series.modality == "CT":
        values = _ct_hu(plan, series)
        sop_class = pydicom.uid.CTImageStorage
        series_time = plan.ct_series_time
    elif series.modality == "PT":
        values = _pet_bqml(plan, series)
        sop_class = pydicom.uid.PositronEmissionTomographyImageStorage
        series_time = plan.pet_series_time
    else:
        values = _mr_signal(plan, series)
        sop_class = pydicom.uid.MRImageStorage
        series_time = "084500" if series.name == "T1" else "090000"
    orientation = [_ds(v, 8) for v in (*geometry.row_cosine, *geometry.col_cosine)]
    normal = geometry.normal
    datasets = []
    for k, sop_uid in enumerate(series.sop_uids):
        ds = common_dataset(
            plan,
            sop_class,
            sop_uid,
            series.implicit_vr,
            series.modality,
            series.study_uid,
            series.series_uid,
            series.series_number,
            series.description,
            series_time,
        )
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if series.modality == "CT" else "OTHER"]
        ds.AcquisitionDate = ds.SeriesDate
        ds.AcquisitionTime = series_time
        ds.PatientPosition = "FFS"
        ds.InstanceNumber = series.instance_numbers[k]
        ds.FrameOfReferenceUID = series.frame.uid
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [_ds(v, 4) for v in geometry.positions_mm[k]]
        ds.ImageOrientationPatient = orientation
        ds.PixelSpacing = list(geometry.pixel_spacing_mm)
        ds.SliceThickness = geometry.slice_thickness_mm
        ds.SliceLocation = _ds(geometry.positions_mm[k] @ normal, 4)
        if series.modality == "CT":
            stored = np.round(values[k] + 1024.0).astype(np.int16)
            ds.set_pixel_data(stored, "MONOCHROME2", 16, generate_instance_uid=False)
            ds.KVP = 120
            ds.AcquisitionNumber = 1
            ds.RescaleIntercept = -1024
            ds.RescaleSlope = 1
            ds.RescaleType = "HU"
        elif series.modality == "PT":
            _add_pet_attributes(plan, ds, len(series.sop_uids))
            # Per-slice slope so that the slice maximum fills the uint16 range (as scanners do).
            slope = _ds(max(float(values[k].max()), 1.0) / 65000.0, 10)
            stored = np.round(values[k] / slope).astype(np.uint16)
            ds.set_pixel_data(stored, "MONOCHROME2", 16, generate_instance_uid=False)
            ds.RescaleIntercept = 0
            ds.RescaleSlope = slope
        else:
            _add_mr_attributes(ds, series.sequence, geometry.slice_spacing_mm)
            stored = np.round(np.clip(values[k], 0, 65535)).astype(np.uint16)
            ds.set_pixel_data(stored, "MONOCHROME2", 16, generate_instance_uid=False)
        datasets.append(ds)
    return datasets


def _add_pet_attributes(plan: PatientPlan, ds: Dataset, num_slices: int) -> None:
    """PET series, PET image and PET isotope modules."""
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SeriesType = ["STATIC", "IMAGE"]
    ds.Units = "BQML"
    ds.CountsSource = "EMISSION"
    ds.DecayCorrection = "START"
    ds.CorrectedImage = ["DECY", "ATTN", "SCAT", "DTIM", "RAN", "NORM"]
    ds.RandomsCorrectionMethod = "DLYD"
    ds.AttenuationCorrectionMethod = "CT-based"
    ds.ReconstructionMethod = "OSEM"
    ds.NumberOfSlices = num_slices
    ds.ImageIndex = ds.InstanceNumber
    ds.FrameReferenceTime = 0.0
    ds.ActualFrameDuration = 180000
    ds.CollimatorType = "NONE"
    drug = Dataset()
    drug.Radiopharmaceutical = "Fluorodeoxyglucose"
    drug.RadiopharmaceuticalStartTime = plan.injection_time
    drug.RadiopharmaceuticalStartDateTime = plan.petct_date + plan.injection_time
    drug.RadionuclideTotalDose = plan.injected_dose_bq
    drug.RadionuclideHalfLife = F18_HALF_LIFE_S
    drug.RadionuclidePositronFraction = 0.97
    nuclide = Dataset()
    nuclide.CodeValue = "C-111A1"
    nuclide.CodingSchemeDesignator = "SRT"
    nuclide.CodeMeaning = "^18^Fluorine"
    drug.RadionuclideCodeSequence = Sequence([nuclide])
    ds.RadiopharmaceuticalInformationSequence = Sequence([drug])
    ds.PatientOrientationCodeSequence = Sequence()
    ds.PatientGantryRelationshipCodeSequence = Sequence()


def _add_mr_attributes(ds: Dataset, sequence: str, slice_spacing_mm: float) -> None:
    """MR image module: scanning sequence and timing of a T1 SE, T2 FSE with fat sat, or STIR."""
    ds.MRAcquisitionType = "2D"
    ds.MagneticFieldStrength = 1.5
    ds.ImagingFrequency = 63.87
    ds.ImagedNucleus = "1H"
    ds.TriggerTime = 0
    if sequence == "T1":
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "SE", "SK", ""
        ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = 550.0, 12.0, 1
    elif sequence == "STIR":
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = ["IR", "SE"], ["SK", "SP"], ""
        ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = 4500.0, 45.0, 12
        ds.InversionTime = 150.0
    else:
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "SE", ["SK", "SP"], "FS"
        ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = 4000.0, 90.0, 16
    ds.SpacingBetweenSlices = slice_spacing_mm
