"""Aggregates finished workdirs into the thesis' tables and figures: python -m sarcoma_jax.report.

`python -m sarcoma_jax.report W1 W2 ... --out R` reads each workdir's config.json, results.json,
metrics.jsonl and provenance.json, groups the runs, and writes into R:

  index.md                     links to everything, the workdirs used and their provenance
  segmentation.md / .tex       §15-4: F1, accuracy, AUC per modality (+ intensity-threshold
                               baseline, thesis numbers, §15-5 zero-ratio)
  da.md / .tex                 §15-6: before DA / ADDA / RESET (confusion stop) per pair and metric
  stopping.md / .tex           §15-7: highest peak (oracle) / confusion / latest / best loss stop
  digits.md                    §10-3 (digits.table_10_3)
  figures/                     §15-3 box plots, §17-1 curves per ADDA run, §15-4..6 before/after
                               overlays, a segmentation F1 box plot per modality

Grouping. Segmentation runs by (data source, modality), ADDA runs by (data source, pair) with
the scheme as a column, digits runs by dataset. Runs of one group whose configs differ in more than
seeds and cosmetic fields (IGNORED_CONFIG_KEYS) are split into variants [A], [B], ..., listed with
the fields in which they differ (e.g. `num_epochs=10`), so runs of different budgets are never
averaged together.
Every cell is mean ± sample sd over the runs (n shown); reported numbers are on the test split.

Overlays restore the `initial` and `confusion` target maps of the lowest-seed run per pair and
scheme from its checkpoints/ and load its target data (`--no-overlays` skips that work).
"""

import argparse
import dataclasses
import datetime
import functools
import json
import math
import pathlib
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import scipy.special
import tqdm
from matplotlib.figure import Figure  # not pyplot: no global figure state, no display backend.
from matplotlib.patches import Patch

from data_pipeline import datasets
from sarcoma_jax import digits, figures, input_pipeline, metrics, models, provenance, train_adda

# ---------------------------------------------------------------------------------------------
# The thesis' numbers (SPEC §7; accuracy and AUC of §15-6 and all of §15-7 transcribed from the
# thesis text).

# Table 15-4 (validation = test patients in the thesis), per downsampling variant of the U-Net.
THESIS_TABLE_15_4 = {
    "conv": {
        "PT": {"f1": 0.925, "accuracy": 0.982, "auc": 0.969},
        "T2": {"f1": 0.923, "accuracy": 0.981, "auc": 0.968},
        "CT": {"f1": 0.844, "accuracy": 0.917, "auc": 0.903},
    },
    "maxpool": {
        "PT": {"f1": 0.924, "accuracy": 0.982, "auc": 0.979},
        "T2": {"f1": 0.902, "accuracy": 0.980, "auc": 0.976},
        "CT": {"f1": 0.847, "accuracy": 0.918, "auc": 0.902},
    },
}
# Table 15-5: fraction of zero pixels in the truth of tumour slices (= all-zero accuracy).
THESIS_ZERO_RATIO = {"CT": 0.9848, "PT": 0.9904, "T2": 0.9631}
# Table 15-6: metric -> (before DA, ADDA with confusion stop, RESET with confusion stop).
THESIS_TABLE_15_6 = {
    "CT->PT": {
        "f1": (0.0754, 0.0401, 0.2038),
        "accuracy": (0.9697, 0.9092, 0.9666),
        "auc": (0.5116, 0.5612, 0.6724),
    },
    "CT->T2": {
        "f1": (0.1107, 0.1407, 0.2264),
        "accuracy": (0.8829, 0.8591, 0.8247),
        "auc": (0.4945, 0.5608, 0.6422),
    },
    "PT->CT": {
        "f1": (0.0292, 0.0292, 0.1221),
        "accuracy": (0.0149, 0.0149, 0.9514),
        "auc": (0.4937, 0.5529, 0.5789),
    },
    "PT->T2": {
        "f1": (0.3367, 0.3073, 0.3922),
        "accuracy": (0.8853, 0.8849, 0.8774),
        "auc": (0.5640, 0.5738, 0.6386),
    },
    "T2->CT": {
        "f1": (0.2024, 0.1173, 0.0266),
        "accuracy": (0.9368, 0.8998, 0.9347),
        "auc": (0.7986, 0.8039, 0.7576),
    },
    "T2->PT": {
        "f1": (0.3799, 0.0268, 0.2602),
        "accuracy": (0.9705, 0.8504, 0.9495),
        "auc": (0.8077, 0.7570, 0.8181),
    },
}
STOP_CRITERIA = ("highest_peak", "confusion", "latest", "best_loss")  # §15-7's column order


def _stops(highest_peak, confusion, latest, best_loss):
    return dict(zip(STOP_CRITERIA, (highest_peak, confusion, latest, best_loss), strict=True))


# Table 15-7: test F1 per pair, scheme and stopping criterion.
THESIS_TABLE_15_7 = {
    "CT->PT": {
        "adda": _stops(0.1049, 0.0401, 0.0401, 0.0186),
        "reset": _stops(0.3485, 0.2038, 0.2038, 0.0186),
    },
    "CT->T2": {
        "adda": _stops(0.2948, 0.1407, 0.0728, 0.0728),
        "reset": _stops(0.3870, 0.2264, 0.2831, 0.2264),
    },
    "PT->CT": {
        "adda": _stops(0.1656, 0.0292, 0.0873, 0.0292),
        "reset": _stops(0.1624, 0.1221, 0.0948, 0.1221),
    },
    "PT->T2": {
        "adda": _stops(0.2812, 0.3073, 0.2668, 0.3271),
        "reset": _stops(0.3986, 0.3922, 0.3889, 0.3089),
    },
    "T2->CT": {
        "adda": _stops(0.1919, 0.1173, 0.0708, 0.0292),
        "reset": _stops(0.1954, 0.0266, 0.0266, 0.1642),
    },
    "T2->PT": {
        "adda": _stops(0.2537, 0.0268, 0.0186, 0.2066),
        "reset": _stops(0.5186, 0.2602, 0.2776, 0.4466),
    },
}
THESIS_PAIR_ORDER = tuple(THESIS_TABLE_15_6)

