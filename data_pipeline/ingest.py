"""Ingest a DICOM folder tree into a queryable index of per-slice images and tumour masks.

python -m data_pipeline.ingest --dicom_dir D --out_dir O [--clinical F]
    [--split_scheme patient|thesis] [--seed S] [--workers N] [--fast_paths=false]

Walks D (folder names carry no meaning), classifies every series, links each RTSTRUCT to its image
series (decided over all of them: referenced series UID, then contour image UIDs, then frame of
reference and geometry), rasterises the chosen ROI and writes O/index.sqlite plus one .npz per
slice. Malformed input never aborts an ingest: each bad file gets one line naming it and the
reason and is skipped, the summary counts the image slices lost, and every good series is indexed
as it would be alone. The index is built aside and moved in only when complete.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import logging
import os
import re
import sys
from collections.abc import Sequence

import numpy as np
import pydicom
import tqdm
from absl import app, flags

from data_pipeline import clinical as clinical_lib
from data_pipeline import dicom_rules, index_writer, slice_store
from data_pipeline import fast_paths as fast_paths_lib
from data_pipeline import index as index_lib
from data_pipeline import splits as splits_lib
from data_pipeline import workers as workers_lib
from data_pipeline.dicom_io import (
    Header,
    InputProblem,
    Series,
    SliceProblem,
    load_series_from_headers,
    read_header,
    slice_normal,
    split_consistent,
)
from data_pipeline.rtstruct import (
    DEFAULT_ROI_PATTERNS,
    Contour,
    Link,
    SeriesGeometry,
    StructureSet,
    link_all,
    rasterise,
    read_rtstruct,
    select_rois,
)
from data_pipeline.vocabulary import IMAGE_MODALITIES

# Headers are read in chunks of this many files per worker task, to amortise process overheads.
_HEADER_CHUNK = 64


@dataclasses.dataclass
class IngestSummary:
    """What an ingest found, wrote and skipped.

    Attributes:
      slices_lost: CT/PT/MR image slices that are not in the index: a malformed or unreadable
        slice, or every slice of a series dropped (no RTSTRUCT, inconsistent, unreadable).
      files_skipped: files named with a reason and left out (not DICOM, unreadable, malformed, a
        losing or unusable RTSTRUCT...).
      warnings: every message, one line each (problems and warnings alike).
    """

    out_dir: str
    patients: int = 0
    series: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    slices: int = 0
    tumour_slices: int = 0
    files_seen: int = 0
    slices_lost: int = 0
    files_skipped: int = 0
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
            f"slices lost    {self.slices_lost}",
            f"files skipped  {self.files_skipped}",
            f"warnings       {len(self.warnings)}",
        ]
        return "\n".join(lines)


def display_path(path: str) -> str:
    """A path as text that prints and stores anywhere: bytes that are not UTF-8 and control
    characters written as escapes (a name like b'junk\\xff.dcm' must not abort an ingest)."""
    text = path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _read_headers(
    paths: Sequence[str], fast_paths: bool
) -> tuple[list[Header | InputProblem], dict[str, StructureSet | InputProblem]]:
    """Each file's header or problem, and every RTSTRUCT among them read in full."""
    results, structures = [], {}
    for path in paths:
        try:
            header = read_header(path, fast_paths)
        except InputProblem as problem:
            results.append(problem)
            continue
        results.append(header)
        if header.modality == "RTSTRUCT":
            try:
                structures[path] = read_rtstruct(path, fast_paths)
            except InputProblem as problem:
                structures[path] = problem
    return results, structures


@dataclasses.dataclass(frozen=True)
class _SeriesTask:
    """Everything a worker needs to load one series, rasterise its contours and write its slices."""

    series_key: str
    headers: tuple[Header, ...]
    rtstruct_label: str  # the RTSTRUCT's path as its warnings name it
    roi_name: str
    contours: tuple[Contour, ...]
    staging_dir: str = ""
    fast_paths: bool = True  # passed explicitly: a forkserver keeps the environment it started in


@dataclasses.dataclass
class _SeriesResult:
    """A written series: its Series with the pixels dropped, and per-slice tumour pixel counts."""

    series: Series | None
    tumour_pixels: list[int]
    warnings: list[str]
    problem: InputProblem | None = None
    lost: list[SliceProblem] = dataclasses.field(default_factory=list)  # unreadable slices


