"""IndexWriter: builds an index directory (data_pipeline.index's layout) and moves it in whole.

IndexWriter stages everything in O/.partial-<pid>-<random>/ and commit() moves it in: the old
index.sqlite is removed first and the new one moved in last, so an interrupted run leaves either the
old index or none, never a half-written one.
"""

import importlib.metadata
import json
import os
import pathlib
import platform
import secrets
import shutil
import sqlite3
import subprocess
from collections.abc import Mapping, Sequence

import numpy as np

from data_pipeline import slice_store
from data_pipeline import splits as splits_lib
from data_pipeline.index import (
    INDEX_FILENAME,
    LINKED_BY,
    SAFE_KEY,
    SCHEMA,
    SCHEMA_VERSION,
    SLICES_DIRNAME,
    slice_relpath,
)
from data_pipeline.vocabulary import IMAGE_MODALITIES as MODALITIES

_PARTIAL_PREFIX = ".partial-"
_OLD_SLICES_PREFIX = ".old-slices-"


def _check_key(kind: str, key: str) -> str:
    if not isinstance(key, str) or not SAFE_KEY.fullmatch(key):
        raise ValueError(
            f"{kind} {key!r} must start with a letter or digit and hold only letters, digits, '.', "
            "'_' and '-' (it names a folder)"
        )
    return key


def _optional_float(value) -> float | None:
    return None if value is None else float(value)