CRITERION_LABELS = {
    "initial": "before DA",
    "highest_peak": "highest peak (oracle)",
    "confusion": "confusion stop",
    "latest": "latest stop",
    "best_loss": "best loss stop",
}
METRIC_LABELS = {"f1": "F1", "accuracy": "accuracy", "auc": "AUC"}

# Flattened config keys (also under 'source.') that do not change what a run computes beyond its
# seeds: runs that differ only in these are aggregated as seeds of one experiment.
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


# ---------------------------------------------------------------------------------------------
# Runs.


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
    """Each path, with a `num_seeds` run (train_segment) replaced by its seed_<s> run folders."""
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


def _commit(run: Run) -> str:
    return (run.provenance.get("git", {}).get("commit") or "unknown")[:10]


def _mixed_commit_warnings(runs: Sequence[Run]) -> list[str]:
    """One line per group (kind, data, modality or pair, variant) whose runs come from different
    git commits: their numbers may differ by more than the seed."""
    commits: dict[tuple[str, str, str, str], set[str]] = {}
    for run in runs:
        key = (run.kind, run.data_label, run.subject, run.variant)
        commits.setdefault(key, set()).add(_commit(run))
    return [
        f"runs of {' '.join(part for part in key if part)} come from different commits: "
        f"{', '.join(sorted(found))}"
        for key, found in commits.items()
        if len(found) > 1
    ]


# ---------------------------------------------------------------------------------------------
# Numbers and tables.


def mean_sd(values: Sequence[float | None], decimals: int = 4, show_n: bool = True) -> str:
    """'0.8123 ± 0.0100 (n=5)' (sample sd, ddof=1), '0.8123 (n=1)', or '–' for no values.

    None values are left out (and not counted); show_n=False drops the '(n=...)'.
    """
    values = [float(value) for value in values if value is not None]
    if not values:
        return "–"
    count = f" (n={len(values)})" if show_n else ""
    if len(values) == 1:
        return f"{values[0]:.{decimals}f}{count}"
    return f"{np.mean(values):.{decimals}f} ± {np.std(values, ddof=1):.{decimals}f}{count}"


def _thesis_value(value: float | None, decimals: int = 4, mark: str = "") -> str:
    return "–" if value is None else f"{value:.{decimals}f}{mark}"


def _thesis_pair(pair: str) -> tuple[str | None, str]:
    """The thesis' pair to set beside `pair` and a mark for its cells.

    The thesis' MR is T2; a pair with another MR sequence (e.g. T1, the only MR in the real data
    here) gets the T2 pair's numbers marked '(T2)', so a reader sees the nearest comparison and
    that it is not the same one. None where there is none.
    """
    if pair in THESIS_TABLE_15_6:
        return pair, ""
    domains = pair.split("->")
    as_t2 = "->".join("T2" if domain in ("T1", "STIR") else domain for domain in domains)
    if as_t2 != pair and as_t2 in THESIS_TABLE_15_6:
        return as_t2, " (T2)"
    return None, ""


@dataclasses.dataclass
class Table:
    """A table in the thesis' layout, rendered as markdown or LaTeX (booktabs).

    Cells are plain text with '±', '→' and '–', which the LaTeX rendering translates.
    """

    title: str
    caption: str
    header: list[str]
    rows: list[list[str]]
    num_label_columns: int = 2

    def to_markdown(self) -> str:
        lines = [
            "| " + " | ".join(self.header) + " |",
            "|" + "---|" * len(self.header),
            *("| " + " | ".join(row) + " |" for row in self.rows),
        ]
        return "\n".join(lines) + "\n"

    def to_latex(self) -> str:
        alignment = "l" * self.num_label_columns + "c" * (len(self.header) - self.num_label_columns)
        lines = [
            "% needs \\usepackage{booktabs}",
            "\\begin{table}[ht]",
            "\\centering",
            f"\\caption{{{latex_escape(self.caption)}}}",
            "\\resizebox{\\textwidth}{!}{%",
            f"\\begin{{tabular}}{{{alignment}}}",
            "\\toprule",
            " & ".join(latex_escape(cell) for cell in self.header) + " \\\\",
            "\\midrule",
        ]
        previous_group = None  # a rule between groups of rows (all label columns but the last)
        for row in self.rows:
            group = row[: max(1, self.num_label_columns - 1)]
            if previous_group is not None and group != previous_group:
                lines.append("\\midrule")
            previous_group = group
            lines.append(" & ".join(latex_escape(cell) for cell in row) + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}}", "\\end{table}"]
        return "\n".join(lines) + "\n"


_LATEX_SPECIALS = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    "→": r"$\to$",
    "–": "--",
    "§": r"\S{}",
    "≥": r"$\geq$",
}


def latex_escape(text: str) -> str:
    """Text safe inside a LaTeX table cell (specials escaped, ±, →, –, § translated)."""
    return "".join(_LATEX_SPECIALS.get(character, character) for character in text)


def _pair_display(pair: str) -> str:
    return pair.replace("->", "→")


def _data_cell(run: Run) -> str:
    return f"{run.data_label} [{run.variant}]" if run.variant else run.data_label


