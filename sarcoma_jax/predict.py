"""Apply a trained segmenter or ADDA target map to new DICOM: DICOM-SEG, RTSTRUCT, NIfTI, PNG.

python -m sarcoma_jax.predict --workdir W --dicom_dir D --out_dir O [--checkpoint NAME]
    [--series_uid UID] [--threshold 0.5] [--formats seg,rtstruct,nifti,png] [--batch_size 32]
    [--patient_salt SALT]

W is a segmentation run (its best-validation checkpoint; `--checkpoint latest` for the last) or an
ADDA run (the target map of one stopping criterion, `DEFAULT_ADDA_CRITERION` unless --checkpoint
names another). Every image series in D of the model's domain (the segmentation run's modality, the
ADDA run's target modality) is found by the ingest's own header reader and classifier, whatever the
folder layout. Every slice is preprocessed exactly as in training (physical units, nearest-neighbour
resize, min-max to [0, 1]) and predicted in batches by one jit-compiled function; the
probabilities are interpolated back onto the series' own pixel grid and thresholded. Each series
gets O/<patient key>_<domain>_<series hash>/ with seg.dcm (DICOM-SEG), rtstruct.dcm, mask.nii.gz,
overview.png and prediction.json. Problems with the input are one line each; a bad file or series
is skipped and the others are still written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import pathlib
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pydicom
from absl import app, flags, logging

from data_pipeline import dicom_io, ingest, nifti_writer, rtstruct_writer, seg_writer
from data_pipeline import preprocess as preprocess_lib
from data_pipeline.datasets import DatasetError, canonical_domain
from data_pipeline.dicom_io import InputProblem, Series
from data_pipeline.series_finder import DicomScan, scan_dicom_dir, series_domain
from data_pipeline.vocabulary import MR_SEQUENCES
from sarcoma_jax import checkpoints, models, prediction_figures, provenance
from sarcoma_jax.adda import criteria as criteria_lib

# The ADDA stopping criterion whose target map predicts when --checkpoint is not given. The
# README's recommendation (section "Prediction on new patients") sets it: change both together.
# The criterion the README recommends (the tables' ADDA column): the default for an ADDA run.
DEFAULT_ADDA_CRITERION = criteria_lib.RECOMMENDED
SEGMENTATION_CHECKPOINTS = ("best", "latest")
FORMATS = ("seg", "rtstruct", "nifti", "png")
DEFAULT_THRESHOLD = 0.5
DEFAULT_BATCH_SIZE = 32
OUTPUT_FILES = {
    "seg": "seg.dcm",
    "rtstruct": "rtstruct.dcm",
    "nifti": "mask.nii.gz",
    "png": "overview.png",
}


class PredictError(Exception):
    """A problem that stops the whole run (workdir, checkpoint, data folder); one line."""


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A trained map, ready to predict, and where it came from.

    Attributes:
      module: the flax U-Net (sarcoma_jax.models.create of the run's config.model).
      variables: {'params', 'batch_stats'}.
      image_size: the training resolution (config.data.image_size).
      domain: what it segments: 'CT', 'PT', 'T1', 'T2' or 'STIR'.
      kind: 'segmentation' or 'adda'.
      checkpoint: 'best' / 'latest' (segmentation) or the ADDA stopping criterion.
      step: the checkpoint's step.
      workdir: the run's folder.
      state_dir: the checkpoint's orbax folder.
      eval_batch_stats: the model normalises with each batch's own statistics (reference mode).
      tumour_only: the run trained and scored on tumour slices only (config.data.tumour_only).
      training_commit: git commit of the code that trained it (provenance.json), if known.
      results: the run's results.json ({} when absent).
    """

    module: nn.Module
    variables: Mapping[str, Any]
    image_size: int
    domain: str
    kind: str
    checkpoint: str
    step: int
    workdir: pathlib.Path
    state_dir: pathlib.Path
    eval_batch_stats: bool
    tumour_only: bool
    training_commit: str | None
    results: Mapping[str, Any]

    def algorithm(self, threshold: float) -> seg_writer.Algorithm:
        """The algorithm identification written into the SEG."""
        what = "segmenter" if self.kind == "segmentation" else f"ADDA target map ({self.domain})"
        criterion = {"best": "best_val_f1"}.get(self.checkpoint, self.checkpoint)
        return seg_writer.Algorithm(
            name=f"sarcoma_jax U-Net {what}"[:64],
            version=package_version(),
            model_name=f"U-Net {self.domain} {self.image_size}px"[:64],
            parameters={
                "git_commit": self.training_commit or "unknown",
                "predict_git_commit": provenance.git_state()["commit"] or "unknown",
                "workdir": self.workdir.name,
                "checkpoint": f"checkpoints/{self.checkpoint}/{self.step}",
                "criterion": criterion,
                "domain": self.domain,
                "image_size": str(self.image_size),
                "threshold": f"{threshold:g}",
            },
        )


