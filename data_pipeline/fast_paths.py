"""The one switch between ingest's hand-written fast paths and the libraries they stand in for.

On (the default), ingest reads headers and RTSTRUCT contours with data_pipeline.dicom_scan, plain
pixels with numpy at the offset the header gave, and writes slice files with ISA-L into
data_pipeline.slice_store's own zip writer. Off, pydicom reads every header, contour and pixel
(``dcmread``, ``pixel_array``) and Python's ``zipfile`` (zlib) writes the slice files. Both build
the same index (tests/fast_paths_test.py); off is slower and there to rule our code out.

Set it with the environment variable ``SARCOMA_JAX_FAST_PATHS=0`` (or ``false``), or per ingest
with ``--fast_paths=false`` / ``ingest(..., fast_paths=False)``, which ingest hands to its worker
processes explicitly.
"""

import os

ENV_VAR = "SARCOMA_JAX_FAST_PATHS"
_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def enabled(fast_paths: bool | None = None) -> bool:
    """``fast_paths`` when given, else what ``$SARCOMA_JAX_FAST_PATHS`` says (default on).

    Raises:
      ValueError: the environment variable holds something other than 1/0, true/false, yes/no,
        on/off.
    """
    if fast_paths is not None:
        return bool(fast_paths)
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if not value or value in _ON:
        return True
    if value in _OFF:
        return False
    raise ValueError(f"{ENV_VAR}={value!r}: expected 1 or 0 (or true/false)")