def _subject_order(subject: str) -> tuple:
    if subject in THESIS_PAIR_ORDER:
        return (0, THESIS_PAIR_ORDER.index(subject), subject)
    if subject in ("PT", "T2", "CT"):  # §15-4's row order
        return (0, ("PT", "T2", "CT").index(subject), subject)
    return (1, 0, subject)


def _groups(runs: Iterable[Run], kind: str) -> list[tuple[tuple[str, str, str], list[Run]]]:
    """Runs of `kind` by (data label, variant, subject), in the thesis' order."""
    grouped: dict[tuple[str, str, str], list[Run]] = {}
    for run in runs:
        if run.kind == kind:
            grouped.setdefault((run.data_label, run.variant, run.subject), []).append(run)
    ordered = sorted(grouped.items(), key=lambda item: (item[0][:2], _subject_order(item[0][2])))
    return [
        (key, sorted(group, key=lambda run: (run.scheme or "", run.seed))) for key, group in ordered
    ]


def _metric_cells(sections: Sequence[Mapping[str, float] | None]) -> list[str]:
    """F1, accuracy, AUC cells (mean ± sd) over the runs' metric dicts (None: left out)."""
    return [
        mean_sd([section[name] for section in sections if section], decimals=3, show_n=False)
        for name in ("f1", "accuracy", "auc")
    ]


def _baseline_test(run: Run) -> Mapping[str, float] | None:
    return run.results.get("baseline_threshold", {}).get("test")


def segmentation_table(runs: Sequence[Run]) -> Table:
    """§15-4: per modality the U-Net's test F1, accuracy, AUC (mean ± sd over seeds), the
    intensity-threshold baseline of the same runs, the thesis' numbers and the §15-5 zero-ratio."""
    header = ["data", "modality", "method", "n", "F1", "accuracy", "AUC", "zero-ratio", "budget"]
    rows = []
    for (_, _, modality), group in _groups(runs, "segmentation"):
        data_cell = _data_cell(group[0])
        n = str(len(group))
        walls = [run.wall_time_s for run in group if run.wall_time_s is not None]
        epochs = group[0].results.get("epochs", group[0].config.get("num_epochs"))
        budget = f"{epochs} epochs" + (f", {np.mean(walls):.0f} s/run" if walls else "")
        zero_ratios = [run.results["test"].get("zero_ratio") for run in group]
        zero_ratio = mean_sd(zero_ratios, decimals=4, show_n=False)
        rows.append(
            [
                data_cell,
                modality,
                "U-Net (ours)",
                n,
                *_metric_cells([run.results["test"] for run in group]),
                zero_ratio,
                budget,
            ]
        )
        rows.append(
            [
                data_cell,
                modality,
                "intensity threshold, no learning",
                n,
                *_metric_cells([_baseline_test(run) for run in group]),
                "",
                "",
            ]
        )
        downsampling = group[0].config.get("model", {}).get("downsampling", "conv")
        thesis = THESIS_TABLE_15_4.get(downsampling, {}).get(modality)
        if thesis is not None:
            rows.append(
                [
                    data_cell,
                    modality,
                    f"thesis §15-4 (U-Net, {downsampling})",
                    "–",
                    *(f"{thesis[name]:.3f}" for name in ("f1", "accuracy", "auc")),
                    _thesis_value(THESIS_ZERO_RATIO.get(modality)),
                    "",
                ]
            )
    return Table(
        title="Segmentation (thesis Table 15-4, zero-ratio Table 15-5)",
        caption=(
            "Segmentation on the test split: F1 (mean per-image Dice at p >= 0.5), pixel "
            "accuracy, pixel ROC AUC; mean ± sample sd over n runs (seeds). The intensity "
            "threshold is chosen on train (no learning). Zero-ratio: fraction of zero pixels in "
            "the truth, the accuracy of predicting no tumour. The thesis' numbers are on its "
            "validation split, whose patients were its test patients."
        ),
        header=header,
        rows=rows,
        num_label_columns=3,
    )


def _criterion_metric(run: Run, criterion: str, metric: str) -> float | None:
    entry = run.results.get("criteria", {}).get(criterion)
    return None if entry is None else entry["test"].get(metric)


def _by_scheme(group: Sequence[Run]) -> dict[str, list[Run]]:
    return {scheme: [run for run in group if run.scheme == scheme] for scheme in train_adda.SCHEMES}


def _before_da_per_seed(group: Sequence[Run], metric: str) -> list[float]:
    """Before-DA values averaged per seed first: both schemes of a seed share the source map."""
    per_seed: dict[int, list[float]] = {}
    for run in group:
        value = _criterion_metric(run, "initial", metric)
        if value is not None:
            per_seed.setdefault(run.seed, []).append(value)
    return [float(np.mean(values)) for _, values in sorted(per_seed.items())]


def da_table(runs: Sequence[Run]) -> Table:
    """§15-6: per pair and metric, before DA, ADDA and RESET (both with the confusion stop)."""
    header = [
        "data",
        "pair",
        "metric",
        "before DA",
        "ADDA (confusion stop)",
        "RESET (confusion stop)",
        "thesis before DA",
        "thesis ADDA",
        "thesis RESET",
    ]
    rows = []
    for (_, _, pair), group in _groups(runs, "adda"):
        schemes = _by_scheme(group)
        thesis_pair, mark = _thesis_pair(pair)
        thesis = THESIS_TABLE_15_6.get(thesis_pair, {})
        for metric, label in METRIC_LABELS.items():
            ours = [
                mean_sd(_before_da_per_seed(group, metric)),
                *(
                    mean_sd([_criterion_metric(run, "confusion", metric) for run in schemes[s]])
                    for s in train_adda.SCHEMES
                ),
            ]
            theirs = [_thesis_value(value, mark=mark) for value in thesis.get(metric, (None,) * 3)]
            rows.append([_data_cell(group[0]), _pair_display(pair), label, *ours, *theirs])
    return Table(
        title="Domain adaptation (thesis Table 15-6)",
        caption=(
            "Target test split before DA (the source map applied to the target), after ADDA and "
            "after RESET (momentum reset), both stopped by the confusion score; mean ± sample sd "
            "over seeds (n: runs that reached the criterion; before DA averaged per seed over "
            "both schemes first). Thesis numbers marked (T2) are its pair with MR T2 in place of "
            "this run's MR sequence."
        ),
        header=header,
        rows=rows,
        num_label_columns=3,
    )


