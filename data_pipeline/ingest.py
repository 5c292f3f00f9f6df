"""Ingest a DICOM folder tree into a queryable index of per-slice images and tumour masks.

python -m data_pipeline.ingest --dicom_dir D --out_dir O [--clinical F]
    [--split_scheme patient|thesis] [--seed S] [--workers N]

Walks D (folder names carry no meaning), classifies every series, links each RTSTRUCT to its image
series (referenced series UID, then contour image UIDs, then frame of reference and geometry),
rasterises the chosen ROI and writes O/index.sqlite plus one .npz per slice. Input problems are
reported one line each and skipped; the index is built aside and moved in only when complete.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import multiprocessing
import os
import re
import sys
from collections.abc import Iterator, Sequence

import numpy as np
import pydicom
import tqdm
from absl import app, flags

from data_pipeline import clinical as clinical_lib
from data_pipeline import index as index_lib
from data_pipeline import splits as splits_lib
from data_pipeline.dicom_io import (
    Header,
    InputProblem,
    Series,
    load_series_from_headers,
    read_header,
    slice_normal,
)
from data_pipeline.rtstruct import (
    DEFAULT_ROI_PATTERNS,
    Contour,
    SeriesGeometry,
    StructureSet,
    link_rtstruct,
    rasterise,
    read_rtstruct,
    select_rois,
)

# Headers are read in chunks of this many files per worker task, to amortise process overheads.
_HEADER_CHUNK = 64
# Threads per worker writing slice files (file creation waits on the file system).
_WRITER_THREADS = 2


@dataclasses.dataclass
class IngestSummary:
    """What an ingest found, wrote and skipped."""

    out_dir: str
    patients: int = 0
    series: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    slices: int = 0
    tumour_slices: int = 0
    files_seen: int = 0
    skipped: int = 0
    warnings: list[str] = dataclasses.field(default_factory=list)

    def render(self) -> str:
        """A short human-readable table."""
        lines = [
            f"index          {self.out_dir}",
            f"files seen     {self.files_seen}",
            f"patients       {self.patients}",
        ]
        for domain, count in sorted(self.series.items()):
            lines.append(f"series {domain:<7} {count}")
        lines += [
            f"slices         {self.slices}",
            f"with tumour    {self.tumour_slices}",
            f"skipped        {self.skipped}",
            f"warnings       {len(self.warnings)}",
        ]
        return "\n".join(lines)


def _read_headers(
    paths: Sequence[str],
) -> tuple[list[Header | InputProblem], dict[str, StructureSet | InputProblem]]:
    """Each file's header or problem, and every RTSTRUCT among them read in full."""
    results, structures = [], {}
    for path in paths:
        try:
            header = read_header(path)
        except InputProblem as problem:
            results.append(problem)
            continue
        results.append(header)
        if header.modality == "RTSTRUCT":
            try:
                structures[path] = read_rtstruct(path)
            except InputProblem as problem:
                structures[path] = problem
    return results, structures


@dataclasses.dataclass(frozen=True)
class _SeriesTask:
    """Everything a worker needs to load one series, rasterise its contours and write its slices."""

    series_key: str
    headers: tuple[Header, ...]
    rtstruct_path: str
    roi_name: str
    contours: tuple[Contour, ...]
    staging_dir: str = ""


@dataclasses.dataclass
class _SeriesResult:
    """A written series: its Series with the pixels dropped, and per-slice tumour pixel counts."""

    series: Series | None
    tumour_pixels: list[int]
    warnings: list[str]
    problem: InputProblem | None = None


def _shared_map(executor, fn, items: Sequence) -> Iterator:
    """executor.map(fn, items), with this process working too; results in the order of items.

    The workers take items from the front while this process takes, from the back, those no worker
    has started yet, so that no core idles while worker processes start up (most of a second) and
    this process is not left waiting on them at the end.
    """
    if executor is None:
        yield from map(fn, items)
        return
    futures = [executor.submit(fn, item) for item in items]
    done_here = {}
    next_out, back = 0, len(items) - 1
    try:
        while next_out < len(items):
            if next_out in done_here:
                yield done_here.pop(next_out)
            elif futures[next_out].done():
                yield futures[next_out].result()
            elif back >= next_out and futures[back].cancel():
                done_here[back] = fn(items[back])
                back -= 1
                continue
            else:
                back = -1  # the workers hold everything left: wait for them in order
                yield futures[next_out].result()
            next_out += 1
    finally:
        for future in futures:
            future.cancel()


