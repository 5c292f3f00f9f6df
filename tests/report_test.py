"""Tests for sarcoma_jax.report: tables against hand-computed numbers, figures, bad input."""

import contextlib
import io
import json
import pathlib
import subprocess
import sys
import tempfile

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl.testing import absltest

from data_pipeline import vocabulary
from sarcoma_jax import models, report
from sarcoma_jax.adda import criteria as criteria_lib
from sarcoma_jax.adda import game as game_lib
from sarcoma_jax.adda import segmentation
from sarcoma_jax.adda import task as task_lib
from sarcoma_jax.report import overlays, plots, tables, thesis
from sarcoma_jax.report import runs as report_runs

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG"
TINY_UNET = {
    "name": "unet",
    "depth": 2,
    "base_filters": 2,
    "downsampling": "conv",
    "upsampling": "zero_insert",
    "eval_batch_stats": False,
}
OVERLAY_IMAGE_SIDE = 8


def _write(
    workdir: pathlib.Path,
    config: dict,
    results: dict | None,
    history=(),
    commit: str = "0123456789abcdef",
) -> pathlib.Path:
    """A workdir as segment/train.py / adda/train.py leave it (only the files the report reads)."""
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps(config))
    if results is not None:
        (workdir / "results.json").write_text(json.dumps(results))
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in history))
    provenance = {
        "git": {"commit": commit, "dirty": False},
        "created_utc": "2026-01-01T00:00:00+00:00",
        "seed": config["seed"],
    }
    (workdir / "provenance.json").write_text(json.dumps(provenance))
    return workdir


def _metrics(f1: float, accuracy: float, auc: float, zero_ratio: float = 0.95) -> dict:
    return {"f1": f1, "dice": f1, "accuracy": accuracy, "auc": auc, "zero_ratio": zero_ratio}


def segmentation_workdir(root, name, modality, seed, test, baseline_f1, num_epochs=3):
    """A segmentation workdir (layout of segment/train.py)."""
    config = {
        "experiment": "segment",
        "seed": seed,
        "progress_bar": seed % 2 == 0,  # cosmetic: must not split the group
        "num_epochs": num_epochs,
        "data": {"source": "phantom", "path": None, "modality": modality, "seed": seed},
        "model": dict(TINY_UNET),
    }
    results = {
        "modality": modality,
        "seed": seed,
        "best_epoch": 2,
        "val": test,
        "test": test,
        "baseline_threshold": {"polarity": "bright", "test": _metrics(baseline_f1, 0.9, 0.85)},
        "test_per_image": {"patient_key": ["a", "b"], "f1": [test["f1"] - 0.05, test["f1"] + 0.05]},
        "epochs": num_epochs,
        "train_wall_time_s": 10.0,
    }
    return _write(root / name, config, results)


def adda_workdir(root, name, scheme, seed, f1_by_criterion, target="PET", finished=True):
    """An ADDA workdir as runs before the criterion registry left it (no labels recorded);
    accuracy = 0.9 + f1 / 10, AUC = 0.5 + f1 for every criterion, so all three metrics have
    hand-computable cells."""
    config = {
        "experiment": "adda",
        "task": "segmentation",
        "scheme": scheme,
        "seed": seed,
        "source_checkpoint": "/elsewhere" if scheme == "reset" else None,
        "eval_batch_size": 4,
        "data": {
            "source": "phantom",
            "path": None,
            "source_modality": "CT",
            "target_modality": target,
            "seed": 0,
        },
        "model": dict(TINY_UNET),
    }
    criteria = {
        name: {
            "step": step,
            "cycle": step // 10,
            "test": _metrics(f1, 0.9 + f1 / 10, 0.5 + f1),
            "val": _metrics(f1, 0.9, 0.5),
        }
        for step, (name, f1) in enumerate(f1_by_criterion.items())
    }
    results = {
        "pair": "CT->PT",
        "scheme": scheme,
        "seed": seed,
        "primary_metric": "f1",
        "criteria": criteria,
        "criteria_not_reached": [c for c in criteria_lib.THESIS_CRITERIA if c not in criteria],
        "source_test": _metrics(0.8, 0.98, 0.95),
        "wall_time_s": 5.0,
    }
    history = [
        {
            "phase": "before_da" if step == 0 else "cycle",
            "cycle": step,
            "step": 10 * step,
            "disc_loss": 0.7 - 0.01 * step,
            "recall": 0.5 + 0.02 * step,
            "specificity": 0.5 - 0.02 * step,
            "target_adversarial_loss": 0.6 + 0.01 * step,
            "target_val_f1": 0.1 * step,
            **({"confusion_score": None} if step < 2 else {"confusion_score": 0.9 - 0.05 * step}),
            **({} if step == 0 else {"disc_loss_train": 0.65}),
        }
        for step in range(6)
    ]
    return _write(root / name, config, results if finished else None, history)


