"""Malformed DICOM beside good series, made from a real sts_ibsi patient, and the invariant every
ingest of such a case must hold (issue 17).

A case is one patient's good CT series with its RTSTRUCT, beside another series (PET, or MR T1 for
explicit-VR mutations) and its RTSTRUCT, some file of which is mutated. Unmutated files are links
to ../shared (read-only, never written); a mutated file is a copy in the case folder.

Used by tests/malformed_test.py (each defect of the issue), tests/fuzz_test.py (seeded mutations
with hypothesis) and benchmarks/fuzz.py (the same at scale).
"""

import dataclasses
import os
import pathlib
import random
import shutil
import signal
import socket
import sqlite3
import struct

import numpy as np
import pydicom

from data_pipeline import dicom_scan
from data_pipeline import ingest as ingest_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("SARCOMA_JAX_SHARED", REPO / ".." / "shared"))
STS_IBSI = SHARED / "data" / "sts_ibsi"
PATIENT = "STS_002"  # the fewest slices (48 CT, 48 PET, 35 MR)
GOOD = "CT"
FOLDER_MODALITY = {"CT": "CT", "PET": "PT", "MR_T1": "MR"}


def source_files(series: str, part: str) -> list[pathlib.Path]:
    """PATIENT's sts_ibsi files of ``series`` ('CT', 'PET', 'MR_T1'), ``part`` 'image'/'mask'."""
    return sorted((STS_IBSI / "dicom" / PATIENT / series / part).glob("*.dcm"))


def build_case(root, series: tuple[str, ...] = (GOOD, "PET"), masks: bool = True) -> pathlib.Path:
    """A case folder under ``root``: <series>/image/*.dcm and <series>/mask/*.dcm, as links."""
    case = pathlib.Path(root)
    for name in series:
        for part in ("image", "mask") if masks else ("image",):
            folder = case / name / part
            folder.mkdir(parents=True, exist_ok=True)
            for source in source_files(name, part):
                os.symlink(source, folder / source.name)
    return case


def writable(path) -> pathlib.Path:
    """Replaces a link to ../shared by a copy of its file, so that it can be mutated."""
    path = pathlib.Path(path)
    if path.is_symlink():
        data = path.read_bytes()
        path.unlink()
        path.write_bytes(data)
    return path


@dataclasses.dataclass
class Outcome:
    """One ingest of a case: its summary and log lines, or the exception it raised."""

    index_dir: str
    summary: ingest_lib.IngestSummary | None
    lines: list[str]
    error: BaseException | None = None


class Hang(BaseException):
    """The ingest ran past its time limit (a BaseException: ingest's own handlers must not catch
    it and call it an input problem)."""


def _alarm(signum, frame):
    raise Hang("the ingest ran past its time limit")


def run_ingest(dicom_dir, index_dir, workers: int = 1, timeout_s: float = 60.0) -> Outcome:
    """Ingests a case in this process, within ``timeout_s`` (SIGALRM; main thread only)."""
    lines: list[str] = []
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        summary = ingest_lib.ingest(
            str(dicom_dir), str(index_dir), progress=False, log=lines.append, workers=workers
        )
    except (Exception, Hang) as error:  # the invariant says none may escape: recorded, asserted
        return Outcome(str(index_dir), None, lines, error)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return Outcome(str(index_dir), summary, lines)


def series_contents(index_dir, modality: str) -> dict | None:
    """Every index row about the series of one modality and its slices' arrays (dtype included);
    None when the index has no such series."""
    connection = sqlite3.connect(os.path.join(index_dir, "index.sqlite"))
    try:
        series = connection.execute(
            "SELECT * FROM series WHERE modality = ?", (modality,)
        ).fetchall()
        if not series:
            return None
        keys = tuple(row[0] for row in series)
        marks = ", ".join("?" * len(keys))
        contents = {
            "series": series,
            "patients": connection.execute(
                f"SELECT * FROM patients WHERE patient_key IN "
                f"(SELECT patient_key FROM series WHERE series_key IN ({marks}))",
                keys,
            ).fetchall(),
            "rois": connection.execute(
                f"SELECT * FROM rois WHERE series_key IN ({marks}) ORDER BY series_key", keys
            ).fetchall(),
            "slices": connection.execute(
                f"SELECT * FROM slices WHERE series_key IN ({marks}) "
                "ORDER BY series_key, slice_index",
                keys,
            ).fetchall(),
        }
    finally:
        connection.close()
    arrays = []
    for row in contents["slices"]:
        with np.load(os.path.join(index_dir, row[-1])) as npz:
            arrays.append({name: npz[name].copy() for name in sorted(npz.files)})
    contents["arrays"] = arrays
    return contents