@functools.cache
def _writer_pool() -> concurrent.futures.ThreadPoolExecutor:
    """This process's slice-writing threads (cheaper than starting threads per series)."""
    return concurrent.futures.ThreadPoolExecutor(_WRITER_THREADS, thread_name_prefix="npz-writer")


def _load_task(task: _SeriesTask) -> _SeriesResult:
    """Loads, rasterises and writes one series (runs in a worker process when workers > 1).

    The slice files are written by a few threads while the next series is read: creating files is
    mostly waiting on the file system, and zlib releases the GIL while it compresses.
    """
    try:
        series = load_series_from_headers(task.headers)
    except InputProblem as problem:
        return _SeriesResult(None, [], [], problem)
    mask, warnings = rasterise(task.contours, series, task.roi_name, task.rtstruct_path)
    tumour_pixels = list(
        _writer_pool().map(
            lambda k: index_lib.write_slice_npz(
                os.path.join(task.staging_dir, index_lib.slice_relpath(task.series_key, k)),
                series.pixels[k],
                mask[k],
            ),
            range(len(mask)),
        )
    )
    # Only the geometry goes back to the parent process: the pixels are on disk now.
    series.pixels = np.empty((0,) + series.pixels.shape[1:], np.float32)
    return _SeriesResult(series, tumour_pixels, warnings)


def _geometry_from_headers(headers: Sequence[Header]) -> SeriesGeometry:
    first = headers[0]
    normal = slice_normal(first.orientation)
    coords = np.sort(np.array([h.position for h in headers]) @ normal)
    return SeriesGeometry(
        series_instance_uid=first.series_instance_uid,
        frame_of_reference_uid=first.frame_of_reference_uid,
        orientation=np.asarray(first.orientation),
        slice_coords=coords,
        sop_instance_uids=frozenset(h.sop_instance_uid for h in headers),
    )


def patient_key(patient_id: str, salt: str | None) -> str:
    """The stored patient key: the de-identified PatientID, or a salted hash of it when salted."""
    if salt is None:
        return patient_id.strip() or "UNKNOWN"
    return "P" + hashlib.sha256(f"{salt}:{patient_id}".encode()).hexdigest()[:12]


def _series_key(key: str, domain: str, series_uid: str) -> str:
    """A folder-safe, stable key: patient key, domain and a short hash of the series UID."""
    safe_key = re.sub(r"[^A-Za-z0-9._-]", "_", key).lstrip("._-") or "patient"
    return f"{safe_key}_{domain}_{hashlib.sha1(series_uid.encode()).hexdigest()[:8]}"


def _walk(dicom_dir: str) -> tuple[list[str], list[str]]:
    """All files below ``dicom_dir`` (sorted) and the folders that hold nothing at all."""
    files, empty = [], []
    for root, dirs, names in os.walk(dicom_dir):
        dirs.sort()
        if not dirs and not names:
            empty.append(root)
        files.extend(os.path.join(root, name) for name in sorted(names))
    return files, empty