def package_version() -> str:
    try:
        return importlib.metadata.version("sarcoma_jax")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _run_config(workdir: str | os.PathLike) -> tuple[pathlib.Path, dict, str, str]:
    """(workdir, its config.json, kind 'segmentation'|'adda', the domain its map segments).

    Raises:
      PredictError: not a training workdir, or a num_seeds run's top folder.
    """
    workdir = pathlib.Path(workdir).expanduser()
    if not workdir.is_dir():
        raise PredictError(f"{workdir}: no such workdir")
    config_path = workdir / "config.json"
    if not config_path.is_file():
        raise PredictError(f"{workdir}: no config.json; not a training workdir")
    try:
        config = json.loads(config_path.read_text())
        model, image_size = config["model"], int(config["data"]["image_size"])
    except (ValueError, KeyError, TypeError) as error:
        raise PredictError(f"{config_path}: malformed ({type(error).__name__}: {error})") from None
    if not isinstance(model, dict) or image_size < 1:
        raise PredictError(f"{config_path}: malformed (model or data.image_size)")
    seeds = sorted(p.name for p in workdir.glob("seed_*") if p.is_dir())
    if seeds and (config.get("num_seeds") or 1) > 1:
        raise PredictError(
            f"{workdir} is a num_seeds run; pass one seed's run: "
            + ", ".join(str(workdir / s) for s in seeds)
        )
    experiment = config.get("experiment")
    field = {"segment": "modality", "adda": "target_modality"}.get(experiment)
    if field is None:
        raise PredictError(
            f"{workdir}: config.json's experiment {experiment!r} is neither a segmentation "
            "nor an ADDA run"
        )
    try:
        domain = canonical_domain(config.get("data", {}).get(field, ""))
    except DatasetError as error:
        raise PredictError(f"{config_path}: config.data.{field}: {error}") from None
    return workdir, config, "segmentation" if experiment == "segment" else "adda", domain


def checkpoint_names(kind: str, workdir: pathlib.Path | None = None) -> tuple[str, ...]:
    """The checkpoints a run of this kind can hold: best/latest, or the criteria an ADDA run ran
    (its config's `criteria`; the registry's when the config predates them)."""
    if kind == "segmentation":
        return SEGMENTATION_CHECKPOINTS
    config_path = None if workdir is None else pathlib.Path(workdir) / "config.json"
    if config_path is not None and config_path.is_file():
        names = json.loads(config_path.read_text()).get("criteria")
        if names:
            return tuple(names)
    return criteria_lib.DEFAULT


def available_checkpoints(workdir: str | os.PathLike) -> list[str]:
    """The checkpoints a run holds (segmentation: best, latest; ADDA: each reached criterion).

    Raises:
      PredictError: as load_model, for a bad workdir.
    """
    workdir, _, kind, _ = _run_config(workdir)
    return [
        name
        for name in checkpoint_names(kind, workdir)
        if checkpoints.latest_step(workdir / "checkpoints" / name) is not None
    ]