def _git_commit() -> str | None:
    repo_root = pathlib.Path(__file__).resolve().parents[1]
    try:
        result = subprocess.run(
            ["git", "-C", str(repo_root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip() or None


def default_provenance() -> dict:
    """What wrote an index: package and library versions and the git commit, no timestamps."""
    try:
        package_version = importlib.metadata.version("sarcoma_jax")
    except importlib.metadata.PackageNotFoundError:
        package_version = None
    return {
        "package": "sarcoma_jax",
        "package_version": package_version,
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "sqlite": sqlite3.sqlite_version,
        "schema_version": SCHEMA_VERSION,
    }


def _is_process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_partials(out_dir: pathlib.Path) -> None:
    """Removes staging folders left by writers that were killed (their process is gone)."""
    for stale in out_dir.glob(f"{_PARTIAL_PREFIX}*"):
        pid_text = stale.name[len(_PARTIAL_PREFIX) :].split("-", 1)[0]
        if pid_text.isdigit() and not _is_process_alive(int(pid_text)):
            shutil.rmtree(stale, ignore_errors=True)
    for stale in out_dir.glob(f"{_OLD_SLICES_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


class IndexWriter:
    """Builds an index in a staging folder inside out_dir; commit() moves it in.

    Use as a context manager: an exception inside the `with` block removes the staging folder and
    leaves any previous index untouched; a clean exit commits if commit() was not called. Calls
    must come from one thread; worker processes can write slice files themselves with
    slice_store.write_slice(writer.staging_dir / slice_relpath(...)) and register them with
    add_slice_file().

    Nothing identifying is stored: the patient key is whatever the caller passes (a de-identified
    PatientID or a salted hash) and there are no name or birth-date columns.
    """

    def __init__(
        self,
        out_dir,
        split_scheme: str = "patient",
        seed: int = 0,
        provenance: Mapping | None = None,
    ):
        if split_scheme not in splits_lib.SCHEMES:
            raise ValueError(
                f"unknown split scheme {split_scheme!r}; expected one of "
                f"{', '.join(splits_lib.SCHEMES)}"
            )
        self.out_dir = pathlib.Path(out_dir)
        self.split_scheme = split_scheme
        self.seed = int(seed)
        self.provenance = {**default_provenance(), **dict(provenance or {})}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(self.out_dir)
        self.staging_dir = self.out_dir / f"{_PARTIAL_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        self.staging_dir.mkdir()
        self._patients: dict[str, dict] = {}
        self._series: dict[str, dict] = {}
        self._rois: list[tuple] = []
        self._slices: dict[tuple[str, int], dict] = {}
        self._warnings: list[tuple] = []
        self._fold_draws: dict[str, str] = {}
        self._closed = False

    def __enter__(self) -> "IndexWriter":
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        if self._closed:
            return
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this IndexWriter was already committed or aborted")

    def add_patient(self, patient_key: str, age=None, sex=None, site=None) -> None:
        """Adds a patient; adding one again fills in fields that were None."""
        self._check_open()
        if not isinstance(patient_key, str) or not patient_key.strip():
            raise ValueError(f"patient_key must be a non-empty string, got {patient_key!r}")
        fields = {"age": _optional_float(age), "sex": sex, "site": site}
        known = self._patients.setdefault(patient_key, dict.fromkeys(fields))
        known.update({name: value for name, value in fields.items() if value is not None})

    def set_fold_draw(self, patient_key: str, draw: str) -> None:
        """Sets a patient's fold draw (`splits.fold_draw` of the seed and its raw PatientID).

        Patients without one draw by their patient key, which changes with a patient salt.
        """
        self._check_open()
        self._fold_draws[patient_key] = draw

    def _fold_rows(self) -> list[tuple]:
        """(num_folds, fold, patient_key, split) rows of every stored fold count."""
        tumour_slices = dict.fromkeys(self._patients, 0)
        for (series_key, _), row in self._slices.items():
            tumour_slices[self._series[series_key]["patient_key"]] += int(row["tumor_pixels"] > 0)
        draws = {key: self._fold_draws.get(key) or splits_lib.fold_draw(self.seed, key)
                 for key in self._patients}
        return splits_lib.fold_table(tumour_slices, draws)

    def add_series(
        self,
        *,
        series_key: str,
        patient_key: str,
        study_uid: str,
        series_uid: str,
        modality: str,
        sequence: str | None,
        description: str | None,
        frame_of_reference_uid: str | None,
        rows: int,
        cols: int,
        pixel_spacing: Sequence[float],
        slice_spacing: float | None,
        orientation: Sequence[float],
        n_slices: int,
        units: str | None,
    ) -> None:
        """Adds an image series. pixel_spacing is (row spacing, column spacing) in mm."""
        self._check_open()
        _check_key("series_key", series_key)
        if series_key in self._series:
            raise ValueError(f"series {series_key!r} was added twice")
        if modality not in MODALITIES:
            raise ValueError(f"series {series_key!r}: modality {modality!r} not in {MODALITIES}")
        row_spacing_mm, col_spacing_mm = (float(value) for value in pixel_spacing)
        orientation = [float(value) for value in orientation]
        if len(orientation) != 6:
            raise ValueError(f"series {series_key!r}: orientation needs 6 values")
        self._series[series_key] = {
            "series_key": series_key,
            "patient_key": patient_key,
            "study_uid": study_uid,
            "series_uid": series_uid,
            "modality": modality,
            "sequence": sequence,
            "description": description,
            "frame_of_reference_uid": frame_of_reference_uid,
            "rows": int(rows),
            "cols": int(cols),
            "pixel_spacing_row_mm": row_spacing_mm,
            "pixel_spacing_col_mm": col_spacing_mm,
            "slice_spacing_mm": _optional_float(slice_spacing),
            "orientation": json.dumps(orientation),
            "n_slices": int(n_slices),
            "units": units,
        }

    def add_roi(
        self, *, series_key: str, roi_name: str, rtstruct_file_rel: str | None, linked_by: str
    ) -> None:
        """Records which RTSTRUCT ROI gave a series' masks and how it was linked."""
        self._check_open()
        if linked_by not in LINKED_BY:
            raise ValueError(f"linked_by {linked_by!r} not in {LINKED_BY}")
        self._rois.append((series_key, roi_name, rtstruct_file_rel, linked_by))

    def add_slice(
        self,
        *,
        series_key: str,
        slice_index: int,
        position_mm: float,
        sop_instance_uid: str | None,
        image: np.ndarray,
        mask: np.ndarray,
    ) -> None:
        """Writes a slice's .npz (image float32 (R, C) physical units, mask (R, C)), records it."""
        self._check_open()
        _check_key("series_key", series_key)
        self._check_new_slice(series_key, slice_index)
        tumor_pixels = slice_store.write_slice(
            self.staging_dir / slice_relpath(series_key, slice_index), image, mask
        )
        self._record_slice(
            series_key, slice_index, position_mm, sop_instance_uid, tumor_pixels, np.shape(image)
        )

    def add_slice_file(
        self,
        *,
        series_key: str,
        slice_index: int,
        position_mm: float,
        sop_instance_uid: str | None,
        tumor_pixels: int,
    ) -> None:
        """Records a slice whose file a worker already wrote with slice_store.write_slice.

        The file must be at staging_dir / slice_relpath(series_key, slice_index).
        """
        self._check_open()
        _check_key("series_key", series_key)
        self._check_new_slice(series_key, slice_index)
        path = os.path.join(self.staging_dir, slice_relpath(series_key, slice_index))
        if not os.path.isfile(path):
            raise ValueError(f"slice file {path} was not written")
        self._record_slice(
            series_key, slice_index, position_mm, sop_instance_uid, tumor_pixels, None
        )

    def _check_new_slice(self, series_key: str, slice_index: int) -> None:
        if (series_key, int(slice_index)) in self._slices:
            raise ValueError(f"slice {slice_index} of series {series_key!r} was added twice")

    def _record_slice(
        self, series_key, slice_index, position_mm, sop_instance_uid, tumor_pixels, shape
    ) -> None:
        self._slices[(series_key, int(slice_index))] = {
            "position_mm": float(position_mm),
            "sop_instance_uid": sop_instance_uid,
            "tumor_pixels": int(tumor_pixels),
            "shape": shape,
        }

    def add_warning(self, path_rel: str | None, message: str) -> None:
        """Records a skipped file or other input problem."""
        self._check_open()
        self._warnings.append((path_rel, str(message)))

    def _validate(self) -> None:
        for series in self._series.values():
            if series["patient_key"] not in self._patients:
                raise ValueError(
                    f"series {series['series_key']!r} names patient {series['patient_key']!r}, "
                    "who was never added"
                )
        for series_key, *_ in self._rois:
            if series_key not in self._series:
                raise ValueError(f"an ROI names series {series_key!r}, which was never added")
        for (series_key, slice_index), slice_row in self._slices.items():
            series = self._series.get(series_key)
            if series is None:
                raise ValueError(
                    f"slice {slice_index} names series {series_key!r}, which was never added"
                )
            shape = slice_row["shape"]
            if shape is not None and tuple(shape) != (series["rows"], series["cols"]):
                raise ValueError(
                    f"slice {slice_index} of series {series_key!r} is {tuple(shape)}, the series "
                    f"is {(series['rows'], series['cols'])}"
                )

    def _write_sqlite(self, path: pathlib.Path) -> None:
        slice_keys = sorted(self._slices)
        slice_patients = [
            (
                self._series[series_key]["patient_key"],
                self._slices[(series_key, index)]["position_mm"],
            )
            for series_key, index in slice_keys
        ]
        slice_splits = splits_lib.assign_slice_splits(
            self.split_scheme, self.seed, self._patients, slice_patients
        )
        meta = {
            "schema_version": str(SCHEMA_VERSION),
            "split_scheme": self.split_scheme,
            "seed": str(self.seed),
            "created_by": json.dumps(self.provenance, sort_keys=True, default=str),
        }
        series_columns = (
            "series_key",
            "patient_key",
            "study_uid",
            "series_uid",
            "modality",
            "sequence",
            "description",
            "frame_of_reference_uid",
            "rows",
            "cols",
            "pixel_spacing_row_mm",
            "pixel_spacing_col_mm",
            "slice_spacing_mm",
            "orientation",
            "n_slices",
            "units",
        )
        connection = sqlite3.connect(path)
        try:
            with connection:
                connection.executescript(SCHEMA)
                connection.executemany("INSERT INTO meta VALUES (?, ?)", sorted(meta.items()))
                connection.executemany(
                    "INSERT INTO patients VALUES (?, ?, ?, ?)",
                    [
                        (key, row["age"], row["sex"], row["site"])
                        for key, row in sorted(self._patients.items())
                    ],
                )
                connection.executemany(
                    f"INSERT INTO series VALUES ({', '.join('?' * len(series_columns))})",
                    [
                        tuple(self._series[key][column] for column in series_columns)
                        for key in sorted(self._series)
                    ],
                )
                connection.executemany(
                    "INSERT INTO rois VALUES (?, ?, ?, ?)",
                    sorted(self._rois, key=lambda row: tuple(str(value) for value in row)),
                )
                connection.executemany(
                    "INSERT INTO slices VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            series_key,
                            index,
                            row["position_mm"],
                            row["sop_instance_uid"],
                            int(row["tumor_pixels"] > 0),
                            row["tumor_pixels"],
                            split,
                            slice_relpath(series_key, index),
                        )
                        for (series_key, index), split in zip(slice_keys, slice_splits, strict=True)
                        for row in [self._slices[(series_key, index)]]
                    ],
                )
                connection.executemany(
                    "INSERT INTO fold_splits VALUES (?, ?, ?, ?)", self._fold_rows()
                )
                connection.executemany(
                    "INSERT INTO warnings VALUES (?, ?)",
                    sorted(self._warnings, key=lambda row: (str(row[0]), row[1])),
                )
        finally:
            connection.close()

    def commit(self) -> None:
        """Assigns splits, writes index.sqlite and moves the index into out_dir.

        Raises:
          ValueError: if a series, ROI or slice refers to something never added, or a slice's
            shape differs from its series'; the staging folder is then removed.
        """
        self._check_open()
        try:
            self._validate()
            staged_sqlite = self.staging_dir / INDEX_FILENAME
            self._write_sqlite(staged_sqlite)
            staged_slices = self.staging_dir / SLICES_DIRNAME
            staged_slices.mkdir(exist_ok=True)
        except BaseException:
            self.abort()
            raise
        final_sqlite = self.out_dir / INDEX_FILENAME
        final_slices = self.out_dir / SLICES_DIRNAME
        # From here until the last replace there is no index.sqlite: a kill leaves "no index".
        final_sqlite.unlink(missing_ok=True)
        old_slices = self.staging_dir.with_name(_OLD_SLICES_PREFIX + self.staging_dir.name)
        if final_slices.exists():
            final_slices.rename(old_slices)
        staged_slices.rename(final_slices)
        os.replace(staged_sqlite, final_sqlite)
        self._closed = True
        shutil.rmtree(old_slices, ignore_errors=True)
        shutil.rmtree(self.staging_dir, ignore_errors=True)

    def abort(self) -> None:
        """Discards everything staged; any previous index stays as it was."""
        self._closed = True
        shutil.rmtree(self.staging_dir, ignore_errors=True)
