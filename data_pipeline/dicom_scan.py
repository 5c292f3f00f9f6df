"""A DICOM element scanner of our own: tags, VRs and lengths walked with struct, values left raw.

Why our own: pydicom's reader builds, checks and converts every element of every file it walks,
which made reading headers cost as much as the bare dcmread + pixel_array loop ingest is measured
against, and it builds a Dataset for every contour of a structure set. This scanner walks the
element tags and lengths with struct and keeps the raw bytes of the elements asked for; pydicom
still converts every value ingest reads (as RawDataElements). Anything it does not expect (no
preamble, big endian, deflate, a malformed or truncated header) is left to pydicom.dcmread, which
also words the error for a bad file. What it reads itself is checked as pydicom checks it: a VR
must be one of the standard's, a length must lie inside the file, items and delimiters must be
where sequences allow them; anything else sends the file to pydicom. The values are converted by
pydicom and checked by data_pipeline.dicom_rules on both paths alike.
``SARCOMA_JAX_FAST_PATHS=0`` (data_pipeline.fast_paths) turns it off; tests/dicom_io_test.py
checks both paths give equal headers and structure sets on the phantom, the real data and
pydicom's own test files.
"""

from __future__ import annotations

import functools
import struct
import types
from collections.abc import Iterator

import pydicom
import pydicom.charset
import pydicom.sequence
import pydicom.uid
import pydicom.valuerep

_STRUCT_H, _STRUCT_I, _STRUCT_HH = struct.Struct("<H"), struct.Struct("<I"), struct.Struct("<HH")
_CHARSET_TAG = 0x00080005  # (0008,0005) Specific Character Set
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
# The VRs with a 2-byte length (PS3.5 7.1.2): every VR of the standard but the long ones.
_SHORT_VRS = (
    frozenset(vr.value.encode("ascii") for vr in pydicom.valuerep.VR if len(vr.value) == 2)
    - _LONG_VRS
)
_SCAN_SYNTAXES = {"1.2.840.10008.1.2": False, "1.2.840.10008.1.2.1": True}  # uid -> explicit VR
_ENCAPSULATED_PREFIX = "1.2.840.10008.1.2.4."  # JPEG family: explicit VR LE dataset
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_FIRST_READ = 1 << 16


class ScanError(Exception):
    """The scanner cannot read this; pydicom can say why, or read it."""


class _NeedMore(ScanError):
    """The scan ran past the bytes read so far."""


class _Unexpected(ScanError):
    """Something the scanner leaves to pydicom."""


def _element_at(buffer: bytes, pos: int, explicit: bool) -> tuple[int, bytes | None, int, int]:
    """(tag, VR or None, value length, value offset) of the element starting at pos."""
    if pos + 8 > len(buffer):
        raise _NeedMore
    group, element = _STRUCT_HH.unpack_from(buffer, pos)
    tag = group << 16 | element
    if group == 0xFFFE or not explicit:  # items and delimiters have no VR in any syntax
        return tag, None, _STRUCT_I.unpack_from(buffer, pos + 4)[0], pos + 8
    vr = buffer[pos + 4 : pos + 6]
    if vr in _LONG_VRS:
        if pos + 12 > len(buffer):
            raise _NeedMore
        return tag, vr, _STRUCT_I.unpack_from(buffer, pos + 8)[0], pos + 12
    if vr not in _SHORT_VRS:  # not a VR of the standard: pydicom decides what the file is
        raise _Unexpected
    return tag, vr, _STRUCT_H.unpack_from(buffer, pos + 6)[0], pos + 8


def _skip_undefined(buffer: bytes, pos: int, explicit: bool) -> int:
    """Offset just past the sequence delimiter of an undefined-length value starting at pos."""
    while True:
        tag, _, length, pos = _element_at(buffer, pos, explicit)
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise _Unexpected
        if length != _UNDEFINED:
            pos += length
            continue
        while True:  # an item of undefined length: its elements up to the item delimiter
            tag, vr, length, pos = _element_at(buffer, pos, explicit)
            if tag == _ITEM_END:
                break
            if length == _UNDEFINED:  # a nested sequence (UN of undefined length: implicit VR)
                pos = _skip_undefined(buffer, pos, explicit and vr != b"UN")
            else:
                pos += length