def ingest(
    dicom_dir: str,
    out_dir: str,
    clinical: str | None = None,
    split_scheme: str = "patient",
    seed: int = 0,
    workers: int = 1,
    roi_patterns: Sequence[str] = DEFAULT_ROI_PATTERNS,
    patient_salt: str | None = None,
    progress: bool = True,
    log=None,
) -> IngestSummary:
    """Builds ``out_dir``'s index from the DICOM tree below ``dicom_dir``.

    Args:
      dicom_dir: root of the DICOM files (any layout).
      out_dir: where index.sqlite and slices/ go; replaced atomically when complete.
      clinical: optional CSV/XLSX with age, sex, site per patient.
      split_scheme: 'patient' or 'thesis' (see data_pipeline.splits).
      seed: the split seed.
      workers: processes reading DICOM and writing slices: this one plus workers - 1 more.
      roi_patterns: ROI name patterns in order of preference.
      patient_salt: when given, patient keys are salted hashes of PatientID.
      progress: show progress bars.
      log: callable for the one-line problem reports (default: print to stderr).

    Returns:
      The summary.

    Raises:
      InputProblem: ``dicom_dir`` is missing or holds no usable image series.
    """
    log = log or (lambda line: tqdm.tqdm.write(line, file=sys.stderr))
    dicom_dir = os.path.abspath(dicom_dir)
    if not os.path.isdir(dicom_dir):
        raise InputProblem(dicom_dir, "no such folder")
    if split_scheme not in ("patient", "thesis"):
        raise ValueError(f"unknown split scheme {split_scheme!r} (patient or thesis)")
    summary = IngestSummary(out_dir=os.path.abspath(out_dir))

    def report(message: str, skipped: bool = True) -> None:
        summary.warnings.append(message)
        summary.skipped += int(skipped)
        log(message)

    def relative(path: str) -> str:
        return os.path.relpath(path, dicom_dir)

    clinical_rows = clinical_lib.read_clinical(clinical) if clinical else {}
    files, empty_folders = _walk(dicom_dir)
    if clinical:  # a clinical table kept inside the DICOM tree is not a bad DICOM file
        files = [f for f in files if not os.path.samefile(f, clinical)]
    if not files:
        raise InputProblem(dicom_dir, "empty folder: no files to ingest")
    for folder in empty_folders:
        report(f"{relative(folder)}: empty folder", False)
    summary.files_seen = len(files)

    executor = None
    if workers > 1:
        context = multiprocessing.get_context("forkserver")
        # Workers forked from a server that has imported what ingest needs (numpy, pydicom,
        # scikit-image...) start in milliseconds. Not ingest itself: `python -m
        # data_pipeline.ingest` runs it as the workers' __main__ too.
        context.set_forkserver_preload(["data_pipeline"])
        executor = concurrent.futures.ProcessPoolExecutor(workers - 1, mp_context=context)
    try:
        chunks = [files[i : i + _HEADER_CHUNK] for i in range(0, len(files), _HEADER_CHUNK)]
        mapper = functools.partial(_shared_map, executor)
        headers: list[Header] = []
        with tqdm.tqdm(total=len(files), desc="headers", unit="file", disable=not progress) as bar:
            structures: dict[str, StructureSet | InputProblem] = {}
            for chunk_results, chunk_structures in mapper(_read_headers, chunks):
                structures.update(chunk_structures)
                for result in chunk_results:
                    if isinstance(result, InputProblem):
                        report(f"{relative(result.path)}: {result.reason}; skipped")
                    else:
                        headers.append(result)
                bar.update(len(chunk_results))

        image_series: dict[str, list[Header]] = collections.defaultdict(list)
        rtstruct_headers: list[Header] = []
        for header in headers:
            if header.modality == "RTSTRUCT":
                rtstruct_headers.append(header)
            elif header.modality in ("CT", "PT", "MR"):
                if not header.has_pixels:
                    report(
                        f"{relative(header.path)}: {header.modality} object without pixel data; "
                        "skipped"
                    )
                else:
                    image_series[header.series_instance_uid].append(header)
            else:
                report(f"{relative(header.path)}: unsupported modality {header.modality}; skipped")

        geometries: dict[str, SeriesGeometry] = {}
        for uid, series_headers in sorted(image_series.items()):
            orientations = {tuple(np.round(h.orientation, 3)) for h in series_headers}
            if len(orientations) > 1:
                report(
                    f"{relative(series_headers[0].path)}: series mixes slice orientations; skipped"
                )
                continue
            geometries[uid] = _geometry_from_headers(series_headers)

        tasks: list[_SeriesTask] = []
        # series uid -> (RTSTRUCT header, ROI name, how it was linked, the ROI's contours)
        linked: dict[str, tuple[Header, str, str, tuple[Contour, ...]]] = {}
        rtstruct_headers.sort(key=lambda h: h.path)
        for rt_header in rtstruct_headers:
            structure = structures[rt_header.path]
            if isinstance(structure, InputProblem):
                report(f"{relative(structure.path)}: {structure.reason}; skipped")
                continue
            roi_name = select_rois(list(structure.rois), roi_patterns)
            if roi_name is None or not structure.rois[roi_name]:
                report(
                    f"{relative(rt_header.path)}: no contoured ROI matches {list(roi_patterns)} "
                    f"(ROIs: {sorted(structure.rois)}); skipped"
                )
                continue
            candidates = [
                g
                for uid, g in geometries.items()
                if image_series[uid][0].patient_id == rt_header.patient_id
            ]
            try:
                geometry, how, link_warnings = link_rtstruct(structure, candidates)
            except InputProblem as problem:
                report(f"{relative(problem.path)}: {problem.reason}; skipped")
                continue
            for warning in link_warnings:
                report(warning.replace(rt_header.path, relative(rt_header.path)), False)
            uid = geometry.series_instance_uid
            if uid in linked:
                report(
                    f"{relative(rt_header.path)}: a second RTSTRUCT for a series already "
                    "contoured by "
                    f"{relative(linked[uid][0].path)}; skipped"
                )
                continue
            linked[uid] = (rt_header, roi_name, how, structure.rois[roi_name])

        for uid, series_headers in sorted(image_series.items()):
            if uid not in geometries:
                continue
            first = series_headers[0]
            if uid not in linked:
                report(
                    f"{relative(os.path.dirname(first.path))}: image series with no RTSTRUCT; "
                    "skipped"
                )
                continue
            if first.modality == "MR" and first.sequence is None:
                report(
                    f"{relative(os.path.dirname(first.path))}: MR series of unknown sequence; "
                    "skipped"
                )
                continue
            domain = first.sequence if first.modality == "MR" else first.modality
            key = patient_key(first.patient_id, patient_salt)
            tasks.append(
                _SeriesTask(
                    series_key=_series_key(key, domain, uid),
                    headers=tuple(sorted(series_headers, key=lambda h: h.path)),
                    rtstruct_path=linked[uid][0].path,
                    roi_name=linked[uid][1],
                    contours=linked[uid][3],
                )
            )
        if not tasks:
            raise InputProblem(dicom_dir, "no image series with a linked RTSTRUCT to ingest")

        writer = index_lib.IndexWriter(
            out_dir,
            split_scheme=split_scheme,
            seed=seed,
            provenance=_provenance(
                dicom_dir, split_scheme, seed, roi_patterns, patient_salt is not None
            ),
        )
        tasks = [dataclasses.replace(t, staging_dir=str(writer.staging_dir)) for t in tasks]
        patient_keys = set()
        with writer:
            results = mapper(_load_task, tasks)
            bar = tqdm.tqdm(
                total=sum(len(t.headers) for t in tasks),
                desc="slices",
                unit="slice",
                disable=not progress,
            )
            with bar:
                for task, result in zip(tasks, results, strict=True):
                    bar.update(len(task.headers))
                    if result.problem is not None:
                        report(
                            f"{relative(result.problem.path)}: {result.problem.reason}; "
                            "series skipped"
                        )
                        continue
                    for warning in result.warnings:
                        report(
                            warning.replace(task.rtstruct_path, relative(task.rtstruct_path)), False
                        )
                    patient_keys.add(
                        _write_series(
                            writer, task, result, linked, clinical_rows, patient_salt, relative
                        )
                    )
                    summary.series[result.series.domain] += 1
                    summary.slices += len(result.series.sop_instance_uids)
                    summary.tumour_slices += sum(count > 0 for count in result.tumour_pixels)
            summary.patients = len(patient_keys)
            for message in summary.warnings:
                writer.add_warning(message.split(": ", 1)[0], message)
            writer.commit()
    finally:
        if executor is not None:
            executor.shutdown(cancel_futures=True)
    return summary