def _load_task(task: _SeriesTask) -> _SeriesResult:
    """Loads, rasterises and writes one series (runs in a worker process when workers > 1).

    A slice whose pixels cannot be read is left out (and reported); the rest make the series. The
    slice files are written by a few threads while the next series is read: creating files is
    mostly waiting on the file system, and zlib releases the GIL while it compresses.
    """
    lost: list[SliceProblem] = []
    try:
        series = load_series_from_headers(task.headers, skipped=lost)
    except InputProblem as problem:
        return _SeriesResult(None, [], [], problem, lost)
    mask, warnings = rasterise(task.contours, series, task.roi_name, task.rtstruct_label)
    tumour_pixels = list(
        workers_lib.writer_pool().map(
            lambda k: slice_store.write_slice(
                os.path.join(task.staging_dir, index_lib.slice_relpath(task.series_key, k)),
                series.pixels[k],
                mask[k],
                task.fast_paths,
            ),
            range(len(mask)),
        )
    )
    # Only the geometry goes back to the parent process: the pixels are on disk now.
    series.pixels = np.empty((0,) + series.pixels.shape[1:], np.float32)
    return _SeriesResult(series, tumour_pixels, warnings, None, lost)


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
    text = f"{salt}:{patient_id}".encode("utf-8", "surrogatepass")
    return "P" + hashlib.sha256(text).hexdigest()[:12]