def load_model(workdir: str | os.PathLike, checkpoint: str | None = None) -> LoadedModel:
    """Loads the map a segmentation or ADDA workdir holds (the one place models are loaded).

    Args:
      workdir: a segmentation run (W/checkpoints/best|latest/<step>/state, a TrainState) or an
        ADDA run (W/checkpoints/<criterion>/<step>/state, the target map's variables). One seed's
        folder W/seed_<s> of a num_seeds run is such a run too.
      checkpoint: 'best' (default) or 'latest' for segmentation; a stopping criterion for ADDA
        (default DEFAULT_ADDA_CRITERION).

    Raises:
      PredictError: not a workdir, a num_seeds run's top folder, no checkpoint, a criterion the run
        did not reach, or a checkpoint that does not fit the run's model config.
    """
    workdir, config, kind, domain = _run_config(workdir)
    data = config["data"]
    names = checkpoint_names(kind, workdir)
    default = "best" if kind == "segmentation" else DEFAULT_ADDA_CRITERION
    name = checkpoint or default
    if name not in names:
        raise PredictError(
            f"--checkpoint {name!r} is not a checkpoint of this {kind} run; use one of "
            + ", ".join(names)
        )
    step = checkpoints.latest_step(workdir / "checkpoints" / name)
    if step is None:
        if kind == "adda":
            reached = available_checkpoints(workdir)
            raise PredictError(
                f"{workdir}: stopping criterion {name!r} was not reached in this run "
                f"(reached: {', '.join(reached) or 'none'}); choose one with --checkpoint"
            )
        raise PredictError(
            f"{workdir}: no checkpoint in checkpoints/{name} (has the run saved one yet?)"
        )
    state_dir = workdir / "checkpoints" / name / str(step) / "state"
    try:
        variables = checkpoints.restore_variables(state_dir)
    except Exception as error:  # orbax raises many types for a damaged folder
        raise PredictError(f"{state_dir}: unreadable checkpoint ({type(error).__name__})") from None
    model_config = config["model"]
    module = models.create(model_config)
    image_size = int(data["image_size"])
    _check_fits(module, variables, image_size, state_dir)
    provenance_path = workdir / "provenance.json"
    record = json.loads(provenance_path.read_text()) if provenance_path.is_file() else {}
    results_path = workdir / "results.json"
    return LoadedModel(
        module=module,
        variables=jax.tree.map(jnp.asarray, variables),
        image_size=image_size,
        domain=domain,
        kind=kind,
        checkpoint=name,
        step=step,
        workdir=workdir,
        state_dir=state_dir,
        eval_batch_stats=bool(model_config.get("eval_batch_stats", False)),
        tumour_only=bool(data.get("tumour_only", True)),
        training_commit=(record.get("git") or {}).get("commit"),
        results=json.loads(results_path.read_text()) if results_path.is_file() else {},
    )


def _check_fits(module: nn.Module, variables: Mapping, image_size: int, state_dir) -> None:
    expected = jax.eval_shape(
        lambda: module.init(
            jax.random.PRNGKey(0), jnp.zeros((1, image_size, image_size, 1)), train=False
        )
    )
    for collection in ("params", "batch_stats"):
        want = jax.tree.map(lambda x: x.shape, dict(expected.get(collection, {})))
        got = jax.tree.map(np.shape, dict(variables.get(collection, {})))
        if want != got:
            raise PredictError(
                f"{state_dir}: the checkpoint's {collection} do not fit the run's config.model"
            )


# ---------------------------------------------------------------------------------------------
# Series and outputs.


def series_folder_name(patient_key: str, domain: str, series_uid: str) -> str:
    """O/<this>: the pseudonymous patient key, the domain and a short hash of the series UID."""
    safe_key = re.sub(r"[^A-Za-z0-9._-]", "_", patient_key).lstrip("._-") or "patient"
    return f"{safe_key}_{domain}_{hashlib.sha1(series_uid.encode()).hexdigest()[:8]}"


