"""A mask on a DICOM series' grid as NIfTI-1 (nibabel), with the affine from the DICOM geometry.

Convention (stated in the file's description too): voxel (i, j, k) is column i, row j of slice k,
slices in the series' sorted order (ascending along the slice normal, as data_pipeline.dicom_io
sorts them). The affine maps (i, j, k) to RAS+ millimetres, as NIfTI and nibabel define world
space: the DICOM patient (LPS) coordinates with x and y negated. Its columns are
dc * row_cosines, dr * column_cosines and the step from one slice's ImagePositionPatient to the
next, so oblique, sagittal, flipped and gantry-tilted series keep their geometry.
"""

from __future__ import annotations

import os

import nibabel
import numpy as np

from data_pipeline.dicom_io import Series

# LPS (DICOM) -> RAS (NIfTI).
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Slices whose positions stray further than this from one regular step (mm) cannot be described by
# one affine: the file is still written, with the mean step, and the caller is warned.
_IRREGULAR_TOLERANCE_MM = 0.01
DESCRIPTION = "i=column j=row k=slice (ascending along normal); affine to RAS+ mm"


def affine(series: Series, single_slice_thickness_mm: float = 1.0) -> tuple[np.ndarray, str]:
    """The voxel-to-RAS affine of a series' grid, and a warning ('' when exact).

    Args:
      series: the series (positions sorted along the normal).
      single_slice_thickness_mm: the slice step of a one-slice series (along the normal).
    """
    row_spacing, col_spacing = series.pixel_spacing
    positions = np.asarray(series.positions, np.float64)
    count = len(positions)
    warning = ""
    if count > 1:
        step = (positions[-1] - positions[0]) / (count - 1)
        expected = positions[0] + np.outer(np.arange(count), step)
        stray = float(np.abs(positions - expected).max())
        if stray > _IRREGULAR_TOLERANCE_MM:
            warning = (
                f"slice positions are not evenly spaced (up to {stray:.3f} mm off a regular step);"
                " the NIfTI affine uses the mean step"
            )
    else:
        step = series.normal * single_slice_thickness_mm
    lps = np.eye(4)
    lps[:3, 0] = series.orientation[:3] * col_spacing
    lps[:3, 1] = series.orientation[3:] * row_spacing
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    return _LPS_TO_RAS @ lps, warning


def write_nifti(
    mask: np.ndarray, series: Series, path: str | os.PathLike, single_slice_thickness_mm=1.0
) -> str:
    """Writes mask (slices, rows, cols) as uint8 NIfTI (``path`` ending .nii.gz compresses it).

    Returns:
      A warning ('' when the affine describes the series exactly).

    Raises:
      ValueError: the mask's shape is not the series'.
    """
    mask = np.asarray(mask)
    if mask.shape != series.pixels.shape:
        raise ValueError(f"mask {mask.shape} does not match the series {series.pixels.shape}")
    matrix, warning = affine(series, single_slice_thickness_mm)
    image = nibabel.Nifti1Image(np.transpose(mask.astype(np.uint8), (2, 1, 0)), matrix)
    image.set_sform(matrix, code=1)  # scanner-anatomical coordinates
    image.set_qform(matrix, code=1)  # nibabel stores the nearest rotation (no shear) here
    image.header.set_xyzt_units("mm")
    image.header["descrip"] = DESCRIPTION.encode()[:80]
    nibabel.save(image, str(path))
    return warning
