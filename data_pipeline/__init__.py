"""DICOM -> SQLite index + per-slice .npz -> queries, splits -> preprocessing -> TFDS -> batches."""

import importlib

from data_pipeline.clinical import ClinicalFileError, read_clinical
from data_pipeline.dicom_io import InputProblem, Series, load_series
from data_pipeline.index import BadIndexError, Index, IndexNotFoundError, SliceRecord
from data_pipeline.index_writer import IndexWriter
from data_pipeline.rtstruct import load_rtstruct_masks

# Names from modules that import grain (about a second): loaded on first use, so that ingest's
# worker processes, which never batch, start quickly.
_LAZY = {
    "DatasetError": "data_pipeline.datasets",
    "get_index": "data_pipeline.datasets",
    "eval_batches": "data_pipeline.loader",
    "load_arrays": "data_pipeline.loader",
    "train_batches": "data_pipeline.loader",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'data_pipeline' has no attribute {name!r}")


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
    *_LAZY,
]