def read_source_headers(series: Series) -> list[pydicom.Dataset]:
    """The series' files read by pydicom without pixels, in the series' order (for the writers)."""
    return [pydicom.dcmread(path, stop_before_pixels=True) for path in series.files]


# ---------------------------------------------------------------------------------------------
# Prediction.


def preprocess_slices(pixels: np.ndarray, image_size: int) -> np.ndarray:
    """Every slice as in training (data_pipeline.preprocess): float32 (n, size, size, 1) in [0, 1].

    Raises:
      ValueError: a slice holds NaN or infinite values.
    """
    return np.stack(
        [
            preprocess_lib.min_max(preprocess_lib.resize_nearest(image, image_size))
            for image in pixels
        ]
    )[..., None]


def upsampling_matrix(size_original: int, size_model: int) -> np.ndarray:
    """(size_original, size_model) linear weights taking one axis of a model-grid map back.

    Why not a resize routine: the model's pixel i saw original pixel nearest_indices(i) (the
    preprocessing's nearest-neighbour map), which for a reduction lies up to half an original pixel
    off the centre a generic resize assumes. Here each model pixel's value is put back at the
    original pixel it was sampled from (several model pixels sampling one original pixel, when
    enlarging, are averaged), and the original pixels between those are interpolated linearly
    (beyond the first and last, the edge value is kept). An equal size gives the identity.
    """
    knots = preprocess_lib.nearest_indices(size_original, size_model)
    unique, inverse = np.unique(knots, return_inverse=True)
    average = np.zeros((unique.size, size_model))
    average[inverse, np.arange(size_model)] = 1.0
    average /= average.sum(axis=1, keepdims=True)
    positions = np.arange(size_original)
    hats = np.stack(
        [np.interp(positions, unique, column) for column in np.eye(unique.size)], axis=1
    )
    return (hats @ average).astype(np.float32)


@dataclasses.dataclass
class Prediction:
    """One series' prediction.

    Attributes:
      series: the series (pixels in physical units, sorted along the normal).
      probabilities: float32 (slices, rows, cols) on the series' own grid.
      model_probabilities: float32 (slices, size, size) at the training resolution.
      threshold: tumour where probabilities >= threshold.
    """

    series: Series
    probabilities: np.ndarray
    model_probabilities: np.ndarray
    threshold: float

    @property
    def mask(self) -> np.ndarray:
        return self.probabilities >= self.threshold


