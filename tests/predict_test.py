"""End to end: a tiny trained segmenter predicts phantom DICOM into SEG, RTSTRUCT, NIfTI and PNG,
evaluate scores it, and bad input gets one line each while the other series are still written."""

import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import types

import highdicom
import jax
import nibabel
import numpy as np
import orbax.checkpoint as ocp
import pydicom
import scipy.spatial
from absl.testing import absltest
from scipy import ndimage

from data_pipeline import dicom_io, nifti_writer, phantom, rtstruct, series_finder
from data_pipeline import preprocess as preprocess_lib
from sarcoma_jax import evaluate, predict
from sarcoma_jax.segment import train as segment_train

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # configs/ is imported as a package from the repo root.

from configs import segment_ct  # noqa: E402

PATIENTS = 4


def tiny_config(dicom_dir: pathlib.Path, cache_dir: pathlib.Path):
    config = segment_ct.get_config("smoke")
    config.data.source = "dicom"
    config.data.path = str(dicom_dir)
    config.data.cache_dir = str(cache_dir)
    config.data.image_size = 16
    config.model.base_filters = 2
    config.model.depth = 2
    config.batch_size = 2
    config.eval_batch_size = 4
    config.num_epochs = 2
    config.bn_recalibration_batches = 2
    config.progress_bar = False
    return config


def run_cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def ct_folders(dicom_dir: pathlib.Path) -> list[pathlib.Path]:
    """The phantom's CT series folders (the ones whose files are CT images), one per patient."""
    folders = []
    for folder in sorted({p.parent for p in dicom_dir.rglob("*.dcm")}):
        first = next(folder.glob("*.dcm"))
        if pydicom.dcmread(first, stop_before_pixels=True).Modality == "CT":
            folders.append(folder)
    return folders


