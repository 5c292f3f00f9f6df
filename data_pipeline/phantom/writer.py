"""Writing the phantom collection to disk: DICOM per patient, clinical.csv, atomically."""

from __future__ import annotations

import csv
import hashlib
import os
import pathlib
import shutil
import tempfile

import tqdm

from data_pipeline.phantom.images import image_datasets
from data_pipeline.phantom.plan import PatientPlan, plan_patient
from data_pipeline.phantom.structures import structure_dataset


def write_patient(plan: PatientPlan, out_dir: str | os.PathLike) -> int:
    """Writes a patient's series and RTSTRUCTs under ``out_dir/<key>/``; returns the file count."""
    patient_dir = pathlib.Path(out_dir) / plan.key
    count = 0
    for series in plan.series.values():
        folder = patient_dir / series.folder
        folder.mkdir(parents=True, exist_ok=True)
        for file_name, ds in zip(series.file_names, image_datasets(plan, series), strict=True):
            ds.save_as(folder / file_name, enforce_file_format=True)
            count += 1
        structure_folder = patient_dir / series.structure.folder
        structure_folder.mkdir(parents=True, exist_ok=True)
        structure_dataset(plan, series).save_as(
            structure_folder / "1-1.dcm", enforce_file_format=True
        )
        count += 1
    return count


def write_phantom(
    out_dir: str | os.PathLike,
    num_patients: int,
    seed: int = 0,
    image_size: int = 128,
    num_slices: int = 30,
    progress: bool = True,
) -> list[str]:
    """Writes the phantom collection: DICOM per patient and ``clinical.csv``.

    The collection is built in a temporary folder beside ``out_dir`` and moved into place at the
    end, so an interrupted run leaves nothing half written. The same arguments give the same bytes.

    Args:
      out_dir: destination; must not exist or be an empty folder.
      num_patients: how many patients (PHANTOM_000, PHANTOM_001, ...).
      seed: the phantom's seed.
      image_size: CT and MR rows/columns (PET gets half), at least 16.
      num_slices: CT slices (PET ~0.8x, MR ~2/3x), at least 6.
      progress: show a progress bar.

    Returns:
      The patient keys.

    Raises:
      ValueError: bad arguments.
      FileExistsError: ``out_dir`` exists and is not empty.
    """
    if num_patients < 1:
        raise ValueError(f"num_patients must be at least 1, got {num_patients}")
    if image_size < 16 or num_slices < 6:
        raise ValueError(
            f"image_size >= 16 and num_slices >= 6 needed, got {image_size}, {num_slices}"
        )
    out_dir = pathlib.Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not an empty folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        keys = []
        with open(staging / "clinical.csv", "w", newline="") as clinical:
            writer = csv.writer(clinical, lineterminator="\n")
            writer.writerow(["patient_id", "age", "sex", "site"])
            for index in tqdm.trange(
                num_patients, desc="phantom patients", unit="patient", disable=not progress
            ):
                plan = plan_patient(seed, index, image_size, num_slices)
                write_patient(plan, staging)
                writer.writerow([plan.key, plan.age, plan.sex, plan.site])
                keys.append(plan.key)
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return keys


def tree_digest(folder: str | os.PathLike) -> str:
    """sha256 over every file's relative path and bytes under ``folder`` (to compare two runs)."""
    digest = hashlib.sha256()
    root = pathlib.Path(folder)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()