def same_contents(a: dict | None, b: dict | None) -> bool:
    if a is None or b is None:
        return a is b
    if any(a[table] != b[table] for table in ("series", "patients", "rois", "slices")):
        return False
    return all(
        x.keys() == y.keys()
        and all(x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]) for k in x)
        for x, y in zip(a["arrays"], b["arrays"], strict=True)
    )


def invariant_violations(
    outcome: Outcome,
    good_alone: dict,
    bad_modality: str,
    bad_slices: int,
    image_files: int,
    mutated: list[str],
    case_dir,
) -> list[str]:
    """What in ``outcome`` breaks the invariant of issue 17; [] when it holds.

    Args:
      outcome: the ingest of the case.
      good_alone: series_contents of the good series ingested alone.
      bad_modality: the other series' modality ('PT', 'MR').
      bad_slices: how many slices the other series has unmutated.
      image_files: image files in the case before mutation.
      mutated: the mutated (or added) files, relative to the case folder.
      case_dir: the case folder.
    """
    if outcome.error is not None:
        return [f"ingest raised {type(outcome.error).__name__}: {outcome.error}"]
    violations = []
    for line in outcome.lines:
        if "\n" in line or "\r" in line:
            violations.append(f"a message spans several lines: {line!r}")
        if "Traceback" in line:
            violations.append(f"a traceback: {line!r}")
        if ": " not in line:
            violations.append(f"a message names no file: {line!r}")
    if not same_contents(series_contents(outcome.index_dir, GOOD), good_alone):
        violations.append(f"the good {GOOD} series is not indexed as it is alone")
    summary = outcome.summary
    counted = summary.slices + summary.slices_lost
    mutated_images = sum("/image/" in f"/{name}" for name in mutated)
    if not image_files - mutated_images <= counted <= image_files:
        violations.append(
            f"{summary.slices} slices indexed + {summary.slices_lost} lost, of {image_files} image "
            f"files ({mutated_images} mutated)"
        )
    bad = series_contents(outcome.index_dir, bad_modality)
    indexed = 0 if bad is None else len(bad["slices"])
    if indexed < bad_slices:
        named = [
            line
            for line in outcome.lines
            if any(ingest_lib.display_path(name) in line for name in mutated)
            or f"{_bad_folder(case_dir, bad_modality)}/" in line
        ]
        if not named:
            violations.append(
                f"{bad_slices - indexed} {bad_modality} slices lost, but no message names "
                f"{mutated} or their series: {outcome.lines}"
            )
    return violations


def _bad_folder(case_dir, modality: str) -> str:
    return next(
        name
        for name, folder_modality in FOLDER_MODALITY.items()
        if folder_modality == modality and (pathlib.Path(case_dir) / name).exists()
    )


def edit(path, change) -> pathlib.Path:
    """Rewrites a DICOM file after change(dataset) (pydicom: only values it accepts)."""
    path = writable(path)
    dataset = pydicom.dcmread(path)
    change(dataset)
    dataset.save_as(path)
    return path


def replace_value(path, tag: int, value: bytes) -> pathlib.Path:
    """Replaces a top-level element's value bytes (any bytes, any length: what pydicom refuses to
    write), its length field rewritten."""
    path = writable(path)
    data = path.read_bytes()
    elements, explicit = _elements(data)
    _, start, value_start, value_end, _ = next(e for e in elements if e[0] == tag)
    if explicit and value_start - start == 8:
        header = data[start : start + 6] + struct.pack("<H", len(value))
    else:
        header = data[start : value_start - 4] + struct.pack("<I", len(value))
    path.write_bytes(data[:start] + header + value + data[value_end:])
    return path


