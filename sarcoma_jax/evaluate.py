"""External validation: predict every contoured series of the model's domain and score it in 3D.

python -m sarcoma_jax.evaluate --workdir W --dicom_dir D --out_dir O [--checkpoint NAME|all]
    [--threshold 0.5] [--rois GTV_Mass,GTV] [--batch_size 32] [--patient_salt SALT]

The prediction path is predict's (sarcoma_jax.predict): the same model loading, series finding,
preprocessing, batches and mapping back onto the original grid. The truth is the RTSTRUCT the
ingest would link to each series (referenced series UID, contour image UIDs, then frame of
reference and geometry) with the ROI its name patterns choose, rasterised by the ingest's own
even-odd fill. Per series (one row per patient and series):
  dice_3d          Dice of the 3D masks at the original resolution
  hd95_mm          95th percentile of the symmetric surface distances (medpy; None when a mask is
                   empty), in mm, with the series' row, column and slice spacing
  volume_ml, volume_true_ml   predicted and true volume
  f1               the training resolution's per-slice F1 as results.json defines it (mean over
                   the slices the run selects, tumour slices by default, of the per-slice Dice of
                   the model-grid prediction against the nearest-neighbour resized truth)
  f1_original      the same per-slice F1 at the original resolution: the mean over the same slices
                   of the per-slice Dice of the thresholded prediction on the series' own grid
                   against the rasterised truth; unlike f1, comparable between runs trained at
                   different image sizes (f1 scores each against its own resized truth)
  f1_results_json  that patient's mean per-slice test F1 in the run's results.json, when the
                   patient was in its test split (else None)
  slices_predicted, slices_true   slices with predicted / true tumour (of `slices`): a model
                   trained on tumour slices only (the default) has never seen a slice without
                   tumour, which the 3D scores show and the per-slice F1 does not
Outputs: O/evaluation.json {"per_patient": [...], "summary": {checkpoint: {...}}, "model": ...},
O/evaluation.md, O/evaluation_boxplot.png and O/overlays/<checkpoint>/<series>.png (prediction red,
truth orange).
"""

from __future__ import annotations

import collections
import json
import math
import os
import pathlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import medpy.metric.binary
import numpy as np
from absl import app, flags

from data_pipeline import dicom_io, ingest, rtstruct, series_finder
from data_pipeline import preprocess as preprocess_lib
from data_pipeline.dicom_io import InputProblem, Series
from sarcoma_jax import metrics, prediction_figures
from sarcoma_jax.predict import (
    LoadedModel,
    PredictError,
    Prediction,
    Predictor,
    available_checkpoints,
    define_common_flags,
    load_model,
    quiet_libraries,
    require_flags,
    scan_folder,
    series_folder_name,
    slice_thickness_mm,
    volume_ml,
)

ROW_KEYS = (
    "checkpoint",
    "patient_key",
    "series_uid",
    "dice_3d",
    "hd95_mm",
    "volume_ml",
    "volume_true_ml",
    "f1",
    "f1_original",
    "f1_results_json",
    "roi_name",
    "linked_by",
    "slices",
    "slices_predicted",
    "slices_true",
)


def dice_3d(prediction: np.ndarray, truth: np.ndarray) -> float:
    """2 |P & T| / (|P| + |T|) over the whole volume; 1.0 when both are empty."""
    prediction, truth = np.asarray(prediction, bool), np.asarray(truth, bool)
    total = int(np.count_nonzero(prediction)) + int(np.count_nonzero(truth))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(prediction & truth)) / total


def hd95_mm(prediction: np.ndarray, truth: np.ndarray, spacing_mm: Sequence[float]) -> float | None:
    """95th percentile Hausdorff distance (mm) by medpy; None when either mask is empty.

    medpy (medpy.metric.binary.hd95): the surface voxels of each mask (the mask minus its erosion)
    and their Euclidean distance transforms with the voxel spacing; the 95th percentile of the
    distances in both directions. Chosen over DeepMind's surface-distance (not released on PyPI
    by its authors), MONAI (needs torch) and seg-metrics/pymia (SimpleITK pipelines around the
    same definition): a small, long-used implementation of the definition challenges report.

    Args:
      prediction, truth: bool (slices, rows, cols).
      spacing_mm: (slice, row, column) spacing.
    """
    if not np.any(prediction) or not np.any(truth):
        return None
    # Both masks within one voxel of margin: the same surfaces and distances as the whole volume
    # (a mask that touches the volume's edge touches the crop's there too), at a fraction of the
    # distance transform's cost.
    union = np.argwhere(prediction | truth)
    low = np.maximum(union.min(axis=0) - 1, 0)
    high = np.minimum(union.max(axis=0) + 2, prediction.shape)
    crop = tuple(slice(a, b) for a, b in zip(low, high, strict=True))
    return float(
        medpy.metric.binary.hd95(prediction[crop], truth[crop], voxelspacing=tuple(spacing_mm))
    )


