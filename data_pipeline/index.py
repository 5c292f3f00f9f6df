"""The slice index: its layout and schema, and Index, which queries it by filters.

Layout of an index directory O:

    O/index.sqlite
    O/slices/<series_key>/<slice_index:04d>.npz   image float32 (R, C) physical units,
                                                  mask bool (R, C)  (data_pipeline.slice_store)

index.sqlite's fold_splits table holds the cross-validation folds (data_pipeline.splits).

data_pipeline.index_writer.IndexWriter builds one atomically: an interrupted run leaves either the
old index or none (Index(O) then raises IndexNotFoundError), never a half-written one.
"""

import dataclasses
import functools
import json
import pathlib
import re
import sqlite3
from collections.abc import Iterable, Sequence

import numpy as np

from data_pipeline import slice_store
from data_pipeline import splits as splits_lib
from data_pipeline.vocabulary import DOMAIN_ALIASES, MR_SEQUENCES, SPLITS
from data_pipeline.vocabulary import IMAGE_MODALITIES as MODALITIES

INDEX_FILENAME = "index.sqlite"
SLICES_DIRNAME = "slices"
SCHEMA_VERSION = 2  # 2: the fold_splits table
LINKED_BY = ("series_uid", "contour_images", "geometry")
# Tables added after version 1: an index without them still opens (Index.fold_splits says to
# ingest again).
_ADDED_TABLES = frozenset({"fold_splits"})
SAFE_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # series keys name folders

SCHEMA = """
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
        return slice_store.read_slice(self.path)


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
                f"unknown modality {name!r}; expected one of {', '.join(MODALITIES + MR_SEQUENCES)}"
            )
    return "(" + " OR ".join(clauses) + ")", params


def _in_condition(column: str) -> str:
    """`column IN` the values of one JSON array parameter; column is one of Index.query's fixed
    names, never user input. One parameter however many values: SQLite allows at most 32766
    parameters, and a patient list can be longer."""
    return f"{column} IN (SELECT value FROM json_each(?))"


@functools.cache
def _schema_columns() -> dict[str, list[str]]:
    """Each table's columns, as SCHEMA creates them."""
    connection = sqlite3.connect(":memory:")
    try:
        connection.executescript(SCHEMA)
        return _columns(connection)
    finally:
        connection.close()


