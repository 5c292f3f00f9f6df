"""The runs a report reads: finished workdirs, their kind, data and subject, and their variants.

A `num_seeds` run is read as its seeds' runs; a run of every fold (sarcoma_jax/folds.py) as one
cross-validated run per seed, whose test results pool its folds' (each patient tested once).
"""

import copy
import dataclasses
import json
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from data_pipeline import datasets
from sarcoma_jax import folds as folds_lib

IGNORED_CONFIG_KEYS = frozenset(
    {
        "seed",
        "data.seed",
        "scheme",
        "source_checkpoint",
        "progress_bar",
        "log_every_steps",
        "checkpoint_every_steps",
        "checkpoint_every_cycles",
        "num_devices",
        "fused_cycles",
        "data.cache_dir",
        "data.tfds_data_dir",
        "data.fold",
    }
)


class ReportError(ValueError):
    """Bad input to the report (a path that is not a workdir, nothing to report); one line."""


@dataclasses.dataclass
class Run:
    """One finished workdir.

    Attributes:
      workdir: its folder.
      kind: 'segmentation', 'adda' (segmentation maps between modalities) or 'digits'.
      config, results, provenance: its config.json, results.json, provenance.json ({} if absent).
      history: metrics.jsonl rows ([] if absent).
      variant: a letter naming its config among differing ones of its group ('' if none).
      variant_detail: the config fields in which it differs, e.g. 'num_epochs=10'.
      fold_runs: for a cross-validated run (workdir: the folds run), this seed's run of each fold,
        in fold order; its results pool theirs (`pool_fold_runs`).
    """

    workdir: pathlib.Path
    kind: str
    config: dict
    results: dict
    provenance: dict
    history: list[dict]
    variant: str = ""
    variant_detail: str = ""
    fold_runs: list["Run"] = dataclasses.field(default_factory=list)

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", self.results.get("seed", 0)))

    @property
    def data_seed(self) -> int | None:
        return self.config.get("data", {}).get("seed")

    @property
    def scheme(self) -> str | None:
        return self.results.get("scheme")

    @property
    def data_label(self) -> str:
        """'phantom', 'dicom:sts_ibsi/dicom' (the path's last two parts), 'index:...' or the
        digits dataset ('offline')."""
        data = self.config.get("data", {})
        if self.kind == "digits":
            return str(data.get("dataset", "digits"))
        source = str(data.get("source", "?"))
        path = data.get("path")
        return f"{source}:{'/'.join(pathlib.Path(path).parts[-2:])}" if path else source

    @property
    def subject(self) -> str:
        """The modality ('CT') of a segmentation run, the pair ('CT->PT') of an ADDA run."""
        data = self.config.get("data", {})
        if self.kind == "segmentation":
            return _domain(data.get("modality", self.results.get("modality", "?")))
        if self.kind == "adda":
            return f"{_domain(data['source_modality'])}->{_domain(data['target_modality'])}"
        return ""

    @property
    def wall_time_s(self) -> float | None:
        for key in ("train_wall_time_s", "wall_time_s"):
            if key in self.results:
                return float(self.results[key])
        return None

    @property
    def num_folds(self) -> int:
        """K of a cross-validated run (or of one of its folds); 0 for an ordinary run."""
        return int(self.config.get("data", {}).get("num_folds") or 0)

    @property
    def fold(self) -> int | None:
        return self.config.get("data", {}).get("fold")

    @property
    def description(self) -> str:
        """e.g. 'phantom CT->PT reset seed 1' ('phantom [A] ...' for a variant; '... fold 2' for
        a fold's run, '... 5 folds' for a cross-validated one)."""
        data = f"{self.data_label} [{self.variant}]" if self.variant else self.data_label
        parts = [data, self.subject, self.scheme or "", f"seed {self.seed}"]
        if self.fold is not None:
            parts.append(f"fold {self.fold}")
        elif self.num_folds:
            parts.append(f"{self.num_folds} folds")
        return " ".join(part for part in parts if part)


def _domain(name: str) -> str:
    try:
        return datasets.canonical_domain(name)
    except datasets.DatasetError:
        return str(name)


