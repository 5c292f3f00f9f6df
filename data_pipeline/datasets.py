"""Where slices come from: the phantom, a DICOM folder or an index; ingested once, then cached.

`get_index` returns a `data_pipeline.index.Index`; `domain_query` turns a domain name into
`Index.query` arguments with the default slice selection (tumour slices only, SPEC §2), and
`load_domain` does both and preprocesses the slices into memory.

Cache layout (default `~/.cache/sarcoma_jax`, or `$SARCOMA_JAX_CACHE`):
  phantom_<seed>_<n>p_<size>px_<slices>sl_<code>/dicom    the generated DICOM and clinical.csv
  phantom_<seed>_<n>p_<size>px_<slices>sl_<code>/index_<scheme>_<code>   its index (split seed =
                                                          phantom seed)
  dicom_<key>/index                                       an ingested DICOM folder
<code> is a digest of the phantom's / the ingest's source code and <key> hashes the DICOM folder's
path and file listing (names, sizes, mtimes), the clinical file, split scheme, seed and ingest
code, so changed data or code gets a new entry instead of a stale one (old entries can be deleted).
Every entry is built in a hidden staging folder beside it and renamed into place when complete, so
a run killed half-way leaves no entry, only a `.tmp-` folder that the next build of it deletes.
"""

import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from data_pipeline import dicom_rules, loader
from data_pipeline import index as index_lib
from data_pipeline import ingest as ingest_lib
from data_pipeline import preprocess as preprocess_lib
from data_pipeline import splits as splits_lib
from data_pipeline.vocabulary import DOMAIN_ALIASES, DOMAINS

SOURCES = ("phantom", "dicom", "index")
CACHE_ENV_VAR = "SARCOMA_JAX_CACHE"
PHANTOM_CLINICAL_FILENAME = "clinical.csv"
# Modules whose code decides what an ingest produces.
INGEST_MODULES = (
    "ingest",
    "dicom_io",
    "dicom_header",
    "dicom_rules",
    "dicom_scan",
    "rtstruct",
    "index",
    "index_writer",
    "slice_store",
    "fast_paths",
    "splits",
    "clinical",
    "vocabulary",
    "workers",
)


class DatasetError(ValueError):
    """A bad data source request; `str(e)` is one line saying what is wrong."""


class PhantomSpec(NamedTuple):
    """Size of the generated phantom (data_pipeline.phantom.write_phantom arguments)."""

    patients: int = 12
    image_size: int = 128  # CT / MR rows and columns; PET gets half.
    num_slices: int = 30  # CT slices; PET and MR get fewer.


DEFAULT_PHANTOM = PhantomSpec()


def default_cache_dir() -> pathlib.Path:
    """`$SARCOMA_JAX_CACHE` when set, else `~/.cache/sarcoma_jax`."""
    from_env = os.environ.get(CACHE_ENV_VAR)
    if from_env:
        return pathlib.Path(from_env).expanduser()
    return pathlib.Path.home() / ".cache" / "sarcoma_jax"


def _process_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # Alive, owned by someone else.
        return True
    return True


def _remove_dead_staging(final_dir: pathlib.Path) -> None:
    """Deletes staging folders of final_dir left by builds whose process was killed."""
    prefix = f".{final_dir.name}.tmp-"
    for staging in final_dir.parent.glob(f"{prefix}*"):
        pid_text = staging.name[len(prefix) :].split("-", 1)[0]
        if pid_text.isdigit() and not _process_is_alive(int(pid_text)):
            shutil.rmtree(staging, ignore_errors=True)


def _build_once(final_dir: pathlib.Path, build: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """Returns final_dir, building it first with build(target) if it does not exist yet.

    build writes into `target`, a fresh path inside a staging folder beside final_dir
    (`.<name>.tmp-<pid>-<random>`); the result is renamed to final_dir only when build returns.
    If another process finished the same entry first, its copy is kept and ours discarded.
    """
    if final_dir.exists():
        return final_dir
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_staging(final_dir)
    staging = pathlib.Path(
        tempfile.mkdtemp(prefix=f".{final_dir.name}.tmp-{os.getpid()}-", dir=final_dir.parent)
    )
    try:
        target = staging / final_dir.name
        build(target)
        try:
            os.rename(target, final_dir)
        except OSError:
            if not final_dir.exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final_dir


def _code_digest(module_names: tuple[str, ...]) -> str:
    """8 hex digits of sha256 over data_pipeline modules' source (keys caches by code).

    A name is a module (``name.py``) or a package (every ``.py`` file below ``name/``).
    """
    digest = hashlib.sha256()
    root = pathlib.Path(__file__).parent
    for name in module_names:
        package = root / name
        files = sorted(package.rglob("*.py")) if package.is_dir() else [root / f"{name}.py"]
        for path in files:
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:8]