class PredictEndToEndTest(absltest.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = pathlib.Path(tempfile.mkdtemp())
        cls.dicom = cls.tmp / "phantom"
        phantom.write_phantom(
            cls.dicom, PATIENTS, seed=0, image_size=32, num_slices=8, progress=False
        )
        cls.workdir = cls.tmp / "seg"
        segment_train.train_and_evaluate(tiny_config(cls.dicom, cls.tmp / "cache"), cls.workdir)
        cls.out = cls.tmp / "predicted"
        cls.records, cls.failed = predict.predict_dicom_dir(
            cls.workdir, cls.dicom, cls.out, log=lambda line: None
        )

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)
        super().tearDownClass()

    def test_every_ct_series_is_written_in_every_format(self):
        self.assertEqual(self.failed, 0)
        self.assertLen(self.records, PATIENTS)
        for record in self.records:
            folder = self.out / predict.series_folder_name(
                record["patient_key"], "CT", record["series_uid"]
            )
            self.assertTrue(folder.name.startswith("PHANTOM_"), folder.name)
            for name in (
                "seg.dcm",
                "rtstruct.dcm",
                "mask.nii.gz",
                "overview.png",
                "prediction.json",
            ):
                self.assertTrue((folder / name).is_file(), folder / name)
            self.assertEqual((folder / "overview.png").read_bytes()[:8], b"\x89PNG\r\n\x1a\n")
            self.assertEqual(json.loads((folder / "prediction.json").read_text()), record)

    def test_outputs_agree_with_each_other_and_with_the_series_geometry(self):
        record = self.records[0]
        folder = self.out / predict.series_folder_name(
            record["patient_key"], "CT", record["series_uid"]
        )
        scan = series_finder.scan_dicom_dir(self.dicom, log=lambda line: None)
        series = dicom_io.load_series_from_headers(scan.images[record["series_uid"]])
        image = nibabel.load(folder / "mask.nii.gz")
        mask = np.transpose(np.asarray(image.dataobj), (2, 1, 0)).astype(bool)
        self.assertEqual(mask.shape, series.pixels.shape)
        np.testing.assert_allclose(image.affine, nifti_writer.affine(series)[0], atol=1e-5)
        seg = highdicom.seg.segread(folder / "seg.dcm")
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=list(series.sop_instance_uids), segment_numbers=[1]
        )
        np.testing.assert_array_equal(pixels[..., 0].astype(bool), mask)
        self.assertEqual(seg.ReferencedSeriesSequence[0].SeriesInstanceUID, record["series_uid"])
        (algorithm,) = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence
        parameters = algorithm.AlgorithmParameters
        step = record["model"]["step"]
        self.assertIn(f"checkpoint=checkpoints/best/{step}", parameters)
        self.assertIn("criterion=best_val_f1", parameters)
        commit = json.loads((self.workdir / "provenance.json").read_text())["git"]["commit"]
        self.assertIn(f"git_commit={commit or 'unknown'}", parameters)
        (traced,) = rtstruct.load_rtstruct_masks(folder / "rtstruct.dcm", series).values()
        if mask.any():
            self.assertGreaterEqual(2 * np.sum(traced & mask) / (traced.sum() + mask.sum()), 0.98)
        else:
            self.assertFalse(traced.any())
        volume = mask.sum() * np.prod(series.pixel_spacing) * series.slice_spacing / 1000
        self.assertAlmostEqual(record["volume_ml"], volume, places=6)

    def test_slices_are_preprocessed_and_predicted_as_in_training(self):
        model = predict.load_model(self.workdir)
        scan = series_finder.scan_dicom_dir(self.dicom, log=lambda line: None)
        series = dicom_io.load_series_from_headers(predict.select_series(scan, "CT")[0])
        prediction = predict.Predictor(model, batch_size=3).predict(series)
        # The training path for one slice: preprocess() as load_arrays calls it, then the model.
        image, _ = preprocess_lib.preprocess(series.pixels[5], np.zeros_like(series.pixels[5]), 16)
        logits = model.module.apply(model.variables, image[None], train=False)
        np.testing.assert_allclose(
            prediction.model_probabilities[5], jax.nn.sigmoid(logits)[0, ..., 0], atol=1e-6
        )
        # Back on the series' grid, each pixel the model saw keeps the model's probability.
        rows = preprocess_lib.nearest_indices(series.pixels.shape[1], 16)
        cols = preprocess_lib.nearest_indices(series.pixels.shape[2], 16)
        np.testing.assert_allclose(
            prediction.probabilities[:, rows][:, :, cols], prediction.model_probabilities, atol=1e-6
        )
        self.assertEqual(prediction.probabilities.shape, series.pixels.shape)
        self.assertEqual(len(prediction.model_probabilities), len(series.pixels))  # every slice

    def test_evaluate_scores_every_contoured_series(self):
        out = self.tmp / "evaluated"
        evaluation = evaluate.evaluate_dicom_dir(
            self.workdir, self.dicom, out, log=lambda line: None
        )
        self.assertTrue((out / "evaluation.md").is_file())
        self.assertTrue((out / "evaluation_boxplot.png").is_file())
        self.assertEqual(json.loads((out / "evaluation.json").read_text()), evaluation)
        rows = evaluation["per_patient"]
        self.assertLen(rows, PATIENTS)
        for row in rows:
            for key in (
                "patient_key",
                "series_uid",
                "dice_3d",
                "hd95_mm",
                "volume_ml",
                "volume_true_ml",
                "f1",
                "f1_original",
            ):
                self.assertIn(key, row)
            self.assertBetween(row["dice_3d"], 0.0, 1.0)
            self.assertBetween(row["f1_original"], 0.0, 1.0)
            self.assertGreater(row["volume_true_ml"], 0.0)
            self.assertEqual(row["roi_name"], "GTV_Mass")
            name = predict.series_folder_name(row["patient_key"], "CT", row["series_uid"])
            self.assertTrue((out / "overlays" / "best" / f"{name}.png").is_file())
        # The per-slice F1 at the training resolution, recomputed from the DICOM, equals what the
        # run wrote for its test patients: preprocessing, slice selection and model are the same.
        compared = [row for row in rows if row["f1_results_json"] is not None]
        self.assertNotEmpty(compared)
        for row in compared:
            self.assertAlmostEqual(row["f1"], row["f1_results_json"], places=5)
        summary = evaluation["summary"]["best"]
        self.assertEqual(summary["series"], PATIENTS)
        self.assertAlmostEqual(summary["dice_3d"]["mean"], np.mean([r["dice_3d"] for r in rows]))
        results = json.loads((self.workdir / "results.json").read_text())
        self.assertEqual(summary["results_json_test_f1"], results["test"]["f1"])

    def test_adda_workdir_predicts_its_target_modality_with_the_chosen_criterion(self):
        adda = self.make_adda_workdir(self.tmp / "adda", reached=("confusion", "latest"))
        model = predict.load_model(adda)
        self.assertEqual(
            (model.kind, model.checkpoint, model.domain, model.step), ("adda", "confusion", "PT", 7)
        )
        self.assertEqual(predict.DEFAULT_ADDA_CRITERION, "confusion")
        self.assertEqual(predict.load_model(adda, "latest").step, 8)
        out = self.tmp / "adda_predicted"
        records, failed = predict.predict_dicom_dir(
            adda, self.dicom, out, formats=["seg"], log=lambda line: None
        )
        self.assertEqual((failed, len(records)), (0, PATIENTS))
        self.assertEqual({r["domain"] for r in records}, {"PT"})
        folder = out / predict.series_folder_name(
            records[0]["patient_key"], "PT", records[0]["series_uid"]
        )
        self.assertEqual(sorted(p.name for p in folder.iterdir()), ["prediction.json", "seg.dcm"])
        algorithm = (
            pydicom.dcmread(folder / "seg.dcm")
            .SegmentSequence[0]
            .SegmentationAlgorithmIdentificationSequence[0]
        )
        self.assertIn("criterion=confusion", algorithm.AlgorithmParameters)
        self.assertIn("ADDA", algorithm.AlgorithmName)
        with self.assertRaisesRegex(
            predict.PredictError, r"'best_loss' was not reached .*reached: confusion, latest"
        ):
            predict.load_model(adda, "best_loss")
        with self.assertRaisesRegex(predict.PredictError, "not a checkpoint of this adda run"):
            predict.load_model(adda, "best")

    def test_one_series_by_uid_and_option_problems(self):
        record = self.records[0]
        records, failed = predict.predict_dicom_dir(
            self.workdir,
            self.dicom,
            self.tmp / "one",
            series_uid=record["series_uid"],
            formats=["nifti"],
            log=lambda line: None,
        )
        self.assertEqual((failed, [r["series_uid"] for r in records]), (0, [record["series_uid"]]))
        scan = series_finder.scan_dicom_dir(self.dicom)
        (pet, *_) = scan.series_of("PT")
        cases = {
            "is PT, the model segments CT": {"series_uid": pet[0].series_instance_uid},
            "no image series with UID 1.2.3": {"series_uid": "1.2.3"},
            "--threshold must lie strictly between 0 and 1": {"threshold": 1.5},
            "--formats: use some of seg,rtstruct,nifti,png": {"formats": ["dicom"]},
        }
        for message, options in cases.items():
            with self.assertRaisesRegex(predict.PredictError, message):
                predict.predict_dicom_dir(self.workdir, self.dicom, self.tmp / "x", **options)
        self.assertFalse((self.tmp / "x").exists())

    def test_evaluate_every_reached_criterion_of_an_adda_run(self):
        adda = self.make_adda_workdir(self.tmp / "adda_all", reached=("confusion", "latest"))
        evaluation = evaluate.evaluate_dicom_dir(
            adda, self.dicom, self.tmp / "adda_evaluated", checkpoint="all", log=lambda line: None
        )
        self.assertEqual(list(evaluation["summary"]), ["confusion", "latest"])
        rows = evaluation["per_patient"]
        self.assertEqual(len(rows), 2 * PATIENTS)
        self.assertEqual({row["roi_name"] for row in rows}, {"GTV_Mass"})
        self.assertEqual(evaluation["summary"]["latest"]["results_json_test_f1"], 0.5)
        self.assertEqual(evaluation["model"]["domain"], "PT")
        # Both criteria hold the same variables here: the same scores.
        by_checkpoint = {
            name: [row["dice_3d"] for row in rows if row["checkpoint"] == name]
            for name in ("confusion", "latest")
        }
        self.assertEqual(by_checkpoint["confusion"], by_checkpoint["latest"])

    def test_workdir_problems_are_one_line_errors(self):
        no_checkpoint = self.tmp / "no_checkpoint"
        no_checkpoint.mkdir()
        shutil.copy(self.workdir / "config.json", no_checkpoint)
        seeds = self.tmp / "seeds"
        (seeds / "seed_0").mkdir(parents=True)
        (seeds / "seed_1").mkdir()
        config = json.loads((self.workdir / "config.json").read_text())
        (seeds / "config.json").write_text(json.dumps({**config, "num_seeds": 2}))
        cases = {
            no_checkpoint: "no checkpoint in checkpoints/best",
            seeds: r"num_seeds run; pass one seed's run: .*seed_0, .*seed_1",
            self.tmp / "absent": "no such workdir",
            self.dicom: "no config.json",
        }
        for workdir, message in cases.items():
            with self.assertRaisesRegex(predict.PredictError, message) as caught:
                predict.load_model(workdir)
            self.assertNotIn("\n", str(caught.exception))

    def test_cli_bad_input_one_line_each_and_other_series_still_written(self):
        data = self.tmp / "cli_data"
        for folder in ct_folders(self.dicom)[:2]:
            shutil.copytree(folder, data / folder.relative_to(self.dicom))
        broken = sorted(data.rglob("*.dcm"))[3]
        broken.write_bytes(broken.read_bytes()[:400])  # cut inside its header
        (data / "notes.txt").write_text("not DICOM")
        out = self.tmp / "cli_out"
        result = run_cli(
            "sarcoma_jax.predict",
            f"--workdir={self.workdir}",
            f"--dicom_dir={data}",
            f"--out_dir={out}",
            "--formats=nifti",
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        problems = [line for line in result.stderr.splitlines() if "skipped" in line]
        self.assertLen(problems, 2, result.stderr)
        self.assertTrue(any(str(broken.relative_to(data)) in line for line in problems), problems)
        self.assertTrue(any("notes.txt" in line for line in problems), problems)
        written = sorted(out.iterdir())
        self.assertLen(written, 2)
        slices = sorted(nibabel.load(f / "mask.nii.gz").shape[2] for f in written)
        self.assertEqual(slices, [7, 8])  # the broken file's series lost that slice only

        pet_only = self.tmp / "pet_only"
        for path in self.dicom.rglob("*.dcm"):
            if pydicom.dcmread(path, stop_before_pixels=True).Modality == "PT":
                target = pet_only / path.relative_to(self.dicom)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, target)
        adda = self.make_adda_workdir(self.tmp / "adda_cli", reached=("latest",))
        cases = [  # a workdir without a checkpoint: test_workdir_problems_are_one_line_errors
            (self.workdir, pet_only, "no CT series (image series found: PT x4)"),
            (adda, self.dicom, "stopping criterion 'confusion' was not reached"),
        ]
        for workdir, dicom_dir, message in cases:
            result = run_cli(
                "sarcoma_jax.predict",
                f"--workdir={workdir}",
                f"--dicom_dir={dicom_dir}",
                f"--out_dir={self.tmp / 'unused'}",
            )
            self.assertEqual(result.returncode, 1)
            lines = result.stderr.strip().splitlines()
            self.assertLen(lines, 1, result.stderr)
            self.assertIn(message, lines[0])
            self.assertTrue(lines[0].startswith("error: "), lines[0])
        self.assertFalse((self.tmp / "unused").exists())

    def make_adda_workdir(self, workdir: pathlib.Path, reached: tuple[str, ...]) -> pathlib.Path:
        """An ADDA run's layout holding the segmenter's variables as target maps (CT -> PT)."""
        config = json.loads((self.workdir / "config.json").read_text())
        workdir.mkdir()
        (workdir / "config.json").write_text(
            json.dumps(
                {
                    "experiment": "adda",
                    "model": config["model"],
                    "data": {"source_modality": "CT", "target_modality": "PET", "image_size": 16},
                }
            )
        )
        variables = {
            key: value
            for key, value in ocp.StandardCheckpointer()
            .restore(
                (self.workdir / "checkpoints" / "best").resolve()
                / str(predict.load_model(self.workdir).step)
                / "state"
            )
            .items()
            if key in ("params", "batch_stats")
        }
        for step, name in enumerate(reached, start=7):
            checkpointer = ocp.StandardCheckpointer()
            checkpointer.save(
                (workdir / "checkpoints" / name / str(step) / "state").resolve(), variables
            )
            checkpointer.wait_until_finished()
        (workdir / "results.json").write_text(
            json.dumps({"criteria": {name: {"test": {"f1": 0.5}} for name in reached}})
        )
        return workdir


