"""The phantom's RTSTRUCTs: GTV_Mass and GTV_Edema outlined from the true masks."""

from __future__ import annotations

import numpy as np
import pydicom
import pydicom.uid
import skimage.measure
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from data_pipeline.phantom.images import common_dataset
from data_pipeline.phantom.plan import PatientPlan, SeriesPlan, SliceGeometry, true_masks


def _contours_mm(mask: np.ndarray, geometry: SliceGeometry, slice_index: int) -> list[np.ndarray]:
    """Closed contours (n, 3) in patient mm around a boolean slice mask (rows, cols).

    Marching squares at level 0.5 passes half way between inside and outside pixel centres, so an
    even-odd fill of these polygons at the pixel centres gives back exactly the mask.
    """
    padded = np.pad(mask.astype(np.float32), 1)
    contours = []
    for rows_cols in skimage.measure.find_contours(padded, 0.5):
        rows_cols = _drop_collinear(rows_cols[:-1] - 1.0)
        contours.append(geometry.to_patient(slice_index, rows_cols))
    return contours


def _drop_collinear(points: np.ndarray) -> np.ndarray:
    """Removes vertices (of a closed polygon (n, 2)) that lie on the line through their neighbours.

    Written here because skimage.measure.approximate_polygon imports scipy.signal (seconds).
    """
    before = points - np.roll(points, 1, axis=0)
    after = np.roll(points, -1, axis=0) - points
    turn = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]
    return points[np.abs(turn) > 1e-9]


def structure_dataset(plan: PatientPlan, series: SeriesPlan) -> Dataset:
    """The RTSTRUCT outlining ``series`` with GTV_Mass and GTV_Edema."""
    structure = series.structure
    masks = true_masks(plan, series.name)
    sop_class = pydicom.uid.RTStructureSetStorage
    ds = common_dataset(
        plan,
        sop_class,
        structure.sop_uid,
        structure.implicit_vr,
        "RTSTRUCT",
        series.study_uid,
        structure.series_uid,
        structure.series_number,
        structure.description,
        "120000",
    )
    ds.FrameOfReferenceUID = series.frame.uid
    ds.OperatorsName = ""
    ds.InstanceNumber = 1
    ds.StructureSetLabel = structure.description[:16]
    ds.StructureSetName = structure.description
    ds.StructureSetDate = ds.StudyDate
    ds.StructureSetTime = "120000"
    image_class = {
        "CT": pydicom.uid.CTImageStorage,
        "PT": pydicom.uid.PositronEmissionTomographyImageStorage,
        "MR": pydicom.uid.MRImageStorage,
    }[series.modality]

    def image_reference(sop_uid: str) -> Dataset:
        item = Dataset()
        item.ReferencedSOPClassUID = image_class
        item.ReferencedSOPInstanceUID = sop_uid
        return item

    referenced_series = Dataset()
    referenced_series.SeriesInstanceUID = series.series_uid
    referenced_series.ContourImageSequence = Sequence([image_reference(u) for u in series.sop_uids])
    referenced_study = Dataset()
    referenced_study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management
    referenced_study.ReferencedSOPInstanceUID = series.study_uid
    referenced_study.RTReferencedSeriesSequence = Sequence([referenced_series])
    referenced_frame = Dataset()
    referenced_frame.FrameOfReferenceUID = series.frame.uid
    referenced_frame.RTReferencedStudySequence = Sequence([referenced_study])
    ds.ReferencedFrameOfReferenceSequence = Sequence([referenced_frame])

    rois, roi_contours, observations = [], [], []
    colours = {"GTV_Mass": [255, 0, 0], "GTV_Edema": [0, 128, 255]}
    for roi_name, roi_number in zip(structure.roi_order, structure.roi_numbers, strict=True):
        roi = Dataset()
        roi.ROINumber = roi_number
        roi.ReferencedFrameOfReferenceUID = series.frame.uid
        roi.ROIName = roi_name
        roi.ROIGenerationAlgorithm = "MANUAL"
        rois.append(roi)
        contour_items = []
        for k in range(len(series.sop_uids)):
            for points_mm in _contours_mm(masks[roi_name][k], series.geometry, k):
                contour = Dataset()
                if structure.contour_images:
                    contour.ContourImageSequence = Sequence([image_reference(series.sop_uids[k])])
                contour.ContourGeometricType = "CLOSED_PLANAR"
                contour.NumberOfContourPoints = len(points_mm)
                contour.ContourNumber = len(contour_items) + 1
                contour.ContourData = [round(float(v), 3) for v in points_mm.ravel()]
                contour_items.append(contour)
        roi_contour = Dataset()
        roi_contour.ROIDisplayColor = colours[roi_name]
        roi_contour.ReferencedROINumber = roi_number
        roi_contour.ContourSequence = Sequence(contour_items)
        roi_contours.append(roi_contour)
        observation = Dataset()
        observation.ObservationNumber = roi_number
        observation.ReferencedROINumber = roi_number
        observation.RTROIInterpretedType = "GTV"
        observation.ROIInterpreter = ""
        observations.append(observation)
    ds.StructureSetROISequence = Sequence(rois)
    ds.ROIContourSequence = Sequence(roi_contours)
    ds.RTROIObservationsSequence = Sequence(observations)
    return ds
