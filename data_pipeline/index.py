"""The slice index: a SQLite file plus one .npz per slice, written atomically, queried by filters.

Layout of an index directory O:

    O/index.sqlite
    O/slices/<series_key>/<slice_index:04d>.npz   image float32 (R, C) physical units,
                                                  mask bool (R, C)

index.sqlite's fold_splits table holds the cross-validation folds (data_pipeline.splits).

IndexWriter stages everything in O/.partial-<pid>-<random>/ and commit() moves it in: the old
index.sqlite is removed first and the new one moved in last, so an interrupted run leaves either the
old index or none (Index(O) then raises IndexNotFoundError), never a half-written one.
"""

import dataclasses
import importlib.metadata
import io
import json
import os
import pathlib
import platform
import re
import secrets
import shutil
import sqlite3
import struct
import subprocess
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from isal import isal_zlib

from data_pipeline import splits as splits_lib
from data_pipeline.vocabulary import DOMAIN_ALIASES, MR_SEQUENCES, SPLITS
from data_pipeline.vocabulary import IMAGE_MODALITIES as MODALITIES

INDEX_FILENAME = "index.sqlite"
SLICES_DIRNAME = "slices"
SCHEMA_VERSION = 2  # 2: the fold_splits table
LINKED_BY = ("series_uid", "contour_images", "geometry")
# Deflate level 1: about 9x faster than numpy's default (6) on CT slices for ~5% larger files.
# Done with ISA-L (python-isal), which deflates a 512x512 int16 slice 5x faster than zlib at the
# same level and ratio; compression otherwise dominates ingest time.
NPZ_COMPRESSLEVEL = 1
_PARTIAL_PREFIX = ".partial-"
_OLD_SLICES_PREFIX = ".old-slices-"
_SAFE_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE patients (
  patient_key TEXT PRIMARY KEY, age REAL, sex TEXT, site TEXT);
CREATE TABLE series (
  series_key TEXT PRIMARY KEY,
  patient_key TEXT NOT NULL REFERENCES patients(patient_key),
  study_uid TEXT, series_uid TEXT, modality TEXT NOT NULL, sequence TEXT, description TEXT,
  frame_of_reference_uid TEXT, rows INTEGER NOT NULL, cols INTEGER NOT NULL,
  pixel_spacing_row_mm REAL, pixel_spacing_col_mm REAL, slice_spacing_mm REAL,
  orientation TEXT, n_slices INTEGER, units TEXT);
CREATE TABLE rois (
  series_key TEXT NOT NULL REFERENCES series(series_key), roi_name TEXT NOT NULL,
  rtstruct_file TEXT, linked_by TEXT NOT NULL);
CREATE TABLE slices (
  series_key TEXT NOT NULL REFERENCES series(series_key), slice_index INTEGER NOT NULL,
  position_mm REAL NOT NULL, sop_instance_uid TEXT, has_tumor INTEGER NOT NULL,
  tumor_pixels INTEGER NOT NULL, split TEXT NOT NULL, path TEXT NOT NULL,
  PRIMARY KEY (series_key, slice_index));
CREATE TABLE warnings (path TEXT, message TEXT NOT NULL);
CREATE TABLE fold_splits (
  num_folds INTEGER NOT NULL, fold INTEGER NOT NULL,
  patient_key TEXT NOT NULL REFERENCES patients(patient_key), split TEXT NOT NULL,
  PRIMARY KEY (num_folds, fold, patient_key));
CREATE INDEX series_modality ON series (modality, sequence);
CREATE INDEX series_patient ON series (patient_key);
CREATE INDEX slices_split ON slices (split);
CREATE INDEX patients_site ON patients (site);
"""


class BadIndexError(ValueError):
    """An index directory that cannot be read; str(e) is one line naming it."""


class IndexNotFoundError(BadIndexError):
    """The directory holds no index.sqlite (never ingested, or an ingest was interrupted)."""


def slice_relpath(series_key: str, slice_index: int) -> str:
    """Path of a slice's .npz relative to the index directory."""
    return f"{SLICES_DIRNAME}/{series_key}/{int(slice_index):04d}.npz"


def _smallest_exact(image: np.ndarray) -> np.ndarray:
    """image as int16 when that holds it exactly (CT in HU, most MR), else float32.

    Half the bytes to deflate: compressing is the costliest part of writing a slice, and the
    values, hence the physical units, are unchanged (SliceRecord.load returns float32).
    """
    as_int16 = image.astype(np.int16)
    return as_int16 if np.array_equal(as_int16, image) else image


