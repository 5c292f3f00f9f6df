"""Command line query of an index: slice counts per patient and split, with totals.

    python -m data_pipeline.query --index O [--modality CT|PT|MR|T1|T2|STIR] [--sequence T2]
        [--split train|val|test] [--has_tumor | --no_tumor] [--site thigh] [--age_min 40]
        [--age_max 70] [--patients STS_002,STS_006]

Exit status: 0 when slices matched, 1 when the filters matched nothing (a one-line message says
which filters), 2 for bad arguments or an index that cannot be read (one line, no traceback).
"""

import argparse
import collections
import sys
from collections.abc import Sequence

from data_pipeline import index as index_lib
from data_pipeline import vocabulary

EXIT_MATCHED, EXIT_NOTHING_MATCHED, EXIT_ERROR = 0, 1, 2


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipeline.query",
        description="Counts the slices of an index per patient and split.",
        epilog="Exit status: 0 matched, 1 nothing matched, 2 error.",
    )
    parser.add_argument("--index", required=True, help="index directory (holds index.sqlite)")
    parser.add_argument("--modality", help="CT, PT, MR, or an MR sequence T1, T2, STIR")
    parser.add_argument("--sequence", help="MR sequence: T1, T2 or STIR")
    parser.add_argument("--split", choices=vocabulary.SPLITS)
    tumor = parser.add_mutually_exclusive_group()
    tumor.add_argument("--has_tumor", action="store_true", help="only slices with tumour")
    tumor.add_argument("--no_tumor", action="store_true", help="only slices without tumour")
    parser.add_argument("--site", help="tumour site, case-insensitive (e.g. thigh)")
    parser.add_argument("--age_min", type=float, help="minimum age in years, inclusive")
    parser.add_argument("--age_max", type=float, help="maximum age in years, inclusive")
    parser.add_argument("--patients", help="comma-separated patient keys")
    return parser.parse_args(argv)


def query_filters(args: argparse.Namespace) -> dict:
    """Index.query keyword arguments for the filters that were given."""
    filters = {}
    for name in ("modality", "sequence", "split", "site"):
        if getattr(args, name) is not None:
            filters[name] = getattr(args, name)
    if args.has_tumor or args.no_tumor:
        filters["has_tumor"] = bool(args.has_tumor)
    if args.age_min is not None or args.age_max is not None:
        filters["age"] = (args.age_min, args.age_max)
    if args.patients is not None:
        filters["patients"] = [key.strip() for key in args.patients.split(",") if key.strip()]
    return filters


def describe_filters(filters: dict) -> str:
    """The filters as 'name=value, ...' text, or 'none'."""
    parts = []
    for name, value in filters.items():
        if name == "age":
            lo, hi = value
            value = f"{'' if lo is None else f'{lo:g}'}-{'' if hi is None else f'{hi:g}'}"
        elif name == "patients":
            value = ",".join(value)
        parts.append(f"{name}={value}")
    return ", ".join(parts) or "none"


def format_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """An aligned text table: numbers right-aligned, text left-aligned, a rule under the header and
    above the last row (the totals)."""
    cells = [[str(value) for value in row] for row in [header, *rows]]
    widths = [max(len(row[column]) for row in cells) for column in range(len(header))]
    numeric = [all(isinstance(row[column], int) for row in rows) for column in range(len(header))]

    def line(row):
        return "  ".join(
            value.rjust(width) if is_number else value.ljust(width)
            for value, width, is_number in zip(row, widths, numeric, strict=True)
        ).rstrip()

    rule = "  ".join("-" * width for width in widths)
    lines = [line(cells[0]), rule, *(line(row) for row in cells[1:-1]), rule, line(cells[-1])]
    return "\n".join(lines)


def count_table(records: Sequence[index_lib.SliceRecord]) -> str:
    """Slices per patient and split, slices with tumour, series kinds; a totals row at the end."""
    per_patient = collections.defaultdict(collections.Counter)
    kinds = collections.defaultdict(set)
    for record in records:
        counts = per_patient[record.patient_key]
        counts[record.split] += 1
        counts["tumor"] += record.has_tumor
        kinds[record.patient_key].add(
            f"MR_{record.sequence}"
            if record.modality == "MR" and record.sequence
            else record.modality
        )
    header = ["patient", "series", *vocabulary.SPLITS, "total", "with_tumor"]
    rows = []
    totals = collections.Counter()
    for patient_key in sorted(per_patient):
        counts = per_patient[patient_key]
        totals.update(counts)
        rows.append(
            [
                patient_key,
                ",".join(sorted(kinds[patient_key])),
                *(counts[name] for name in vocabulary.SPLITS),
                sum(counts[name] for name in vocabulary.SPLITS),
                counts["tumor"],
            ]
        )
    rows.append(
        [
            f"total ({len(per_patient)} patients)",
            "",
            *(totals[name] for name in vocabulary.SPLITS),
            len(records),
            totals["tumor"],
        ]
    )
    return format_table(header, rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    filters = query_filters(args)
    try:
        records = index_lib.Index(args.index).query(**filters)
    except ValueError as error:  # BadIndexError, unknown modality, ...
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    if not records:
        print(f"No slices matched in {args.index} (filters: {describe_filters(filters)}).")
        return EXIT_NOTHING_MATCHED
    print(f"Index {args.index}; filters: {describe_filters(filters)}")
    print(count_table(records))
    return EXIT_MATCHED


if __name__ == "__main__":
    sys.exit(main())