def _ingest_into(dicom_dir, clinical, split_scheme, seed, workers, progress):
    """A build function for `_build_once` that ingests dicom_dir into its target."""

    def build(target: pathlib.Path) -> None:
        ingest_lib.ingest(
            str(dicom_dir),
            str(target),
            clinical=None if clinical is None else str(clinical),
            split_scheme=split_scheme,
            seed=seed,
            workers=workers,
            progress=progress,
        )

    return build


def _folder_fingerprint(folder: pathlib.Path) -> list:
    """(relative path, size, mtime_ns) of every file below folder, sorted, as ingest walks it
    (links to folders followed: dicom_rules.walk_folder); no file is read. A file that cannot be
    stat'ed (a broken link) enters as (path, None, None), which ingest names and skips."""
    entries = []
    for path in dicom_rules.walk_folder(folder).files:
        try:
            stat = os.stat(path)
            entries.append((os.path.relpath(path, folder), stat.st_size, stat.st_mtime_ns))
        except OSError:
            entries.append((os.path.relpath(path, folder), None, None))
    return entries


def _file_stat(path: pathlib.Path) -> tuple[int, int]:
    """(size, mtime_ns) of one file."""
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


def _dicom_cache_key(dicom_dir: pathlib.Path, clinical, split_scheme: str, seed: int) -> str:
    """16 hex digits naming the cached index of one DICOM folder and ingest setting."""
    clinical_path = None if clinical is None else pathlib.Path(clinical).resolve()
    description = {
        "dicom_dir": str(dicom_dir),
        "files": _folder_fingerprint(dicom_dir),
        "clinical": None if clinical_path is None else str(clinical_path),
        "clinical_stat": None if clinical_path is None else _file_stat(clinical_path),
        "split_scheme": split_scheme,
        "seed": seed,
        "ingest_code": _code_digest(INGEST_MODULES),
    }
    encoded = json.dumps(description, sort_keys=True).encode("utf-8")
    return hashlib.sha256(encoded).hexdigest()[:16]


def _phantom_index(
    cache_dir: pathlib.Path, seed: int, phantom: PhantomSpec, split_scheme, workers, progress
) -> pathlib.Path:
    """Generates (once) and ingests (once per split scheme) the phantom; returns the index dir."""
    # Imported here: the phantom is only needed when it is asked for.
    from data_pipeline import phantom as phantom_lib

    if phantom.patients < 1 or phantom.image_size < 16 or phantom.num_slices < 6:
        raise DatasetError(
            f"phantom needs patients >= 1, image_size >= 16, num_slices >= 6; got {phantom}"
        )
    entry = cache_dir / (
        f"phantom_{seed}_{phantom.patients}p_{phantom.image_size}px_{phantom.num_slices}sl_"
        f"{_code_digest(('phantom',))}"
    )

    def write(target: pathlib.Path) -> None:
        phantom_lib.write_phantom(
            target,
            phantom.patients,
            seed,
            image_size=phantom.image_size,
            num_slices=phantom.num_slices,
            progress=progress,
        )

    dicom_dir = _build_once(entry / "dicom", write)
    clinical = dicom_dir / PHANTOM_CLINICAL_FILENAME
    clinical = clinical if clinical.is_file() else None
    build = _ingest_into(dicom_dir, clinical, split_scheme, seed, workers, progress)
    return _build_once(entry / f"index_{split_scheme}_{_code_digest(INGEST_MODULES)}", build)