def contour_data_spans(path) -> list[tuple[int, int]]:
    """(start, end) in the file of every ContourData value of an RTSTRUCT, in file order."""
    buffer, elements, explicit = dicom_scan.scan_dataset(str(path))
    spans = []
    for roi in dicom_scan.scan_items(buffer, *elements[0x30060039][1:3], explicit):
        roi_elements = dicom_scan.scan_elements(buffer, *roi, explicit)
        for item in dicom_scan.scan_items(buffer, *roi_elements[0x30060040], explicit):
            spans.append(dicom_scan.scan_elements(buffer, *item, explicit)[0x30060050])
    return spans


def replace_contour_text(path, index: int, change) -> pathlib.Path:
    """Contour ``index``'s ContourData text replaced by change(text), padded with spaces to its
    length (so that no sequence length changes); the new text must not be longer."""
    path = writable(path)
    data = bytearray(path.read_bytes())
    start, end = contour_data_spans(path)[index]
    text = change(data[start:end].decode("ascii").strip())
    if len(text) > end - start:
        raise ValueError("the new ContourData is longer than the old")
    data[start:end] = text.encode("ascii").ljust(end - start)
    path.write_bytes(bytes(data))
    return path


# --- Seeded mutations: each takes (case folder, bad series folder name, random.Random) and
# returns the case-relative names of the files it changed or added. -------------------------


def _pick(rng: random.Random, case, bad: str, parts=("image", "mask")) -> pathlib.Path:
    part = rng.choice(parts)
    return rng.choice(sorted((pathlib.Path(case) / bad / part).glob("*.dcm")))


def _rel(case, path) -> str:
    return os.path.relpath(path, case)


def _elements(data: bytes) -> tuple[list[tuple[int, ...]], bool]:
    """(tag, element start, value start, value end, element end) of the top-level elements."""
    pos, _, explicit = dicom_scan._dataset_start(data)
    return list(dicom_scan._walk(data, pos, len(data), explicit)), explicit


def truncate(case, bad, rng):
    path = writable(_pick(rng, case, bad))
    data = path.read_bytes()
    path.write_bytes(data[: rng.randrange(len(data))])
    return [_rel(case, path)]


def flip_header_bytes(case, bad, rng):
    """1-4 random bytes anywhere in the header (the dataset before the pixel data)."""
    path = writable(_pick(rng, case, bad))
    data = bytearray(path.read_bytes())
    elements, _ = _elements(bytes(data))
    end = next((e[1] for e in elements if e[0] == 0x7FE00010), len(data))
    for _ in range(rng.randint(1, 4)):
        data[rng.randrange(132, end)] = rng.randrange(256)
    path.write_bytes(bytes(data))
    return [_rel(case, path)]


_EDGE_LENGTHS = (0, 1, 2, 3, 7, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFF0, 0xFFFFFFFF)


def corrupt_length(case, bad, rng):
    """An element's length field set to an edge value or its own value +-1."""
    path = writable(_pick(rng, case, bad))
    data = bytearray(path.read_bytes())
    elements, explicit = _elements(bytes(data))
    tag, start, value_start, value_end, _ = rng.choice(elements)
    length = value_end - value_start
    if explicit and value_start - start == 8:  # explicit VR, 2-byte length
        new = rng.choice([*_EDGE_LENGTHS[:7], length + 1, max(length - 1, 0)]) & 0xFFFF
        struct.pack_into("<H", data, start + 6, new)
    else:
        new = rng.choice([*_EDGE_LENGTHS, length + 1, max(length - 1, 0)]) & 0xFFFFFFFF
        struct.pack_into("<I", data, value_start - 4, new)
    path.write_bytes(bytes(data))
    return [_rel(case, path)]


def corrupt_vr(case, bad, rng):
    """An explicit VR replaced (MR T1 is explicit VR; elsewhere a header byte flip)."""
    path = writable(_pick(rng, case, bad))
    data = bytearray(path.read_bytes())
    elements, explicit = _elements(bytes(data))
    if not explicit:
        return flip_header_bytes(case, bad, rng)
    _, start, *_ = rng.choice(elements)
    vr = rng.choice(
        [b"UN", b"SQ", b"OB", b"US", b"DS", b"XX", b"\x00\x00", bytes(rng.randbytes(2))]
    )
    data[start + 4 : start + 6] = vr
    path.write_bytes(bytes(data))
    return [_rel(case, path)]