def stopping_table(runs: Sequence[Run]) -> Table:
    """§15-7: per pair, test F1 of each stopping criterion for ADDA and RESET, thesis beside."""
    header = ["data", "pair", "results"] + [
        f"{CRITERION_LABELS[criterion]} {scheme.upper()}"
        for criterion in STOP_CRITERIA
        for scheme in train_adda.SCHEMES
    ]
    rows = []
    for (_, _, pair), group in _groups(runs, "adda"):
        schemes = _by_scheme(group)
        ours = [
            mean_sd([_criterion_metric(run, criterion, "f1") for run in schemes[scheme]])
            for criterion in STOP_CRITERIA
            for scheme in train_adda.SCHEMES
        ]
        data_cell, pair_cell = _data_cell(group[0]), _pair_display(pair)
        rows.append([data_cell, pair_cell, "ours", *ours])
        thesis_pair, mark = _thesis_pair(pair)
        thesis = THESIS_TABLE_15_7.get(thesis_pair)
        if thesis is not None:
            theirs = [
                _thesis_value(thesis[scheme][criterion], mark=mark)
                for criterion in STOP_CRITERIA
                for scheme in train_adda.SCHEMES
            ]
            rows.append([data_cell, pair_cell, "thesis", *theirs])
    return Table(
        title="Stopping criteria (thesis Table 15-7)",
        caption=(
            "Target test F1 of the model each stopping criterion keeps, for ADDA and RESET; "
            "mean ± sample sd over seeds (n: runs that reached the criterion). Highest peak picks "
            "the best target val F1, so it uses target labels: an oracle, a ceiling only. Thesis "
            "numbers marked (T2) are its pair with MR T2 in place of this run's MR sequence."
        ),
        header=header,
        rows=rows,
        num_label_columns=3,
    )


# ---------------------------------------------------------------------------------------------
# Figures.


def _boxes(axes, categories: Sequence[str], series: Sequence[str], values, ylabel: str) -> None:
    """Grouped box plots: per category one box per series; ⊗ marks the mean (as the thesis)."""
    colours = ("#bbbbbb", "#4c72b0", "#dd8452", "#55a868")
    width = 0.8 / len(series)
    for index, name in enumerate(series):
        positions, data = [], []
        for category_index, category in enumerate(categories):
            found = [v for v in values.get((category, name), []) if v is not None]
            if found:
                positions.append(category_index + (index - (len(series) - 1) / 2) * width)
                data.append(found)
        if data:
            artists = axes.boxplot(
                data,
                positions=positions,
                widths=width * 0.9,
                patch_artist=True,
                showmeans=True,
                meanprops={"marker": "$\\otimes$", "markeredgecolor": "black", "markersize": 9},
                medianprops={"color": "black"},
            )
            for box in artists["boxes"]:
                box.set_facecolor(colours[index % len(colours)])
    axes.set_xticks(range(len(categories)), [_pair_display(c) for c in categories])
    axes.set_xlim(-0.6, len(categories) - 0.4)
    axes.set_ylabel(ylabel)
    axes.legend(
        handles=[
            Patch(facecolor=colours[i % len(colours)], label=name) for i, name in enumerate(series)
        ],
        fontsize=8,
    )


def _per_image_f1(run: Run, criterion: str | None) -> list[float] | None:
    """Per-image test F1 of a segmentation run (criterion None) or of an ADDA criterion."""
    section = run.results if criterion is None else run.results["criteria"].get(criterion, {})
    return section.get("test_per_image", {}).get("f1")


def plot_da_boxplots(groups: Sequence[tuple[str, list[Run]]], path: pathlib.Path) -> str:
    """§15-3: F1 and accuracy box plots per pair: before DA, ADDA and RESET (confusion stop).

    F1 is per image (pooled over seeds) when every run records per-image test F1
    (`criteria[name]['test_per_image']['f1']`), else one value per seed; accuracy is per seed.

    Returns:
      A caption saying which.
    """
    columns = {
        "before DA": ("initial", None),
        "ADDA": ("confusion", "adda"),
        "RESET": ("confusion", "reset"),
    }
    categories = [pair for pair, _ in groups]
    per_image = all(
        _per_image_f1(run, criterion) is not None
        for _, group in groups
        for run in group
        for criterion in ("initial", "confusion")
        if criterion in run.results["criteria"]
    )
    f1_values, accuracy_values = {}, {}
    for pair, group in groups:
        for name, (criterion, scheme) in columns.items():
            chosen = [run for run in group if scheme is None or run.scheme == scheme]
            if scheme is None:
                accuracy_values[pair, name] = _before_da_per_seed(group, "accuracy")
                f1_values[pair, name] = _before_da_per_seed(group, "f1")
            else:
                accuracy_values[pair, name] = [
                    _criterion_metric(run, criterion, "accuracy") for run in chosen
                ]
                f1_values[pair, name] = [_criterion_metric(run, criterion, "f1") for run in chosen]
            if per_image:
                if scheme is None:  # one seed's before-DA images once, not once per scheme
                    chosen = list({run.seed: run for run in group}.values())
                f1_values[pair, name] = [
                    value for run in chosen for value in (_per_image_f1(run, criterion) or [])
                ]
    figure = Figure(figsize=(max(7, 2.2 * len(categories)), 7))
    f1_axes, accuracy_axes = figure.subplots(2, 1)
    f1_unit = "per test image, pooled over seeds" if per_image else "one value per seed"
    _boxes(f1_axes, categories, list(columns), f1_values, f"test F1 ({f1_unit})")
    _boxes(accuracy_axes, categories, list(columns), accuracy_values, "test accuracy (per seed)")
    f1_axes.set_title("Confusion stop; ⊗ mean, line median")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return f"F1: {f1_unit}; accuracy: one value per seed."


