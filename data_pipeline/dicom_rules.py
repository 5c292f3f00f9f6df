"""The rules a DICOM value must meet before ingest uses it, and the one-line problems it reports.

pydicom reads leniently: a decimal string that is not one, a US value of the wrong length, pixel
data longer than Rows x Columns or a NaN are warnings at most, and the value is handed on. Ingest
would then index sheared images, NaN positions or empty masks (issue 17). Every value ingest uses
passes through one of these checks first, on both readers (data_pipeline.dicom_scan and pydicom):
the value rules of the standard (PS3.5: VR and value multiplicity, pixel data length), and
plausibility bounds of our own that keep the arithmetic finite (a pixel spacing between 0.1 um
and 10 m, coordinates within 10 km of the origin).
"""

import dataclasses
import math
import os
import stat
from collections.abc import Sequence

import numpy as np
import pydicom.pixels
import pydicom.uid


class InputProblem(Exception):
    """A problem with the input data; ``str(e)`` is one line naming the file and the reason.

    Attributes:
      path: the file (or folder) at fault.
      reason: one line.
      modality: the file's Modality when it was read far enough to know it (ingest counts the
        lost image slices by it), else None.
    """

    def __init__(self, path: str | os.PathLike | None, reason: str, modality: str | None = None):
        self.path = None if path is None else str(path)
        self.reason = one_line(reason)
        self.modality = modality
        super().__init__(f"{self.path}: {self.reason}" if self.path else self.reason)

    def __reduce__(self):  # pickled between ingest's worker processes
        return type(self), (self.path, self.reason, self.modality)


class SliceProblem(InputProblem):
    """One slice of a series is unusable (unreadable pixels, or unlike the rest of its series);
    the other slices may still make a series."""


def regular_file(path: str) -> os.stat_result:
    """Only regular files are opened: a FIFO would block the read forever, a device never end."""
    try:
        status = os.stat(path)
    except OSError as e:
        raise InputProblem(path, f"unreadable ({e.strerror or type(e).__name__})") from None
    mode = status.st_mode
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _SPECIAL_FILES if test(mode)), "not a file")
        raise InputProblem(path, f"not a regular file ({kind})")
    return status


@dataclasses.dataclass
class FolderWalk:
    """What lies below a folder (walk_folder).

    Attributes:
      files: every entry that is not a folder, sorted by folder then name (special files and broken
        links too: the readers name them with regular_file).
      empty: the folders that hold nothing at all.
      problems: one per folder not read: unreadable, or the same folder as one read already.
    """

    files: list[str]
    empty: list[str]
    problems: list[InputProblem]


def walk_folder(folder: str | os.PathLike) -> FolderWalk:
    """Every entry below ``folder``, following links to folders, each real folder read once.

    A cohort folder is often put together from links to each patient's folder, which os.walk
    skips by default: that would lose every linked patient without a word. Following links could
    walk forever (a link to a folder above it) or read a folder twice (two links to it, which
    ingest would see as every slice twice), so a folder reached again (by (device, inode), in
    sorted order: the first path wins) is a problem and not read again. A folder that cannot be
    listed is a problem too (os.walk would drop it silently).
    """
    root = os.fspath(folder)
    files: list[str] = []
    empty: list[str] = []
    problems: list[InputProblem] = []
    claimed: dict[tuple[int, int], str] = {}
    try:
        status = os.stat(root)
        claimed[(status.st_dev, status.st_ino)] = root
    except OSError:
        pass  # os.walk reports it through on_error

    def on_error(error: OSError) -> None:
        problems.append(
            InputProblem(
                error.filename or root,
                f"unreadable folder ({error.strerror or type(error).__name__})",
            )
        )

    for here, dirs, names in os.walk(root, onerror=on_error, followlinks=True):
        if not dirs and not names:
            empty.append(here)
        kept = []
        for name in sorted(dirs):
            path = os.path.join(here, name)
            try:
                status = os.stat(path)
            except OSError as e:
                problems.append(
                    InputProblem(
                        path, f"unreadable folder ({e.strerror or type(e).__name__})"
                    )
                )
                continue
            key = (status.st_dev, status.st_ino)
            if key in claimed:
                first = os.path.relpath(claimed[key], root)
                first = "the top folder" if first == "." else f"'{first}'"
                problems.append(
                    InputProblem(path, f"the same folder as {first}, read already")
                )
                continue
            claimed[key] = path
            kept.append(name)
        dirs[:] = kept
        files.extend(os.path.join(here, name) for name in sorted(names))
    return FolderWalk(files, empty, problems)


_SPECIAL_FILES = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


class Malformed(ValueError):
    """A value breaks a rule; ``str(e)`` is the one-line reason, naming the attribute."""


# Patient coordinates (mm) beyond this are not a body in a scanner, and keep float64 arithmetic on
# them finite; pixel spacings (mm) outside these bounds likewise.
MAX_COORDINATE_MM = 1e7
SPACING_RANGE_MM = (1e-4, 1e4)
# Row and column cosines: unit vectors and orthogonal, within this (real files carry 5-6 digits).
COSINE_TOLERANCE = 1e-2
BITS_ALLOCATED = (1, 8, 16, 32, 64)
# Known non-area contour types (PS3.3 C.8.8.6.1): ignored, with a warning; any other type is an
# error. CLOSEDPLANAR_XOR (2023 standard) is filled like CLOSED_PLANAR: by XOR.
AREA_CONTOURS = ("CLOSED_PLANAR", "CLOSEDPLANAR_XOR")
OTHER_CONTOURS = ("POINT", "OPEN_PLANAR", "OPEN_NONPLANAR")