def write_slice_npz(path, image: np.ndarray, mask: np.ndarray) -> int:
    """Writes a slice (image int16 when exact, else float32; mask bool); returns tumour pixels.

    The same arrays give the same bytes: numpy's savez stamps the zip members with the current
    time, so the members are written here with a fixed date instead. Safe to call from worker
    processes.

    Raises:
      ValueError: if image is not 2-D or mask has another shape.
    """
    image = np.asarray(image, dtype=np.float32)
    mask = np.asarray(mask).astype(bool)
    if image.ndim != 2 or mask.shape != image.shape:
        raise ValueError(
            f"a slice needs a 2-D image and a mask of the same shape, got image {image.shape} "
            f"and mask {mask.shape}"
        )
    image = _smallest_exact(image)
    members = []
    for name, array in (("image", image), ("mask", mask)):
        member_bytes = io.BytesIO()
        np.lib.format.write_array(member_bytes, array, allow_pickle=False)
        members.append((f"{name}.npy", member_bytes.getvalue()))
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_deflated_zip(members))
    return int(np.count_nonzero(mask))


# A minimal zip writer (PKWARE APPNOTE 4.3: local headers, data, central directory, end record),
# because zipfile can only deflate with zlib and cannot take members compressed elsewhere. Every
# member is raw deflate from ISA-L, dated 1980-01-01 so the same arrays give the same bytes; no
# zip64, so a member must stay under 4 GiB (a slice is a few hundred KiB).
_ZIP_DOS_DATE = (0 << 11, 1 | (1 << 5) | (0 << 9))  # (time, date): 00:00:00, 1980-01-01
_ZIP_VERSION = 20  # 2.0: deflate
_ZIP_DEFLATE = 8
_ZIP_MAX = 0xFFFFFFFF


def _deflated_zip(members: Sequence[tuple[str, bytes]]) -> bytes:
    """The bytes of a zip archive holding each (name, data) member deflated (np.load reads it)."""
    dos_time, dos_date = _ZIP_DOS_DATE
    parts, central, offset = [], [], 0
    for name, data in members:
        packed = isal_zlib.compress(data, NPZ_COMPRESSLEVEL, wbits=-15)  # raw deflate
        if len(data) > _ZIP_MAX or len(packed) > _ZIP_MAX:
            raise ValueError(f"zip member {name} is {len(data)} bytes, over the 4 GiB zip limit")
        encoded = name.encode("ascii")
        crc = isal_zlib.crc32(data)
        fields = (_ZIP_DEFLATE, dos_time, dos_date, crc, len(packed), len(data), len(encoded))
        local = struct.pack("<IHHHHHIIIHH", 0x04034B50, _ZIP_VERSION, 0, *fields, 0)
        central.append(
            struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, _ZIP_VERSION, _ZIP_VERSION, 0, *fields,
                        0, 0, 0, 0, 0, offset) + encoded)
        parts += [local, encoded, packed]
        offset += len(local) + len(encoded) + len(packed)
    directory = b"".join(central)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(directory),
                      offset, 0)
    return b"".join(parts) + directory + end