def _series_key(key: str, domain: str, series_uid: str) -> str:
    """A folder-safe, stable key: patient key, domain and a short hash of the series UID."""
    safe_key = re.sub(r"[^A-Za-z0-9._-]", "_", key).lstrip("._-") or "patient"
    digest = hashlib.sha1(series_uid.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{safe_key}_{domain}_{digest}"


def _walk(
    dicom_dir: str, skip: tuple[int, int] | None = None
) -> tuple[list[str], dicom_rules.FolderWalk, list[InputProblem]]:
    """All regular files below ``dicom_dir`` (sorted, links to files and folders followed, each
    folder read once: dicom_rules.walk_folder) but the one whose (device, inode) is ``skip``, the
    walk (its empty folders and folders not read), and a problem for every other entry (a FIFO, a
    socket, a device, a broken or looping link): reading one could block forever or never end."""
    walk = dicom_rules.walk_folder(dicom_dir)
    files, unusable = [], []
    for path in walk.files:
        try:
            status = dicom_rules.regular_file(path)
        except InputProblem as problem:
            unusable.append(problem)
            continue
        if (status.st_dev, status.st_ino) != skip:
            files.append(path)
    return files, walk, unusable


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
    fast_paths: bool | None = None,
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
      fast_paths: read DICOM with our scanner and write slices with ISA-L (True), or with pydicom
        and zipfile only (False); both give the same index. None: as ``$SARCOMA_JAX_FAST_PATHS``
        says (default on; data_pipeline.fast_paths).

    Returns:
      The summary.

    Raises:
      InputProblem: ``dicom_dir`` is missing or holds no usable image series.
      ValueError: an unknown split scheme or value of ``$SARCOMA_JAX_FAST_PATHS``.
    """
    log = log or (lambda line: tqdm.tqdm.write(line, file=sys.stderr))
    fast_paths = fast_paths_lib.enabled(fast_paths)
    dicom_dir = os.path.abspath(dicom_dir)
    if not os.path.isdir(dicom_dir):
        raise InputProblem(display_path(dicom_dir), "no such folder")
    if split_scheme not in ("patient", "thesis"):
        raise ValueError(f"unknown split scheme {split_scheme!r} (patient or thesis)")
    summary = IngestSummary(out_dir=os.path.abspath(out_dir))

    def relative(path: str) -> str:
        return display_path(os.path.relpath(path, dicom_dir))

    def report(message: str, files: int = 0, lost: int = 0) -> None:
        summary.warnings.append(message)
        summary.files_skipped += files
        summary.slices_lost += lost
        log(message)

    def report_file(problem: InputProblem, outcome: str = "skipped") -> None:
        """A file left out; an image slice is also counted as lost."""
        lost = int(problem.modality in IMAGE_MODALITIES)
        report(f"{relative(problem.path)}: {problem.reason}; {outcome}", files=1, lost=lost)

    clinical_rows = clinical_lib.read_clinical(clinical) if clinical else {}
    # A clinical table kept inside the DICOM tree is not a bad DICOM file.
    clinical_id = (os.stat(clinical).st_dev, os.stat(clinical).st_ino) if clinical else None
    files, walk, unusable = _walk(dicom_dir, clinical_id)
    if not files and not unusable and not walk.problems:
        raise InputProblem(display_path(dicom_dir), "empty folder: no files to ingest")
    for folder in walk.empty:
        report(f"{relative(folder)}: empty folder")
    for problem in walk.problems:
        report(f"{relative(problem.path)}: {problem.reason}; skipped")
    for problem in unusable:
        report_file(problem)
    summary.files_seen = len(files) + len(unusable)

    executor = workers_lib.process_pool(workers)
    try:
        mapper = functools.partial(workers_lib.shared_map, executor)
        headers, structures = _read_all_headers(files, mapper, fast_paths, progress, report_file)
        image_series, rtstruct_headers = _classify(headers, report, relative)
        geometries = _consistent_series(image_series, report, report_file, relative)
        links, roi_names = _link(
            rtstruct_headers,
            structures,
            image_series,
            geometries,
            roi_patterns,
            report,
            report_file,
            relative,
        )
        tasks = []
        for uid, series_headers in sorted(image_series.items()):
            if uid not in geometries:
                continue
            first = series_headers[0]
            folder = relative(os.path.dirname(first.path))
            count = len(series_headers)
            if uid not in links:
                report(
                    f"{folder}: image series with no RTSTRUCT; {count} slices skipped", lost=count
                )
                continue
            if first.modality == "MR" and first.sequence is None:
                report(
                    f"{folder}: MR series of unknown sequence; {count} slices skipped", lost=count
                )
                continue
            domain = first.sequence if first.modality == "MR" else first.modality
            key = patient_key(first.patient_id, patient_salt)
            link = links[uid]
            tasks.append(
                _SeriesTask(
                    series_key=_series_key(key, domain, uid),
                    headers=tuple(sorted(series_headers, key=lambda h: h.path)),
                    rtstruct_label=relative(link.structure.path),
                    roi_name=roi_names[link.structure.path],
                    contours=link.structure.rois[roi_names[link.structure.path]],
                    fast_paths=fast_paths,
                )
            )
        if not tasks:
            raise InputProblem(
                display_path(dicom_dir), "no image series with a linked RTSTRUCT to ingest"
            )

        writer = index_writer.IndexWriter(
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
                    for problem in result.lost:
                        report_file(problem, "slice skipped")
                    if result.problem is not None:
                        count = len(task.headers) - len(result.lost)
                        report(
                            f"{relative(result.problem.path)}: {result.problem.reason}; series "
                            f"skipped ({count} slices)",
                            files=int(result.problem.path in {h.path for h in task.headers}),
                            lost=count,
                        )
                        continue
                    for warning in result.warnings:
                        report(warning)
                    patient_keys.add(
                        _write_series(
                            writer,
                            task,
                            result,
                            links,
                            roi_names,
                            clinical_rows,
                            patient_salt,
                            relative,
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


def _read_all_headers(files, mapper, fast_paths, progress, report_file):
    """Every file's header (problems reported) and every RTSTRUCT read in full, by path."""
    chunks = [files[i : i + _HEADER_CHUNK] for i in range(0, len(files), _HEADER_CHUNK)]
    headers: list[Header] = []
    structures: dict[str, StructureSet | InputProblem] = {}
    read_headers = functools.partial(_read_headers, fast_paths=fast_paths)
    with tqdm.tqdm(total=len(files), desc="headers", unit="file", disable=not progress) as bar:
        for chunk_results, chunk_structures in mapper(read_headers, chunks):
            structures.update(chunk_structures)
            for result in chunk_results:
                if isinstance(result, InputProblem):
                    report_file(result)
                else:
                    headers.append(result)
            bar.update(len(chunk_results))
    return headers, structures


def _classify(headers, report, relative) -> tuple[dict[str, list[Header]], list[Header]]:
    """Image headers grouped by series UID, and the RTSTRUCT headers (the rest is reported)."""
    image_series: dict[str, list[Header]] = collections.defaultdict(list)
    rtstruct_headers: list[Header] = []
    for header in headers:
        if header.modality == "RTSTRUCT":
            rtstruct_headers.append(header)
        elif header.modality in IMAGE_MODALITIES:
            if not header.has_pixels:
                report(
                    f"{relative(header.path)}: {header.modality} object without pixel data; "
                    "skipped",
                    files=1,
                    lost=1,
                )
            else:
                image_series[header.series_instance_uid].append(header)
        else:
            report(
                f"{relative(header.path)}: unsupported modality {header.modality!r:.40}; skipped",
                files=1,
            )
    return image_series, sorted(rtstruct_headers, key=lambda h: h.path)


def _consistent_series(image_series, report, report_file, relative) -> dict[str, SeriesGeometry]:
    """Drops (and reports) each slice unlike the rest of its series; the geometry of each series.

    A series whose slices agree in no majority is dropped whole and has no geometry.
    """
    geometries: dict[str, SeriesGeometry] = {}
    for uid, series_headers in sorted(image_series.items()):
        try:
            kept, odd = split_consistent(series_headers)
        except InputProblem as problem:
            count = len(series_headers)
            report(
                f"{relative(problem.path)}: {problem.reason}; {count} slices skipped", lost=count
            )
            continue
        for problem in odd:
            report_file(problem, "slice skipped")
        image_series[uid] = kept
        geometries[uid] = _geometry_from_headers(kept)
    return geometries


def _link(
    rtstruct_headers,
    structures,
    image_series,
    geometries,
    roi_patterns,
    report,
    report_file,
    relative,
) -> tuple[dict[str, Link], dict[str, str]]:
    """Each usable RTSTRUCT's chosen ROI, and the link of each contoured series (rtstruct.link_all:
    decided over all RTSTRUCTs at once; each file that loses is reported)."""
    usable, roi_names = [], {}
    for rt_header in rtstruct_headers:
        structure = structures[rt_header.path]
        if isinstance(structure, InputProblem):
            report_file(structure)
            continue
        roi_name = select_rois(list(structure.rois), roi_patterns)
        name = relative(rt_header.path)
        if roi_name is None or (
            not structure.rois[roi_name] and roi_name not in structure.problems
        ):
            report(
                f"{name}: no contoured ROI matches {list(roi_patterns)} "
                f"(ROIs: {sorted(structure.rois)}); skipped",
                files=1,
            )
            continue
        if roi_name in structure.problems:
            reasons = structure.problems[roi_name]
            more = f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else ""
            report(f"{name}: ROI {roi_name}: {reasons[0]}{more}; skipped", files=1)
            continue
        for note in structure.notes.get(roi_name, ()):
            report(f"{name}: ROI {roi_name}: {note}")
        usable.append(structure)
        roi_names[structure.path] = roi_name
    patients = {h.path: h.patient_id for h in rtstruct_headers}

    def candidates(structure: StructureSet) -> list[SeriesGeometry]:
        patient = patients[structure.path]
        return [g for uid, g in geometries.items() if image_series[uid][0].patient_id == patient]

    links, problems, warnings = link_all(usable, candidates, relative)
    for warning in warnings:
        report(warning)
    for problem in sorted(problems, key=lambda p: p.path):
        report_file(problem)
    return links, roi_names


def _write_series(
    writer, task, result, links, roi_names, clinical_rows, patient_salt, relative
) -> str:
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
    link = links[series.series_instance_uid]
    writer.add_roi(
        series_key=task.series_key,
        roi_name=roi_names[link.structure.path],
        rtstruct_file_rel=relative(link.structure.path),
        linked_by=link.how,
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
    flags.DEFINE_boolean(
        "fast_paths",
        None,
        "Our DICOM scanner and ISA-L zip writer (true) or pydicom and zipfile only (false); the "
        f"same index either way. Default: ${fast_paths_lib.ENV_VAR}, else true.",
    )


def main(argv: Sequence[str]) -> None:
    del argv
    # pydicom logs what it finds wrong in a file over several lines (a failed decode with its
    # traceback, at level ERROR); ingest words each problem in one line instead.
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
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
            fast_paths=FLAGS.fast_paths,
        )
    except (InputProblem, ValueError) as e:
        sys.exit(f"error: {e}")
    print(summary.render())


if __name__ == "__main__":
    _define_flags()
    app.run(main)