def one_line(text: str) -> str:
    """``text`` on one line (third-party messages can span several), at most 300 characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= 300 else line[:297] + "..."


def integer(value, name: str, low: int, high: int) -> int:
    """A single integer in [low, high] (US, IS, UL values); Malformed otherwise."""
    if type(value) is int and low <= value <= high:  # nearly always: done at once
        return value
    if isinstance(value, bytes | bytearray | str):
        try:
            value = int(str(value if isinstance(value, str) else value.decode("ascii")).strip())
        except (UnicodeDecodeError, ValueError):
            raise Malformed(f"{name} is not an integer ({value!r:.40})") from None
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        # pydicom gives a list for a US of 3 or 6 bytes, a float for an IS of '1.5'...
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise Malformed(f"{name} is not a single integer ({value!r:.40})")
    if not low <= int(value) <= high:
        raise Malformed(f"{name} {int(value)} is outside {low}..{high}")
    return int(value)


def decimals(text: str, name: str, count: int | None = None) -> tuple[float, ...]:
    """The finite numbers of a DS (or FD) value written 'a\\\\b\\\\c'; Malformed otherwise.

    Args:
      text: the value as text, values separated by backslashes.
      name: the attribute, for the reason.
      count: how many values there must be (None: any number, at least one).
    """
    parts = text.split("\\") if text else []
    if not parts or (count is not None and len(parts) != count):
        expected = "at least one" if count is None else str(count)
        raise Malformed(f"{name} has {len(parts)} values, not {expected}")
    try:
        values = tuple(map(float, parts))
    except ValueError:
        raise Malformed(f"{name} is not a list of numbers ({text!r:.60})") from None
    if not all(map(math.isfinite, values)):
        raise Malformed(f"{name} holds a value that is not finite ({text!r:.60})")
    return values


def position(values: Sequence[float], name: str = "ImagePositionPatient") -> tuple[float, ...]:
    """Patient coordinates (mm), each within MAX_COORDINATE_MM of the origin."""
    if max(abs(v) for v in values) > MAX_COORDINATE_MM:
        raise Malformed(f"{name} {tuple(values)} is more than 10 km from the origin")
    return tuple(values)


def orientation(values: Sequence[float]) -> tuple[float, ...]:
    """ImageOrientationPatient: two unit, orthogonal direction cosine vectors (6 values)."""
    rows, columns = values[:3], values[3:]
    norms = math.hypot(*rows), math.hypot(*columns)
    if max(abs(norm - 1.0) for norm in norms) > COSINE_TOLERANCE:
        raise Malformed(
            f"ImageOrientationPatient {tuple(values)}: its cosine vectors are not unit vectors"
        )
    if abs(sum(r * c for r, c in zip(rows, columns, strict=True))) > COSINE_TOLERANCE:
        raise Malformed(
            f"ImageOrientationPatient {tuple(values)}: its row and column cosines are not "
            "orthogonal"
        )
    return tuple(values)


def pixel_spacing(values: Sequence[float]) -> tuple[float, ...]:
    """PixelSpacing (row spacing, column spacing), positive and within SPACING_RANGE_MM."""
    low, high = SPACING_RANGE_MM
    if not all(low <= v <= high for v in values):
        raise Malformed(
            f"PixelSpacing {tuple(values)} is not positive (or outside {low}..{high} mm)"
        )
    return tuple(values)


def rescale(slope: float | None, intercept: float | None) -> tuple[float, float]:
    """(RescaleSlope, RescaleIntercept), 1 and 0 when absent; a slope of 0 is malformed."""
    if slope == 0.0:
        raise Malformed("RescaleSlope is 0")
    return (1.0 if slope is None else slope), (0.0 if intercept is None else intercept)


def pixel_data_length(
    length: int, rows: int, columns: int, bits_allocated: int, samples: int, frames: int
) -> None:
    """Native (uncompressed) pixel data must be exactly Rows x Columns x ... bytes long.

    One byte more is the padding of an odd length (PS3.5 8.1.1); anything else means the image
    attributes do not describe the pixels (an edited Columns shears the image).
    """
    pixels = rows * columns * samples * frames
    expected = (pixels * bits_allocated + 7) // 8
    if length not in (expected, expected + expected % 2):
        raise Malformed(
            f"pixel data is {length} bytes, but Rows x Columns x BitsAllocated make {expected} "
            f"({rows} x {columns} x {bits_allocated} bits)"
        )


def decodable(syntax: pydicom.uid.UID) -> None:
    """Pixel data in this transfer syntax can be decoded by an installed pydicom plugin."""
    if not syntax.is_transfer_syntax:
        raise Malformed(f"unknown TransferSyntaxUID {str(syntax)!r:.70}")
    if not syntax.is_compressed:
        return
    try:
        available = pydicom.pixels.get_decoder(syntax).is_available
    except NotImplementedError:
        available = False
    if not available:
        raise Malformed(
            f"pixel data compressed as {syntax.name}, which no installed decoder reads (pydicom "
            "needs a plugin such as pylibjpeg, pyjpegls or gdcm for it)"
        )


def contour_points(values: np.ndarray, declared: int | None) -> np.ndarray:
    """ContourData (3n,) as points (n, 3): a multiple of 3 values, finite, within bounds, and as
    many points as NumberOfContourPoints says when it is given."""
    if values.size % 3:
        raise Malformed(f"ContourData holds {values.size} values, not a multiple of 3")
    if not np.isfinite(values).all():
        raise Malformed("ContourData holds a value that is not finite")
    if values.size and np.abs(values).max() > MAX_COORDINATE_MM:
        raise Malformed("ContourData holds a point more than 10 km from the origin")
    if declared is not None and declared != values.size // 3:
        raise Malformed(
            f"NumberOfContourPoints is {declared}, but ContourData holds {values.size // 3} points"
        )
    return values.reshape(-1, 3)