def get_index(
    source: str,
    path=None,
    cache_dir=None,
    seed: int = 0,
    split_scheme: str = "patient",
    phantom_patients: int = DEFAULT_PHANTOM.patients,
    phantom_image_size: int = DEFAULT_PHANTOM.image_size,
    phantom_slices: int = DEFAULT_PHANTOM.num_slices,
    clinical=None,
    workers: int = 1,
    progress: bool = True,
) -> index_lib.Index:
    """Opens an index of slices, ingesting the data first when needed (once; then cached).

    Args:
      source: 'phantom' (generate the synthetic DICOM phantom and ingest it), 'dicom' (ingest the
        DICOM tree at `path`, e.g. the TCIA download) or 'index' (open the index at `path`).
      path: the DICOM root for 'dicom', the index folder for 'index'; unused for 'phantom'.
      cache_dir: where ingested data is kept (default: `default_cache_dir()`).
      seed: split seed; for the phantom also its generation seed.
      split_scheme: 'patient' or 'thesis' (data_pipeline.splits); not used for 'index', whose
        splits were fixed when it was ingested.
      phantom_patients: number of phantom patients.
      phantom_image_size: phantom CT / MR rows and columns (PET gets half).
      phantom_slices: phantom CT slices per patient (PET and MR get fewer).
      clinical: optional clinical CSV/XLSX joined at ingest for 'dicom' (the phantom uses its own).
      workers: ingest processes.
      progress: show progress bars while generating / ingesting.

    Returns:
      The index.

    Raises:
      DatasetError: unknown source or split scheme, missing folder or file.
    """
    if source not in SOURCES:
        raise DatasetError(f"unknown data source {source!r}; expected one of {', '.join(SOURCES)}")
    if split_scheme not in splits_lib.SCHEMES:
        expected = ", ".join(splits_lib.SCHEMES)
        raise DatasetError(f"unknown split scheme {split_scheme!r}; expected one of {expected}")
    if source == "index":
        if path is None:
            raise DatasetError("source 'index' needs the index folder as path")
        try:
            return index_lib.Index(path)
        except index_lib.BadIndexError as error:
            raise DatasetError(str(error)) from None
    cache_dir = pathlib.Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    if source == "phantom":
        phantom = PhantomSpec(phantom_patients, phantom_image_size, phantom_slices)
        index_dir = _phantom_index(cache_dir, seed, phantom, split_scheme, workers, progress)
        return index_lib.Index(index_dir)
    if path is None or not pathlib.Path(path).is_dir():
        raise DatasetError(f"DICOM folder not found: {path}")
    if clinical is not None and not pathlib.Path(clinical).is_file():
        raise DatasetError(f"clinical file not found: {clinical}")
    dicom_dir = pathlib.Path(path).expanduser().resolve()
    key = _dicom_cache_key(dicom_dir, clinical, split_scheme, seed)
    build = _ingest_into(dicom_dir, clinical, split_scheme, seed, workers, progress)
    return index_lib.Index(_build_once(cache_dir / f"dicom_{key}" / "index", build))


def canonical_domain(name: str) -> str:
    """'CT', 'PT', 'T1', 'T2' or 'STIR' for a domain name (case-insensitive; 'PET' -> 'PT')."""
    upper = str(name).strip().upper()
    upper = DOMAIN_ALIASES.get(upper, upper)
    if upper not in DOMAINS:
        raise DatasetError(f"unknown domain {name!r}; expected one of {', '.join(DOMAINS)}")
    return upper


def domain_query(domain: str, split: str | None = None, tumour_only: bool = True) -> dict:
    """`Index.query` keyword arguments for one domain's slices.

    Args:
      domain: 'CT', 'PT', 'T1', 'T2' or 'STIR' (MR sequences); see `canonical_domain`.
      split: 'train', 'val', 'test' or None for all.
      tumour_only: only slices that contain tumour (the default selection, SPEC §2); False for all.

    Returns:
      e.g. {'modality': 'T2', 'split': 'train', 'has_tumor': True}.
    """
    return {
        "modality": canonical_domain(domain),
        "split": split,
        "has_tumor": True if tumour_only else None,
    }


def load_domain(
    index: index_lib.Index,
    domain: str,
    split: str | None,
    image_size: int = preprocess_lib.DEFAULT_IMAGE_SIZE,
    tumour_only: bool = True,
    patients=None,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """One domain's split, preprocessed into memory (`loader.load_arrays` of `domain_query`).

    Args:
      index: the index.
      domain: see `domain_query`.
      split: 'train', 'val', 'test' or None.
      image_size: output height and width.
      tumour_only: see `domain_query`.
      patients: optional patient keys to keep (e.g. disjoint source and target patients).
      progress: show a progress bar.

    Returns:
      The arrays of `loader.load_arrays`; they may hold 0 examples.
    """
    records = index.query(**domain_query(domain, split, tumour_only), patients=patients)
    return loader.load_arrays(records, image_size=image_size, progress=progress)
