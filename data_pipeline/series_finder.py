"""What a DICOM folder holds, read as the ingest reads it: image series by domain, linked RTSTRUCTs.

For code that works on a DICOM folder directly rather than on an index (sarcoma_jax.predict and
.evaluate): the ingest's header reader and classifier (data_pipeline.dicom_io) find the image
series whatever the folder layout, and its RTSTRUCT reader and linking rules
(data_pipeline.rtstruct) give each series its contours. Unreadable files are reported in one line
each and skipped.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Callable, Sequence

import numpy as np

from data_pipeline import dicom_io, dicom_rules, rtstruct
from data_pipeline.dicom_io import Header, InputProblem
from data_pipeline.rtstruct import SeriesGeometry, StructureSet
from data_pipeline.vocabulary import IMAGE_MODALITIES


@dataclasses.dataclass
class DicomScan:
    """What a DICOM folder holds, as the ingest reads it.

    Attributes:
      images: SeriesInstanceUID -> the headers of its image files (CT, PT, MR with pixels).
      rtstructs: the RTSTRUCT files' headers.
      dicom_dir: the folder scanned (absolute).
    """

    images: dict[str, list[Header]]
    rtstructs: list[Header]
    dicom_dir: str

    def domains(self) -> collections.Counter:
        """How many series of each domain (MR of unknown sequence counted as 'MR?')."""
        return collections.Counter(series_domain(h[0]) or "MR?" for h in self.images.values())

    def series_of(self, domain: str | None) -> list[list[Header]]:
        """The headers of each series of one domain (None: MR of unknown sequence), ordered by
        patient and series UID."""
        chosen = [h for h in self.images.values() if series_domain(h[0]) == domain]
        return sorted(chosen, key=lambda h: (h[0].patient_id, h[0].series_instance_uid))

    def relative(self, path: str) -> str:
        return os.path.relpath(path, self.dicom_dir)


def series_domain(header: Header) -> str | None:
    """CT, PT, or the MR sequence (None for MR of unknown sequence), as the ingest classifies."""
    return header.sequence if header.modality == "MR" else header.modality


def scan_dicom_dir(
    dicom_dir: str | os.PathLike, log: Callable[[str], None] = lambda line: None
) -> DicomScan:
    """Reads every file's header below ``dicom_dir`` (any layout) and groups the image series.

    Files that cannot be read are reported (one line each, named) and skipped.

    Raises:
      InputProblem: no such folder, or no files in it.
    """
    root = os.path.abspath(dicom_dir)
    if not os.path.isdir(root):
        raise InputProblem(dicom_dir, "no such folder")
    walk = dicom_rules.walk_folder(root)  # links to folders followed, each folder read once
    if not walk.files and not walk.problems:
        raise InputProblem(dicom_dir, "empty folder")
    scan = DicomScan(collections.defaultdict(list), [], root)
    for problem in walk.problems:
        log(f"{scan.relative(problem.path)}: {problem.reason}; skipped")
    files = walk.files
    for path in files:
        try:
            header = dicom_io.read_header(path)
        except InputProblem as problem:
            log(f"{scan.relative(path)}: {problem.reason}; skipped")
            continue
        if header.modality == "RTSTRUCT":
            scan.rtstructs.append(header)
        elif header.modality in IMAGE_MODALITIES and header.has_pixels:
            scan.images[header.series_instance_uid].append(header)
    scan.images = dict(scan.images)
    return scan


def _geometry(headers: Sequence[Header]) -> SeriesGeometry | None:
    """A series' geometry from its headers (None when its slices mix orientations)."""
    orientations = {tuple(np.round(h.orientation, 3)) for h in headers}
    if len(orientations) > 1:
        return None
    normal = dicom_io.slice_normal(headers[0].orientation)
    return SeriesGeometry(
        series_instance_uid=headers[0].series_instance_uid,
        frame_of_reference_uid=headers[0].frame_of_reference_uid,
        orientation=np.asarray(headers[0].orientation),
        slice_coords=np.sort(np.array([h.position for h in headers]) @ normal),
        sop_instance_uids=frozenset(h.sop_instance_uid for h in headers),
    )


def link_rtstructs(
    scan: DicomScan, roi_patterns: Sequence[str], log: Callable[[str], None]
) -> dict[str, tuple[StructureSet, str, str]]:
    """Series UID -> (structure set, ROI name, how linked) as the ingest links RTSTRUCTs.

    Each RTSTRUCT (in path order) is linked among the image series of its patient; an unreadable
    one, one without a matching ROI, one that fits no series or a second one for a series is
    reported in one line and skipped.
    """
    geometries = {uid: g for uid, h in scan.images.items() if (g := _geometry(h)) is not None}
    linked: dict[str, tuple[StructureSet, str, str]] = {}
    for header in sorted(scan.rtstructs, key=lambda h: h.path):
        where = scan.relative(header.path)
        try:
            structure = rtstruct.read_rtstruct(header.path)
        except InputProblem as problem:
            log(f"{where}: {problem.reason}; skipped")
            continue
        roi_name = rtstruct.select_rois(list(structure.rois), roi_patterns)
        if roi_name is None or not structure.rois[roi_name]:
            log(f"{where}: no contoured ROI matches {list(roi_patterns)}; skipped")
            continue
        candidates = [
            g
            for uid, g in geometries.items()
            if scan.images[uid][0].patient_id == header.patient_id
        ]
        try:
            geometry, how, warnings = rtstruct.link_rtstruct(structure, candidates)
        except InputProblem as problem:
            log(f"{where}: {problem.reason}; skipped")
            continue
        for warning in warnings:
            log(warning.replace(header.path, where))
        uid = geometry.series_instance_uid
        if uid in linked:
            log(f"{where}: a second RTSTRUCT for a series already contoured; skipped")
            continue
        linked[uid] = (structure, roi_name, how)
    return linked
