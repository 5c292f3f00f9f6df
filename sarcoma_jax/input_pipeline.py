"""The one place experiments touch data: config checks, the index, a domain's splits in memory."""

import dataclasses
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from data_pipeline import context, datasets, dicom_io, loader
from data_pipeline import index as index_lib
from data_pipeline import splits as splits_lib
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


def validate_folds(data_config: Mapping[str, Any], all_folds: bool = False) -> None:
    """Checks `config.data.num_folds` (0: no folds) and `config.data.fold` without reading data.

    Args:
      data_config: with split_scheme and, optionally, num_folds and fold.
      all_folds: the config of a run of every fold (main.py with num_folds and no fold); else
        num_folds > 0 needs a fold.

    Raises:
      ConfigError: a bad fold count or fold, a fold without num_folds, folds with the `thesis`
        split scheme.
    """
    num_folds, fold = data_config.get("num_folds") or 0, data_config.get("fold")
    if not isinstance(num_folds, int) or num_folds < 0 or num_folds == 1:
        raise ConfigError(f"config.data.num_folds must be 0 (no folds) or >= 2, got {num_folds!r}")
    if num_folds > splits_lib.MAX_FOLDS:
        raise ConfigError(
            f"config.data.num_folds {num_folds} is over {splits_lib.MAX_FOLDS}, the most folds "
            "the index stores"
        )
    if fold is not None and not num_folds:
        raise ConfigError(f"config.data.fold {fold} needs config.data.num_folds (the fold count)")
    if num_folds and data_config["split_scheme"] != "patient":
        raise ConfigError(
            f"config.data.num_folds needs the 'patient' split scheme, not "
            f"{data_config['split_scheme']!r} (folds hold whole patients)"
        )
    if fold is None and num_folds and not all_folds:
        raise ConfigError(
            "config.data.fold is unset: give a fold, or run every fold with python main.py"
        )
    if fold is not None and (not isinstance(fold, int) or not 0 <= fold < num_folds):
        raise ConfigError(f"config.data.fold must be one of 0..{num_folds - 1}, got {fold!r}")


def validate_data_config(data_config: Mapping[str, Any], size_divisor: int = 1) -> None:
    """Checks a `config.data` without reading any data.

    Args:
      data_config: with source, path, modality, image_size (and optionally num_folds, fold).
      size_divisor: image_size must be a multiple of it (2**depth for a U-Net).

    Raises:
      ConfigError: unknown source or modality, a missing data folder, a bad image size, bad
        folds or a bad number of context slices.
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
    validate_folds(data_config)


def patient_splits(index: index_lib.Index, data_config: Mapping[str, Any]) -> dict[str, str] | None:
    """Each patient's split under `config.data.fold` of `num_folds`; None without folds.

    Raises:
      ConfigError: the index does not store that many folds (more folds than patients), or
        stores none (an index ingested before folds existed).
    """
    num_folds = data_config.get("num_folds") or 0
    if not num_folds:
        return None
    try:
        return index.fold_splits(num_folds, data_config["fold"])
    except index_lib.BadIndexError as error:
        raise ConfigError(f"config.data.num_folds: {error}") from None
    except ValueError as error:
        raise ConfigError(f"config.data.num_folds {num_folds}: {error}") from None


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
    fold_splits: Mapping[str, str] | None = None,
) -> dict[str, list]:
    """The slice records of one modality per split; every split must hold at least one slice.

    Args:
      index: the index.
      modality: a domain name.
      splits: the splits to query.
      tumour_only: only slices with tumour.
      patients: only these patients (None: all).
      fold_splits: per patient its split (`patient_splits` of a fold), in place of the index's
        stored splits; the records then carry these splits.

    Raises:
      ConfigError: a split without slices (names the modality and split).
    """
    modality = canonical_modality(modality)
    if fold_splits is None:
        records = {
            split: index.query(
                **datasets.domain_query(modality, split, tumour_only), patients=patients
            )
            for split in splits
        }
    else:
        kept = set(fold_splits) if patients is None else set(fold_splits) & set(patients)
        records = {
            split: [
                dataclasses.replace(record, split=split)
                for record in index.query(
                    **datasets.domain_query(modality, None, tumour_only),
                    patients=sorted(key for key in kept if fold_splits[key] == split),
                )
            ]
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
    records = query_splits(
        index,
        data_config["modality"],
        tumour_only=data_config["tumour_only"],
        fold_splits=patient_splits(index, data_config),
    )
    return load_splits(
        records,
        data_config["image_size"],
        progress=progress,
        context_slices=data_config.get("context_slices", 0),
        index=index,
    )
