"""Tests for the label-free model selection benchmark (sarcoma_jax/report/selection.py): its
per-run numbers, sign test and degenerate count against hand-computed values, and a
cross-validated run read as one game per fold plus a table pooling the folds."""

import pathlib

import report_test  # tests/: the workdir writer and temporary folder of the report's tests
from absl.testing import absltest

from sarcoma_jax import report
from sarcoma_jax.report import runs as report_runs
from sarcoma_jax.report import selection

# Criteria of the fake runs: the source map, an oracle, the baseline and one label-free rule.
ORACLE = "highest_peak"


def _config(fold=None, num_folds=0) -> dict:
    return {
        "experiment": "adda",
        "task": "segmentation",
        "scheme": "adda",
        "seed": 0,
        "data": {
            "source": "dicom",
            "path": "/data/sts_ibsi/dicom",
            "source_modality": "CT",
            "target_modality": "PT",
            "seed": 0,
            "num_folds": num_folds,
            "fold": fold,
        },
    }


def _criterion(step: int, per_image_f1: list[float], keys: list[str], oracle=False) -> dict:
    f1 = sum(per_image_f1) / len(per_image_f1)
    return {
        "step": step,
        "test": {"f1": f1, "accuracy": 0.9, "auc": 0.8, "zero_ratio": 0.9},
        "test_per_image": {"patient_key": keys, "f1": per_image_f1},
        "val": {"f1": f1},
        "oracle": oracle,
    }


def _history(target_val_f1, confusion_scores, recall_specificity) -> list[dict]:
    rows = [{"phase": "before_da", "step": 0, "target_val_f1": 0.0, "recall": 1.0}]
    for index, (f1, score, (recall, specificity)) in enumerate(
        zip(target_val_f1, confusion_scores, recall_specificity, strict=True)
    ):
        rows.append(
            {
                "phase": "cycle",
                "step": 10 * (index + 1),
                "target_val_f1": f1,
                "confusion_score": score,
                "latest_score": 0.0,  # constant: no correlation defined
                "recall": recall,
                "specificity": specificity,
            }
        )
    return rows


def adda_run(root: pathlib.Path, f1: dict, keys: list[str], fold=None, num_folds=0) -> None:
    """One ADDA run (or one fold's run) whose criteria score `f1[name]` (per-image lists) on
    the test images of patients `keys`; confusion picks step 20, the oracle step 30."""
    steps = {"initial": 0, "confusion": 20, ORACLE: 30, "latest": 40}
    results = {
        "pair": "CT->PT",
        "scheme": "adda",
        "seed": 0,
        "primary_metric": "f1",
        "criteria": {
            name: _criterion(steps[name], values, keys, oracle=name == ORACLE)
            for name, values in f1.items()
        },
        "criteria_not_reached": [],
        "wall_time_s": 5.0,
    }
    history = _history(
        [0.1, 0.3, 0.2, 0.4], [1.0, 2.0, 3.0, 4.0], [(1.0, 0.0), (0.5, 0.5), (0.0, 1.0), (1.0, 1.0)]
    )
    report_test._write(root, _config(fold, num_folds), results, history)


class PerRunTest(absltest.TestCase):
    def test_numbers_of_one_run_by_hand(self):
        workdir = report_test._temp_dir(self) / "run"
        adda_run(
            workdir,
            {"initial": [0.3], "confusion": [0.5], ORACLE: [0.6], "latest": [0.4]},
            ["a"],
        )
        (run,), _ = report_runs.load_runs([workdir])
        numbers = selection.per_run(run, "confusion")
        self.assertEqual(numbers["step"], 20)
        self.assertAlmostEqual(numbers["test"], 0.5)
        self.assertAlmostEqual(numbers["delta_source"], 0.2)  # 0.5 - 0.3
        self.assertAlmostEqual(numbers["regret"], 0.1)  # 0.6 - 0.5
        # Scores 1, 2, 3, 4 against target val F1 0.1, 0.3, 0.2, 0.4: ranks differ by 1 at two
        # evaluations, rho = 1 - 6 * 2 / (4 * 15) = 0.8 (the before-DA row is left out).
        self.assertAlmostEqual(numbers["spearman"], 0.8)
        self.assertIsNone(selection.per_run(run, "latest")["spearman"])  # a constant score
        # Position: the step over the last evaluated step (40): 20 / 40; the source map 0, the
        # last evaluation 1.
        self.assertAlmostEqual(numbers["position"], 0.5)
        self.assertEqual(selection.per_run(run, "initial")["position"], 0.0)
        self.assertEqual(selection.per_run(run, "latest")["position"], 1.0)
        # (1, 0), (0, 1) and (1, 1) are degenerate, (0.5, 0.5) is not.
        self.assertEqual(selection.degenerate_evaluations(run), (3, 4))

    def test_sign_test_by_hand(self):
        # 3 wins, 1 loss, 1 tie: p = 2 * P(X >= 3 | n=4, 1/2) = 2 * 5 / 16 = 0.625.
        self.assertEqual(selection.sign_test([0.1, 0.2, -0.1, 0.3, 0.0]), "3/1/1, p=0.62")
        self.assertEqual(selection.sign_test([0.0, None]), "0/0/1")