def _check_key(kind: str, key: str) -> str:
    if not isinstance(key, str) or not _SAFE_KEY.fullmatch(key):
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
            capture_output=True, text=True, timeout=10, check=False,
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
        pid_text = stale.name[len(_PARTIAL_PREFIX):].split("-", 1)[0]
        if pid_text.isdigit() and not _is_process_alive(int(pid_text)):
            shutil.rmtree(stale, ignore_errors=True)
    for stale in out_dir.glob(f"{_OLD_SLICES_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


class IndexWriter:
    """Builds an index in a staging folder inside out_dir; commit() moves it in.

    Use as a context manager: an exception inside the `with` block removes the staging folder and
    leaves any previous index untouched; a clean exit commits if commit() was not called. Calls
    must come from one thread; worker processes can write slice files themselves with
    write_slice_npz(writer.staging_dir / slice_relpath(...)) and register them with
    add_slice_file().

    Nothing identifying is stored: the patient key is whatever the caller passes (a de-identified
    PatientID or a salted hash) and there are no name or birth-date columns.
    """

    def __init__(self, out_dir, split_scheme: str = "patient", seed: int = 0,
                 provenance: Mapping | None = None):
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

    def add_series(self, *, series_key: str, patient_key: str, study_uid: str, series_uid: str,
                   modality: str, sequence: str | None, description: str | None,
                   frame_of_reference_uid: str | None, rows: int, cols: int,
                   pixel_spacing: Sequence[float], slice_spacing: float | None,
                   orientation: Sequence[float], n_slices: int, units: str | None) -> None:
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
            "series_key": series_key, "patient_key": patient_key, "study_uid": study_uid,
            "series_uid": series_uid, "modality": modality, "sequence": sequence,
            "description": description, "frame_of_reference_uid": frame_of_reference_uid,
            "rows": int(rows), "cols": int(cols), "pixel_spacing_row_mm": row_spacing_mm,
            "pixel_spacing_col_mm": col_spacing_mm,
            "slice_spacing_mm": _optional_float(slice_spacing),
            "orientation": json.dumps(orientation), "n_slices": int(n_slices), "units": units,
        }

    def add_roi(self, *, series_key: str, roi_name: str, rtstruct_file_rel: str | None,
                linked_by: str) -> None:
        """Records which RTSTRUCT ROI gave a series' masks and how it was linked."""
        self._check_open()
        if linked_by not in LINKED_BY:
            raise ValueError(f"linked_by {linked_by!r} not in {LINKED_BY}")
        self._rois.append((series_key, roi_name, rtstruct_file_rel, linked_by))

    def add_slice(self, *, series_key: str, slice_index: int, position_mm: float,
                  sop_instance_uid: str | None, image: np.ndarray, mask: np.ndarray) -> None:
        """Writes a slice's .npz (image float32 (R, C) physical units, mask (R, C)), records it."""
        self._check_open()
        _check_key("series_key", series_key)
        self._check_new_slice(series_key, slice_index)
        tumor_pixels = write_slice_npz(
            self.staging_dir / slice_relpath(series_key, slice_index), image, mask)
        self._record_slice(series_key, slice_index, position_mm, sop_instance_uid, tumor_pixels,
                           np.shape(image))

    def add_slice_file(self, *, series_key: str, slice_index: int, position_mm: float,
                       sop_instance_uid: str | None, tumor_pixels: int) -> None:
        """Records a slice whose file a worker already wrote with write_slice_npz.

        The file must be at staging_dir / slice_relpath(series_key, slice_index).
        """
        self._check_open()
        _check_key("series_key", series_key)
        self._check_new_slice(series_key, slice_index)
        path = os.path.join(self.staging_dir, slice_relpath(series_key, slice_index))
        if not os.path.isfile(path):
            raise ValueError(f"slice file {path} was not written")
        self._record_slice(series_key, slice_index, position_mm, sop_instance_uid, tumor_pixels,
                           None)

    def _check_new_slice(self, series_key: str, slice_index: int) -> None:
        if (series_key, int(slice_index)) in self._slices:
            raise ValueError(f"slice {slice_index} of series {series_key!r} was added twice")

    def _record_slice(self, series_key, slice_index, position_mm, sop_instance_uid,
                      tumor_pixels, shape) -> None:
        self._slices[(series_key, int(slice_index))] = {
            "position_mm": float(position_mm), "sop_instance_uid": sop_instance_uid,
            "tumor_pixels": int(tumor_pixels), "shape": shape,
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
                    "who was never added")
        for series_key, *_ in self._rois:
            if series_key not in self._series:
                raise ValueError(f"an ROI names series {series_key!r}, which was never added")
        for (series_key, slice_index), slice_row in self._slices.items():
            series = self._series.get(series_key)
            if series is None:
                raise ValueError(
                    f"slice {slice_index} names series {series_key!r}, which was never added")
            shape = slice_row["shape"]
            if shape is not None and tuple(shape) != (series["rows"], series["cols"]):
                raise ValueError(
                    f"slice {slice_index} of series {series_key!r} is {tuple(shape)}, the series "
                    f"is {(series['rows'], series['cols'])}")

    def _write_sqlite(self, path: pathlib.Path) -> None:
        slice_keys = sorted(self._slices)
        slice_patients = [
            (self._series[series_key]["patient_key"],
             self._slices[(series_key, index)]["position_mm"])
            for series_key, index in slice_keys
        ]
        slice_splits = splits_lib.assign_slice_splits(
            self.split_scheme, self.seed, self._patients, slice_patients)
        meta = {
            "schema_version": str(SCHEMA_VERSION),
            "split_scheme": self.split_scheme,
            "seed": str(self.seed),
            "created_by": json.dumps(self.provenance, sort_keys=True, default=str),
        }
        series_columns = (
            "series_key", "patient_key", "study_uid", "series_uid", "modality", "sequence",
            "description", "frame_of_reference_uid", "rows", "cols", "pixel_spacing_row_mm",
            "pixel_spacing_col_mm", "slice_spacing_mm", "orientation", "n_slices", "units")
        connection = sqlite3.connect(path)
        try:
            with connection:
                connection.executescript(_SCHEMA)
                connection.executemany("INSERT INTO meta VALUES (?, ?)", sorted(meta.items()))
                connection.executemany(
                    "INSERT INTO patients VALUES (?, ?, ?, ?)",
                    [(key, row["age"], row["sex"], row["site"])
                     for key, row in sorted(self._patients.items())])
                connection.executemany(
                    f"INSERT INTO series VALUES ({', '.join('?' * len(series_columns))})",
                    [tuple(self._series[key][column] for column in series_columns)
                     for key in sorted(self._series)])
                connection.executemany(
                    "INSERT INTO rois VALUES (?, ?, ?, ?)",
                    sorted(self._rois, key=lambda row: tuple(str(value) for value in row)))
                connection.executemany(
                    "INSERT INTO slices VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [(series_key, index, row["position_mm"], row["sop_instance_uid"],
                      int(row["tumor_pixels"] > 0), row["tumor_pixels"], split,
                      slice_relpath(series_key, index))
                     for (series_key, index), split in zip(slice_keys, slice_splits, strict=True)
                     for row in [self._slices[(series_key, index)]]])
                connection.executemany(
                    "INSERT INTO fold_splits VALUES (?, ?, ?, ?)", self._fold_rows())
                connection.executemany(
                    "INSERT INTO warnings VALUES (?, ?)",
                    sorted(self._warnings, key=lambda row: (str(row[0]), row[1])))
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


