"""The colab notebooks run top to bottom with tiny settings, and are committed with outputs."""

import os
import pathlib
import shutil
import tempfile

import nbformat
from absl.testing import absltest, parameterized
from nbclient import NotebookClient

COLAB = pathlib.Path(__file__).resolve().parents[1] / "colab"
SHARED = pathlib.Path(
    os.environ.get(
        "SARCOMA_JAX_SHARED", pathlib.Path(__file__).resolve().parents[1] / ".." / "shared"
    )
)
# What each notebook needs beyond the package (03 and 04 run on the shared real data; 03 also
# on a download).
NEEDS = {
    "03_real_data.ipynb": SHARED / "data" / "sts_ibsi" / "dicom",
    "04_predict.ipynb": SHARED / "data" / "sts_ibsi" / "dicom",
}
NOTEBOOKS = (
    "01_quickstart.ipynb",
    "02_momentum_reset_and_confusion.ipynb",
    "03_real_data.ipynb",
    "04_predict.ipynb",
)


class NotebooksTest(parameterized.TestCase):
    @parameterized.parameters(*NOTEBOOKS)
    def test_runs_top_to_bottom_with_smoke_settings(self, name):
        if name in NEEDS and not NEEDS[name].is_dir():
            self.skipTest(f"{NEEDS[name]} is absent")
        notebook = nbformat.read(COLAB / name, as_version=4)
        work = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, work, ignore_errors=True)
        environment = {
            "SARCOMA_JAX_SMOKE": "1",
            "SARCOMA_JAX_WORK": os.path.join(work, "runs"),
            "SARCOMA_JAX_SHARED": str(SHARED.resolve()),
        }
        saved = {key: os.environ.get(key) for key in environment}
        os.environ.update(environment)  # the kernel inherits the environment
        try:
            client = NotebookClient(
                notebook,
                timeout=600,
                kernel_name="python3",
                resources={"metadata": {"path": work}},  # run from an empty folder
            )
            client.execute()  # raises CellExecutionError, with the cell, on any error
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        outputs = [
            output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
        ]
        self.assertTrue(any("image/png" in output.get("data", {}) for output in outputs), name)

    @parameterized.parameters(*NOTEBOOKS)
    def test_committed_with_outputs_of_a_full_run(self, name):
        notebook = nbformat.read(COLAB / name, as_version=4)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        self.assertTrue(all(cell.execution_count for cell in code), f"{name}: unexecuted cells")
        outputs = [output for cell in code for output in cell.outputs]
        self.assertFalse([o for o in outputs if o.output_type == "error"], f"{name}: errors")
        text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
        self.assertIn("settings: full", text, name)
        self.assertNotIn("settings: smoke", text, f"{name}: outputs of a smoke run")
        self.assertTrue(any("image/png" in o.get("data", {}) for o in outputs), name)


if __name__ == "__main__":
    absltest.main()
