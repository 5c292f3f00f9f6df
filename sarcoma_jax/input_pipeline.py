"""The one place experiments touch data: config checks, the index, a domain's splits in memory."""

import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from data_pipeline import context, datasets, dicom_io, loader
from data_pipeline import index as index_lib
from data_pipeline.vocabulary import SPLITS


class ConfigError(ValueError):
    """A config that cannot run; `str(e)` is one line saying what to change."""


# Errors that mean "bad input from the user" (config, data folder, index): main.py reports them in
# one line, without a traceback. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ConfigError, datasets.DatasetError, dicom_io.InputProblem, index_lib.BadIndexError)


def canonical_modality(modality: str) -> str:
    """'CT', 'PT', 'T1', 'T2' or 'STIR' ('PET' -> 'PT'); raises ConfigError for anything else."""
    try:
        return datasets.canonical_domain(modality)
    except datasets.DatasetError as error:
        raise ConfigError(f"config.data.modality: {error}") from None


def validate_data_config(data_config: Mapping[str, Any], size_divisor: int = 1) -> None:
    """Checks a `config.data` without reading any data.

    Args:
      data_config: with source, path, modality, image_size.
      size_divisor: image_size must be a multiple of it (2**depth for a U-Net).

    Raises:
      ConfigError: unknown source or modality, a missing data folder, a bad image size or
        number of context slices.
    """
    source = data_config["source"]
    if source not in datasets.SOURCES:
        raise ConfigError(
            f"config.data.source {source!r} is unknown; use one of {', '.join(datasets.SOURCES)}"
        )
    canonical_modality(data_config["modality"])
    if source in ("dicom", "index"):
        path = data_config.get("path")
        if not path:
            raise ConfigError(f"config.data.path is required for source {source!r}")
        if not pathlib.Path(path).expanduser().is_dir():
            raise ConfigError(f"data folder not found: {path} (config.data.path)")
        if source == "index" and not (pathlib.Path(path).expanduser() / "index.sqlite").is_file():
            raise ConfigError(f"no index.sqlite in {path}; ingest it first or use source 'dicom'")
    image_size = data_config["image_size"]
    if image_size < 1 or image_size % size_divisor:
        raise ConfigError(
            f"config.data.image_size {image_size} must be a positive multiple of {size_divisor}"
            " (2**depth of the model)"
        )
    context_slices = data_config.get("context_slices", 0)
    if (
        isinstance(context_slices, bool)
        or not isinstance(context_slices, int)
        or context_slices < 0
    ):
        raise ConfigError(
            f"config.data.context_slices must be an integer >= 0, got {context_slices!r}"
        )


def open_index(data_config: Mapping[str, Any], progress: bool = True) -> index_lib.Index:
    """Opens (building and caching it first if needed) the index that `config.data` names."""
    return datasets.get_index(
        data_config["source"],
        path=data_config.get("path") or None,
        cache_dir=data_config.get("cache_dir") or None,
        seed=data_config["seed"],
        split_scheme=data_config["split_scheme"],
        phantom_patients=data_config["phantom_patients"],
        progress=progress,
    )


def query_splits(
    index: index_lib.Index,
    modality: str,
    splits: Sequence[str] = SPLITS,
    tumour_only: bool = True,
    patients: Sequence[str] | None = None,
) -> dict[str, list]:
    """The slice records of one modality per split; every split must hold at least one slice.

    Raises:
      ConfigError: a split without slices (names the modality and split).
    """
    modality = canonical_modality(modality)
    records = {
        split: index.query(**datasets.domain_query(modality, split, tumour_only), patients=patients)
        for split in splits
    }
    empty = [split for split, split_records in records.items() if not split_records]
    if empty:
        selection = "tumour slices" if tumour_only else "slices"
        raise ConfigError(
            f"no {modality} {selection} in split(s) {', '.join(empty)} of the index at "
            f"{index.out_dir}; use more patients or another split scheme"
        )
    return records


def load_splits(
    records_by_split: Mapping[str, Sequence[Any]],
    image_size: int,
    progress: bool = False,
    context_slices: int = 0,
    index: index_lib.Index | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """Preprocesses each split's slices into memory (`data_pipeline.loader.load_arrays`); with
    `context_slices` k > 0, the k neighbours on each side in the series as channels (2.5D), found
    in `index` (`data_pipeline.context`)."""
    series = None
    if context_slices:
        if index is None:
            raise ValueError("config.data.context_slices > 0 needs the index of the records")
        all_records = [record for records in records_by_split.values() for record in records]
        series = context.series_slices(index, all_records)
    return {
        split: loader.load_arrays(
            records,
            image_size=image_size,
            progress=progress,
            context_slices=context_slices,
            series=series,
        )
        for split, records in records_by_split.items()
    }


def get_datasets(
    data_config: Mapping[str, Any], progress: bool = True
) -> dict[str, dict[str, np.ndarray]]:
    """train / val / test arrays of `config.data.modality` (image (n, s, s, 1) float32 in [0, 1],
    mask (n, s, s, 1) uint8, patient_key (n,)); raises ConfigError when a split is empty."""
    index = open_index(data_config, progress=progress)
    records = query_splits(index, data_config["modality"], tumour_only=data_config["tumour_only"])
    return load_splits(
        records,
        data_config["image_size"],
        progress=progress,
        context_slices=data_config.get("context_slices", 0),
        index=index,
    )