def training_resolution_f1(
    prediction: Prediction, truth: np.ndarray, tumour_only: bool = True
) -> float | None:
    """results.json's F1 on one series: the mean per-slice Dice at the training resolution.

    The truth goes through the training's nearest-neighbour resize; slices are those the run
    selects (those with tumour when ``tumour_only``, as the default config). None when no slice is
    selected.
    """
    size = prediction.model_probabilities.shape[-1]
    chosen = np.flatnonzero(truth.any(axis=(1, 2))) if tumour_only else np.arange(len(truth))
    if chosen.size == 0:
        return None
    small_truth = np.stack([preprocess_lib.resize_nearest(truth[k], size) for k in chosen])
    small_prediction = prediction.model_probabilities[chosen] >= prediction.threshold
    return float(np.mean(metrics.dice_per_image(small_prediction, small_truth)))


def original_resolution_f1(
    prediction: Prediction, truth: np.ndarray, tumour_only: bool = True
) -> float | None:
    """training_resolution_f1's slices and mean, scored on the series' own grid: the prediction
    mapped back (prediction.mask) against the rasterised truth. None when no slice is selected."""
    chosen = np.flatnonzero(truth.any(axis=(1, 2))) if tumour_only else np.arange(len(truth))
    if chosen.size == 0:
        return None
    return float(np.mean(metrics.dice_per_image(prediction.mask[chosen], truth[chosen])))


