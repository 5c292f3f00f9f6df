"""Reads a clinical table (CSV or XLSX) into {patient_id: {'age', 'sex', 'site'}} for the index."""

import csv
import math
import pathlib
import re
import zipfile

# Column names are compared after lower-casing and dropping everything but letters and digits, so
# 'Patient ID', 'patient_id' and 'PatientID' are all 'patientid'.
ID_COLUMNS = ("patientid", "patient", "patientkey", "id")
AGE_COLUMNS = ("age", "ageatdiagnosis", "ageyears")
SEX_COLUMNS = ("sex", "gender")
SITE_COLUMNS = ("site", "siteofprimarysts", "tumorsite", "tumoursite", "primarysite", "location")
_HEADER_SEARCH_ROWS = 10  # Spreadsheets often have a title row or two above the header.
_SNIFF_BYTES = 65536


class ClinicalFileError(ValueError):
    """A clinical file that cannot be read; str(e) is one line naming the file and the reason."""


def _normalise_header(name) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def _find_column(headers: list[str], candidates: tuple[str, ...],
                 allow_prefix: bool = True) -> int | None:
    """Index of the header equal to a candidate (in candidate order), else of the first one that
    starts with a candidate ('Age (years)' -> 'ageyears' starts with 'age') if allow_prefix."""
    for candidate in candidates:
        if candidate in headers:
            return headers.index(candidate)
    if allow_prefix:
        for column, header in enumerate(headers):
            if header.startswith(candidates):
                return column
    return None


def _is_missing(value) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def _parse_id(value) -> str | None:
    if _is_missing(value):
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # Spreadsheets turn the ID 12 into 12.0.
    return str(value).strip()


def _parse_age(value) -> float | None:
    """Age in years from a number or text such as '45', '45 y', '45.5'; None if there is none."""
    if _is_missing(value):
        return None
    if isinstance(value, int | float):
        return float(value)
    match = re.search(r"\d+(?:\.\d+)?", str(value))
    return float(match.group()) if match else None


def _parse_sex(value) -> str | None:
    """'M' or 'F' for the usual spellings, otherwise the text as given; None if empty."""
    if _is_missing(value):
        return None
    text = str(value).strip()
    if text.lower() in ("m", "male", "man"):
        return "M"
    if text.lower() in ("f", "female", "woman"):
        return "F"
    return text


def _parse_text(value) -> str | None:
    return None if _is_missing(value) else str(value).strip()


def _read_rows(path: pathlib.Path) -> list[list]:
    """The file's cells, row by row, header included (rows may differ in length)."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".txt"):
        with path.open(newline="", encoding="utf-8-sig") as csv_file:
            sample = csv_file.read(_SNIFF_BYTES)
            try:
                dialect = csv.Sniffer().sniff(sample, delimiters=",;\t|")
            except csv.Error:  # One column, or nothing to tell the delimiter by.
                dialect = csv.excel
            csv_file.seek(0)
            return list(csv.reader(csv_file, dialect))
    if suffix in (".xlsx", ".xlsm"):
        import openpyxl  # only .xlsx needs it; a top-level import slows every ingest worker

        workbook = openpyxl.load_workbook(path, read_only=True, data_only=True)
        try:
            return [list(row) for row in workbook.worksheets[0].iter_rows(values_only=True)]
        finally:
            workbook.close()
    raise ClinicalFileError(f"{path}: unsupported clinical file type {suffix!r}; use .csv or .xlsx")


def read_clinical(path) -> dict[str, dict]:
    """Reads a clinical table keyed by patient ID.

    The header row (searched for in the first rows) must have a patient ID column: 'patient',
    'patient id', 'patient_id', 'PatientID' or 'id', case and punctuation ignored. Age, sex and
    site columns are optional and matched the same way (e.g. 'Age', 'Gender', 'Site of primary
    STS'); a missing column or empty cell gives None. Other columns are ignored.

    Args:
      path: a .csv or .xlsx file.

    Returns:
      {patient_id: {'age': float | None, 'sex': 'M' | 'F' | str | None, 'site': str | None}}.

    Raises:
      ClinicalFileError: if the file is missing, unreadable, has no patient ID column or lists a
        patient twice.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise ClinicalFileError(f"{path}: clinical file not found")
    try:
        rows = _read_rows(path)
    except ClinicalFileError:
        raise
    except (ValueError, OSError, KeyError, zipfile.BadZipFile, csv.Error) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ClinicalFileError(f"{path}: cannot read clinical table: {reason}") from None
    header_row, headers, id_column = None, [], None
    for row_number, cells in enumerate(rows[:_HEADER_SEARCH_ROWS]):
        headers = [_normalise_header(cell) for cell in cells]
        id_column = _find_column(headers, ID_COLUMNS, allow_prefix=False)
        if id_column is not None:
            header_row = row_number
            break
    if header_row is None:
        raise ClinicalFileError(
            f"{path}: no patient ID column (expected a header such as 'Patient ID', 'patient_id' "
            "or 'id')")
    fields = {
        "age": (_find_column(headers, AGE_COLUMNS), _parse_age),
        "sex": (_find_column(headers, SEX_COLUMNS), _parse_sex),
        "site": (_find_column(headers, SITE_COLUMNS), _parse_text),
    }
    clinical = {}
    for cells in rows[header_row + 1:]:
        cells = list(cells) + [None] * (len(headers) - len(cells))  # Short rows end in blanks.
        patient_id = _parse_id(cells[id_column])
        if patient_id is None:
            continue
        if patient_id in clinical:
            raise ClinicalFileError(f"{path}: patient {patient_id!r} is listed twice")
        clinical[patient_id] = {
            name: None if column is None else parse(cells[column])
            for name, (column, parse) in fields.items()
        }
    return clinical