def _read_json(path: pathlib.Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ReportError(f"{path} is not valid JSON ({error})") from None


def _read_jsonl(path: pathlib.Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise ReportError(f"{path}:{number} is not valid JSON") from None
    return rows


def _kind(config: Mapping[str, Any], results: Mapping[str, Any], workdir: pathlib.Path) -> str:
    experiment = config.get("experiment")
    if experiment == "segment":
        return "segmentation"
    if experiment == "adda":
        primary = results.get("primary_metric")
        if primary == "f1":
            return "adda"
        if primary == "accuracy":
            return "digits"
        raise ReportError(f"{workdir}: ADDA run with primary metric {primary!r}; cannot report it")
    raise ReportError(f"{workdir}: config.json has experiment {experiment!r}, not segment or adda")


def load_run(workdir: str | pathlib.Path) -> Run | None:
    """Reads one workdir; None for an unfinished run (no results.json).

    Raises:
      ReportError: the path does not exist, is not a workdir, or holds unreadable JSON.
    """
    workdir = pathlib.Path(workdir)
    if not workdir.exists():
        raise ReportError(f"{workdir} does not exist")
    if not (workdir / "config.json").is_file():
        raise ReportError(f"{workdir} is not a workdir (no config.json); pass run folders only")
    if not (workdir / "results.json").is_file():
        return None
    config = _read_json(workdir / "config.json")
    results = _read_json(workdir / "results.json")
    kind = _kind(config, results, workdir)
    provenance_path = workdir / "provenance.json"
    return Run(
        workdir=workdir,
        kind=kind,
        config=config,
        results=results,
        provenance=_read_json(provenance_path) if provenance_path.is_file() else {},
        history=_read_jsonl(workdir / "metrics.jsonl"),
    )


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value)
    return flat


def _compared_config(config: Mapping[str, Any]) -> dict[str, Any]:
    return {
        key: value
        for key, value in _flatten(config).items()
        if key not in IGNORED_CONFIG_KEYS and key.removeprefix("source.") not in IGNORED_CONFIG_KEYS
    }


def assign_variants(runs: Sequence[Run]) -> None:
    """Marks runs whose configs differ within their group (kind, data, modality or pair).

    Each distinct setting of the differing fields gets a letter (`run.variant`, 'A', 'B', ...,
    in order of first appearance over all groups) and a description (`run.variant_detail`, e.g.
    'num_epochs=10'); runs of a group without differences keep variant ''.
    """
    base_groups: dict[tuple, list[Run]] = {}
    for run in runs:
        base_groups.setdefault((run.kind, run.data_label, run.subject), []).append(run)
    letters: dict[tuple, str] = {}
    for (kind, data_label, subject), group in base_groups.items():
        compared = [_compared_config(run.config) for run in group]
        differing = sorted(
            key
            for key in {key for config in compared for key in config}
            if len({config.get(key) for config in compared}) > 1
        )
        if not differing:
            continue
        for run, config in zip(group, compared, strict=True):
            run.variant_detail = ", ".join(f"{key}={config.get(key, 'unset')}" for key in differing)
            letter_key = (kind, data_label, subject, run.variant_detail)
            if letter_key not in letters:
                letters[letter_key] = _variant_letter(len(letters))
            run.variant = letters[letter_key]


def _variant_letter(index: int) -> str:
    """'A'..'Z', then 'AA', 'AB', ..."""
    letters = ""
    index += 1
    while index:
        index, remainder = divmod(index - 1, 26)
        letters = chr(ord("A") + remainder) + letters
    return letters


def _expand_seed_runs(paths: Sequence[str | pathlib.Path]) -> list[pathlib.Path]:
    """Each path, with a `num_seeds` run (segmentation or ADDA) replaced by its seed_<s> folders."""
    expanded = []
    for path in map(pathlib.Path, paths):
        config_path = path / "config.json"
        seeds = _read_json(config_path).get("num_seeds", 1) if config_path.is_file() else 1
        if isinstance(seeds, int) and seeds > 1:
            expanded.extend(sorted(path.glob("seed_*"), key=lambda p: int(p.name[5:])))
        else:
            expanded.append(path)
    return expanded


def _is_folds_run(path: pathlib.Path) -> bool:
    config_path = path / "config.json"
    if not config_path.is_file():
        return False
    data = _read_json(config_path).get("data") or {}
    return bool(data.get("num_folds")) and data.get("fold") is None


def _pooled_section(pooled: Mapping[str, Any], sections: Sequence[Mapping[str, Any]]) -> dict:
    """A score set of a cross-validated run shaped like one run's: test metrics pooled over the
    folds (`folds.pool_folds`; AUC the mean over folds) and every fold's per-image scores."""
    test = {name: pooled[name] for name in ("f1", "accuracy", "zero_ratio") if name in pooled}
    test["auc"] = pooled["auc_fold_mean"]
    per_image = {"patient_key": [], "f1": []}
    for section in sections:
        for key in per_image:
            per_image[key] += section["test_per_image"][key]
    return {"test": test, "test_per_image": per_image, "patient_f1": pooled["patient_f1"]}


def pool_fold_runs(workdir: pathlib.Path, fold_runs: Sequence[Run]) -> Run:
    """One seed's cross-validated run from its runs of every fold (in fold order).

    Its results hold what a single run's do, pooled: `test` (and the threshold's, or each
    criterion's) over every fold's test images, `test_per_image` concatenated, wall times summed;
    `cross_validation` says how many folds and patients. Its config is fold 0's without the fold.

    Raises:
      ReportError: folds without per-image patient keys, or a patient tested in two folds.
    """
    first = fold_runs[0]
    try:
        summary = folds_lib.pool_folds({run.fold: {first.seed: run.results} for run in fold_runs})
    except ValueError as error:
        raise ReportError(f"{workdir}: {error}") from None
    pooled = {name: entry["seeds"][str(first.seed)] for name, entry in summary["pooled"].items()}
    sections = {
        name: [folds_lib.score_sets(run.results)[name] for run in fold_runs]
        for name, entry in pooled.items()
        if "missing_folds" not in entry
    }
    results = {
        key: value
        for key, value in first.results.items()
        if key in ("modality", "seed", "epochs", "pair", "scheme", "primary_metric")
    }
    if first.kind == "segmentation":
        model = _pooled_section(pooled[folds_lib.MODEL], sections[folds_lib.MODEL])
        baseline = _pooled_section(pooled[folds_lib.BASELINE], sections[folds_lib.BASELINE])
        results.update(model, baseline_threshold=baseline)
    else:
        results["criteria"] = {
            name: {
                **{
                    key: value
                    for key, value in fold_runs[0].results["criteria"][name].items()
                    if key in ("label", "oracle")
                },
                **_pooled_section(pooled[name], sections[name]),
            }
            for name in sections
        }
        results["criteria_not_reached"] = sorted(set(pooled) - set(sections))
    wall_times = [run.wall_time_s for run in fold_runs]
    if None not in wall_times:
        results["wall_time_s"] = float(sum(wall_times))
    results["cross_validation"] = {
        "num_folds": len(fold_runs),
        "patients": summary["patients"],  # key -> {"fold", "test_images"}
        "fold_workdirs": [str(run.workdir) for run in fold_runs],
    }
    config = copy.deepcopy(first.config)
    for data in (config.get("data"), (config.get("source") or {}).get("data")):
        if isinstance(data, dict):
            data["fold"] = None
    return Run(
        workdir=workdir,
        kind=first.kind,
        config=config,
        results=results,
        provenance=first.provenance,
        history=[],
        fold_runs=list(fold_runs),
    )


def _load_folds_run(workdir: pathlib.Path) -> tuple[list[Run], list[str]]:
    """A run of every fold as one cross-validated Run per seed; skipped (with a warning) unless
    every fold has finished."""
    num_folds = int(_read_json(workdir / "config.json")["data"]["num_folds"])
    by_seed: dict[int, list[Run]] = {}
    for fold in range(num_folds):
        fold_dir = workdir / f"{folds_lib.FOLD_DIR_PREFIX}{fold}"
        fold_runs = (
            [load_run(path) for path in _expand_seed_runs([fold_dir])]
            if (fold_dir / "config.json").is_file()
            else [None]
        )
        if None in fold_runs:
            return [], [f"skipping {workdir}: fold {fold} of {num_folds} has not finished"]
        for run in fold_runs:
            by_seed.setdefault(run.seed, []).append(run)
    runs = [pool_fold_runs(workdir, fold_runs) for _, fold_runs in sorted(by_seed.items())]
    commits = {commit_of(fold_run) for run in runs for fold_run in run.fold_runs}
    warnings = (
        []
        if len(commits) <= 1
        else [f"the folds of {workdir} come from different commits: {', '.join(sorted(commits))}"]
    )
    return runs, warnings


def load_runs(paths: Iterable[str | pathlib.Path]) -> tuple[list[Run], list[str]]:
    """Reads the workdirs, skipping unfinished ones, and assigns variants.

    Returns:
      The finished runs and one-line warnings (skipped runs, groups mixing git commits).

    Raises:
      ReportError: no paths, a path that is not a workdir, or no finished run at all.
    """
    paths = list(paths)
    if not paths:
        raise ReportError(
            "no workdirs given; usage: python -m sarcoma_jax.report W1 W2 ... --out R"
        )
    runs, warnings = [], []
    for path in map(pathlib.Path, paths):
        if _is_folds_run(path):
            fold_runs, fold_warnings = _load_folds_run(path)
            runs += fold_runs
            warnings += fold_warnings
            continue
        for seed_path in _expand_seed_runs([path]):
            run = load_run(seed_path)
            if run is None:
                warnings.append(f"skipping {seed_path}: no results.json (an unfinished run?)")
            else:
                runs.append(run)
    if not runs:
        raise ReportError("none of the workdirs holds a finished run (results.json)")
    assign_variants(runs)
    return runs, warnings + _mixed_commit_warnings(runs)


def commit_of(run: Run) -> str:
    return (run.provenance.get("git", {}).get("commit") or "unknown")[:10]


def _mixed_commit_warnings(runs: Sequence[Run]) -> list[str]:
    """One line per group (kind, data, modality or pair, variant) whose runs come from different
    git commits: their numbers may differ by more than the seed."""
    commits: dict[tuple[str, str, str, str], set[str]] = {}
    for run in runs:
        key = (run.kind, run.data_label, run.subject, run.variant)
        commits.setdefault(key, set()).add(commit_of(run))
    return [
        f"runs of {' '.join(part for part in key if part)} come from different commits: "
        f"{', '.join(sorted(found))}"
        for key, found in commits.items()
        if len(found) > 1
    ]
