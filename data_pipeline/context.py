"""2.5D context: a slice's neighbours in its series, to stack as extra channels (load_arrays).

With k context slices each example is the 2k + 1 slices s - k, ..., s + k of its series, in slice
order, the slice itself in the middle channel; its mask stays the centre slice's. Past either end
of a series the edge slice repeats (s - 1 of the first slice is the first slice again), as
nnU-Net's and most 2.5D pipelines pad. Neighbours are taken from every stored slice of the series,
with or without tumour and whatever their split (they are inputs, never labels).
"""

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np


class _Record(Protocol):
    """What context needs of a slice record (data_pipeline.index.SliceRecord)."""

    patient_key: str
    series_key: str
    slice_index: int


class _Index(Protocol):
    def query(self, *, patients: Iterable[str]) -> list: ...


def series_slices(index: _Index, records: Iterable[_Record]) -> dict[str, list]:
    """Every stored slice of each series that `records` come from, by series key, in slice order.

    Args:
      index: the index the records were queried from (data_pipeline.index.Index).
      records: slice records.

    Returns:
      {series_key: [SliceRecord, ...]} sorted by slice_index.
    """
    records = list(records)
    series_keys = {record.series_key for record in records}
    patients = sorted({record.patient_key for record in records})
    by_series: dict[str, list] = {key: [] for key in series_keys}
    if patients:
        for record in index.query(patients=patients):
            if record.series_key in by_series:
                by_series[record.series_key].append(record)
    for slices in by_series.values():
        slices.sort(key=lambda record: record.slice_index)
    return by_series


def neighbours(record: _Record, series: Mapping[str, Sequence[Any]], k: int) -> list:
    """The 2k + 1 records around `record` in its series (edges repeated), in slice order.

    Raises:
      ValueError: k < 0, or the series in `series` lacks the record.
    """
    if k < 0:
        raise ValueError(f"context slices must be >= 0, got {k}")
    slices = series.get(record.series_key, ())
    positions = {int(other.slice_index): i for i, other in enumerate(slices)}
    if int(record.slice_index) not in positions:
        raise ValueError(
            f"slice {record.slice_index} of series {record.series_key!r} is not among the "
            "series' stored slices"
        )
    centre = positions[int(record.slice_index)]
    return [slices[min(max(centre + offset, 0), len(slices) - 1)] for offset in range(-k, k + 1)]


def centre_channel(images: np.ndarray) -> np.ndarray:
    """The middle channel of (..., c) images, as (..., 1): the slice itself under 2.5D context,
    the image unchanged when c = 1."""
    middle = images.shape[-1] // 2
    return images[..., middle : middle + 1]