def evaluate_dicom_dir(
    workdir: str | os.PathLike,
    dicom_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    checkpoint: str | None = None,
    threshold: float = 0.5,
    roi_patterns: Sequence[str] = rtstruct.DEFAULT_ROI_PATTERNS,
    batch_size: int = 32,
    patient_salt: str | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The evaluate command; returns what it writes to O/evaluation.json.

    Raises:
      PredictError: a bad workdir, checkpoint or folder, or no contoured series of the domain.
    """
    log = log or (lambda line: print(line, file=sys.stderr))
    if not 0.0 < threshold < 1.0:
        raise PredictError(f"--threshold must lie strictly between 0 and 1, got {threshold}")
    names = available_checkpoints(workdir) if checkpoint == "all" else [checkpoint]
    if not names:
        raise PredictError(f"{workdir}: no checkpoints")
    models = [load_model(workdir, name) for name in names]
    domain = models[0].domain
    scan = scan_folder(dicom_dir, log)
    truths = series_finder.link_rtstructs(scan, roi_patterns, log)
    chosen = [h for h in scan.series_of(domain) if h[0].series_instance_uid in truths]
    if not chosen:
        raise PredictError(
            f"{scan.dicom_dir}: no {domain} series with a linked RTSTRUCT matching "
            f"{list(roi_patterns)} ({len(scan.series_of(domain))} {domain} series, "
            f"{len(scan.rtstructs)} RTSTRUCT files)"
        )
    predictors = [Predictor(model, batch_size) for model in models]
    out_dir = pathlib.Path(out_dir)
    rows = []
    for headers in chosen:
        uid = headers[0].series_instance_uid
        key = ingest.patient_key(headers[0].patient_id, patient_salt)
        structure, roi_name, how = truths[uid]
        try:
            series = dicom_io.load_series_from_headers(headers)
            thickness = slice_thickness_mm(series)
        except InputProblem as problem:
            log(f"{scan.relative(problem.path or scan.dicom_dir)}: {problem.reason}; skipped")
            continue
        truth, warnings = rtstruct.rasterise(
            structure.rois[roi_name], series, roi_name, scan.relative(structure.path)
        )
        for warning in warnings:
            log(warning)
        for predictor in predictors:
            try:
                prediction = predictor.predict(series, threshold)
            except InputProblem as problem:
                log(f"{scan.relative(problem.path)}: {problem.reason}; skipped")
                break
            row = _score(prediction, truth, series, thickness, predictor.model)
            row.update(patient_key=key, series_uid=uid, roi_name=roi_name, linked_by=how)
            rows.append({name: row[name] for name in ROW_KEYS})
            overlay = out_dir / "overlays" / predictor.model.checkpoint
            overlay.mkdir(parents=True, exist_ok=True)
            prediction_figures.plot_overview(
                series.pixels,
                prediction.mask,
                overlay / f"{series_folder_name(key, domain, uid)}.png",
                pixel_spacing=series.pixel_spacing,
                title=f"{key} {domain} ({predictor.model.checkpoint}): Dice {row['dice_3d']:.3f}",
                truth=truth,
            )
    if not rows:
        raise PredictError(f"{scan.dicom_dir}: no series could be evaluated")
    evaluation = {
        "per_patient": rows,
        "summary": {model.checkpoint: summarise(rows, model) for model in models},
        "model": {
            "workdir": models[0].workdir.name,
            "kind": models[0].kind,
            "domain": domain,
            "image_size": models[0].image_size,
            "threshold": threshold,
            "steps": {model.checkpoint: model.step for model in models},
            "training_git_commit": models[0].training_commit,
        },
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "evaluation.json").write_text(json.dumps(evaluation, indent=2) + "\n")
    (out_dir / "evaluation.md").write_text(render_markdown(evaluation))
    prediction_figures.plot_evaluation_boxes(rows, out_dir / "evaluation_boxplot.png")
    return evaluation


def _scored_test(model: LoadedModel) -> Mapping[str, Any]:
    """What the run's results.json says of this checkpoint on its test split ({} if nothing)."""
    if model.kind == "segmentation":
        return model.results if model.checkpoint == "best" else {}
    return model.results.get("criteria", {}).get(model.checkpoint, {})


def results_test_f1(model: LoadedModel) -> float | None:
    """The run's test F1 for this checkpoint (results.json), when recorded."""
    f1 = _scored_test(model).get("test", {}).get("f1")
    return None if f1 is None else float(f1)


def results_test_f1_per_patient(model: LoadedModel) -> dict[str, float]:
    """Mean per-slice test F1 of each test patient in results.json (this checkpoint)."""
    per_image = _scored_test(model).get("test_per_image", {})
    scores = collections.defaultdict(list)
    for key, f1 in zip(per_image.get("patient_key", []), per_image.get("f1", []), strict=True):
        scores[key].append(f1)
    return {key: float(np.mean(values)) for key, values in scores.items()}


def _score(
    prediction: Prediction,
    truth: np.ndarray,
    series: Series,
    thickness: float | None,
    model: LoadedModel,
) -> dict[str, Any]:
    mask = prediction.mask
    row_spacing, col_spacing = series.pixel_spacing
    return {
        "checkpoint": model.checkpoint,
        "dice_3d": dice_3d(mask, truth),
        "hd95_mm": hd95_mm(mask, truth, (thickness or 1.0, row_spacing, col_spacing)),
        "volume_ml": volume_ml(mask, series, thickness),
        "volume_true_ml": volume_ml(truth, series, thickness),
        "f1": training_resolution_f1(prediction, truth, model.tumour_only),
        "f1_original": original_resolution_f1(prediction, truth, model.tumour_only),
        "f1_results_json": results_test_f1_per_patient(model).get(
            ingest.patient_key(series.patient_id, None)
        ),
        "slices": int(mask.shape[0]),
        "slices_predicted": int(np.count_nonzero(mask.any(axis=(1, 2)))),
        "slices_true": int(np.count_nonzero(truth.any(axis=(1, 2)))),
    }


def _stats(values: Sequence[float | None]) -> dict[str, float | int | None]:
    defined = np.array([v for v in values if v is not None], np.float64)
    if defined.size == 0:
        return {"n": 0, "mean": None, "median": None, "sd": None, "min": None, "max": None}
    return {
        "n": int(defined.size),
        "mean": float(defined.mean()),
        "median": float(np.median(defined)),
        "sd": float(defined.std(ddof=1)) if defined.size > 1 else 0.0,
        "min": float(defined.min()),
        "max": float(defined.max()),
    }


def summarise(rows: Sequence[Mapping[str, Any]], model: LoadedModel) -> dict[str, Any]:
    """Per-checkpoint statistics over its rows (None values left out and counted)."""
    mine = [row for row in rows if row["checkpoint"] == model.checkpoint]
    volume_errors = [
        row["volume_ml"] - row["volume_true_ml"]
        for row in mine
        if row["volume_ml"] is not None and row["volume_true_ml"] is not None
    ]
    return {
        "series": len(mine),
        "patients": len({row["patient_key"] for row in mine}),
        "step": model.step,
        "dice_3d": _stats([row["dice_3d"] for row in mine]),
        "hd95_mm": _stats([row["hd95_mm"] for row in mine]),
        "hd95_undefined": sum(row["hd95_mm"] is None for row in mine),
        "volume_error_ml": _stats(volume_errors),
        "f1": _stats([row["f1"] for row in mine]),
        "f1_original": _stats([row["f1_original"] for row in mine]),
        "results_json_test_f1": results_test_f1(model),
    }


def _cell(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def render_markdown(evaluation: Mapping[str, Any]) -> str:
    """evaluation.md: what was evaluated, a summary per checkpoint and one row per patient."""
    model = evaluation["model"]
    lines = [
        f"# External validation of `{model['workdir']}` ({model['kind']}, {model['domain']})",
        "",
        f"Threshold {model['threshold']}, training resolution {model['image_size']} px. Dice and "
        "HD95 in 3D at the original resolution; f1 = results.json's per-slice F1 at the training "
        "resolution; f1 original = the same slices' F1 at the original resolution (comparable "
        "across training resolutions); f1 (results.json) = the run's own test value for the "
        "patient, when it was a test patient.",
        "",
        "| checkpoint | series | Dice 3D mean ± sd | median | HD95 mm median | HD95 undefined "
        "| volume error ml mean | f1 mean | f1 original mean | results.json test F1 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, summary in evaluation["summary"].items():
        dice, hd95 = summary["dice_3d"], summary["hd95_mm"]
        lines.append(
            f"| {name} | {summary['series']} | {_cell(dice['mean'])} ± {_cell(dice['sd'])} "
            f"| {_cell(dice['median'])} | {_cell(hd95['median'], 1)} | {summary['hd95_undefined']} "
            f"| {_cell(summary['volume_error_ml']['mean'], 1)} | {_cell(summary['f1']['mean'])} "
            f"| {_cell(summary['f1_original']['mean'])} "
            f"| {_cell(summary['results_json_test_f1'])} |"
        )
    lines += [
        "",
        "| checkpoint | patient | Dice 3D | HD95 mm | volume ml | true ml | f1 | f1 original "
        "| f1 (results.json) | slices with tumour: predicted / true / all | ROI | linked by |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in evaluation["per_patient"]:
        lines.append(
            f"| {row['checkpoint']} | {row['patient_key']} | {_cell(row['dice_3d'])} "
            f"| {_cell(row['hd95_mm'], 1)} | {_cell(row['volume_ml'], 1)} "
            f"| {_cell(row['volume_true_ml'], 1)} | {_cell(row['f1'])} "
            f"| {_cell(row['f1_original'])} | {_cell(row['f1_results_json'])} "
            f"| {row['slices_predicted']} / {row['slices_true']} / {row['slices']} "
            f"| {row['roi_name']} | {row['linked_by']} |"
        )
    return "\n".join(lines) + "\n"


FLAGS = flags.FLAGS


def _define_flags() -> None:
    define_common_flags()
    flags.DEFINE_string(
        "checkpoint",
        None,
        "As predict's --checkpoint, or 'all': every checkpoint the run has.",
    )
    flags.DEFINE_list(
        "rois", list(rtstruct.DEFAULT_ROI_PATTERNS), "ROI name patterns, in order of preference."
    )


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {' '.join(argv[1:])}")
    require_flags("workdir", "dicom_dir", "out_dir")
    quiet_libraries()
    try:
        evaluation = evaluate_dicom_dir(
            FLAGS.workdir,
            FLAGS.dicom_dir,
            FLAGS.out_dir,
            checkpoint=FLAGS.checkpoint,
            threshold=FLAGS.threshold,
            roi_patterns=FLAGS.rois,
            batch_size=FLAGS.batch_size,
            patient_salt=FLAGS.patient_salt,
        )
    except PredictError as error:
        sys.exit(f"error: {error}")
    for name, summary in evaluation["summary"].items():
        dice = summary["dice_3d"]
        print(
            f"{name}: {summary['series']} series, 3D Dice {_cell(dice['mean'])} ± "
            f"{_cell(dice['sd'])} (median {_cell(dice['median'])}), HD95 median "
            f"{_cell(summary['hd95_mm']['median'], 1)} mm; see "
            f"{pathlib.Path(FLAGS.out_dir) / 'evaluation.md'}"
        )


if __name__ == "__main__":
    _define_flags()
    app.run(main)