def _scan_elements(buffer: bytes, pos: int, explicit: bool, wanted: frozenset[int]) -> dict:
    """The wanted top-level elements from pos on, as RawDataElements, up to the pixel data."""
    elements = {}
    while pos < len(buffer):
        tag, vr, length, value_pos = _element_at(buffer, pos, explicit)
        if tag >> 16 == 0xFFFE:
            raise _Unexpected
        vr_text = vr.decode("ascii") if vr is not None else None
        if tag in _PIXEL_TAGS:  # left unread: only its length and offset are needed
            elements[tag] = pydicom.dataelem.RawDataElement(
                pydicom.tag.Tag(tag), vr_text, length, None, value_pos, not explicit, True
            )
            if tag == 0x7FE00010:
                return elements
            if length == _UNDEFINED:
                raise _Unexpected
            pos = value_pos + length
            continue
        if length == _UNDEFINED:
            end = _skip_undefined(buffer, value_pos, explicit and vr != b"UN")
            value_end = end - 8  # the value bytes exclude the sequence delimiter
            length = value_end - value_pos
        else:
            end = value_end = value_pos + length
            if end > len(buffer):
                raise _NeedMore
        if tag in wanted:
            elements[tag] = pydicom.dataelem.RawDataElement(
                pydicom.tag.Tag(tag),
                vr_text,
                length,
                buffer[value_pos:value_end],
                value_pos,
                not explicit,
                True,
            )
        pos = end
    return elements


def _dataset_start(buffer: bytes) -> tuple[int, str, bool]:
    """(offset of the dataset after the file meta, transfer syntax UID, explicit VR?)."""
    if len(buffer) < 132 or buffer[128:132] != b"DICM":
        raise _Unexpected
    pos, syntax = 132, None
    while True:  # file meta: explicit VR little endian, group 0002
        if pos + 8 > len(buffer):
            raise _NeedMore
        if _STRUCT_H.unpack_from(buffer, pos)[0] != 0x0002:
            break
        tag, _, length, value_pos = _element_at(buffer, pos, True)
        if length == _UNDEFINED:
            raise _Unexpected
        if value_pos + length > len(buffer):
            raise _NeedMore
        if tag == 0x00020010:
            syntax = buffer[value_pos : value_pos + length].decode("ascii", "replace")
            syntax = syntax.strip(" \x00")
        pos = value_pos + length
    if syntax in _SCAN_SYNTAXES:
        explicit = _SCAN_SYNTAXES[syntax]
    elif syntax is not None and syntax.startswith(_ENCAPSULATED_PREFIX):
        explicit = True
    else:
        raise _Unexpected
    return pos, syntax, explicit


def _scan(buffer: bytes, wanted: frozenset[int]) -> ScannedHeader:
    pos, syntax, explicit = _dataset_start(buffer)
    return ScannedHeader(_scan_elements(buffer, pos, explicit, wanted | {_CHARSET_TAG}), syntax)


def _value_span(buffer: bytes, vr: bytes | None, length: int, value_pos: int, explicit: bool):
    """(value start, value end, offset after the element) of an element's value."""
    if length != _UNDEFINED:
        end = value_pos + length
        if end > len(buffer):
            raise _NeedMore
        return value_pos, end, end
    end = _skip_undefined(buffer, value_pos, explicit and vr != b"UN")
    return value_pos, end - 8, end


def _walk(buffer: bytes, start: int, end: int, explicit: bool) -> Iterator[tuple[int, ...]]:
    """(tag, element start, value start, value end, element end) of each element of the dataset
    (or item) in buffer[start:end], with no conversion; raises _Unexpected or _NeedMore on
    anything malformed."""
    pos = start
    while pos < end:
        tag, vr, length, value_pos = _element_at(buffer, pos, explicit)
        if tag >> 16 == 0xFFFE:
            raise _Unexpected
        value_start, value_end, element_end = _value_span(buffer, vr, length, value_pos, explicit)
        yield tag, pos, value_start, value_end, element_end
        pos = element_end
    if pos != end:
        raise _Unexpected


def scan_elements(buffer: bytes, start: int, end: int, explicit: bool) -> dict[int, tuple]:
    """The elements of one dataset (or item) in buffer[start:end]: tag -> (value start, value end).

    For data inside sequences: the caller knows each tag's VR.
    """
    return {tag: (first, last) for tag, _, first, last, _ in _walk(buffer, start, end, explicit)}


def scan_items(buffer: bytes, start: int, end: int, explicit: bool) -> list[tuple[int, int]]:
    """The (start, end) of each item of a sequence whose value is buffer[start:end]."""
    items, pos = [], start
    while pos < end:
        tag, _, length, pos = _element_at(buffer, pos, explicit)
        if tag != _ITEM:
            raise _Unexpected
        if length == _UNDEFINED:  # its elements up to the item delimiter
            item_start = pos
            while True:
                tag, vr, length, value_pos = _element_at(buffer, pos, explicit)
                if tag == _ITEM_END:
                    items.append((item_start, pos))
                    pos = value_pos
                    break
                pos = _value_span(buffer, vr, length, value_pos, explicit)[2]
        else:
            if pos + length > end:
                raise _Unexpected
            items.append((pos, pos + length))
            pos += length
    return items