def _columns(connection: sqlite3.Connection) -> dict[str, list[str]]:
    tables = [
        row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    ]
    return {
        table: [row[1] for row in connection.execute(f"PRAGMA table_info({_quoted(table)})")]
        for table in tables
    }


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class Index:
    """A read-only view of an index directory. Picklable: it holds only the path."""

    def __init__(self, out_dir):
        self.out_dir = pathlib.Path(out_dir).resolve()
        self.sqlite_path = self.out_dir / INDEX_FILENAME
        if not self.sqlite_path.is_file():
            raise IndexNotFoundError(
                f"no index at {out_dir}: {INDEX_FILENAME} is missing (run "
                "`python -m data_pipeline.ingest --dicom_dir D --out_dir O` first)"
            )
        try:
            connection = self._connect()
            try:
                found = _columns(connection)
            finally:
                connection.close()
        except sqlite3.Error as error:
            raise BadIndexError(f"{self.sqlite_path} is not a readable index: {error}") from None
        for table, columns in _schema_columns().items():
            if table in _ADDED_TABLES and table not in found:
                continue  # an older index: what needs the table says to ingest again
            if table not in found:
                raise BadIndexError(f"{self.sqlite_path} is not an index (no table {table})")
            missing = [c for c in columns if c not in found[table]]
            if missing:
                raise BadIndexError(
                    f"{self.sqlite_path} is not an index of this version (table {table} lacks "
                    f"{', '.join(missing)})"
                )

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.sqlite_path.as_uri() + "?mode=ro", uri=True)

    def _fetch(self, sql: str, params: Sequence = ()) -> list[sqlite3.Row]:
        """The rows of a query; BadIndexError when SQLite cannot read the file (a corrupt or
        replaced index.sqlite)."""
        try:
            connection = self._connect()
            try:
                connection.row_factory = sqlite3.Row
                return connection.execute(sql, tuple(params)).fetchall()
            finally:
                connection.close()
        except sqlite3.Error as error:
            raise BadIndexError(f"{self.sqlite_path} is not a readable index: {error}") from None

    def query(
        self,
        modality=None,
        sequence=None,
        split=None,
        has_tumor: bool | None = None,
        site=None,
        age: tuple[float | None, float | None] | None = None,
        patients: Iterable[str] | None = None,
    ) -> list[SliceRecord]:
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
            conditions.append(_in_condition("upper(r.sequence)"))
            params.append(json.dumps(sequences))
        if split is not None:
            split_names = _as_list(split, "split")
            unknown = [name for name in split_names if name not in SPLITS]
            if unknown:
                raise ValueError(
                    f"unknown split {unknown[0]!r}; expected one of {', '.join(SPLITS)}"
                )
            conditions.append(_in_condition("s.split"))
            params.append(json.dumps(split_names))
        if has_tumor is not None:
            conditions.append("s.has_tumor = ?")
            params.append(int(bool(has_tumor)))
        if site is not None:
            sites = [str(name).lower() for name in _as_list(site, "site")]
            conditions.append(_in_condition("lower(p.site)"))
            params.append(json.dumps(sites))
        if age is not None:
            try:
                age_lo, age_hi = (None if bound is None else float(bound) for bound in age)
            except (TypeError, ValueError):
                raise ValueError(f"age must be a (lo, hi) pair of numbers, got {age!r}") from None
            conditions.append("p.age IS NOT NULL")
            if age_lo is not None:
                conditions.append("p.age >= ?")
                params.append(age_lo)
            if age_hi is not None:
                conditions.append("p.age <= ?")
                params.append(age_hi)
        if patients is not None:
            patient_keys = [str(key) for key in _as_list(patients, "patients")]
            conditions.append(_in_condition("p.patient_key"))
            params.append(json.dumps(patient_keys))
        where = " AND ".join(conditions) if conditions else "1"
        rows = self._fetch(
            "SELECT p.patient_key, r.modality, r.sequence, s.split, s.has_tumor, s.series_key, "
            "s.slice_index, s.position_mm, s.tumor_pixels, s.path "
            "FROM slices s JOIN series r ON s.series_key = r.series_key "
            "JOIN patients p ON r.patient_key = p.patient_key "
            f"WHERE {where} ORDER BY p.patient_key, s.series_key, s.slice_index",
            params,
        )
        return [
            SliceRecord(
                patient_key=row["patient_key"],
                modality=row["modality"],
                sequence=row["sequence"],
                split=row["split"],
                has_tumor=bool(row["has_tumor"]),
                series_key=row["series_key"],
                slice_index=row["slice_index"],
                position_mm=row["position_mm"],
                tumor_pixels=row["tumor_pixels"],
                path=str(self.out_dir / row["path"]),
            )
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
            "AS splits FROM patients p ORDER BY p.patient_key"
        )
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
        return [
            dict(row) for row in self._fetch("SELECT * FROM rois ORDER BY series_key, roi_name")
        ]

    def warnings(self) -> list[dict]:
        """Input problems recorded at ingest: path, message."""
        return [dict(row) for row in self._fetch("SELECT * FROM warnings ORDER BY rowid")]

    def meta(self) -> dict:
        """schema_version, split_scheme, seed (int) and created_by (provenance dict)."""
        meta = {row["key"]: row["value"] for row in self._fetch("SELECT key, value FROM meta")}
        try:
            meta["seed"] = int(meta["seed"])
            meta["schema_version"] = int(meta["schema_version"])
            meta["created_by"] = json.loads(meta["created_by"])
        except (KeyError, TypeError, ValueError) as error:
            raise BadIndexError(
                f"{self.sqlite_path}: its meta table is malformed ({type(error).__name__}: {error})"
            ) from None
        return meta

    def summary(self) -> dict:
        """Counts of patients, series per modality (MR per sequence), slices, tumour slices."""
        meta = self.meta()
        series_counts = {
            row["kind"]: row["n"]
            for row in self._fetch(
                "SELECT CASE WHEN modality = 'MR' THEN 'MR_' || coalesce(sequence, 'unknown') "
                "ELSE modality END AS kind, count(*) AS n FROM series GROUP BY kind ORDER BY kind"
            )
        }
        split_counts = {
            row["split"]: row["n"]
            for row in self._fetch("SELECT split, count(*) AS n FROM slices GROUP BY split")
        }
        slice_totals = self._fetch(
            "SELECT count(*) AS n, coalesce(sum(has_tumor), 0) AS n_tumor FROM slices"
        )[0]
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