class MetricsTest(absltest.TestCase):
    def test_hd95_hand_computed(self):
        truth = np.zeros((6, 12, 12), bool)
        truth[2, 5, 5] = True
        spacing = (3.0, 0.5, 0.7)  # slice, row, column
        shifted = np.roll(truth, 3, axis=0)
        self.assertAlmostEqual(evaluate.hd95_mm(shifted, truth, spacing), 9.0)
        shifted = np.roll(truth, 4, axis=2)
        self.assertAlmostEqual(evaluate.hd95_mm(shifted, truth, spacing), 2.8)
        self.assertEqual(evaluate.hd95_mm(truth, truth, spacing), 0.0)
        self.assertIsNone(evaluate.hd95_mm(np.zeros_like(truth), truth, spacing))

    def test_hd95_equals_a_brute_force_surface_distance(self):
        rng = np.random.default_rng(1)
        spacing = np.array([2.5, 0.8, 1.1])
        masks = [np.zeros((12, 40, 40), bool) for _ in range(2)]
        for i, mask in enumerate(masks):  # in a corner of the volume, one touching its edge
            mask[i:9, 3:30, :25] = ndimage.gaussian_filter(rng.random((9 - i, 27, 25)), 2) > 0.5
        structure = ndimage.generate_binary_structure(3, 1)

        def surface_mm(mask):
            border = mask & ~ndimage.binary_erosion(mask, structure)
            return np.argwhere(border) * spacing

        a, b = surface_mm(masks[0]), surface_mm(masks[1])
        distances = np.concatenate(
            [scipy.spatial.cKDTree(b).query(a)[0], scipy.spatial.cKDTree(a).query(b)[0]]
        )
        expected = np.percentile(distances, 95)
        self.assertAlmostEqual(evaluate.hd95_mm(masks[0], masks[1], spacing), expected, places=9)

    def test_dice_3d(self):
        a = np.zeros((2, 4, 4), bool)
        b = np.zeros((2, 4, 4), bool)
        a[0, :2, :2] = True  # 4 voxels
        b[0, :2, :] = True  # 8 voxels, 4 shared
        self.assertAlmostEqual(evaluate.dice_3d(a, b), 2 * 4 / 12)
        self.assertEqual(evaluate.dice_3d(a & False, b & False), 1.0)

    def test_original_resolution_f1_by_hand(self):
        truth = np.zeros((3, 4, 4), bool)
        mask = np.zeros((3, 4, 4), bool)
        mask[0, 0, 0] = True  # a slice without tumour: left out unless every slice is scored
        truth[1, 0, :] = True  # 4 pixels; predicted: 2 of them and 2 others -> 2 * 2 / 8
        mask[1, 0, :2] = mask[1, 3, :2] = True
        truth[2, 1, 1:3] = mask[2, 1, 1:3] = True  # exact -> 1
        prediction = types.SimpleNamespace(mask=mask)
        self.assertAlmostEqual(evaluate.original_resolution_f1(prediction, truth), 0.75)
        self.assertAlmostEqual(evaluate.original_resolution_f1(prediction, truth, False), 0.5)
        self.assertIsNone(evaluate.original_resolution_f1(prediction, truth & False))


class UpsamplingTest(absltest.TestCase):
    def test_equal_sizes_give_the_identity(self):
        np.testing.assert_array_equal(predict.upsampling_matrix(32, 32), np.eye(32))

    def test_linear_maps_are_reproduced_between_the_sampled_pixels(self):
        for size_original, size_model in ((143, 32), (512, 128), (20, 16), (7, 16)):
            knots = preprocess_lib.nearest_indices(size_original, size_model)
            weights = predict.upsampling_matrix(size_original, size_model)
            np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-6)
            values = 0.25 + 0.01 * knots  # what the model saw at each of its pixels, linear
            back = weights @ values
            inside = np.arange(knots.min(), knots.max() + 1)
            np.testing.assert_allclose(back[inside], 0.25 + 0.01 * inside, atol=1e-5)
            np.testing.assert_allclose(back[: knots.min()], values[0], atol=1e-6)  # edges kept
            np.testing.assert_allclose(back[knots.max() + 1 :], values[-1], atol=1e-6)


if __name__ == "__main__":
    absltest.main()
