"""Deterministic train/val/test splits from patient keys, slice positions and a seed (SPEC §2)."""

import hashlib
import math
from collections.abc import Iterable, Sequence

SCHEMES = ("patient", "thesis")
THESIS_WITHHELD_PATIENTS = 7  # §13.3: validation and test share the same 7 patients.
PATIENT_SCHEME_FRACTION = 0.15  # Fraction of patients in each of val and test.


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def rank_patients(patient_keys: Iterable[str], seed: int) -> list[str]:
    """Patient keys ordered by sha256(f"{seed}:{patient_key}"), a seeded shuffle that is stable.

    A patient's rank relative to any other depends only on the two keys and the seed, so adding
    patients never reorders the ones already there.
    """
    unique_keys = set(patient_keys)
    return sorted(unique_keys, key=lambda key: (_digest(f"{seed}:{key}"), key))


def num_holdout_patients(num_patients: int) -> int:
    """Patients in each of val and test under the `patient` scheme: max(1, round(0.15 n)), n >= 3.

    Rounds half up (round(1.5) = 2), unlike Python's round. With fewer than 3 patients there is
    nothing to hold out and every patient is in train.
    """
    if num_patients < 3:
        return 0
    return max(1, math.floor(PATIENT_SCHEME_FRACTION * num_patients + 0.5))


def num_thesis_withheld(num_patients: int) -> int:
    """Patients withheld for val and test under the `thesis` scheme: min(7, n // 2)."""
    return min(THESIS_WITHHELD_PATIENTS, num_patients // 2)


def patient_scheme_splits(patient_keys: Iterable[str], seed: int) -> dict[str, str]:
    """`patient` scheme: each patient wholly in train, val or test.

    The first num_holdout_patients(n) patients of rank_patients go to test, the next as many to
    val, the rest to train.
    """
    ranked = rank_patients(patient_keys, seed)
    num_holdout = num_holdout_patients(len(ranked))
    splits = {}
    for rank, key in enumerate(ranked):
        if rank < num_holdout:
            splits[key] = "test"
        elif rank < 2 * num_holdout:
            splits[key] = "val"
        else:
            splits[key] = "train"
    return splits


def thesis_withheld_patients(patient_keys: Iterable[str], seed: int) -> set[str]:
    """`thesis` scheme: the first num_thesis_withheld(n) patients of rank_patients."""
    ranked = rank_patients(patient_keys, seed)
    return set(ranked[: num_thesis_withheld(len(ranked))])


def position_key(position_mm: float) -> str:
    """Slice position rounded to 0.1 mm as text, so that co-registered slices share it."""
    rounded_mm = round(float(position_mm), 1) + 0.0  # + 0.0 turns -0.0 into 0.0.
    return f"{rounded_mm:.1f}"


def withheld_slice_split(patient_key: str, position_mm: float, seed: int) -> str:
    """'val' or 'test' for one slice of a withheld patient, from (seed, patient, position)."""
    digest = _digest(f"{seed}:{patient_key}:{position_key(position_mm)}")
    return "val" if digest[0] % 2 == 0 else "test"


def assign_slice_splits(
    scheme: str,
    seed: int,
    patient_keys: Iterable[str],
    slices: Sequence[tuple[str, float]],
) -> list[str]:
    """The split of each slice.

    Args:
      scheme: 'patient' or 'thesis'.
      seed: integer seed.
      patient_keys: every patient of the index (the splits depend on how many there are).
      slices: (patient_key, position_mm) of each slice; every patient_key must be in patient_keys.

    Returns:
      One of 'train', 'val', 'test' per slice, in the order of `slices`.

    Raises:
      ValueError: for an unknown scheme or a slice whose patient is not in patient_keys.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown split scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")
    patient_keys = set(patient_keys)
    unknown = sorted({key for key, _ in slices} - patient_keys)
    if unknown:
        raise ValueError(f"slices of patients that were never added: {', '.join(unknown)}")
    if scheme == "patient":
        per_patient = patient_scheme_splits(patient_keys, seed)
        return [per_patient[key] for key, _ in slices]
    withheld = thesis_withheld_patients(patient_keys, seed)
    return [
        withheld_slice_split(key, position_mm, seed) if key in withheld else "train"
        for key, position_mm in slices
    ]
