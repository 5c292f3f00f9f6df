"""DICOM -> SQLite index + per-slice .npz -> queries, splits -> preprocessing -> TFDS -> batches."""

from data_pipeline.clinical import ClinicalFileError, read_clinical
from data_pipeline.dicom_io import InputProblem, Series, load_series
from data_pipeline.index import BadIndexError, Index, IndexNotFoundError, IndexWriter, SliceRecord
from data_pipeline.rtstruct import load_rtstruct_masks

__all__ = [
    "BadIndexError",
    "ClinicalFileError",
    "Index",
    "IndexNotFoundError",
    "IndexWriter",
    "InputProblem",
    "Series",
    "SliceRecord",
    "load_rtstruct_masks",
    "load_series",
    "read_clinical",
]