_GEOMETRY_TAGS = (0x00200032, 0x00200037, 0x00280030, 0x00180050, 0x00281053, 0x00281052)
_NUMBER_CHARS = "0123456789.-+eE\\ naifNI"


def _scramble(text: bytes, rng: random.Random) -> bytes:
    chars = bytearray(text)
    for _ in range(rng.randint(1, 3)):
        if chars:
            chars[rng.randrange(len(chars))] = ord(rng.choice(_NUMBER_CHARS))
    return bytes(chars)


def corrupt_geometry(case, bad, rng):
    """Characters of ImagePositionPatient, ImageOrientationPatient, PixelSpacing, SliceThickness
    or the rescale of an image replaced (lengths kept, so the file still parses)."""
    path = writable(_pick(rng, case, bad, ("image",)))
    data = bytearray(path.read_bytes())
    elements, _ = _elements(bytes(data))
    spans = [e for e in elements if e[0] in _GEOMETRY_TAGS]
    _, _, start, end, _ = rng.choice(spans)
    data[start:end] = _scramble(bytes(data[start:end]), rng)
    path.write_bytes(bytes(data))
    return [_rel(case, path)]


def corrupt_contour(case, bad, rng):
    """A ContourData value of the RTSTRUCT scrambled, cut or extended (lengths kept)."""
    path = writable(_pick(rng, case, bad, ("mask",)))
    data = bytearray(path.read_bytes())
    start, end = rng.choice(contour_data_spans(path))
    value = bytes(data[start:end])
    how = rng.randrange(3)
    if how == 0:
        value = _scramble(value, rng)
    elif how == 1:  # a value dropped: a count that is not a multiple of 3
        values = value.decode("ascii").split("\\")
        del values[rng.randrange(len(values))]
        value = "\\".join(values).encode("ascii").ljust(end - start)
    else:
        value = value[:-4] + rng.choice([b"nan ", b"inf ", b"1e99", b"\\\\\\\\"])
    data[start:end] = value[: end - start]
    path.write_bytes(bytes(data))
    return [_rel(case, path)]


def add_special_file(case, bad, rng):
    """Something in the tree that is not a regular DICOM file."""
    folder = pathlib.Path(case) / bad / "image"
    kind = rng.choice(["fifo", "socket", "devzero", "broken", "loop", "dir", "empty", "junk"])
    if kind == "fifo":
        path = folder / "pipe.dcm"
        os.mkfifo(path)
    elif kind == "socket":
        path = folder / "s.dcm"
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
        server.close()
    elif kind == "devzero":
        path = folder / "zero.dcm"
        os.symlink("/dev/zero", path)
    elif kind == "broken":
        path = folder / "gone.dcm"
        os.symlink(folder / "nowhere", path)
    elif kind == "loop":
        path = folder / "loop.dcm"
        os.symlink(path, path)
    elif kind == "dir":
        path = folder / "folder.dcm"
        path.mkdir()
        (path / "notes.txt").write_text("not DICOM")
        path = path / "notes.txt"
    elif kind == "empty":
        path = folder / "empty.dcm"
        path.write_bytes(b"")
    else:
        name = os.fsencode(folder) + b"/junk\xff\xfe\n.dcm"
        with open(name, "wb") as junk:
            junk.write(rng.randbytes(rng.randrange(2000)))
        return [os.fsdecode(name)[len(str(case)) + 1 :]]
    return [_rel(case, path)]


MUTATIONS = {
    "truncate": truncate,
    "header_bytes": flip_header_bytes,
    "length": corrupt_length,
    "vr": corrupt_vr,
    "geometry": corrupt_geometry,
    "contour": corrupt_contour,
    "special_file": add_special_file,
}
# The series each mutation is tried on: the VR only exists in explicit-VR files (MR T1 here).
BAD_SERIES = {"vr": "MR_T1"}


def remove_case(case) -> None:
    shutil.rmtree(case, ignore_errors=True)
