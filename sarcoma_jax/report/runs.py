"""The runs a report reads: finished workdirs, their kind, data and subject, and their variants."""

import dataclasses
import json
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from data_pipeline import datasets

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
    """

    workdir: pathlib.Path
    kind: str
    config: dict
    results: dict
    provenance: dict
    history: list[dict]
    variant: str = ""
    variant_detail: str = ""

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
    def description(self) -> str:
        """e.g. 'phantom CT->PT reset seed 1' ('phantom [A] ...' for a variant)."""
        data = f"{self.data_label} [{self.variant}]" if self.variant else self.data_label
        parts = [data, self.subject, self.scheme or "", f"seed {self.seed}"]
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
    for path in _expand_seed_runs(paths):
        run = load_run(path)
        if run is None:
            warnings.append(f"skipping {path}: no results.json (an unfinished run?)")
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