class CrossValidatedSelectionTest(absltest.TestCase):
    def test_games_per_fold_and_the_folds_pooled(self):
        root = report_test._temp_dir(self)
        workdir = root / "folds"
        report_test._write(workdir, _config(num_folds=2), None)
        # Fold 0 tests patient a (2 images) and b; fold 1 patient c.
        fold_f1 = {
            0: {
                "initial": [0.2, 0.2, 0.2],
                "confusion": [0.5, 0.3, 0.4],
                ORACLE: [0.6, 0.6, 0.6],
                "latest": [0.1, 0.1, 0.1],
            },
            1: {"initial": [0.4], "confusion": [0.2], ORACLE: [0.8], "latest": [0.5]},
        }
        keys = {0: ["a", "a", "b"], 1: ["c"]}
        for fold in (0, 1):
            adda_run(workdir / f"fold_{fold}", fold_f1[fold], keys[fold], fold, num_folds=2)
        report.main([str(workdir), "--out", str(root / "R"), "--no-overlays"])
        markdown = (root / "R" / "selection.md").read_text()
        games, pooled = markdown.split("### Folds pooled")

        def row(text: str, label: str) -> list[str]:
            (line,) = [line for line in text.splitlines() if line.startswith(f"| {label} |")]
            return [cell.strip() for cell in line.strip("|").split("|")]

        # Games: fold 0 confusion 0.4 (Δ source +0.2, regret 0.2), fold 1 0.2 (-0.2, 0.6).
        self.assertEqual(
            row(games, "confusion stop")[1:5],
            ["2", "0.300 ± 0.141", "0.000 ± 0.283", "0.400 ± 0.283"],
        )
        self.assertIn("0.80 ± 0.00 (n=2)", row(games, "confusion stop")[5])
        # Position, median (quartiles) over the games: step 20 of 40 in both, the oracle 30 of 40.
        self.assertEqual(row(games, "confusion stop")[8], "0.50 (0.50-0.50)")
        self.assertEqual(row(games, "highest peak (oracle)")[8], "0.75 (0.75-0.75)")
        # Folds pooled, every test image once: confusion (0.5 + 0.3 + 0.4 + 0.2) / 4 = 0.35;
        # the source map 0.25; the oracle 0.65.
        self.assertEqual(row(pooled, "confusion stop")[1:5], ["1", "0.350", "0.100", "0.300"])
        self.assertLen(row(pooled, "confusion stop"), 8)  # no position: the folds' are above
        self.assertIn("fold 0", markdown)
        figures = sorted((root / "R" / "figures" / "selection").glob("*fold_*.png"))
        self.assertLen(figures, 2)
        for figure in figures:
            self.assertEqual(figure.read_bytes()[:4], report_test.PNG_MAGIC)
        # Target val over the game, both folds' games, with the criteria's median picks.
        (trajectory,) = (root / "R" / "figures" / "selection").glob("trajectory_*.png")
        self.assertEqual(trajectory.read_bytes()[:4], report_test.PNG_MAGIC)
        self.assertIn(f"]({trajectory.relative_to(root / 'R')})", markdown)
        self.assertEqual((root / "R" / "selection.tex").read_text().count(r"\begin{table}"), 2)


if __name__ == "__main__":
    absltest.main()
