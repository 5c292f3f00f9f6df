"""Fuzzing the ingest at scale: seeded mutations of a real sts_ibsi patient, the invariant of
issue 17 checked after each.

python benchmarks/fuzz.py --cases N [--seed S] [--workers W] [--scratch DIR]

Each case holds the good CT series with its RTSTRUCT beside a PET (or, for VR mutations, MR T1)
series and RTSTRUCT of which one file is mutated: truncated at a random offset, header bytes, a
length field, a VR, geometry values or contour data changed, or a special file added (FIFO,
socket, device, broken or looping link, junk with a name that is not UTF-8...). The mutations and
the invariant are tests/malformed_cases.py's, the ones tests/fuzz_test.py runs a few of. The
invariant: the ingest returns within its time limit (ten times an unmutated case's, at least 30
s) with no exception; each message is one line naming a file; the CT series is indexed exactly as
alone; indexed plus lost slices account for every image file; lost slices of the other series
are named. Prints each failing case (with the seed to replay it) and `cases held: k/N`.
"""

import argparse
import collections
import os
import pathlib
import random
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
# This checkout's data_pipeline (not another one installed in editable mode), and tests/, where
# the case builder and the invariant live.
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import malformed_cases as cases  # noqa: E402


def _reference(scratch: str, workers: int) -> tuple[dict, dict[str, tuple[str, int, int]], float]:
    """The good series ingested alone; per bad series (its modality, slices, image files); the
    time an unmutated case takes."""
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        alone = cases.build_case(os.path.join(tmp, "alone"), (cases.GOOD,))
        outcome = cases.run_ingest(alone, os.path.join(tmp, "alone_index"), workers)
        if outcome.error is not None:
            sys.exit(f"error: the unmutated CT series does not ingest: {outcome.error}")
        good = cases.series_contents(outcome.index_dir, cases.GOOD)
        bad = {}
        seconds = 0.0
        for series in ("PET", "MR_T1"):
            case = cases.build_case(os.path.join(tmp, series), (cases.GOOD, series))
            start = time.perf_counter()
            outcome = cases.run_ingest(case, os.path.join(tmp, f"{series}_index"), workers)
            seconds = max(seconds, time.perf_counter() - start)
            modality = cases.FOLDER_MODALITY[series]
            slices = len(cases.series_contents(outcome.index_dir, modality)["slices"])
            images = len(cases.source_files(cases.GOOD, "image")) + len(
                cases.source_files(series, "image")
            )
            bad[series] = (modality, slices, images)
    return good, bad, seconds


def run_case(index: int, seed: int, scratch: str, workers: int, good, bad, limit_s) -> list[str]:
    """One case: its violations of the invariant ([] when it held)."""
    rng = random.Random(f"{seed}:{index}")
    kind = list(cases.MUTATIONS)[index % len(cases.MUTATIONS)]
    series = cases.BAD_SERIES.get(kind, "PET")
    modality, slices, images = bad[series]
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        case = cases.build_case(os.path.join(tmp, "case"), (cases.GOOD, series))
        mutated = cases.MUTATIONS[kind](case, series, rng)
        outcome = cases.run_ingest(case, os.path.join(tmp, "index"), workers, limit_s)
        violations = cases.invariant_violations(
            outcome, good, modality, slices, images, mutated, case
        )
    return [f"{kind} {mutated}: {violation}" for violation in violations]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--start", type=int, default=0, help="First case index (to replay one).")
    parser.add_argument(
        "--scratch",
        default="/dev/shm" if os.access("/dev/shm", os.W_OK) else None,
        help="Folder for the cases and indexes (default /dev/shm, else the temp folder).",
    )
    args = parser.parse_args()
    if not cases.STS_IBSI.is_dir():
        sys.exit(f"error: {cases.STS_IBSI} not found")
    good, bad, seconds = _reference(args.scratch, args.workers)
    limit_s = max(30.0, 10 * seconds)
    print(f"unmutated case: {seconds:.2f} s; time limit per case {limit_s:.0f} s")
    held, by_kind = 0, collections.Counter()
    start = time.perf_counter()
    for index in range(args.start, args.start + args.cases):
        violations = run_case(index, args.seed, args.scratch, args.workers, good, bad, limit_s)
        kind = list(cases.MUTATIONS)[index % len(cases.MUTATIONS)]
        by_kind[kind, not violations] += 1
        if violations:
            print(f"case {index} (--seed {args.seed} --start {index} --cases 1) failed:")
            for violation in violations:
                print(f"  {violation}")
        else:
            held += 1
    elapsed = time.perf_counter() - start
    for kind in cases.MUTATIONS:
        print(
            f"  {kind:<13} held {by_kind[kind, True]}/{by_kind[kind, True] + by_kind[kind, False]}"
        )
    print(f"{args.cases} cases in {elapsed:.0f} s ({elapsed / max(args.cases, 1):.2f} s each)")
    print(f"cases held: {held}/{args.cases}")


if __name__ == "__main__":
    main()
