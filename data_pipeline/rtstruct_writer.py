"""A predicted tumour as an RTSTRUCT: contours traced on the original grid, in patient mm.

The inverse of what the ingest reads (data_pipeline.rtstruct): contours are traced where a map on
the series' own pixel grid crosses a level (marching squares in pixel-centre coordinates), so the
pixels whose centres lie inside a contour are the pixels at or above the level; every boundary,
holes included, is its own CLOSED_PLANAR contour, and the even-odd rule of a reader fills the
holes back. A pixel (row, col) of slice k lies at IPP_k + col * dc * row_cosines + row * dr *
col_cosines (DICOM PS3.3 C.7.6.2.1.1), for any orientation and slice order.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence

import highdicom
import numpy as np
import pydicom
import pydicom.charset
import skimage.measure
from pydicom.dataelem import RawDataElement
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import ImplicitVRLittleEndian

from data_pipeline import seg_writer
from data_pipeline.dicom_io import Series

RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
# RTReferencedStudySequence items reference the study by this SOP class (Detached Study Management,
# retired but still what PS3.3 C.8.8.5 names there).
_STUDY_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"
ROI_NAME = "Tumour_predicted"  # not matching the ingest's 'GTV' patterns: a prediction is no truth
MANUFACTURER = "sarcoma_jax"
_CONTOUR_DATA = Tag(0x30060050)


def trace_contours(values: np.ndarray, level: float) -> list[np.ndarray]:
    """Closed contours of one slice where ``values`` crosses ``level``.

    Args:
      values: (rows, cols) a probability map, or a 0/1 mask with level 0.5.
      level: the threshold: pixels whose value is >= level are inside.

    Returns:
      A list of float64 (n, 2) (row, col) polygons in pixel-index coordinates (pixel centres at
      integers), n >= 3, not repeating the first point; outer boundaries and holes alike. The
      image is padded with a value below the level, so regions touching the border close too.
    """
    padded = np.pad(np.asarray(values, np.float64), 1, constant_values=level - 1.0)
    contours = []
    for contour in skimage.measure.find_contours(padded, level):
        points = contour[:-1] - 1.0 if np.array_equal(contour[0], contour[-1]) else contour - 1.0
        points = _without_repeats(points)
        if len(points) >= 3:
            contours.append(points)
    return contours


def _without_repeats(points: np.ndarray) -> np.ndarray:
    """Drops consecutive duplicate points (marching squares repeats a vertex at a saddle)."""
    keep = np.ones(len(points), bool)
    keep[1:] = np.any(np.diff(points, axis=0) != 0, axis=1)
    return points[keep]


def pixel_to_patient(series: Series, slice_index: int, rows_cols: np.ndarray) -> np.ndarray:
    """(n, 2) (row, col) pixel coordinates on a slice -> (n, 3) patient coordinates (mm, LPS)."""
    row_spacing, col_spacing = series.pixel_spacing
    row_cosines, col_cosines = series.orientation[:3], series.orientation[3:]
    rows_cols = np.asarray(rows_cols, np.float64)
    return (
        series.positions[slice_index]
        + np.outer(rows_cols[:, 1] * col_spacing, row_cosines)
        + np.outer(rows_cols[:, 0] * row_spacing, col_cosines)
    )


def _contour_data(points_mm: np.ndarray) -> RawDataElement:
    """ContourData as a raw DS element: the values formatted once, as the file will hold them.

    Why raw: pydicom converts and validates every decimal string it is given (about 30 us each),
    and a traced structure holds tens of thousands; a raw element is written as it is. Decimal
    strings hold 16 characters: 4 decimals (0.1 micrometre) fit any coordinate below 1e10 mm.
    """
    text = "\\".join(map("{:.4f}".format, points_mm.ravel().tolist())).encode("ascii")
    if len(text) % 2:
        text += b" "  # values have even length, padded with a space
    return RawDataElement(_CONTOUR_DATA, "DS", len(text), text, 0, True, True)


def _image_reference(dataset: pydicom.Dataset) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = dataset.SOPClassUID
    item.ReferencedSOPInstanceUID = dataset.SOPInstanceUID
    return item


def write_rtstruct(
    series: Series,
    source_datasets: Sequence[pydicom.Dataset],
    values: np.ndarray,
    level: float,
    path: str | os.PathLike,
    roi_name: str = ROI_NAME,
    generation_description: str = "",
    software_version: str | None = None,
    series_number: int = 902,
) -> tuple[pydicom.Dataset, int]:
    """Writes one ROI traced from ``values`` at ``level`` as an RTSTRUCT referencing ``series``.

    Args:
      series: the image series (geometry in its sorted order; ``data_pipeline.load_series``).
      source_datasets: the series' image headers in the same order as ``series`` (the patient and
        study modules are copied from the first; each contour references its slice's SOP class
        and instance).
      values: float (slices, rows, cols) on the series' grid, e.g. tumour probabilities.
      level: the threshold (inside: values >= level).
      path: the file to write.
      roi_name: the ROI's name.
      generation_description: ROIGenerationDescription (at most 64 characters, cut to fit).
      software_version: SoftwareVersions of the writing software.
      series_number: SeriesNumber of the new series.

    Returns:
      (the written dataset, number of contours).

    Raises:
      ValueError: ``values`` or ``source_datasets`` do not match the series.
    """
    values = np.asarray(values)
    if values.shape != series.pixels.shape:
        raise ValueError(f"values {values.shape} do not match the series {series.pixels.shape}")
    if tuple(d.SOPInstanceUID for d in source_datasets) != tuple(series.sop_instance_uids):
        raise ValueError("source_datasets are not the series' images in its order")
    first = source_datasets[0]
    now = datetime.datetime.now()
    with seg_writer.quiet_copying():
        ds = highdicom.SOPClass(
            study_instance_uid=series.study_instance_uid,
            series_instance_uid=highdicom.UID(),
            series_number=series_number,
            sop_instance_uid=highdicom.UID(),
            sop_class_uid=RT_STRUCTURE_SET_STORAGE,
            instance_number=1,
            modality="RTSTRUCT",
            manufacturer=MANUFACTURER,
            # Implicit VR: a value of explicit VR DS holds at most 64 KiB, less than the
            # ContourData of a large contour.
            transfer_syntax_uid=ImplicitVRLittleEndian,
            series_description="sarcoma_jax tumour prediction",
            software_versions=software_version,
        )
        ds.copy_patient_and_study_information(first)
    ds.OperatorsName = ""  # RT Series module, type 2
    # Frame of Reference module (the series', as the contours are in its patient coordinates).
    ds.FrameOfReferenceUID = series.frame_of_reference_uid
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")
    ds.StructureSetLabel = "sarcoma_jax"
    ds.StructureSetDate = now.strftime("%Y%m%d")
    ds.StructureSetTime = now.strftime("%H%M%S")

    series_item = pydicom.Dataset()
    series_item.SeriesInstanceUID = series.series_instance_uid
    series_item.ContourImageSequence = DicomSequence([_image_reference(d) for d in source_datasets])
    study_item = pydicom.Dataset()
    study_item.ReferencedSOPClassUID = _STUDY_SOP_CLASS
    study_item.ReferencedSOPInstanceUID = series.study_instance_uid
    study_item.RTReferencedSeriesSequence = DicomSequence([series_item])
    frame_item = pydicom.Dataset()
    frame_item.FrameOfReferenceUID = series.frame_of_reference_uid
    frame_item.RTReferencedStudySequence = DicomSequence([study_item])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame_item])

    roi = pydicom.Dataset()
    roi.ROINumber = 1
    roi.ReferencedFrameOfReferenceUID = series.frame_of_reference_uid
    roi.ROIName = roi_name
    roi.ROIGenerationAlgorithm = "AUTOMATIC"
    roi.ROIGenerationDescription = generation_description[:64]
    ds.StructureSetROISequence = DicomSequence([roi])

    contour_items = []
    for k in range(values.shape[0]):
        if not np.any(values[k] >= level):
            continue
        for polygon in trace_contours(values[k], level):
            item = pydicom.Dataset()
            item.ContourImageSequence = DicomSequence([_image_reference(source_datasets[k])])
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(polygon)
            item[_CONTOUR_DATA] = _contour_data(pixel_to_patient(series, k, polygon))
            # Encoded as the file will be, so that pydicom writes the raw value as it is.
            item.set_original_encoding(True, True, pydicom.charset.default_encoding)
            contour_items.append(item)
    roi_contour = pydicom.Dataset()
    roi_contour.ReferencedROINumber = 1
    roi_contour.ROIDisplayColor = list(seg_writer.DISPLAY_RGB)
    if contour_items:  # type 2C element: present only with contours
        roi_contour.ContourSequence = DicomSequence(contour_items)
    ds.ROIContourSequence = DicomSequence([roi_contour])

    observation = pydicom.Dataset()
    observation.ObservationNumber = 1
    observation.ReferencedROINumber = 1
    observation.RTROIInterpretedType = "GTV"
    observation.ROIInterpreter = ""
    ds.RTROIObservationsSequence = DicomSequence([observation])
    ds.save_as(str(path), enforce_file_format=True)
    return ds, len(contour_items)
