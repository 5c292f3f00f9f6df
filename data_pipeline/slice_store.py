"""The per-slice files of an index: one .npz per slice (image, mask), written and read.

Two writers give files that np.load reads alike, with the same arrays (tests/fast_paths_test.py):
the fast path deflates with ISA-L (python-isal) into a small zip writer of our own; with fast paths
off (data_pipeline.fast_paths) Python's zipfile deflates with zlib at the same level. Either way the
members are dated 1980-01-01 (numpy's savez stamps the current time), so the same arrays give the
same bytes.
"""

import io
import pathlib
import struct
import zipfile
from collections.abc import Sequence

import numpy as np
from isal import isal_zlib

from data_pipeline import fast_paths as fast_paths_lib

# Deflate level 1: about 9x faster than numpy's default (6) on CT slices for ~5% larger files.
# Done with ISA-L (python-isal), which deflates a 512x512 int16 slice 5x faster than zlib at the
# same level and ratio; compression otherwise dominates ingest time.
NPZ_COMPRESSLEVEL = 1
_ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)


def _smallest_exact(image: np.ndarray) -> np.ndarray:
    """image as int16 when that holds it exactly (CT in HU, most MR), else float32.

    Half the bytes to deflate: compressing is the costliest part of writing a slice, and the
    values, hence the physical units, are unchanged (read_slice returns float32).
    """
    with np.errstate(invalid="ignore"):  # values beyond int16 (or fractional) stay float32
        as_int16 = image.astype(np.int16)
    return as_int16 if np.array_equal(as_int16, image) else image


def write_slice(path, image: np.ndarray, mask: np.ndarray, fast_paths: bool | None = None) -> int:
    """Writes a slice (image int16 when exact, else float32; mask bool); returns tumour pixels.

    The same arrays give the same bytes (for one setting of ``fast_paths``). Safe to call from
    worker processes and threads.

    Args:
      path: the .npz to write; its folder is created.
      image: (R, C) in physical units.
      mask: (R, C), nonzero inside the tumour.
      fast_paths: ISA-L and our zip writer (True) or zipfile (False); None: as
        ``$SARCOMA_JAX_FAST_PATHS`` says (data_pipeline.fast_paths).

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
    if fast_paths_lib.enabled(fast_paths):
        path.write_bytes(_deflated_zip(members))
    else:
        path.write_bytes(_zipfile_zip(members))
    return int(np.count_nonzero(mask))


def read_slice(path) -> tuple[np.ndarray, np.ndarray]:
    """(image float32 (R, C) physical units, mask uint8 (R, C)) of a slice file."""
    with np.load(path) as arrays:
        return arrays["image"].astype(np.float32), arrays["mask"].astype(np.uint8)


def _zipfile_zip(members: Sequence[tuple[str, bytes]]) -> bytes:
    """What _deflated_zip makes, made by Python's zipfile with zlib (the fast paths off)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=_ZIP_DATE_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data, compresslevel=NPZ_COMPRESSLEVEL)
    return buffer.getvalue()


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
            struct.pack(
                "<IHHHHHHIIIHHHHHII",
                0x02014B50,
                _ZIP_VERSION,
                _ZIP_VERSION,
                0,
                *fields,
                0,
                0,
                0,
                0,
                0,
                offset,
            )
            + encoded
        )
        parts += [local, encoded, packed]
        offset += len(local) + len(encoded) + len(packed)
    directory = b"".join(central)
    end = struct.pack(
        "<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(directory), offset, 0
    )
    return b"".join(parts) + directory + end