class Predictor:
    """Predicts whole series with one model: fixed-shape batches through one compiled function."""

    def __init__(self, model: LoadedModel, batch_size: int = DEFAULT_BATCH_SIZE):
        if batch_size < 1:
            raise PredictError(f"--batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.batch_size = batch_size
        module, batch_stats_mode = model.module, model.eval_batch_stats

        def probabilities(variables, images):
            if batch_stats_mode:  # the reference's mode: each batch normalised by its statistics
                logits, _ = module.apply(variables, images, train=False, mutable=["batch_stats"])
            else:
                logits = module.apply(variables, images, train=False)
            return jax.nn.sigmoid(logits[..., 0].astype(jnp.float32))

        def upsample(row_weights, col_weights, small):
            return jnp.einsum(
                "rs,bst,ct->brc", row_weights, small, col_weights, precision="highest"
            )

        self._probabilities = jax.jit(probabilities)
        self._upsample = jax.jit(upsample)

    def model_probabilities(self, images: np.ndarray) -> np.ndarray:
        """float32 (n, size, size) for preprocessed images (n, size, size, 1), in order."""
        outputs = []
        for start in range(0, images.shape[0], self.batch_size):
            batch = images[start : start + self.batch_size]
            count = batch.shape[0]
            # Padding keeps one compiled shape; with batch statistics it would enter them, so the
            # last batch then runs at its own size.
            if count < self.batch_size and not self.model.eval_batch_stats:
                padding = np.zeros((self.batch_size - count, *batch.shape[1:]), batch.dtype)
                batch = np.concatenate([batch, padding])
            outputs.append(np.asarray(self._probabilities(self.model.variables, batch))[:count])
        return np.concatenate(outputs)

    def predict(self, series: Series, threshold: float = DEFAULT_THRESHOLD) -> Prediction:
        """Predicts every slice of a series and maps the probabilities onto its grid.

        Raises:
          InputProblem: a slice holds NaN or infinite values.
        """
        try:
            images = preprocess_slices(series.pixels, self.model.image_size)
        except ValueError as error:
            raise InputProblem(series.files[0], f"series not predictable ({error})") from None
        small = self.model_probabilities(images)
        return Prediction(series, self.to_grid(small, series.pixels.shape[1:]), small, threshold)

    def to_grid(self, small: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """Model-grid probabilities (n, size, size) -> float32 (n, rows, cols) on a series' grid
        (``upsampling_matrix`` along each axis, in batches)."""
        row_weights = upsampling_matrix(shape[0], self.model.image_size)
        col_weights = upsampling_matrix(shape[1], self.model.image_size)
        full = np.empty((small.shape[0], *shape), np.float32)
        for start in range(0, small.shape[0], self.batch_size):
            chunk = small[start : start + self.batch_size]
            count = len(chunk)
            if count < self.batch_size:  # one compiled shape per grid
                padding = np.zeros((self.batch_size - count, *chunk.shape[1:]), chunk.dtype)
                chunk = np.concatenate([chunk, padding])
            full[start : start + count] = self._upsample(row_weights, col_weights, chunk)[:count]
        return full


def slice_thickness_mm(
    series: Series, source_datasets: Sequence[pydicom.Dataset] | None = None
) -> float | None:
    """Slice spacing along the normal; for one slice, its SliceThickness (None when absent).

    Args:
      series: the series.
      source_datasets: its headers, if read already (else the one slice's file is read).
    """
    if len(series.sop_instance_uids) > 1:
        return series.slice_spacing
    first = source_datasets[0] if source_datasets else pydicom.dcmread(series.files[0], True)
    thickness = first.get("SliceThickness")
    return float(thickness) if thickness else None


def volume_ml(mask: np.ndarray, series: Series, thickness_mm: float | None) -> float | None:
    """The volume of a mask on the series' grid in millilitres (None without a slice thickness)."""
    if thickness_mm is None:
        return None
    row_spacing, col_spacing = series.pixel_spacing
    return float(np.count_nonzero(mask) * row_spacing * col_spacing * thickness_mm / 1000.0)


# ---------------------------------------------------------------------------------------------
# Writing.


def write_outputs(
    prediction: Prediction,
    source_datasets: Sequence[pydicom.Dataset],
    model: LoadedModel,
    folder: pathlib.Path,
    formats: Iterable[str] = FORMATS,
    patient_key: str = "",
) -> dict[str, Any]:
    """Writes the chosen formats and prediction.json into ``folder``; returns that record."""
    formats = list(formats)
    series, threshold = prediction.series, prediction.threshold
    mask = prediction.mask
    folder.mkdir(parents=True, exist_ok=True)
    warnings, files = [], {}
    if "seg" in formats:
        seg_writer.write_seg(
            source_datasets, mask, folder / OUTPUT_FILES["seg"], model.algorithm(threshold)
        )
        files["seg"] = OUTPUT_FILES["seg"]
    if "rtstruct" in formats:
        description = f"sarcoma_jax {model.kind} {model.checkpoint} step {model.step}"
        _, count = rtstruct_writer.write_rtstruct(
            series,
            source_datasets,
            prediction.probabilities,
            threshold,
            folder / OUTPUT_FILES["rtstruct"],
            generation_description=description,
            software_version=package_version(),
        )
        files["rtstruct"] = OUTPUT_FILES["rtstruct"]
    thickness = slice_thickness_mm(series, source_datasets)
    if "nifti" in formats:
        warning = nifti_writer.write_nifti(
            mask, series, folder / OUTPUT_FILES["nifti"], thickness or 1.0
        )
        if thickness is None:
            warning = "one slice without SliceThickness: the slice step is set to 1 mm"
        if warning:
            warnings.append(f"{OUTPUT_FILES['nifti']}: {warning}")
        files["nifti"] = OUTPUT_FILES["nifti"]
    if "png" in formats:
        prediction_figures.plot_overview(
            series.pixels,
            mask,
            folder / OUTPUT_FILES["png"],
            pixel_spacing=series.pixel_spacing,
            title=f"{patient_key} {series.domain}, {model.kind} {model.checkpoint}, threshold "
            f"{threshold:g}",
        )
        files["png"] = OUTPUT_FILES["png"]
    record = {
        "patient_key": patient_key,
        "series_uid": series.series_instance_uid,
        "domain": series.domain,
        "slices": int(mask.shape[0]),
        "grid": [int(mask.shape[1]), int(mask.shape[2])],
        "threshold": threshold,
        "volume_ml": volume_ml(mask, series, thickness),
        "tumour_slices": int(np.count_nonzero(mask.any(axis=(1, 2)))),
        "rtstruct_contours": count if "rtstruct" in formats else None,
        "model": {
            "workdir": model.workdir.name,
            "kind": model.kind,
            "checkpoint": model.checkpoint,
            "step": model.step,
            "image_size": model.image_size,
            "training_git_commit": model.training_commit,
        },
        "files": files,
        "warnings": warnings,
    }
    (folder / "prediction.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def predict_dicom_dir(
    workdir: str | os.PathLike,
    dicom_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    checkpoint: str | None = None,
    series_uid: str | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    formats: Sequence[str] = FORMATS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    patient_salt: str | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[list[dict], int]:
    """The predict command: every series of the model's domain in dicom_dir -> out_dir.

    Returns:
      (the prediction.json record of each series written, the number of series that failed).

    Raises:
      PredictError: a bad workdir, checkpoint, option or folder, or no series to predict.
    """
    log = log or (lambda line: print(line, file=sys.stderr))
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise PredictError(f"--formats: use some of {','.join(FORMATS)}, got {','.join(formats)}")
    if not 0.0 < threshold < 1.0:
        raise PredictError(f"--threshold must lie strictly between 0 and 1, got {threshold}")
    model = load_model(workdir, checkpoint)
    scan = scan_folder(dicom_dir, log)
    chosen = select_series(scan, model.domain, series_uid, log)
    predictor = Predictor(model, batch_size)
    out_dir = pathlib.Path(out_dir)
    records, failed = [], 0
    for headers in chosen:
        key = ingest.patient_key(headers[0].patient_id, patient_salt)
        folder = out_dir / series_folder_name(key, model.domain, headers[0].series_instance_uid)
        try:
            series = dicom_io.load_series_from_headers(headers)
            sources = read_source_headers(series)
            prediction = predictor.predict(series, threshold)
            record = write_outputs(prediction, sources, model, folder, formats, key)
        except InputProblem as problem:
            log(
                f"{scan.relative(problem.path or scan.dicom_dir)}: {problem.reason}; series skipped"
            )
            failed += 1
            continue
        except (OSError, ValueError, pydicom.errors.InvalidDicomError) as error:
            log(f"{folder.name}: could not be written ({type(error).__name__}: {error}); skipped")
            failed += 1
            continue
        for warning in record["warnings"]:
            log(f"{folder.name}: {warning}")
        records.append(record)
        volume = record["volume_ml"]
        print(
            f"{folder}: {record['slices']} slices, {record['tumour_slices']} with tumour, "
            + (f"{volume:.2f} ml" if volume is not None else "volume unknown")
            + f" ({', '.join(record['files'])})"
        )
    return records, failed


def scan_folder(dicom_dir: str | os.PathLike, log: Callable[[str], None]) -> DicomScan:
    """``series_finder.scan_dicom_dir``, its folder problems as PredictError (they stop a run)."""
    try:
        return scan_dicom_dir(dicom_dir, log)
    except InputProblem as problem:
        raise PredictError(str(problem)) from None


def select_series(
    scan: DicomScan,
    domain: str,
    series_uid: str | None = None,
    log: Callable[[str], None] | None = None,
) -> list:
    """The series of one domain (or the one named) in a scan.

    MR series whose sequence the classifier cannot tell are reported through ``log`` when the
    domain is an MR sequence (they might be of it).

    Raises:
      PredictError: none of that domain (the message says what there is), or the named series is
        absent or of another domain.
    """
    if series_uid is not None:
        headers = scan.images.get(series_uid)
        if headers is None:
            raise PredictError(f"{scan.dicom_dir}: no image series with UID {series_uid}")
        if series_domain(headers[0]) != domain:
            raise PredictError(
                f"series {series_uid} is {series_domain(headers[0]) or 'MR of unknown sequence'}, "
                f"the model segments {domain}"
            )
        return [headers]
    chosen = scan.series_of(domain)
    if log is not None and domain in MR_SEQUENCES:
        for headers in scan.series_of(None):
            folder = scan.relative(os.path.dirname(headers[0].path))
            log(f"{folder}: MR series of unknown sequence (not known to be {domain}); skipped")
    if not chosen:
        found = ", ".join(f"{d} x{n}" for d, n in sorted(scan.domains().items())) or "none"
        raise PredictError(f"{scan.dicom_dir}: no {domain} series (image series found: {found})")
    return chosen


FLAGS = flags.FLAGS


def define_common_flags() -> None:
    """Flags shared by predict and evaluate (defined only when run as a program)."""
    flags.DEFINE_string("workdir", None, "A segmentation or ADDA run's workdir.")
    flags.DEFINE_string("dicom_dir", None, "Root of the DICOM tree to predict (any layout).")
    flags.DEFINE_string("out_dir", None, "Where to write the results.")
    flags.DEFINE_float("threshold", DEFAULT_THRESHOLD, "Tumour where probability >= this.")
    flags.DEFINE_integer("batch_size", DEFAULT_BATCH_SIZE, "Slices per compiled batch.")
    flags.DEFINE_string(
        "patient_salt", None, "As the ingest's: name folders by salted hashes of PatientID."
    )


def _define_flags() -> None:
    define_common_flags()
    flags.DEFINE_string(
        "checkpoint",
        None,
        "Segmentation: best (default) or latest. ADDA: the stopping criterion "
        f"(default {DEFAULT_ADDA_CRITERION}).",
    )
    flags.DEFINE_string("series_uid", None, "Predict only this series.")
    flags.DEFINE_list("formats", list(FORMATS), "Outputs: some of seg,rtstruct,nifti,png.")


def require_flags(*names: str) -> None:
    missing = [f"--{name}" for name in names if not getattr(FLAGS, name)]
    if missing:
        sys.exit(f"error: {' and '.join(missing)} required")


def quiet_libraries() -> None:
    """Libraries' INFO logs (orbax's, highdicom's) would bury the one-line reports; `-v 0` shows
    them (as main.py does)."""
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {' '.join(argv[1:])}")
    require_flags("workdir", "dicom_dir", "out_dir")
    quiet_libraries()
    try:
        records, failed = predict_dicom_dir(
            FLAGS.workdir,
            FLAGS.dicom_dir,
            FLAGS.out_dir,
            checkpoint=FLAGS.checkpoint,
            series_uid=FLAGS.series_uid,
            threshold=FLAGS.threshold,
            formats=FLAGS.formats,
            batch_size=FLAGS.batch_size,
            patient_salt=FLAGS.patient_salt,
        )
    except PredictError as error:
        sys.exit(f"error: {error}")
    if failed:
        sys.exit(f"error: {failed} series could not be predicted; {len(records)} written")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
