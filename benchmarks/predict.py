"""Prediction speed: one 100-slice CT series end to end against a bare pydicom read of its files.

python benchmarks/predict.py [--workdir W] [--series_dir D] [--repeats 3] [--batch_size 32]

In one run, interleaved and best of --repeats each (so both see the same machine load):
  floor        for f in the series' files: pydicom.dcmread(f).pixel_array
  end to end   sarcoma_jax.predict's path: read (scan the headers with the ingest's reader, load
               the pixels in physical units, read the headers the writers copy from), predict in
               three parts: preprocess every slice, the jit-compiled model in batches (model),
               probabilities back on the 512x512 grid (to_grid); write the DICOM-SEG, write the
               RTSTRUCT
and prints slices/s for both, each phase's share of the end-to-end time and
floor_over_end_to_end (how many times slower than just reading the files prediction is). The
first end-to-end pass compiles the model and loads highdicom's tables: it is timed apart.

Defaults (they need the shared IBSI data, ../shared/data/sts_ibsi): the series is a real CT
(STS_046's, 84 slices of 210x212 cropped around the tumour) resampled linearly to 100 slices of
512x512 over the same field of view, so that the matrix is a clinical one and the prediction a
tumour, which is what the writers' cost depends on (a poorly trained model's scattered
predictions make tens of thousands of RTSTRUCT contours); the model is the reference U-Net
(128x128, configs/segment_ct.py) trained for 3 epochs on the cohort's training split (minutes on 2
cores). Pass --workdir for a trained run and --series_dir for another series.
"""

import argparse
import copy
import os
import pathlib
import sys
import tempfile
import time

import jax
import numpy as np
import pydicom
import pydicom.uid
import scipy.ndimage

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # configs/, and this checkout's packages

from configs import segment_ct  # noqa: E402
from data_pipeline import dicom_io, rtstruct_writer, seg_writer, series_finder  # noqa: E402
from sarcoma_jax import predict  # noqa: E402
from sarcoma_jax.segment import train as segment_train  # noqa: E402

PHASES = ("read", "preprocess", "model", "to_grid", "seg", "rtstruct")
STS_IBSI = pathlib.Path(
    os.environ.get("SARCOMA_JAX_SHARED", REPO_ROOT.parent / "shared"), "data", "sts_ibsi", "dicom"
)


def _resampled_ct(source: pathlib.Path, out: pathlib.Path, slices: int, size: int) -> str:
    """A real CT series resampled (linear) to ``slices`` x ``size`` x ``size`` over the same field
    of view, written with pydicom under new UIDs: clinical matrix size, real anatomy and tumour."""
    series = dicom_io.load_series(source)
    count, rows, cols = series.pixels.shape
    hu = scipy.ndimage.zoom(series.pixels, (slices / count, size / rows, size / cols), order=1)
    row_spacing, col_spacing = series.pixel_spacing * np.array([rows, cols]) / size
    step = series.slice_spacing * (count - 1) / (slices - 1)
    row_cosines, col_cosines = series.orientation[:3], series.orientation[3:]
    # The new pixel centres cover the old pixels' extent.
    first = (
        series.positions[0]
        + (row_spacing - series.pixel_spacing[0]) / 2 * col_cosines
        + (col_spacing - series.pixel_spacing[1]) / 2 * row_cosines
    )
    template = pydicom.dcmread(series.files[0])
    template.PixelSpacing = [float(row_spacing), float(col_spacing)]
    study, series_uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    out.mkdir(parents=True)
    with seg_writer.quiet_copying():  # the source's own over-long StudyID, copied as it is
        for k in range(slices):
            _write_slice(template, k, out, study, series_uid, first, step, series.normal, hu[k])
    return str(out)


def _write_slice(template, k, out, study, series_uid, first, step, normal, hu_slice) -> None:
    ds = copy.deepcopy(template)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = study, series_uid, k + 1
    ds.ImagePositionPatient = [float(v) for v in first + k * step * normal]
    ds.SliceThickness = float(step)
    ds.Rows, ds.Columns = hu_slice.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ds.PixelData = np.round(hu_slice).astype(np.int16).tobytes()
    ds.save_as(out / f"{k:03d}.dcm", enforce_file_format=True)


def _train(scratch: str, dicom_dir: pathlib.Path, epochs: int) -> str:
    """The reference U-Net (128x128) trained briefly on the real CTs: tumour-like predictions."""
    config = segment_ct.get_config()
    config.data.source, config.data.path = "dicom", str(dicom_dir)
    config.data.cache_dir = os.path.join(scratch, "cache")
    config.num_epochs = epochs
    config.progress_bar = False
    workdir = os.path.join(scratch, "seg_ct")
    segment_train.train_and_evaluate(config, workdir)
    return workdir