@dataclasses.dataclass(frozen=True)
class SliceRecord:
    """One slice of the index; load() reads its image and mask."""

    patient_key: str
    modality: str
    sequence: str | None
    split: str
    has_tumor: bool
    series_key: str
    slice_index: int
    position_mm: float
    tumor_pixels: int
    path: str  # Absolute path of the .npz.

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """(image float32 (R, C) physical units, mask uint8 (R, C)) at the original resolution."""
        with np.load(self.path) as arrays:
            return arrays["image"].astype(np.float32), arrays["mask"].astype(np.uint8)


def _as_list(value, name: str) -> list:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Iterable):
        return list(value)
    raise ValueError(f"{name} must be a string or a list of strings, got {value!r}")


def _modality_condition(modalities) -> tuple[str, list]:
    """SQL condition and parameters for modality names: CT, PT (PET), MR, or MR sequences."""
    clauses, params = [], []
    for name in _as_list(modalities, "modality"):
        upper = str(name).upper()
        upper = DOMAIN_ALIASES.get(upper, upper)
        if upper in MODALITIES:
            clauses.append("r.modality = ?")
            params.append(upper)
        elif upper in MR_SEQUENCES:
            clauses.append("(r.modality = 'MR' AND upper(r.sequence) = ?)")
            params.append(upper)
        else:
            raise ValueError(
                f"unknown modality {name!r}; expected one of "
                f"{', '.join(MODALITIES + MR_SEQUENCES)}")
    return "(" + " OR ".join(clauses) + ")", params


def _in_condition(column: str, count: int) -> str:
    """`column IN (?, ..., ?)`; column is one of Index.query's fixed names, never user input."""
    return f"{column} IN ({', '.join('?' * count)})"