def scan_dataset(path: str) -> tuple[bytes, dict[int, tuple], bool] | None:
    """A whole file's bytes, its top-level elements and whether its VR is explicit; None where the
    scanner leaves the file to pydicom.

    The elements map tag -> (element start, value start, value end, element end) offsets.
    """
    try:
        with open(path, "rb") as file:
            buffer = file.read()
        pos, syntax, explicit = _dataset_start(buffer)
        if syntax not in _SCAN_SYNTAXES:  # encapsulated pixel data: not an RTSTRUCT
            return None
        elements = {tag: tuple(spans) for tag, *spans in _walk(buffer, pos, len(buffer), explicit)}
        return buffer, elements, explicit
    except (ScanError, struct.error, OSError):
        return None


@functools.cache
def _keyword_tag(keyword: str) -> int | None:
    return pydicom.datadict.tag_for_keyword(keyword)


@functools.cache
def _dictionary_vr(tag: int) -> str | None:
    try:
        return pydicom.datadict.dictionary_VR(tag)
    except KeyError:
        return None


class ScannedHeader:
    """Scanned raw elements behind the few Dataset methods dicom_io.read_header and its helpers
    call (``in``, ``get``, ``get_item``, attribute access, ``file_meta.TransferSyntaxUID``).

    A pydicom Dataset built from the same elements would do, but looking values up in one costs
    more than the scan itself; values are still converted by pydicom, one element at a time.
    """

    def __init__(self, elements: dict, syntax: str):
        self._elements = elements
        self.file_meta = types.SimpleNamespace(TransferSyntaxUID=pydicom.uid.UID(syntax))

    @functools.cached_property
    def _encoding(self):
        charset = self._elements.get(_CHARSET_TAG)
        if charset is None or not charset.value:
            return None
        value = pydicom.dataelem.convert_raw_data_element(charset).value
        return pydicom.charset.convert_encodings(value or "ISO_IR 6")

    def _tag(self, key) -> int:
        return _keyword_tag(key) if isinstance(key, str) else int(key)

    def __contains__(self, key) -> bool:
        return self._tag(key) in self._elements

    def get_item(self, key, *, keep_deferred: bool = False):
        return self._elements.get(self._tag(key))

    def _convert(self, raw):
        return pydicom.dataelem.convert_raw_data_element(raw, encoding=self._encoding)

    def get(self, key, default=None):
        raw = self._elements.get(self._tag(key))
        if raw is None or raw.value is None:
            return default
        vr = raw.VR or _dictionary_vr(raw.tag)
        if raw.length == 2 and vr == "US":
            return _STRUCT_H.unpack(raw.value)[0]  # most of what is read: Rows, BitsAllocated...
        if vr == "SQ":  # the same in every slice of a series: converted once
            return _converted_sequence(raw.value, raw.is_implicit_VR, self._encoding_key)
        return self._convert(raw).value

    @property
    def _encoding_key(self):
        encoding = self._encoding
        return tuple(encoding) if isinstance(encoding, list) else encoding

    def __getattr__(self, keyword: str):
        if keyword.startswith("_") or _keyword_tag(keyword) is None:
            raise AttributeError(keyword)
        value = self.get(keyword)
        if value is None:
            raise AttributeError(keyword)
        return value


@functools.lru_cache(maxsize=64)
def _converted_sequence(value: bytes, implicit: bool, encoding) -> pydicom.sequence.Sequence:
    """A sequence's raw bytes converted by pydicom (memoised: callers only read the result)."""
    raw = pydicom.dataelem.RawDataElement(
        pydicom.tag.Tag(0), "SQ", len(value), value, 0, implicit, True
    )
    encoding = list(encoding) if isinstance(encoding, tuple) else encoding
    return pydicom.dataelem.convert_raw_data_element(raw, encoding=encoding).value


def scan_header(path: str, wanted: frozenset[int]) -> ScannedHeader | None:
    """The top-level elements ``wanted`` (tags) of a file's header, up to its pixel data, scanned
    without pydicom's reader (the character set and pixel data elements come too); None where the
    scanner leaves the file to pydicom."""
    try:
        with open(path, "rb") as file:
            buffer = file.read(_FIRST_READ)
            try:
                return _scan(buffer, wanted)
            except _NeedMore:
                if len(buffer) < _FIRST_READ:
                    return None  # the file ends inside its header: pydicom says how
                buffer += file.read()
            return _scan(buffer, wanted)
    except (_NeedMore, _Unexpected, struct.error, UnicodeDecodeError, ValueError, OSError):
        return None