def _floor(files: list[str]) -> float:
    start = time.perf_counter()
    for path in files:
        pydicom.dcmread(path).pixel_array  # noqa: B018 - decoding the pixels is what is timed.
    return time.perf_counter() - start


def _end_to_end(series_dir, model, predictor, out_dir) -> tuple[dict[str, float], dict]:
    """One pass of predict's path on one series; seconds per phase and what was written."""
    seconds = {}
    start = time.perf_counter()
    scan = series_finder.scan_dicom_dir(series_dir, log=print)
    (headers,) = predict.select_series(scan, model.domain)
    series = dicom_io.load_series_from_headers(headers)
    sources = predict.read_source_headers(series)
    seconds["read"] = time.perf_counter() - start
    # predict's three parts, timed apart (Predictor.predict is these calls in this order).
    start = time.perf_counter()
    images = predict.preprocess_slices(series.pixels, model.image_size)
    seconds["preprocess"] = time.perf_counter() - start
    start = time.perf_counter()
    small = predictor.model_probabilities(images)
    seconds["model"] = time.perf_counter() - start
    start = time.perf_counter()
    prediction = predict.Prediction(
        series, predictor.to_grid(small, series.pixels.shape[1:]), small, 0.5
    )
    mask = prediction.mask
    seconds["to_grid"] = time.perf_counter() - start
    start = time.perf_counter()
    seg_writer.write_seg(sources, mask, out_dir / "seg.dcm", model.algorithm(0.5))
    seconds["seg"] = time.perf_counter() - start
    start = time.perf_counter()
    _, contours = rtstruct_writer.write_rtstruct(
        series, sources, prediction.probabilities, 0.5, out_dir / "rtstruct.dcm"
    )
    seconds["rtstruct"] = time.perf_counter() - start
    shape = series.pixels.shape
    return seconds, {"shape": shape, "tumour_voxels": int(mask.sum()), "contours": contours}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="A trained segmentation run (default: train one).")
    parser.add_argument("--epochs", type=int, default=3, help="Of the default run.")
    parser.add_argument("--series_dir", help="A CT series folder (default: a resampled real CT).")
    parser.add_argument("--patient", default="STS_046", help="Whose CT is resampled.")
    parser.add_argument("--slices", type=int, default=100, help="Slices of the resampled CT.")
    parser.add_argument("--size", type=int, default=512, help="Its rows and columns.")
    parser.add_argument("--repeats", type=int, default=3, help="Best of this many runs each.")
    parser.add_argument("--batch_size", type=int, default=predict.DEFAULT_BATCH_SIZE)
    parser.add_argument(
        "--scratch",
        default="/dev/shm" if os.access("/dev/shm", os.W_OK) else None,
        help="Folder for the phantom and outputs (default /dev/shm, else the temp folder).",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
        series_dir = args.series_dir or _resampled_ct(
            STS_IBSI / args.patient / "CT" / "image",
            pathlib.Path(tmp) / "series",
            args.slices,
            args.size,
        )
        workdir = args.workdir or _train(tmp, STS_IBSI, args.epochs)
        model = predict.load_model(workdir)
        predictor = predict.Predictor(model, args.batch_size)
        files = dicom_io.load_series(series_dir).files
        out_dir = pathlib.Path(tmp) / "out"
        out_dir.mkdir()
        _floor(files)  # the page cache and imports
        start = time.perf_counter()
        _, written = _end_to_end(series_dir, model, predictor, out_dir)
        first_s = time.perf_counter() - start
        floor_s, best = float("inf"), {phase: float("inf") for phase in PHASES}
        total_s = float("inf")
        for _ in range(args.repeats):
            floor_s = min(floor_s, _floor(files))
            seconds, written = _end_to_end(series_dir, model, predictor, out_dir)
            if sum(seconds.values()) < total_s:
                total_s, best = sum(seconds.values()), seconds
    count = len(files)
    floor_rate, rate = count / floor_s, count / total_s
    print(
        f"series: {written['shape'][0]} slices of {written['shape'][1]}x{written['shape'][2]}, "
        f"{written['tumour_voxels']} voxels predicted tumour, {written['contours']} RTSTRUCT "
        f"contours; model {model.image_size}x{model.image_size} ({model.workdir.name}); "
        f"batch {args.batch_size}; {jax.devices()[0].platform} ({jax.device_count()} devices), "
        f"{os.cpu_count()} cpus; best of {args.repeats}"
    )
    print(f"floor (dcmread + pixel_array)   {floor_rate:8.1f} slices/s")
    print(f"end to end (predict's path)     {rate:8.1f} slices/s  (first pass {first_s:.1f} s)")
    for phase in PHASES:
        share = 100 * best[phase] / total_s
        print(f"  {phase:<9} {best[phase] * 1000:8.1f} ms  {share:5.1f}%")
    print(f"floor_over_end_to_end={floor_rate / rate:.2f}")


if __name__ == "__main__":
    main()