def digits_workdir(root, name, scheme, seed, accuracy_by_criterion, source_accuracy):
    """A digits ADDA workdir (an ADDA run of the digits task, written before the registry)."""
    config = {
        "experiment": "adda",
        "task": "sarcoma_jax.digits:DigitsTask",
        "scheme": scheme,
        "seed": seed,
        "data": {"dataset": "offline", "seed": seed},
    }
    results = {
        "pair": "source->target",
        "scheme": scheme,
        "seed": seed,
        "primary_metric": "accuracy",
        "criteria": {
            name: {"step": 5, "test": {"accuracy": value}, "val": {"accuracy": value}}
            for name, value in accuracy_by_criterion.items()
        },
        "criteria_not_reached": [
            c for c in criteria_lib.THESIS_CRITERIA if c not in accuracy_by_criterion
        ],
        "source_test": {"accuracy": source_accuracy},
    }
    history = [
        {"step": 5 * i, "disc_loss": 0.5, "recall": 0.5, "specificity": 0.5} for i in range(3)
    ]
    return _write(root / name, config, results, history)


def _temp_dir(test: absltest.TestCase) -> pathlib.Path:
    """A temporary folder removed after the test (absltest's create_tempdir needs parsed flags,
    which pytest does not provide)."""
    folder = tempfile.TemporaryDirectory()
    test.addCleanup(folder.cleanup)
    return pathlib.Path(folder.name)


