"""A predicted tumour mask as a DICOM Segmentation object (BINARY, one segment), with highdicom."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import warnings
from collections.abc import Mapping, Sequence

import highdicom
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

# What the segment is: SNOMED CT "Morphologically abnormal structure" / "Neoplasm" (108369006,
# also listed as "Tumor"), the pair DICOM's segmentation category/type context groups use for a
# tumour.
SEGMENT_CATEGORY = codes.SCT.MorphologicallyAbnormalStructure
SEGMENT_TYPE = codes.SCT.Neoplasm
SEGMENT_LABEL = "Tumour (predicted)"
MANUFACTURER = "sarcoma_jax"
DISPLAY_RGB = (255, 0, 0)  # the colour of predictions in our figures and the RTSTRUCT


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """What produced a segmentation (the SEG's AlgorithmIdentificationSequence).

    Attributes:
      name: e.g. 'sarcoma_jax U-Net (segmentation)' (at most 64 characters).
      version: the package version.
      model_name: ManufacturerModelName of the SEG (at most 64 characters).
      parameters: name -> value recorded as AlgorithmParameters (git commit, checkpoint,
        criterion, threshold...).
    """

    name: str
    version: str
    model_name: str = "U-Net"
    parameters: Mapping[str, str] = dataclasses.field(default_factory=dict)


def write_seg(
    source_datasets: Sequence[pydicom.Dataset],
    mask: np.ndarray,
    path: str | os.PathLike,
    algorithm: Algorithm,
    series_number: int = 901,
) -> pydicom.Dataset:
    """Writes ``mask`` as a BINARY DICOM-SEG that references the source series.

    Args:
      source_datasets: the source images (headers suffice, e.g. ``dcmread(stop_before_pixels=
        True)``), one per slice, in the order of ``mask``'s first axis. highdicom keeps this order
        and takes each frame's position from its source image, so any slice order and orientation
        is written as it is.
      mask: bool (slices, rows, cols) aligned with the source images.
      path: the file to write.
      algorithm: what produced the mask.
      series_number: SeriesNumber of the new series.

    Returns:
      The written dataset (new Series and SOP Instance UIDs; the patient and study modules are
      copied from the source by highdicom).

    Raises:
      ValueError: the mask's shape does not match the source images.
    """
    mask = np.asarray(mask, bool)
    first = source_datasets[0]
    expected = (len(source_datasets), int(first.Rows), int(first.Columns))
    if mask.shape != expected:
        raise ValueError(f"mask shape {mask.shape} does not match the source images {expected}")
    identification = highdicom.AlgorithmIdentificationSequence(
        name=algorithm.name,
        family=codes.cid7162.ArtificialIntelligence,
        version=algorithm.version,
        parameters={key: str(value) for key, value in algorithm.parameters.items()},
    )
    description = highdicom.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=SEGMENT_CATEGORY,
        segmented_property_type=SEGMENT_TYPE,
        algorithm_type=highdicom.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=identification,
        display_color=highdicom.color.CIELabColor.from_rgb(*DISPLAY_RGB),
    )
    with quiet_copying():
        segmentation = highdicom.seg.Segmentation(
            source_images=list(source_datasets),
            pixel_array=mask.astype(np.uint8),
            segmentation_type=highdicom.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[description],
            series_instance_uid=highdicom.UID(),
            series_number=series_number,
            sop_instance_uid=highdicom.UID(),
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=algorithm.model_name,
            software_versions=algorithm.version,
            device_serial_number="none",
            series_description="sarcoma_jax tumour prediction",
            omit_empty_frames=True,
        )
    segmentation.save_as(str(path))
    return segmentation


@contextlib.contextmanager
def quiet_copying():
    """Silences pydicom's and highdicom's warnings and logs while a derived object is built.

    The patient and study modules are copied from the source verbatim, as the standard requires;
    pydicom and highdicom warn about the form of the source's own values (a StudyID over 16
    characters, a PatientName not in the Last^First form), which are not ours to change, and
    highdicom logs its choices (e.g. that an empty mask keeps all frames).
    """
    loggers = [logging.getLogger(name) for name in ("highdicom", "pydicom")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