class Index:
    """A read-only view of an index directory. Picklable: it holds only the path."""

    def __init__(self, out_dir):
        self.out_dir = pathlib.Path(out_dir).resolve()
        self.sqlite_path = self.out_dir / INDEX_FILENAME
        if not self.sqlite_path.is_file():
            raise IndexNotFoundError(
                f"no index at {out_dir}: {INDEX_FILENAME} is missing (run "
                "`python -m data_pipeline.ingest --dicom_dir D --out_dir O` first)")
        try:
            tables = {row[0] for row in self._fetch(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as error:
            raise BadIndexError(f"{self.sqlite_path} is not a readable index: {error}") from None
        if not {"meta", "patients", "series", "slices"} <= tables:
            raise BadIndexError(f"{self.sqlite_path} is not an index (its tables are missing)")

    def _fetch(self, sql: str, params: Sequence = ()) -> list[sqlite3.Row]:
        uri = self.sqlite_path.as_uri() + "?mode=ro"
        connection = sqlite3.connect(uri, uri=True)
        try:
            connection.row_factory = sqlite3.Row
            return connection.execute(sql, tuple(params)).fetchall()
        finally:
            connection.close()

    def query(self, modality=None, sequence=None, split=None, has_tumor: bool | None = None,
              site=None, age: tuple[float | None, float | None] | None = None,
              patients: Iterable[str] | None = None) -> list[SliceRecord]:
        """Slices matching every given filter, ordered by patient key, series key, slice index.

        Args:
          modality: 'CT', 'PT' (or 'PET'), 'MR', or an MR sequence 'T1', 'T2', 'STIR' (MR with that
            sequence); case-insensitive; a list matches any of them.
          sequence: MR sequence name(s), case-insensitive.
          split: 'train', 'val' or 'test', or a list of them.
          has_tumor: True for slices whose mask has tumour pixels, False for those without.
          site: tumour site(s) from the clinical table, compared case-insensitively.
          age: (lo, hi) in years, inclusive; either bound may be None. Patients without an age
            never match an age filter.
          patients: patient keys; an empty list matches nothing.

        Returns:
          The matching SliceRecords; [] when nothing matches.

        Raises:
          ValueError: for an unknown modality or split, or a malformed age range.
        """
        conditions, params = [], []
        if modality is not None:
            condition, modality_params = _modality_condition(modality)
            conditions.append(condition)
            params += modality_params
        if sequence is not None:
            sequences = [str(name).upper() for name in _as_list(sequence, "sequence")]
            conditions.append(_in_condition("upper(r.sequence)", len(sequences)))
            params += sequences
        if split is not None:
            split_names = _as_list(split, "split")
            unknown = [name for name in split_names if name not in SPLITS]
            if unknown:
                raise ValueError(
                    f"unknown split {unknown[0]!r}; expected one of {', '.join(SPLITS)}")
            conditions.append(_in_condition("s.split", len(split_names)))
            params += split_names
        if has_tumor is not None:
            conditions.append("s.has_tumor = ?")
            params.append(int(bool(has_tumor)))
        if site is not None:
            sites = [str(name).lower() for name in _as_list(site, "site")]
            conditions.append(_in_condition("lower(p.site)", len(sites)))
            params += sites
        if age is not None:
            try:
                age_lo, age_hi = age
            except (TypeError, ValueError):
                raise ValueError(f"age must be a (lo, hi) pair, got {age!r}") from None
            conditions.append("p.age IS NOT NULL")
            if age_lo is not None:
                conditions.append("p.age >= ?")
                params.append(float(age_lo))
            if age_hi is not None:
                conditions.append("p.age <= ?")
                params.append(float(age_hi))
        if patients is not None:
            patient_keys = _as_list(patients, "patients")
            conditions.append(_in_condition("p.patient_key", len(patient_keys)))
            params += patient_keys
        where = " AND ".join(conditions) if conditions else "1"
        rows = self._fetch(
            "SELECT p.patient_key, r.modality, r.sequence, s.split, s.has_tumor, s.series_key, "
            "s.slice_index, s.position_mm, s.tumor_pixels, s.path "
            "FROM slices s JOIN series r ON s.series_key = r.series_key "
            "JOIN patients p ON r.patient_key = p.patient_key "
            f"WHERE {where} ORDER BY p.patient_key, s.series_key, s.slice_index",
            params)
        return [
            SliceRecord(
                patient_key=row["patient_key"], modality=row["modality"],
                sequence=row["sequence"], split=row["split"], has_tumor=bool(row["has_tumor"]),
                series_key=row["series_key"], slice_index=row["slice_index"],
                position_mm=row["position_mm"], tumor_pixels=row["tumor_pixels"],
                path=str(self.out_dir / row["path"]))
            for row in rows
        ]

    def fold_splits(self, num_folds: int, fold: int) -> dict[str, str]:
        """Each patient's split ('train', 'val', 'test') when fold `fold` of `num_folds` is tested.

        Raises:
          BadIndexError: an index ingested before folds were stored (ingest it again).
          ValueError: a fold count the index does not store (splits.fold_counts of its
            patients), or a fold outside 0..num_folds-1.
        """
        if not self._fetch("SELECT name FROM sqlite_master WHERE name = 'fold_splits'"):
            raise BadIndexError(f"{self.sqlite_path} stores no cross-validation folds (ingested "
                                "before they existed); ingest it again")
        rows = self._fetch("SELECT fold, patient_key, split FROM fold_splits WHERE num_folds = ? "
                           "ORDER BY patient_key", (int(num_folds),))
        if not rows:
            num_patients = self._fetch("SELECT count(*) FROM patients")[0][0]
            why = "more folds than patients" if num_folds > num_patients else "too few patients"
            raise ValueError(f"{num_folds} folds of the {num_patients} patients of {self.out_dir}: "
                             f"{why} (stored: {splits_lib.fold_counts(num_patients)})")
        if not 0 <= fold < num_folds:
            raise ValueError(f"fold {fold} is not one of 0..{num_folds - 1}")
        return {row["patient_key"]: row["split"] for row in rows if row["fold"] == fold}

    def patients(self) -> list[dict]:
        """Per patient: patient_key, age, sex, site, splits (sorted), n_series, n_slices."""
        rows = self._fetch(
            "SELECT p.patient_key, p.age, p.sex, p.site, "
            "(SELECT count(*) FROM series r WHERE r.patient_key = p.patient_key) AS n_series, "
            "(SELECT count(*) FROM slices s JOIN series r ON s.series_key = r.series_key "
            " WHERE r.patient_key = p.patient_key) AS n_slices, "
            "(SELECT group_concat(split) FROM (SELECT DISTINCT s.split FROM slices s "
            " JOIN series r ON s.series_key = r.series_key WHERE r.patient_key = p.patient_key)) "
            "AS splits FROM patients p ORDER BY p.patient_key")
        patients = []
        for row in rows:
            patient = dict(row)
            split_names = set(patient["splits"].split(",")) if patient["splits"] else set()
            patient["splits"] = [name for name in SPLITS if name in split_names]
            patients.append(patient)
        return patients

    def series(self) -> list[dict]:
        """Per series: the series table's columns, orientation as 6 floats, ordered by key."""
        series = []
        for row in self._fetch("SELECT * FROM series ORDER BY series_key"):
            entry = dict(row)
            entry["orientation"] = json.loads(entry["orientation"])
            series.append(entry)
        return series

    def rois(self) -> list[dict]:
        """The ROI links: series_key, roi_name, rtstruct_file, linked_by."""
        return [dict(row) for row in self._fetch(
            "SELECT * FROM rois ORDER BY series_key, roi_name")]

    def warnings(self) -> list[dict]:
        """Input problems recorded at ingest: path, message."""
        return [dict(row) for row in self._fetch("SELECT * FROM warnings ORDER BY rowid")]

    def meta(self) -> dict:
        """schema_version, split_scheme, seed (int) and created_by (provenance dict)."""
        meta = {row["key"]: row["value"] for row in self._fetch("SELECT key, value FROM meta")}
        meta["seed"] = int(meta["seed"])
        meta["schema_version"] = int(meta["schema_version"])
        meta["created_by"] = json.loads(meta["created_by"])
        return meta

    def summary(self) -> dict:
        """Counts of patients, series per modality (MR per sequence), slices, tumour slices."""
        meta = self.meta()
        series_counts = {
            row["kind"]: row["n"] for row in self._fetch(
                "SELECT CASE WHEN modality = 'MR' THEN 'MR_' || coalesce(sequence, 'unknown') "
                "ELSE modality END AS kind, count(*) AS n FROM series GROUP BY kind ORDER BY kind")}
        split_counts = {
            row["split"]: row["n"] for row in self._fetch(
                "SELECT split, count(*) AS n FROM slices GROUP BY split")}
        slice_totals = self._fetch(
            "SELECT count(*) AS n, coalesce(sum(has_tumor), 0) AS n_tumor FROM slices")[0]
        return {
            "split_scheme": meta["split_scheme"],
            "seed": meta["seed"],
            "patients": self._fetch("SELECT count(*) FROM patients")[0][0],
            "series": series_counts,
            "slices": slice_totals["n"],
            "slices_with_tumor": slice_totals["n_tumor"],
            "slices_per_split": {name: split_counts.get(name, 0) for name in SPLITS},
            "warnings": self._fetch("SELECT count(*) FROM warnings")[0][0],
        }
