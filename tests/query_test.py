"""Tests of the query command line (python -m data_pipeline.query) on a small synthetic index."""

import contextlib
import hashlib
import io
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
from absl.testing import absltest

from data_pipeline import index_writer, query

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# patient_key -> (age, site) and -> number of CT slices; each patient also has one MR T1 slice.
PATIENTS = {
    "STS_001": (35, "Thigh"),
    "STS_002": (50, "Arm"),
    "STS_003": (65, "thigh"),
    "STS_004": (80, "Knee"),
}
CT_SLICES = {"STS_001": 2, "STS_002": 3, "STS_003": 4, "STS_004": 5}
SEED = 11


def has_tumour(slice_index: int) -> bool:
    return slice_index % 2 == 1


def expected_patient_splits() -> dict[str, str]:
    """Patient scheme with 4 patients: one test, one val (by sha256 rank), two train."""
    ranked = sorted(PATIENTS, key=lambda key: hashlib.sha256(f"{SEED}:{key}".encode()).hexdigest())
    return {ranked[0]: "test", ranked[1]: "val", ranked[2]: "train", ranked[3]: "train"}


def run_main(argv):
    """(exit code, stdout lines, stderr lines) of query.main(argv)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        exit_code = query.main(argv)
    return exit_code, stdout.getvalue().splitlines(), stderr.getvalue().splitlines()


def table_rows(lines):
    """{first cell: [the other cells]} of the table rows (not the header or rules)."""
    rows = {}
    for line in lines[3:]:
        if set(line) <= {"-", " "}:
            continue
        cells = line.split()
        if cells[0] == "total":
            rows["total"] = cells[3:]  # After "total (N patients)".
        else:
            rows[cells[0]] = cells[1:]
    return rows


class QueryCliTest(absltest.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.temp_dir = tempfile.TemporaryDirectory()
        cls.out_dir = cls.temp_dir.name
        with index_writer.IndexWriter(cls.out_dir, seed=SEED) as writer:
            for key, (age, site) in PATIENTS.items():
                writer.add_patient(key, age=age, sex="F", site=site)
                for modality, sequence, num_slices in (
                    ("CT", None, CT_SLICES[key]),
                    ("MR", "T1", 1),
                ):
                    series_key = f"{key}_{sequence or modality}"
                    writer.add_series(
                        series_key=series_key,
                        patient_key=key,
                        study_uid="1",
                        series_uid=series_key,
                        modality=modality,
                        sequence=sequence,
                        description="",
                        frame_of_reference_uid="2",
                        rows=3,
                        cols=3,
                        pixel_spacing=(1, 1),
                        slice_spacing=2.0,
                        orientation=(1, 0, 0, 0, 1, 0),
                        n_slices=num_slices,
                        units="",
                    )
                    for slice_index in range(num_slices):
                        mask = np.zeros((3, 3), bool)
                        mask[1, 1] = has_tumour(slice_index)
                        writer.add_slice(
                            series_key=series_key,
                            slice_index=slice_index,
                            position_mm=2.0 * slice_index,
                            sop_instance_uid=None,
                            image=np.full((3, 3), slice_index, np.float32),
                            mask=mask,
                        )

    @classmethod
    def tearDownClass(cls):
        cls.temp_dir.cleanup()
        super().tearDownClass()

    def test_counts_per_patient_and_split(self):
        exit_code, lines, errors = run_main(["--index", self.out_dir])
        self.assertEqual((exit_code, errors), (0, []))
        split_of = expected_patient_splits()
        expected = {}
        for key, num_ct in CT_SLICES.items():
            total = num_ct + 1
            counts = {
                split: total if split_of[key] == split else 0 for split in ("train", "val", "test")
            }
            tumour = sum(has_tumour(i) for i in range(num_ct))
            expected[key] = [
                "CT,MR_T1",
                *(str(counts[s]) for s in ("train", "val", "test")),
                str(total),
                str(tumour),
            ]
        expected["total"] = [
            str(sum(CT_SLICES[k] + 1 for k in PATIENTS if split_of[k] == split))
            for split in ("train", "val", "test")
        ] + ["18", "6"]
        self.assertEqual(table_rows(lines), expected)
        self.assertIn("total (4 patients)", lines[-1])
        table_lines = lines[1:]
        self.assertLen({len(line) for line in table_lines}, 1, "\n".join(table_lines))

    def test_filters(self):
        exit_code, lines, _ = run_main(
            [
                "--index",
                self.out_dir,
                "--modality",
                "CT",
                "--has_tumor",
                "--site",
                "THIGH",
                "--age_min",
                "35",
                "--age_max",
                "65",
            ]
        )
        self.assertEqual(exit_code, 0)
        rows = table_rows(lines)
        self.assertEqual(sorted(rows), ["STS_001", "STS_003", "total"])
        self.assertEqual(rows["STS_001"][4:], ["1", "1"])  # total, with_tumor
        self.assertEqual(rows["STS_003"][4:], ["2", "2"])
        self.assertEqual(rows["total"][3:], ["3", "3"])
        exit_code, lines, _ = run_main(
            ["--index", self.out_dir, "--patients", "STS_004, STS_002", "--modality", "t1"]
        )
        self.assertEqual(sorted(table_rows(lines)), ["STS_002", "STS_004", "total"])
        self.assertEqual(table_rows(lines)["total"][3:], ["2", "0"])

    def test_nothing_matched_is_one_line_and_exit_code_1(self):
        exit_code, lines, errors = run_main(
            ["--index", self.out_dir, "--site", "shoulder", "--no_tumor"]
        )
        self.assertEqual((exit_code, errors), (1, []))
        self.assertLen(lines, 1)
        self.assertIn("No slices matched", lines[0])
        self.assertIn("site=shoulder", lines[0])
        self.assertIn("has_tumor=False", lines[0])

    def test_bad_modality_is_one_line_error(self):
        exit_code, lines, errors = run_main(["--index", self.out_dir, "--modality", "XR"])
        self.assertEqual((exit_code, lines), (2, []))
        self.assertLen(errors, 1)
        self.assertIn("XR", errors[0])

    def test_missing_index_from_the_command_line(self):
        missing = os.path.join(self.out_dir, "no_such_index")
        completed = subprocess.run(
            [sys.executable, "-m", "data_pipeline.query", "--index", missing],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        self.assertEqual(completed.returncode, 2)
        self.assertEqual(completed.stdout, "")
        self.assertLen(completed.stderr.splitlines(), 1)
        self.assertIn("index.sqlite is missing", completed.stderr)
        self.assertNotIn("Traceback", completed.stderr)


if __name__ == "__main__":
    absltest.main()