def _write_series(writer, task, result, linked, clinical_rows, patient_salt, relative) -> str:
    """Adds one loaded series (patient, series, ROI, slices) to the index; returns its patient."""
    series = result.series
    key = patient_key(series.patient_id, patient_salt)
    info = clinical_rows.get(series.patient_id, clinical_rows.get(key, {}))
    writer.add_patient(key, age=info.get("age"), sex=info.get("sex"), site=info.get("site"))
    # The folds draw by the raw PatientID, so that the patient salt does not change them.
    writer.set_fold_draw(key, splits_lib.fold_draw(writer.seed, series.patient_id))
    rows, cols = series.pixels.shape[1:]  # pixels were dropped, the shape kept
    writer.add_series(
        series_key=task.series_key,
        patient_key=key,
        study_uid=series.study_instance_uid,
        series_uid=series.series_instance_uid,
        modality=series.modality,
        sequence=series.sequence,
        description=series.description,
        frame_of_reference_uid=series.frame_of_reference_uid,
        rows=rows,
        cols=cols,
        pixel_spacing=tuple(float(v) for v in series.pixel_spacing),
        slice_spacing=series.slice_spacing,
        orientation=tuple(float(v) for v in series.orientation),
        n_slices=len(series.sop_instance_uids),
        units=series.units,
    )
    rt_header, roi_name, how, _ = linked[series.series_instance_uid]
    writer.add_roi(
        series_key=task.series_key,
        roi_name=roi_name,
        rtstruct_file_rel=relative(rt_header.path),
        linked_by=how,
    )
    for index, (position_mm, sop_uid, tumour_pixels) in enumerate(
        zip(series.slice_coords, series.sop_instance_uids, result.tumour_pixels, strict=True)
    ):
        writer.add_slice_file(
            series_key=task.series_key,
            slice_index=index,
            position_mm=float(position_mm),
            sop_instance_uid=sop_uid,
            tumor_pixels=tumour_pixels,
        )
    return key


