"""The fast paths (our DICOM scanner, ISA-L zip writer) and the libraries (pydicom, zipfile) build
identical indexes: every row of every table, every slice's arrays with their dtypes."""

import json
import os
import pathlib
import shutil
import sqlite3
import subprocess
import sys
import tempfile

import numpy as np
from absl.testing import absltest

from data_pipeline import datasets, fast_paths, phantom, slice_store
from data_pipeline import ingest as ingest_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("SARCOMA_JAX_SHARED", REPO / ".." / "shared"))
STS_IBSI = SHARED / "data" / "sts_ibsi"


def _temp_dir(test: absltest.TestCase) -> str:
    folder = tempfile.mkdtemp()
    test.addCleanup(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _rows(index_dir) -> dict[str, list[tuple]]:
    """Every row of every table of an index, in storage order."""
    connection = sqlite3.connect(os.path.join(index_dir, "index.sqlite"))
    try:
        tables = [
            name
            for (name,) in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
            )
        ]
        return {
            table: connection.execute(f"SELECT * FROM {table} ORDER BY rowid").fetchall()
            for table in tables
        }
    finally:
        connection.close()


def _slice_files(index_dir) -> list[str]:
    root = pathlib.Path(index_dir)
    return sorted(str(p.relative_to(root)) for p in (root / "slices").rglob("*.npz"))


def _written_by_zipfile(path) -> bool:
    """Whether a slice file has the bytes the zipfile writer gives its arrays."""
    with np.load(path) as arrays:
        image, mask = arrays["image"], arrays["mask"]
    with tempfile.TemporaryDirectory() as folder:
        again = os.path.join(folder, "again.npz")
        slice_store.write_slice(again, image, mask, fast_paths=False)
        return pathlib.Path(again).read_bytes() == pathlib.Path(path).read_bytes()


class SameIndexTest(absltest.TestCase):
    def assert_same_index(self, dicom_dir, workers, clinical=None):
        tmp = _temp_dir(self)
        indexes = {}
        for fast in (True, False):
            out = os.path.join(tmp, f"fast_{fast}")
            ingest_lib.ingest(
                str(dicom_dir),
                out,
                clinical=clinical,
                workers=workers,
                progress=False,
                log=lambda _: None,
                fast_paths=fast,
            )
            indexes[fast] = out
        fast_rows, slow_rows = _rows(indexes[True]), _rows(indexes[False])
        self.assertEqual(list(fast_rows), list(slow_rows))
        for table, rows in fast_rows.items():
            self.assertEqual(rows, slow_rows[table], table)
        self.assertNotEmpty(fast_rows["slices"])
        files = _slice_files(indexes[True])
        self.assertEqual(files, _slice_files(indexes[False]))
        self.assertLen(files, len(fast_rows["slices"]))
        tumour = 0
        for name in files:
            with (
                np.load(os.path.join(indexes[True], name)) as fast,
                np.load(os.path.join(indexes[False], name)) as slow,
            ):
                self.assertEqual(sorted(fast.files), ["image", "mask"])
                self.assertEqual(sorted(slow.files), ["image", "mask"])
                for key in ("image", "mask"):
                    self.assertEqual(fast[key].dtype, slow[key].dtype, (name, key))
                    np.testing.assert_array_equal(fast[key], slow[key], f"{name} {key}")
                tumour += bool(fast["mask"].any())
        self.assertGreater(tumour, 0)
        # Every worker process took the switch: each file of the slow index is zipfile's bytes,
        # and no file of the fast one is.
        for name in files[:: max(1, len(files) // 40)]:
            self.assertTrue(_written_by_zipfile(os.path.join(indexes[False], name)), name)
            self.assertFalse(_written_by_zipfile(os.path.join(indexes[True], name)), name)
        return fast_rows

    def test_phantom(self):
        dicom = os.path.join(_temp_dir(self), "dicom")
        phantom.write_phantom(dicom, 2, seed=11, image_size=32, num_slices=8, progress=False)
        rows = self.assert_same_index(dicom, 2, clinical=os.path.join(dicom, "clinical.csv"))
        self.assertLen(rows["series"], 8)

    @absltest.skipUnless(STS_IBSI.is_dir(), "shared IBSI data not found")
    def test_sts_ibsi(self):
        rows = self.assert_same_index(STS_IBSI / "dicom", 2)
        self.assertLen(rows["series"], 39)


class SwitchTest(absltest.TestCase):
    def test_environment_variable_and_flag_reach_the_workers(self):
        tmp = _temp_dir(self)
        dicom = os.path.join(tmp, "dicom")
        phantom.write_phantom(dicom, 1, seed=12, image_size=16, num_slices=6, progress=False)
        runs = {
            "env_off": ({fast_paths.ENV_VAR: "0"}, []),
            "flag_off": ({fast_paths.ENV_VAR: "1"}, ["--fast_paths=false"]),
            "default": ({}, []),
        }
        for name, (env, extra) in runs.items():
            out = os.path.join(tmp, name)
            environment = {k: v for k, v in os.environ.items() if k != fast_paths.ENV_VAR}
            result = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "data_pipeline.ingest",
                    f"--dicom_dir={dicom}",
                    f"--out_dir={out}",
                    "--workers=2",
                    *extra,
                ],
                capture_output=True,
                text=True,
                cwd=REPO,
                env={**environment, **env},
                check=False,
            )
            self.assertEqual(result.returncode, 0, result.stderr)
            files = _slice_files(out)
            self.assertNotEmpty(files)
            by_zipfile = {_written_by_zipfile(os.path.join(out, f)) for f in files}
            self.assertEqual(by_zipfile, {name != "default"}, name)

    def test_bad_environment_value_is_a_one_line_error(self):
        tmp = _temp_dir(self)
        result = subprocess.run(
            [sys.executable, "-m", "data_pipeline.ingest", f"--dicom_dir={tmp}", "--out_dir=x"],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**os.environ, fast_paths.ENV_VAR: "sometimes"},
            check=False,
        )
        self.assertEqual(result.returncode, 1)
        self.assertNotIn("Traceback", result.stderr)
        self.assertIn("SARCOMA_JAX_FAST_PATHS='sometimes'", result.stderr)


class IngestModulesTest(absltest.TestCase):
    def test_cache_key_digests_every_module_ingest_runs(self):
        # The data_pipeline modules a fresh `import data_pipeline.ingest` loads are what decide
        # an index; datasets.INGEST_MODULES must name each, or a change would reuse stale caches.
        code = (
            "import json, sys, data_pipeline.ingest; print(json.dumps(sorted("
            "m for m in sys.modules if m.startswith('data_pipeline.'))))"
        )
        loaded = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
        )
        modules = {name.split(".")[1] for name in json.loads(loaded.stdout)}
        self.assertContainsSubset({"dicom_scan", "slice_store", "fast_paths"}, modules)
        self.assertEqual(modules, set(datasets.INGEST_MODULES))


if __name__ == "__main__":
    absltest.main()
