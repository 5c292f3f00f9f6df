"""Deterministic train/val/test splits and k-fold cross-validation folds from patient keys, slice
positions and a seed (SPEC §2)."""

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence

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


# Patient-level k-fold cross-validation (the `patient` scheme's folds). The index stores, for every
# fold count K in fold_counts(n), each fold's train / val / test patients (IndexWriter).
MAX_FOLDS = 10


def fold_draw(seed: int, patient_id: str) -> str:
    """A patient's seeded draw for the folds: sha256 hex of f"{seed}:fold:{patient_id}".

    Computed at ingest from the raw PatientID, not from the stored patient key, so that the folds
    do not change with the patient salt; the draw itself is never stored.
    """
    return hashlib.sha256(f"{seed}:fold:{patient_id}".encode()).hexdigest()


def fold_counts(num_patients: int) -> list[int]:
    """The fold counts K stored for n patients: 2..min(MAX_FOLDS, n), each leaving at least two
    patients (one val, one train) outside its largest fold."""
    return [
        num_folds
        for num_folds in range(2, min(MAX_FOLDS, num_patients) + 1)
        if num_patients - math.ceil(num_patients / num_folds) >= 2
    ]


def assign_folds(
    tumour_slices: Mapping[str, int], draws: Mapping[str, str], num_folds: int
) -> dict[str, int]:
    """Each patient's fold (0..num_folds-1), folds balanced in patients and in tumour slices.

    The patients, ordered by tumour slices (most first; ties by draw), are dealt in rounds of
    num_folds: a full round gives one patient to each fold, the round's patients in draw order to
    folds 0, 1, ... (a seeded permutation); the last, partial round gives its patients, most
    tumour slices first, to the folds with the fewest tumour slices so far (ties: lower fold).
    So fold sizes differ by at most one patient, each fold holds one patient of every size band,
    and the seed changes the partition, not only the fold numbers (a greedy "largest first into
    the lightest fold" would balance the slices a little better but give every seed the same
    partition).

    Args:
      tumour_slices: per patient key, its tumour slices (over all its series).
      draws: per patient key, its `fold_draw`.
      num_folds: K, 2 <= K <= number of patients.

    Raises:
      ValueError: K out of range, or keys that differ between the two mappings.
    """
    if set(tumour_slices) != set(draws):
        raise ValueError("tumour_slices and draws must have the same patient keys")
    if not 2 <= num_folds <= len(tumour_slices):
        raise ValueError(f"{num_folds} folds need 2..{len(tumour_slices)} (the patients) folds")
    ordered = sorted(tumour_slices, key=lambda key: (-tumour_slices[key], draws[key], key))
    folds: dict[str, int] = {}
    fold_slices = [0] * num_folds
    num_full = len(ordered) // num_folds * num_folds
    for start in range(0, num_full, num_folds):
        round_keys = sorted(ordered[start : start + num_folds], key=lambda key: (draws[key], key))
        for fold, key in enumerate(round_keys):
            folds[key] = fold
            fold_slices[fold] += tumour_slices[key]
    lightest = sorted(range(num_folds), key=lambda fold: (fold_slices[fold], fold))
    for key, fold in zip(ordered[num_full:], lightest, strict=False):
        folds[key] = fold
    return folds


def fold_patient_splits(
    folds: Mapping[str, int], draws: Mapping[str, str], fold: int
) -> dict[str, str]:
    """Each patient's split when `fold` is tested: its patients test, num_holdout_patients(n) of
    the others val (at most all but one; the first by a second draw derived from `draws`, so not
    simply the first-dealt patients), the rest train."""
    others = sorted(
        (key for key, patient_fold in folds.items() if patient_fold != fold),
        key=lambda key: (hashlib.sha256(f"{draws[key]}:val".encode()).hexdigest(), key),
    )
    num_val = min(max(1, num_holdout_patients(len(folds))), len(others) - 1)
    splits = {key: "test" for key, patient_fold in folds.items() if patient_fold == fold}
    splits.update({key: "val" if rank < num_val else "train" for rank, key in enumerate(others)})
    return splits


def fold_table(
    tumour_slices: Mapping[str, int], draws: Mapping[str, str]
) -> list[tuple[int, int, str, str]]:
    """What the index stores: (K, fold, patient key, split) for every K in fold_counts(n), every
    fold and every patient (see assign_folds and fold_patient_splits)."""
    rows = []
    for num_folds in fold_counts(len(tumour_slices)):
        folds = assign_folds(tumour_slices, draws, num_folds)
        for fold in range(num_folds):
            splits = fold_patient_splits(folds, draws, fold)
            rows += [(num_folds, fold, key, splits[key]) for key in sorted(splits)]
    return rows