def plot_segmentation_boxplot(groups: Sequence[tuple[str, list[Run]]], path: pathlib.Path) -> str:
    """Test F1 per modality (as thesis Figure 15-1): per image pooled over seeds when recorded."""
    per_image = all(_per_image_f1(run, None) is not None for _, group in groups for run in group)
    values = {
        (modality, "U-Net"): [
            value
            for run in group
            for value in (_per_image_f1(run, None) if per_image else [run.results["test"]["f1"]])
        ]
        for modality, group in groups
    }
    unit = "per test image, pooled over seeds" if per_image else "one value per seed"
    figure = Figure(figsize=(max(4, 1.6 * len(groups)), 4))
    axes = figure.subplots()
    _boxes(axes, [modality for modality, _ in groups], ["U-Net"], values, f"test F1 ({unit})")
    axes.set_title("Segmentation; ⊗ mean, line median")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return f"F1 {unit}."


_CRITERION_STYLES = {
    "confusion": ("tab:red", "-"),
    "best_loss": ("tab:purple", "--"),
    "latest": ("tab:gray", ":"),
    "highest_peak": ("tab:green", "-."),
}


def _column(history: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    return np.asarray(
        [np.nan if row.get(key) is None else float(row[key]) for row in history], np.float64
    )


def plot_adda_curves(run: Run, path: pathlib.Path) -> pathlib.Path:
    """§17-1: confusion score, discriminator loss, recall / specificity and the target val metric
    against steps (discriminator + target updates), with each criterion's chosen step marked."""
    history = run.history
    steps = _column(history, "step")
    metric = f"target_val_{run.results.get('primary_metric', 'f1')}"
    figure = Figure(figsize=(8, 9))
    panels = figure.subplots(4, 1, sharex=True)
    panels[0].plot(steps, _column(history, "confusion_score"), "-", color="tab:red")
    panels[0].set(ylabel="confusion score", ylim=(-0.02, 1.02))
    panels[1].plot(steps, _column(history, "disc_loss"), "-", label="discriminator CE (val)")
    panels[1].plot(
        steps,
        _column(history, "disc_loss_train"),
        "-",
        alpha=0.6,
        label="discriminator loss (train, mean of phase)",
    )
    panels[1].plot(
        steps,
        _column(history, "target_adversarial_loss"),
        "-",
        alpha=0.8,
        label="target adversarial loss (target val)",
    )
    panels[1].set(ylabel="loss")
    panels[2].plot(steps, _column(history, "recall"), "-", label="recall (source val → source)")
    panels[2].plot(
        steps, _column(history, "specificity"), "-", label="specificity (target val → target)"
    )
    panels[2].axhline(0.5, color="black", linewidth=0.5)
    panels[2].set(ylabel="discriminator", ylim=(-0.02, 1.02))
    panels[3].plot(steps, _column(history, metric), "-", color="tab:green")
    panels[3].set(ylabel=f"{metric}\n(oracle signal)", xlabel="step (disc + target updates)")
    criteria = run.results.get("criteria", {})
    for name, (colour, style) in _CRITERION_STYLES.items():
        if name in criteria:
            for axes in panels:
                axes.axvline(criteria[name]["step"], color=colour, linestyle=style, linewidth=1)
    handles = [
        Patch(color=colour, label=f"{CRITERION_LABELS[name]} (step {criteria[name]['step']})")
        for name, (colour, _) in _CRITERION_STYLES.items()
        if name in criteria
    ]
    panels[0].legend(handles=handles, fontsize=7, loc="lower right")
    for axes in panels[1:3]:
        axes.legend(fontsize=7)
    panels[0].set_title(run.description, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def select_overlay_slices(
    f1_after: np.ndarray, count: int, band: tuple[float, float] = (60.0, 80.0)
) -> np.ndarray:
    """Slices as the thesis picks them for Figures 15-4..6: F1 between the 60th and 80th
    percentile (after DA), `count` of them spread evenly in F1 order; when the band holds fewer,
    the slices nearest to the band's middle percentile.

    Returns:
      Indices into f1_after, ordered by increasing F1.
    """
    f1_after = np.asarray(f1_after, np.float64)
    count = min(count, f1_after.size)
    low, high = np.percentile(f1_after, band)
    in_band = np.flatnonzero((f1_after >= low) & (f1_after <= high))
    if in_band.size >= count:
        by_f1 = in_band[np.argsort(f1_after[in_band], kind="stable")]
        return by_f1[np.linspace(0, by_f1.size - 1, count).round().astype(int)]
    middle = np.percentile(f1_after, sum(band) / 2)
    nearest = np.argsort(np.abs(f1_after - middle), kind="stable")[:count]
    return nearest[np.argsort(f1_after[nearest], kind="stable")]


def plot_before_after(
    images: np.ndarray,
    masks: np.ndarray,
    probs_before: np.ndarray,
    probs_after: np.ndarray,
    path: pathlib.Path,
    title: str = "",
) -> pathlib.Path:
    """Thesis Figures 15-4..6: per slice the input, the prediction before DA and after DA (truth
    orange, prediction red, per-image F1 above), and the probabilities after DA.

    Args:
      images, masks, probs_before, probs_after: (n, h, w, 1).
      path: the PNG to write.
      title: a line above the figure.
    """
    f1_before = metrics.dice_per_image(probs_before >= 0.5, masks > 0)
    f1_after = metrics.dice_per_image(probs_after >= 0.5, masks > 0)
    num_slices = images.shape[0]
    figure = Figure(figsize=(10, 2.6 * num_slices + 0.4))
    axes = figure.subplots(num_slices, 4, squeeze=False)
    for row in range(num_slices):
        image = images[row, ..., 0]
        for column, probs, f1 in ((1, probs_before, f1_before), (2, probs_after, f1_after)):
            axes[row, column].imshow(image, cmap="gray", vmin=0, vmax=1)
            figures.draw_contour(axes[row, column], masks[row, ..., 0] > 0, figures.TRUTH_COLOUR)
            figures.draw_contour(
                axes[row, column], probs[row, ..., 0] >= 0.5, figures.PREDICTION_COLOUR
            )
            axes[row, column].set_title(f"F1={f1[row]:.3f}", fontsize=8)
        if row == 0:
            axes[0, 1].set_title(f"before DA\nF1={f1_before[0]:.3f}", fontsize=8)
            axes[0, 2].set_title(f"after DA\nF1={f1_after[0]:.3f}", fontsize=8)
            axes[0, 0].set_title("input", fontsize=8)
            axes[0, 3].set_title("probabilities (after DA)", fontsize=8)
        axes[row, 0].imshow(image, cmap="gray", vmin=0, vmax=1)
        axes[row, 3].imshow(probs_after[row, ..., 0], cmap="gray", vmin=0, vmax=1)
        for axis in axes[row]:
            axis.set_xticks([])
            axis.set_yticks([])
    figure.suptitle(title + "\ntruth orange, prediction red", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def _criterion_probs(run: Run, criterion: str, images: np.ndarray) -> np.ndarray:
    """Probabilities (n, h, w, 1) of the target map a criterion kept (from its checkpoint)."""
    state_dir = train_adda.resolve_segmentation_checkpoint(run.workdir / "checkpoints" / criterion)
    variables = ocp.StandardCheckpointer().restore(state_dir.resolve())
    model = models.create(run.config["model"])
    apply = jax.jit(functools.partial(model.apply, train=False))
    batch_size = int(run.config.get("eval_batch_size", 10))
    logits = np.concatenate(
        [
            np.asarray(apply(variables, images[start : start + batch_size]))
            for start in range(0, images.shape[0], batch_size)
        ]
    )
    return scipy.special.expit(logits.astype(np.float64))


def render_overlays(
    run: Run, path: pathlib.Path, num_slices: int, data_cache: dict[str, Any]
) -> str | None:
    """Restores the `initial` and `confusion` target maps of an ADDA run, predicts the target test
    slices and plots `num_slices` of them (select_overlay_slices).

    Args:
      run: an ADDA run.
      path: the PNG to write.
      num_slices: slices to show.
      data_cache: loaded DomainData by data config, shared between runs of the same data.

    Returns:
      None, or a one-line note saying why nothing (or something doubtful) was rendered.
    """
    for criterion in ("initial", "confusion"):
        if not (run.workdir / "checkpoints" / criterion).is_dir():
            return f"no overlay for {run.workdir}: no checkpoints/{criterion}"
    config = ml_collections.ConfigDict(run.config)
    data_key = json.dumps(run.config["data"], sort_keys=True)
    try:
        if data_key not in data_cache:
            data_cache[data_key] = train_adda.get_task(config.task).load_data(config)
        target_test = data_cache[data_key].target["test"]
        probs = {
            c: _criterion_probs(run, c, target_test["image"]) for c in ("initial", "confusion")
        }
    except (*input_pipeline.USER_ERRORS, OSError, ValueError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        return f"no overlay for {run.workdir}: {message}"
    criteria = run.results["criteria"]
    f1_after = metrics.dice_per_image(probs["confusion"] >= 0.5, target_test["mask"] > 0)
    shown = select_overlay_slices(f1_after, num_slices)
    plot_before_after(
        target_test["image"][shown],
        target_test["mask"][shown],
        probs["initial"][shown],
        probs["confusion"][shown],
        path,
        title=f"{run.description}: confusion stop at step {criteria['confusion']['step']}",
    )
    recorded = criteria["confusion"]["test"]["f1"]
    if not math.isclose(float(f1_after.mean()), recorded, abs_tol=1e-4):
        return (
            f"overlay of {run.workdir}: recomputed test F1 {f1_after.mean():.4f} differs from "
            f"results.json's {recorded:.4f}; the data may have changed since the run"
        )
    return None


# ---------------------------------------------------------------------------------------------
# The report.


def _file_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text.replace("->", "_to_")).strip("_")


def _by_data(
    groups: Sequence[tuple[tuple[str, str, str], list[Run]]],
) -> dict[tuple[str, str], list[tuple[str, list[Run]]]]:
    """(data label, variant) -> [(subject, runs)], from `_groups`."""
    by_data: dict[tuple[str, str], list[tuple[str, list[Run]]]] = {}
    for (data_label, variant, subject), group in groups:
        by_data.setdefault((data_label, variant), []).append((subject, group))
    return by_data


def _figure_markdown(link: str, label: str, caption: str) -> str:
    return f"![{label}]({link})\n\n{label}: {caption}\n"


def _link_list(runs: Iterable[Run], links: Mapping[pathlib.Path, str]) -> str:
    return "".join(
        f"- {run.description}: [{links[run.workdir]}]({links[run.workdir]})\n"
        for run in runs
        if run.workdir in links
    )


def _variant_legend(runs: Iterable[Run]) -> str:
    """Markdown lines 'A: num_epochs=10' for the variants among `runs` ('' if none)."""
    details = sorted(
        {(run.variant, run.data_label, run.subject, run.variant_detail) for run in runs}
    )
    lines = [
        f"- [{variant}] {data_label} {subject}: {detail}\n"
        for variant, data_label, subject, detail in details
        if variant
    ]
    if not lines:
        return ""
    return "\nVariants (configs of one group that differ in more than seeds):\n\n" + "".join(lines)


def _write_table(
    table: Table, runs: Iterable[Run], out: pathlib.Path, stem: str, extra_markdown: str = ""
) -> None:
    """stem.md (title, caption, table, variant legend, extra_markdown) and stem.tex."""
    (out / f"{stem}.md").write_text(
        f"# {table.title}\n\n{table.caption}\n\n{table.to_markdown()}{_variant_legend(runs)}"
        f"{extra_markdown}"
    )
    (out / f"{stem}.tex").write_text(table.to_latex())


def _write_segmentation(runs: Sequence[Run], out: pathlib.Path) -> None:
    """segmentation.md / .tex and a test-F1 box plot per data source."""
    figure_lines = []
    for (data_label, variant), groups in _by_data(_groups(runs, "segmentation")).items():
        label = f"{data_label} [{variant}]" if variant else data_label
        link = f"figures/segmentation_f1_{_file_name(f'{data_label}_{variant}')}.png"
        caption = plot_segmentation_boxplot(groups, out / link)
        figure_lines.append(_figure_markdown(link, label, caption))
    _write_table(
        segmentation_table(runs),
        [run for run in runs if run.kind == "segmentation"],
        out,
        "segmentation",
        "\nTraining curves and example slices (Figure 15-2) are in each workdir "
        "(training_curves.png, segmentation_examples.png).\n\n"
        "## Test F1 per modality (as Figure 15-1)\n\n" + "\n".join(figure_lines),
    )


def _write_curves(
    runs: Sequence[Run], out: pathlib.Path, progress: bool, warnings: list[str]
) -> dict[pathlib.Path, str]:
    """§17-1 curves of every ADDA and digits run; returns workdir -> link."""
    curve_runs = [run for run in runs if run.kind in ("adda", "digits")]
    links = {}
    (out / "figures" / "curves").mkdir(exist_ok=True)
    for index, run in enumerate(
        tqdm.tqdm(curve_runs, desc="curves (§17-1)", disable=not progress or not curve_runs)
    ):
        if not run.history:
            warnings.append(f"no metrics.jsonl in {run.workdir}: no §17-1 curves")
            continue
        link = f"figures/curves/{index:03d}_{_file_name(run.description)}.png"
        plot_adda_curves(run, out / link)
        links[run.workdir] = link
    return links


def _write_overlays(
    adda_groups: Sequence[tuple[tuple[str, str, str], list[Run]]],
    out: pathlib.Path,
    num_slices: int,
    progress: bool,
    warnings: list[str],
) -> list[str]:
    """Before/after overlays of the lowest-seed run per pair and scheme; returns markdown lines."""
    lowest_seed_runs = [
        next(run for run in group if run.scheme == scheme)
        for _, group in adda_groups
        for scheme in train_adda.SCHEMES
        if any(run.scheme == scheme for run in group)
    ]
    (out / "figures" / "overlays").mkdir(exist_ok=True)
    data_cache: dict[str, Any] = {}
    lines = []
    for run in tqdm.tqdm(lowest_seed_runs, desc="overlays", disable=not progress):
        if "confusion" not in run.results["criteria"]:
            lines.append(f"- {run.description}: the confusion stop was not reached")
            continue
        link = f"figures/overlays/{_file_name(f'{_data_cell(run)}_{run.subject}_{run.scheme}')}.png"
        note = render_overlays(run, out / link, num_slices, data_cache)
        if (out / link).is_file():
            lines.append(f"- {run.description}: [{link}]({link})")
        if note:
            lines.append(f"- note: {note}")
            warnings.append(note)
    return lines


def _write_adda(
    runs: Sequence[Run],
    out: pathlib.Path,
    curve_links: Mapping[pathlib.Path, str],
    overlays: bool,
    overlay_slices: int,
    progress: bool,
    warnings: list[str],
) -> None:
    """da.md / .tex with the §15-3 box plots and overlays; stopping.md / .tex with the curves."""
    adda_groups = _groups(runs, "adda")
    box_lines = []
    for (data_label, variant), groups in _by_data(adda_groups).items():
        label = f"{data_label} [{variant}]" if variant else data_label
        link = f"figures/da_boxplots_{_file_name(f'{data_label}_{variant}')}.png"
        box_lines.append(_figure_markdown(link, label, plot_da_boxplots(groups, out / link)))
    if overlays:
        overlay_lines = _write_overlays(adda_groups, out, overlay_slices, progress, warnings)
    else:
        overlay_lines = ["- not rendered (--no-overlays)"]
    adda_runs = [run for run in runs if run.kind == "adda"]
    _write_table(
        da_table(runs),
        adda_runs,
        out,
        "da",
        "\n## F1 and accuracy box plots (as Figure 15-3)\n\n"
        + "\n".join(box_lines)
        + "\n## Before/after overlays (as Figures 15-4..6)\n\nOne run (the lowest seed) per "
        "pair and scheme: target test slices whose F1 after DA lies between its 60th and 80th "
        "percentile; before DA = the `initial` target map, after DA = the `confusion` one.\n\n"
        + "\n".join(overlay_lines)
        + "\n",
    )
    _write_table(
        stopping_table(runs),
        adda_runs,
        out,
        "stopping",
        "\n## Confusion score and losses against steps (as Figure 17-1)\n\n"
        + _link_list(adda_runs, curve_links),
    )


def _write_digits(
    runs: Sequence[Run], out: pathlib.Path, curve_links: Mapping[pathlib.Path, str]
) -> None:
    """digits.md: digits.table_10_3 per dataset (and variant), then the curves."""
    digits_runs = [run for run in runs if run.kind == "digits"]
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in digits_runs:
        groups.setdefault((run.data_label, run.variant), []).append(run)
    parts = ["# Digits (thesis Table 10-3)\n"]
    for (data_label, variant), group in sorted(groups.items()):
        other_pair = "" if data_label == "svhn_mnist" else ", not the pair of this table"
        parts.append(
            f"\n## {data_label}{f' [{variant}]' if variant else ''}\n\nTarget test accuracy, "
            f"mean ± sample sd over runs. The thesis rows are SVHN→MNIST{other_pair}.\n\n"
            + digits.table_10_3([run.workdir for run in group])
        )
    parts.append(_variant_legend(digits_runs))
    parts.append("\n## Curves (as Figure 17-1)\n\n" + _link_list(digits_runs, curve_links))
    (out / "digits.md").write_text("".join(parts))


def _write_index(
    runs: Sequence[Run],
    out: pathlib.Path,
    sections: Sequence[tuple[str, str]],
    warnings: Sequence[str],
) -> pathlib.Path:
    git = provenance.git_state()
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    lines = [
        "# Report",
        "",
        f"Generated {created} by `python -m sarcoma_jax.report` at commit "
        f"{git['commit'] or 'unknown'}{' (dirty)' if git['dirty'] else ''}, from {len(runs)} "
        "finished runs. Numbers are on the test split; mean ± sample sd over seeds.",
        "",
        *(f"- [{link}]({link}): {description}" for link, description in sections),
        "",
    ]
    if warnings:
        lines += ["## Warnings", "", *(f"- {warning}" for warning in warnings), ""]
    legend = _variant_legend(runs)
    if legend:
        lines += ["## Variants", legend]
    lines += [
        "## Workdirs",
        "",
        "| workdir | kind | data | modality / pair | scheme | seed | data seed | git commit "
        "| created (UTC) | wall time (s) |",
        "|" + "---|" * 10,
        *(_provenance_row(run) for run in runs),
        "",
    ]
    index = out / "index.md"
    index.write_text("\n".join(lines))
    return index


def _provenance_row(run: Run) -> str:
    commit = _commit(run)
    if run.provenance.get("git", {}).get("dirty"):
        commit += " (dirty)"
    wall = run.wall_time_s
    cells = [
        f"`{run.workdir}`",
        run.kind,
        _data_cell(run),
        run.subject or "–",
        run.scheme or "–",
        str(run.seed),
        str(run.data_seed) if run.data_seed is not None else "–",
        commit,
        run.provenance.get("created_utc", "unknown"),
        "–" if wall is None else f"{wall:.0f}",
    ]
    return "| " + " | ".join(cells) + " |"


def write_report(
    paths: Sequence[str | pathlib.Path],
    out: str | pathlib.Path,
    overlays: bool = True,
    overlay_slices: int = 4,
    progress: bool = True,
) -> tuple[pathlib.Path, list[str]]:
    """Writes the report of the workdirs `paths` into `out`; see the module docstring.

    Args:
      paths: workdirs (segmentation, ADDA or digits runs).
      out: the report folder (created).
      overlays: render before/after overlays (restores checkpoints and loads the target data).
      overlay_slices: slices per overlay figure.
      progress: show progress bars over the figures.

    Returns:
      The path of index.md, and one-line warnings (skipped runs, variant splits, figures that
      could not be made).

    Raises:
      ReportError: bad input (see load_runs), or `out` cannot be created.
    """
    runs, warnings = load_runs(paths)
    out = pathlib.Path(out)
    try:
        (out / "figures").mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ReportError(f"cannot create the report folder {out}: {error.strerror}") from None
    kinds = {run.kind for run in runs}
    sections = []  # (link, description) for index.md
    if "segmentation" in kinds:
        _write_segmentation(runs, out)
        sections.append(("segmentation.md", "segmentation, §15-4 / §15-5 (also .tex)"))
    curve_links = _write_curves(runs, out, progress, warnings)
    if "adda" in kinds:
        _write_adda(runs, out, curve_links, overlays, overlay_slices, progress, warnings)
        sections.append(("da.md", "domain adaptation §15-6 (also .tex), box plots, overlays"))
        sections.append(("stopping.md", "stopping criteria §15-7 (also .tex), §17-1 curves"))
    if "digits" in kinds:
        _write_digits(runs, out, curve_links)
        sections.append(("digits.md", "digits §10-3, §17-1 curves"))
    return _write_index(runs, out, sections, warnings), warnings


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (errors are one line on stderr)."""
    parser = argparse.ArgumentParser(
        prog="python -m sarcoma_jax.report",
        description="Tables (§15-4, §15-6, §15-7, §10-3) and figures from finished workdirs.",
    )
    parser.add_argument("workdirs", nargs="*", help="run folders (segmentation, ADDA, digits)")
    parser.add_argument("--out", required=True, help="report folder (created)")
    parser.add_argument(
        "--no-overlays",
        action="store_true",
        help="skip the before/after overlays (they restore checkpoints and load the target data)",
    )
    parser.add_argument("--overlay-slices", type=int, default=4, help="slices per overlay figure")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        index, warnings = write_report(
            args.workdirs,
            args.out,
            overlays=not args.no_overlays,
            overlay_slices=max(1, args.overlay_slices),
            progress=not args.no_progress,
        )
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"report written: {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