def _provenance(dicom_dir: str, split_scheme: str, seed: int, roi_patterns, salted: bool) -> dict:
    """What produced the index, beside the library versions IndexWriter records itself."""
    return {
        "command": "python -m data_pipeline.ingest",
        "dicom_dir": dicom_dir,
        "split_scheme": split_scheme,
        "seed": seed,
        "roi_patterns": list(roi_patterns),
        "patient_key": "salted hash of PatientID" if salted else "PatientID",
        "pydicom": pydicom.__version__,
    }


FLAGS = flags.FLAGS


def _define_flags() -> None:
    """The CLI's flags, defined only when run as a program so importing this module defines none."""
    flags.DEFINE_string("dicom_dir", None, "Root of the DICOM tree (any layout).")
    flags.DEFINE_string("out_dir", None, "Where to write index.sqlite and slices/.")
    flags.DEFINE_string(
        "clinical", None, "Optional clinical CSV/XLSX (patient id, age, sex, site)."
    )
    flags.DEFINE_enum(
        "split_scheme", "patient", ["patient", "thesis"], "How to split train/val/test."
    )
    flags.DEFINE_integer("seed", 0, "Seed of the split assignment.")
    flags.DEFINE_integer(
        "workers", 1, "Processes reading DICOM and writing slices (this one included)."
    )
    flags.DEFINE_list(
        "rois", list(DEFAULT_ROI_PATTERNS), "ROI name patterns, in order of preference."
    )
    flags.DEFINE_string(
        "patient_salt", None, "If set, store salted hashes of PatientID as patient keys."
    )


def main(argv: Sequence[str]) -> None:
    del argv
    if not FLAGS.dicom_dir or not FLAGS.out_dir:
        sys.exit("error: --dicom_dir and --out_dir are required")
    try:
        summary = ingest(
            FLAGS.dicom_dir,
            FLAGS.out_dir,
            clinical=FLAGS.clinical,
            split_scheme=FLAGS.split_scheme,
            seed=FLAGS.seed,
            workers=FLAGS.workers,
            roi_patterns=FLAGS.rois,
            patient_salt=FLAGS.patient_salt,
        )
    except (InputProblem, ValueError) as e:
        sys.exit(f"error: {e}")
    print(summary.render())


if __name__ == "__main__":
    _define_flags()
    app.run(main)