def _run_main(argv) -> tuple[int, str]:
    """report.main in-process: (exit status, stderr)."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        status = report.main([*argv, "--no-progress"])
    return status, stderr.getvalue()


def _table_row(markdown: str, *leading_cells: str) -> list[str]:
    """The cells of the one markdown table row that starts with `leading_cells`."""
    prefix = "| " + " | ".join(leading_cells) + " |"
    rows = [line for line in markdown.splitlines() if line.startswith(prefix)]
    assert len(rows) == 1, (prefix, rows)
    return [cell.strip() for cell in rows[0].strip("|").split("|")]


class ThesisNumbersTest(absltest.TestCase):
    def test_table_15_6_f1_is_spec_section_7(self):
        spec_f1 = {  # SPEC §7, typed again here
            "CT->PT": (0.0754, 0.0401, 0.2038),
            "CT->T2": (0.1107, 0.1407, 0.2264),
            "PT->CT": (0.0292, 0.0292, 0.1221),
            "PT->T2": (0.3367, 0.3073, 0.3922),
            "T2->CT": (0.2024, 0.1173, 0.0266),
            "T2->PT": (0.3799, 0.0268, 0.2602),
        }
        self.assertEqual(
            {pair: row["f1"] for pair, row in thesis.THESIS_TABLE_15_6.items()}, spec_f1
        )

    def test_table_15_7_confusion_column_is_table_15_6(self):
        # The thesis prints the confusion-stop F1 twice (Tables 15-6 and 15-7): the two
        # transcriptions must agree.
        for pair, row in thesis.THESIS_TABLE_15_6.items():
            _, adda_f1, reset_f1 = row["f1"]
            self.assertEqual(thesis.THESIS_TABLE_15_7[pair]["adda"]["confusion"], adda_f1, pair)
            self.assertEqual(thesis.THESIS_TABLE_15_7[pair]["reset"]["confusion"], reset_f1, pair)

    def test_segmentation_numbers_are_spec_section_7(self):
        conv = thesis.THESIS_TABLE_15_4["conv"]
        self.assertEqual(
            {modality: tuple(conv[modality].values()) for modality in conv},
            {
                "PT": (0.925, 0.982, 0.969),
                "T2": (0.923, 0.981, 0.968),
                "CT": (0.844, 0.917, 0.903),
            },
        )
        self.assertEqual(thesis.THESIS_ZERO_RATIO, {"CT": 0.9848, "PT": 0.9904, "T2": 0.9631})


class FormattingTest(absltest.TestCase):
    def test_mean_sd(self):
        # mean 0.3, sample sd sqrt(((-0.2)^2 + (-0.1)^2 + 0.3^2) / 2) = sqrt(0.07) = 0.26458
        self.assertEqual(tables.mean_sd([0.1, 0.2, 0.6]), "0.3000 ± 0.2646 (n=3)")
        self.assertEqual(tables.mean_sd([0.5, None]), "0.5000 (n=1)")
        self.assertEqual(tables.mean_sd([]), "–")
        self.assertEqual(tables.mean_sd([0.1, 0.3], decimals=2, show_n=False), "0.20 ± 0.14")

    def test_latex_escape(self):
        self.assertEqual(
            tables.latex_escape("CT→PT 0.1 ± 0.2 a_b 5% –"), r"CT$\to$PT 0.1 $\pm$ 0.2 a\_b 5\% --"
        )

    def test_latex_table_is_booktabs(self):
        table = tables.Table("t", "cap", ["a", "b", "c"], [["x", "y", "1"], ["z", "y", "2"]], 2)
        latex = table.to_latex()
        for command in ("\\toprule", "\\midrule", "\\bottomrule", "\\begin{tabular}{llc}"):
            self.assertIn(command, latex)
        self.assertIn("x & y & 1 \\\\", latex)
        # A rule between the groups of rows (first column changes), none before the first row.
        self.assertEqual(latex.count("\\midrule"), 2)

    def test_select_overlay_slices(self):
        f1 = np.arange(10) / 10  # 60th percentile 0.54, 80th 0.72: 0.6 and 0.7 lie in the band
        np.testing.assert_array_equal(overlays.select_overlay_slices(f1, 2), [6, 7])
        # Fewer in the band: the nearest to the 70th percentile (0.63): 0.6, 0.7, 0.5, 0.8.
        np.testing.assert_array_equal(overlays.select_overlay_slices(f1, 4), [5, 6, 7, 8])
        self.assertLen(overlays.select_overlay_slices(f1[:3], 5), 3)


class ReportTest(absltest.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp = tempfile.TemporaryDirectory()
        root = pathlib.Path(cls.tmp.name) / "runs"
        seg = [
            segmentation_workdir(root, "ct0", "CT", 0, _metrics(0.1, 0.90, 0.7), 0.30),
            segmentation_workdir(root, "ct1", "CT", 1, _metrics(0.2, 0.92, 0.8), 0.30),
            segmentation_workdir(root, "ct2", "CT", 2, _metrics(0.6, 0.94, 0.9), 0.30),
            segmentation_workdir(root, "pt0", "PT", 0, _metrics(0.5, 0.99, 0.95, 0.99), 0.40),
            # Another budget: must be its own variant, not a fourth CT seed.
            segmentation_workdir(root, "ct_long", "CT", 0, _metrics(0.9, 0.99, 0.99), 0.30, 30),
        ]
        adda = [
            adda_workdir(
                root, "adda0", "adda", 0, {"initial": 0.1, "confusion": 0.2, "highest_peak": 0.6}
            ),
            adda_workdir(
                root, "adda1", "adda", 1, {"initial": 0.3, "confusion": 0.4, "highest_peak": 0.8}
            ),
            adda_workdir(root, "reset0", "reset", 0, {"initial": 0.1, "confusion": 0.5}),
            adda_workdir(root, "reset1", "reset", 1, {"initial": 0.3, "latest": 0.05}),
        ]
        digits = [
            digits_workdir(root, "d_adda0", "adda", 0, {"initial": 0.6, "confusion": 0.7}, 0.96),
            digits_workdir(root, "d_adda1", "adda", 1, {"initial": 0.62, "confusion": 0.8}, 0.98),
            digits_workdir(root, "d_reset0", "reset", 0, {"initial": 0.6, "confusion": 0.75}, 0.96),
        ]
        cls.unfinished = adda_workdir(root, "running", "adda", 2, {}, finished=False)
        cls.workdirs = [*seg, *adda, *digits]
        cls.out = pathlib.Path(cls.tmp.name) / "report"
        cls.status, cls.stderr = _run_main(
            [*map(str, cls.workdirs), str(cls.unfinished), "--out", str(cls.out), "--no-overlays"]
        )

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()
        super().tearDownClass()

    def test_exit_status_and_unfinished_run_warning(self):
        self.assertEqual(self.status, 0, self.stderr)
        self.assertEqual(
            self.stderr.strip().splitlines(),
            [f"warning: skipping {self.unfinished}: no results.json (an unfinished run?)"],
        )

    def test_segmentation_table(self):
        markdown = (self.out / "segmentation.md").read_text()
        # CT over seeds 0-2: F1 0.1, 0.2, 0.6 -> 0.300 ± 0.265; accuracy 0.90, 0.92, 0.94 ->
        # 0.920 ± 0.020; AUC 0.7, 0.8, 0.9 -> 0.800 ± 0.100.
        self.assertEqual(
            _table_row(markdown, "phantom [A]", "CT", "U-Net (ours)")[3:8],
            ["3", "0.300 ± 0.265", "0.920 ± 0.020", "0.800 ± 0.100", "0.9500 ± 0.0000"],
        )
        self.assertEqual(
            _table_row(markdown, "phantom [A]", "CT", "intensity threshold, no learning")[3:5],
            ["3", "0.300 ± 0.000"],
        )
        self.assertEqual(
            _table_row(markdown, "phantom [B]", "CT", "U-Net (ours)")[3:5], ["1", "0.900"]
        )
        self.assertIn("num_epochs=30", markdown)
        self.assertEqual(
            _table_row(markdown, "phantom", "PT", "U-Net (ours)")[3:8],
            ["1", "0.500", "0.990", "0.950", "0.9900"],
        )
        self.assertEqual(
            _table_row(markdown, "phantom", "PT", "thesis §15-4 (U-Net, conv)")[4:8],
            ["0.925", "0.982", "0.969", "0.9904"],
        )
        latex = (self.out / "segmentation.tex").read_text()
        self.assertIn("0.300 $\\pm$ 0.265", latex)
        self.assertIn("\\bottomrule", latex)

    def test_da_table(self):
        markdown = (self.out / "da.md").read_text()
        # Before DA per seed (both schemes share it): seed 0 0.1, seed 1 0.3 -> 0.2 ± 0.1414.
        # ADDA confusion 0.2, 0.4 -> 0.3 ± 0.1414; RESET: seed 1 never reached it -> 0.5 (n=1).
        self.assertEqual(
            _table_row(markdown, "phantom", "CT→PT", "F1")[3:],
            [
                "0.2000 ± 0.1414 (n=2)",
                "0.3000 ± 0.1414 (n=2)",
                "0.5000 (n=1)",
                "0.0754",
                "0.0401",
                "0.2038",
            ],
        )
        # accuracy = 0.9 + F1 / 10, AUC = 0.5 + F1 in the fakes.
        self.assertEqual(
            _table_row(markdown, "phantom", "CT→PT", "accuracy")[3:],
            ["0.9200 ± 0.0141 (n=2)", "0.9300 ± 0.0141 (n=2)", "0.9500 (n=1)"]
            + ["0.9697", "0.9092", "0.9666"],
        )
        self.assertEqual(
            _table_row(markdown, "phantom", "CT→PT", "AUC")[3:6],
            ["0.7000 ± 0.1414 (n=2)", "0.8000 ± 0.1414 (n=2)", "1.0000 (n=1)"],
        )
        self.assertIn("CT$\\to$PT", (self.out / "da.tex").read_text())

    def test_thesis_pair_for_other_mr_sequences(self):
        self.assertEqual(thesis.thesis_pair("CT->PT"), ("CT->PT", ""))
        self.assertEqual(thesis.thesis_pair("CT->T1"), ("CT->T2", " (T2)"))
        self.assertEqual(thesis.thesis_pair("T1->PT"), ("T2->PT", " (T2)"))
        self.assertEqual(thesis.thesis_pair("T1->T2"), (None, ""))  # T2->T2 is no thesis pair
        self.assertEqual(thesis.thesis_value(0.1107, mark=" (T2)"), "0.1107 (T2)")

    def test_stopping_table(self):
        markdown = (self.out / "stopping.md").read_text()
        header = _table_row(markdown, "data", "pair", "results")
        self.assertEqual(header[3:5], ["highest peak (oracle) ADDA", "highest peak (oracle) RESET"])
        ours = dict(zip(header, _table_row(markdown, "phantom", "CT→PT", "ours"), strict=True))
        self.assertEqual(ours["highest peak (oracle) ADDA"], "0.7000 ± 0.1414 (n=2)")
        self.assertEqual(ours["highest peak (oracle) RESET"], "–")
        self.assertEqual(ours["confusion stop RESET"], "0.5000 (n=1)")
        self.assertEqual(ours["latest stop RESET"], "0.0500 (n=1)")
        thesis = dict(zip(header, _table_row(markdown, "phantom", "CT→PT", "thesis"), strict=True))
        self.assertEqual(thesis["highest peak (oracle) RESET"], "0.3485")
        self.assertEqual(thesis["best loss stop ADDA"], "0.0186")

    def test_digits_table(self):
        markdown = (self.out / "digits.md").read_text()
        # Source accuracy per seed: 0.96, 0.98 -> 0.97 ± 0.0141; ADDA confusion 0.7, 0.8.
        self.assertEqual(
            _table_row(markdown, "0.9700 ± 0.0141 (n=2)", "0.6100 ± 0.0141 (n=2)", "ADDA")[4],
            "0.7500 ± 0.0707 (n=2)",
        )
        self.assertIn("SVHN→MNIST, not the pair of this table", markdown)

    def test_figures_written(self):
        figures = sorted(path.relative_to(self.out) for path in (self.out / "figures").rglob("*"))
        pngs = [path for path in figures if path.suffix == ".png"]
        self.assertContainsSubset(
            {
                pathlib.Path("figures/da_boxplots_phantom.png"),
                pathlib.Path("figures/segmentation_f1_phantom.png"),
                pathlib.Path("figures/segmentation_f1_phantom_A.png"),
            },
            set(pngs),
        )
        curves = [path for path in pngs if path.parent.name == "curves"]
        self.assertLen(curves, 7)  # 4 ADDA + 3 digits runs
        for path in pngs:
            self.assertEqual((self.out / path).read_bytes()[:4], PNG_MAGIC, path)
        self.assertIn("F1: one value per seed", (self.out / "da.md").read_text())
        self.assertIn("not rendered (--no-overlays)", (self.out / "da.md").read_text())

    def test_index_lists_workdirs_with_provenance(self):
        index = (self.out / "index.md").read_text()
        for workdir in self.workdirs:
            self.assertIn(f"`{workdir}`", index)
        self.assertIn("0123456789", index)
        self.assertIn(f"skipping {self.unfinished}", index)
        for link in ("segmentation.md", "da.md", "stopping.md", "digits.md"):
            self.assertIn(f"[{link}]({link})", index)


class BoxPlotTest(absltest.TestCase):
    def test_per_image_f1_when_every_run_records_it(self):
        root = _temp_dir(self)
        runs = []
        for scheme in game_lib.SCHEMES:
            workdir = adda_workdir(root, scheme, scheme, 0, {"initial": 0.1, "confusion": 0.2})
            results = json.loads((workdir / "results.json").read_text())
            for entry in results["criteria"].values():
                entry["test_per_image"] = {"patient_key": ["a", "b"], "f1": [0.0, 1.0]}
            (workdir / "results.json").write_text(json.dumps(results))
            runs.append(report_runs.load_run(workdir))
        caption = plots.plot_da_boxplots([("CT->PT", runs)], root / "per_image.png")
        self.assertEqual(
            caption, "F1: per test image, pooled over seeds; accuracy: one value per seed."
        )
        del runs[1].results["criteria"]["confusion"]["test_per_image"]
        caption = plots.plot_da_boxplots([("CT->PT", runs)], root / "per_seed.png")
        self.assertEqual(caption, "F1: one value per seed; accuracy: one value per seed.")
        self.assertEqual((root / "per_seed.png").read_bytes()[:4], PNG_MAGIC)


class BadInputTest(absltest.TestCase):
    def setUp(self):
        super().setUp()
        self.root = _temp_dir(self)
        self.out = str(self.root / "report")

    def assert_one_line_error(self, argv, expected):
        status, stderr = _run_main([*argv, "--out", self.out])
        self.assertEqual(status, 2)
        self.assertLen(stderr.strip().splitlines(), 1, stderr)
        self.assertStartsWith(stderr, "error: ")
        self.assertIn(expected, stderr)

    def test_no_workdirs(self):
        self.assert_one_line_error([], "no workdirs given")

    def test_missing_path(self):
        self.assert_one_line_error([str(self.root / "nope")], "does not exist")

    def test_file_is_not_a_workdir(self):
        log = self.root / "run.log"
        log.write_text("log")
        self.assert_one_line_error([str(log)], "is not a workdir")

    def test_only_unfinished_runs(self):
        workdir = adda_workdir(self.root, "running", "adda", 0, {}, finished=False)
        self.assert_one_line_error([str(workdir)], "none of the workdirs holds a finished run")

    def test_broken_results_json(self):
        workdir = adda_workdir(self.root, "broken", "adda", 0, {"initial": 0.1})
        (workdir / "results.json").write_text("{")
        self.assert_one_line_error([str(workdir)], "is not valid JSON")

    def test_runs_from_different_commits_are_flagged(self):
        first = segmentation_workdir(self.root, "a", "CT", 0, _metrics(0.1, 0.9, 0.7), 0.3)
        second = segmentation_workdir(self.root, "b", "CT", 1, _metrics(0.2, 0.9, 0.7), 0.3)
        provenance = json.loads((second / "provenance.json").read_text())
        provenance["git"]["commit"] = "fedcba9876543210"
        (second / "provenance.json").write_text(json.dumps(provenance))
        status, stderr = _run_main([str(first), str(second), "--out", self.out, "--no-overlays"])
        self.assertEqual(status, 0)
        self.assertEqual(
            stderr.strip(),
            "warning: runs of segmentation phantom CT come from different commits: "
            "0123456789, fedcba9876",
        )

    def test_command_line_without_traceback(self):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "sarcoma_jax.report",
                str(self.root / "nope"),
                "--out",
                self.out,
            ],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        self.assertEqual(result.returncode, 2)
        self.assertEqual(result.stderr.strip(), f"error: {self.root / 'nope'} does not exist")


def _dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    total = prediction.sum() + truth.sum()
    return 1.0 if total == 0 else 2.0 * np.logical_and(prediction, truth).sum() / total


class TinyOverlayTask(segmentation.SegmentationTask):
    """Target test data for the overlay test: bright squares on noise (no index, no files)."""

    def load_data(self, config):
        del config
        rng = np.random.default_rng(0)
        side = OVERLAY_IMAGE_SIDE
        masks = np.zeros((5, side, side, 1), np.uint8)
        for index in range(5):
            masks[index, index : index + 3, 2:5] = 1
        images = np.where(masks > 0, 0.9, rng.uniform(0, 0.3, masks.shape)).astype(np.float32)
        split = {"image": images, "mask": masks}
        return task_lib.DomainData(
            source={name: split for name in vocabulary.SPLITS},
            target={name: split for name in vocabulary.SPLITS},
        )


class OverlayTest(absltest.TestCase):
    def test_plot_before_after_writes_png(self):
        rng = np.random.default_rng(1)
        images, probs = rng.uniform(size=(2, 3, 8, 8, 1))
        masks = (images > 0.5).astype(np.uint8)
        path = _temp_dir(self) / "overlay.png"
        overlays.plot_before_after(images, masks, probs, 1 - probs, path, title="t")
        self.assertEqual(path.read_bytes()[:4], PNG_MAGIC)

    def test_without_checkpoints_gives_a_note(self):
        root = _temp_dir(self)
        run = report_runs.load_run(
            adda_workdir(root, "w", "adda", 0, {"initial": 0.1, "confusion": 0.2})
        )
        note = overlays.render_overlays(run, root / "overlay.png", 4, {})
        self.assertIn("no checkpoints/initial", note)
        self.assertFalse((root / "overlay.png").exists())

    def test_restores_criterion_checkpoints(self):
        root = _temp_dir(self)
        workdir = adda_workdir(root, "w", "adda", 0, {"initial": 0.1, "confusion": 0.2})
        config = json.loads((workdir / "config.json").read_text())
        config["task"] = f"{__name__}:TinyOverlayTask"
        (workdir / "config.json").write_text(json.dumps(config))
        model = models.create(TINY_UNET)
        shape = (1, OVERLAY_IMAGE_SIDE, OVERLAY_IMAGE_SIDE, 1)
        # Random variables of the model's shapes (model.init compiles every initializer: slow).
        shapes = jax.eval_shape(
            lambda key: model.init(key, np.zeros(shape, np.float32), False), jax.random.PRNGKey(0)
        )
        rng = np.random.default_rng(2)
        data = TinyOverlayTask().load_data(None).target["test"]
        apply = jax.jit(lambda variables, images: model.apply(variables, images, train=False))
        recorded_f1 = {}
        for step, criterion in enumerate(("initial", "confusion")):
            variables = jax.tree.map(
                lambda leaf: rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32), shapes
            )
            checkpointer = ocp.StandardCheckpointer()
            checkpointer.save(
                (workdir / "checkpoints" / criterion / str(step) / "state"), variables
            )
            checkpointer.wait_until_finished()
            logits = np.asarray(apply(variables, data["image"]))
            recorded_f1[criterion] = float(
                np.mean([_dice(lg > 0, m > 0) for lg, m in zip(logits, data["mask"], strict=True)])
            )
        results = json.loads((workdir / "results.json").read_text())
        results["criteria"]["confusion"]["test"]["f1"] = recorded_f1["confusion"]
        (workdir / "results.json").write_text(json.dumps(results))

        path = root / "overlay.png"
        note = overlays.render_overlays(report_runs.load_run(workdir), path, 3, {})
        self.assertIsNone(note)
        self.assertEqual(path.read_bytes()[:4], PNG_MAGIC)

        results["criteria"]["confusion"]["test"]["f1"] = recorded_f1["confusion"] + 0.5
        (workdir / "results.json").write_text(json.dumps(results))
        note = overlays.render_overlays(report_runs.load_run(workdir), path, 3, {})
        self.assertIn("differs from results.json", note)


def folds_workdir(root: pathlib.Path, name: str, finished_folds: int = 2) -> pathlib.Path:
    """A segmentation run of 2 folds x seeds 0, 1 (layout of folds.run_all_folds): fold 0 tests
    patients a (2 images) and b, fold 1 patient c; seed s scores model F1 0.6, 0.4, 0.2 and 0.8
    plus s / 10, the threshold 0.3 on every image; accuracy 0.9 and 0.7, AUC 0.8 and 0.6."""
    base = {
        "experiment": "segment",
        "seed": 0,
        "num_seeds": 2,
        "num_epochs": 3,
        "data": {
            "source": "dicom",
            "path": "/data/sts_ibsi/dicom",
            "modality": "CT",
            "seed": 0,
            "num_folds": 2,
            "fold": None,
        },
        "model": dict(TINY_UNET),
    }
    workdir = _write(root / name, base, None)
    tested = {0: (["a", "a", "b"], [0.6, 0.4, 0.2], 0.9, 0.8), 1: (["c"], [0.8], 0.7, 0.6)}
    for fold in range(finished_folds):
        keys, f1, accuracy, auc = tested[fold]
        fold_config = {**base, "data": {**base["data"], "fold": fold}}
        fold_dir = _write(
            workdir / f"fold_{fold}", fold_config, {"seed_workdirs": ["seed_0", "seed_1"]}
        )
        for seed in (0, 1):
            per_image = [value + seed / 10 for value in f1]
            results = {
                "modality": "CT",
                "seed": seed,
                "test": _metrics(float(np.mean(per_image)), accuracy, auc),
                "test_per_image": {"patient_key": keys, "f1": per_image},
                "baseline_threshold": {
                    "test": _metrics(0.3, 0.5, 0.5),
                    "test_per_image": {"patient_key": keys, "f1": [0.3] * len(keys)},
                },
                "epochs": 3,
                "train_wall_time_s": 10.0,
            }
            seed_config = {**fold_config, "seed": seed, "num_seeds": 1}
            _write(fold_dir / f"seed_{seed}", seed_config, results)
    return workdir


class CrossValidatedReportTest(absltest.TestCase):
    def test_a_folds_run_is_one_pooled_run_per_seed(self):
        workdir = folds_workdir(_temp_dir(self), "folds")
        runs, warnings = report_runs.load_runs([workdir])
        self.assertEqual(warnings, [])
        self.assertEqual([run.seed for run in runs], [0, 1])
        for run in runs:
            self.assertEqual([fold_run.fold for fold_run in run.fold_runs], [0, 1])
            self.assertEqual(run.workdir, workdir)
            self.assertIn("2 folds", run.description)
        # Seed 0 over all 4 test images: (0.6 + 0.4 + 0.2 + 0.8) / 4; accuracy over all pixels
        # (0.9 * 3 + 0.7) / 4; AUC the mean over folds.
        test = runs[0].results["test"]
        self.assertAlmostEqual(test["f1"], 0.5)
        self.assertAlmostEqual(test["accuracy"], 0.85)
        self.assertAlmostEqual(test["auc"], 0.7)
        self.assertAlmostEqual(runs[1].results["test"]["f1"], 0.6)
        self.assertEqual(runs[0].results["test_per_image"]["patient_key"], ["a", "a", "b", "c"])
        self.assertEqual(
            runs[0].results["cross_validation"]["patients"],
            {
                "a": {"fold": 0, "test_images": 2},
                "b": {"fold": 0, "test_images": 1},
                "c": {"fold": 1, "test_images": 1},
            },
        )

    def test_tables_and_box_plots(self):
        root = _temp_dir(self)
        workdir = folds_workdir(root, "folds")
        status, stderr = _run_main([str(workdir), "--out", str(root / "report")])
        self.assertEqual(status, 0, stderr)
        markdown = (root / "report" / "segmentation.md").read_text()
        row = _table_row(markdown, "dicom:sts_ibsi/dicom", "CT", "U-Net (ours)")
        # Pooled F1 0.5 and 0.6 over seeds; accuracy 0.85, AUC 0.7 for both.
        self.assertEqual(row[3:7], ["2", "0.550 ± 0.071", "0.850 ± 0.000", "0.700 ± 0.000"])
        self.assertIn("2 folds", row[8])
        patients = (root / "report" / "patients_segmentation.md").read_text()
        # Patient a: seed 0 (0.6 + 0.4) / 2 = 0.5, seed 1 0.6; b 0.2, 0.3; c 0.8, 0.9.
        for key, fold, images, model in (
            ("a", "0", "2", "0.550 ± 0.071"),
            ("b", "0", "1", "0.250 ± 0.071"),
            ("c", "1", "1", "0.850 ± 0.071"),
        ):
            self.assertEqual(
                _table_row(patients, "dicom:sts_ibsi/dicom", "CT", key)[3:],
                [fold, images, model, "0.300 ± 0.000"],
            )
        # Over patients: the seed means 0.55, 0.25, 0.85 -> 0.55 ± 0.30; over all test images
        # the main table's figure.
        over_patients = "all patients (± sd over patients)"
        self.assertEqual(
            _table_row(patients, "dicom:sts_ibsi/dicom", "CT", over_patients)[5:],
            ["0.550 ± 0.300 (n=3)", "0.300 ± 0.000 (n=3)"],
        )
        over_images = "all test images (± sd over seeds)"
        self.assertEqual(
            _table_row(patients, "dicom:sts_ibsi/dicom", "CT", over_images)[4:],
            ["4", "0.550 ± 0.071 (n=2)", "0.300 ± 0.000 (n=2)"],
        )
        figure = root / "report" / "figures" / "patients_dicom_sts_ibsi_dicom__CT.png"
        self.assertEqual(figure.read_bytes()[:4], PNG_MAGIC)
        self.assertIn("patients_segmentation.md", (root / "report" / "index.md").read_text())

    def test_an_unfinished_fold_skips_the_folds_run(self):
        root = _temp_dir(self)
        workdir = folds_workdir(root, "folds", finished_folds=1)
        other = segmentation_workdir(root, "other", "PT", 0, _metrics(0.5, 0.9, 0.9), 0.3)
        status, stderr = _run_main([str(workdir), str(other), "--out", str(root / "report")])
        self.assertEqual(status, 0, stderr)
        self.assertEqual(
            stderr.strip().splitlines(),
            [f"warning: skipping {workdir}: fold 1 of 2 has not finished"],
        )
        self.assertFalse((root / "report" / "patients_segmentation.md").exists())


if __name__ == "__main__":
    absltest.main()
