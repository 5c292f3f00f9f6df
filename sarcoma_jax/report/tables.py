"""The thesis' tables from runs: §15-4 segmentation, §15-6 domain adaptation, §15-7 stopping
criteria; markdown and LaTeX (booktabs). Every cell is mean ± sample sd over runs."""

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from sarcoma_jax.adda import criteria as criteria_lib
from sarcoma_jax.adda.game import SCHEMES
from sarcoma_jax.report import thesis
from sarcoma_jax.report.runs import Run

METRIC_LABELS = {"f1": "F1", "accuracy": "accuracy", "auc": "AUC"}

# Flattened config keys (also under 'source.') that do not change what a run computes beyond its
# seeds: runs that differ only in these are aggregated as seeds of one experiment.


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


def pair_display(pair: str) -> str:
    return pair.replace("->", "→")


def data_cell(run: Run) -> str:
    return f"{run.data_label} [{run.variant}]" if run.variant else run.data_label


def _subject_order(subject: str) -> tuple:
    if subject in thesis.THESIS_PAIR_ORDER:
        return (0, thesis.THESIS_PAIR_ORDER.index(subject), subject)
    if subject in ("PT", "T2", "CT"):  # §15-4's row order
        return (0, ("PT", "T2", "CT").index(subject), subject)
    return (1, 0, subject)


def groups_of(runs: Iterable[Run], kind: str) -> list[tuple[tuple[str, str, str], list[Run]]]:
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
    for (_, _, modality), group in groups_of(runs, "segmentation"):
        data_label = data_cell(group[0])
        n = str(len(group))
        walls = [run.wall_time_s for run in group if run.wall_time_s is not None]
        epochs = group[0].results.get("epochs", group[0].config.get("num_epochs"))
        num_folds = group[0].num_folds
        if num_folds:
            budget = f"{epochs} epochs, {num_folds} folds" + (
                f", {np.mean(walls) / num_folds:.0f} s/fold" if walls else ""
            )
        else:
            budget = f"{epochs} epochs" + (f", {np.mean(walls):.0f} s/run" if walls else "")
        zero_ratios = [run.results["test"].get("zero_ratio") for run in group]
        zero_ratio = mean_sd(zero_ratios, decimals=4, show_n=False)
        rows.append(
            [
                data_label,
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
                data_label,
                modality,
                "intensity threshold, no learning",
                n,
                *_metric_cells([_baseline_test(run) for run in group]),
                "",
                "",
            ]
        )
        downsampling = group[0].config.get("model", {}).get("downsampling", "conv")
        numbers = thesis.THESIS_TABLE_15_4.get(downsampling, {}).get(modality)
        if numbers is not None:
            rows.append(
                [
                    data_label,
                    modality,
                    f"thesis §15-4 (U-Net, {downsampling})",
                    "–",
                    *(f"{numbers[name]:.3f}" for name in ("f1", "accuracy", "auc")),
                    thesis.thesis_value(thesis.THESIS_ZERO_RATIO.get(modality)),
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
            "validation split, whose patients were its test patients. Cross-validated rows "
            "(budget 'k folds'): each seed's F1, accuracy and zero-ratio are over the test "
            "images of every fold, so over every patient, each tested once by the fold that "
            "held it out; its AUC is the mean over folds; ± is the sd over seeds (n). Per-patient "
            "F1, with mean ± sd over patients: the per-patient table."
        ),
        header=header,
        rows=rows,
        num_label_columns=3,
    )


def criterion_metric(run: Run, criterion: str, metric: str) -> float | None:
    entry = run.results.get("criteria", {}).get(criterion)
    return None if entry is None else entry["test"].get(metric)


def _by_scheme(group: Sequence[Run]) -> dict[str, list[Run]]:
    return {scheme: [run for run in group if run.scheme == scheme] for scheme in SCHEMES}


def before_da_per_seed(group: Sequence[Run], metric: str) -> list[float]:
    """Before-DA values averaged per seed first: both schemes of a seed share the source map."""
    per_seed: dict[int, list[float]] = {}
    for run in group:
        value = criterion_metric(run, criteria_lib.BEFORE_DA, metric)
        if value is not None:
            per_seed.setdefault(run.seed, []).append(value)
    return [float(np.mean(values)) for _, values in sorted(per_seed.items())]


def ran_criteria(results: Mapping) -> list[str]:
    """The stopping criteria a run ran: those that picked a model and those that never did."""
    return [*results.get("criteria", {}), *results.get("criteria_not_reached", [])]


def criterion_names(all_results: Iterable[Mapping]) -> list[str]:
    """The stopping criteria the runs ran (all but the before-DA one), in the registry's order,
    others after them."""
    found = [name for results in all_results for name in ran_criteria(results)]
    return [name for name in criteria_lib.sort_names(found) if name != criteria_lib.BEFORE_DA]


def criterion_label(runs: Iterable[Run], name: str) -> str:
    """A criterion's label as its runs recorded it (older runs did not: the registry's)."""
    for run in runs:
        recorded = run.results.get("criteria", {}).get(name, {}).get("label")
        if recorded:
            return recorded
    return criteria_lib.label(name)


def da_table(runs: Sequence[Run]) -> Table:
    """§15-6: per pair and metric, before DA, ADDA and RESET (both stopped by the recommended
    criterion, `criteria_lib.RECOMMENDED`: the confusion stop, as in the thesis)."""
    recommended = criteria_lib.RECOMMENDED
    stop = criterion_label(runs, recommended)
    header = [
        "data",
        "pair",
        "metric",
        "before DA",
        *(f"{scheme.upper()} ({stop})" for scheme in SCHEMES),
        "thesis before DA",
        "thesis ADDA",
        "thesis RESET",
    ]
    rows = []
    for (_, _, pair), group in groups_of(runs, "adda"):
        schemes = _by_scheme(group)
        beside, mark = thesis.thesis_pair(pair)
        numbers = thesis.THESIS_TABLE_15_6.get(beside, {})
        for metric, label in METRIC_LABELS.items():
            ours = [
                mean_sd(before_da_per_seed(group, metric)),
                *(
                    mean_sd([criterion_metric(run, recommended, metric) for run in schemes[s]])
                    for s in SCHEMES
                ),
            ]
            theirs = [
                thesis.thesis_value(value, mark=mark) for value in numbers.get(metric, (None,) * 3)
            ]
            rows.append([data_cell(group[0]), pair_display(pair), label, *ours, *theirs])
    return Table(
        title="Domain adaptation (thesis Table 15-6)",
        caption=(
            "Target test split before DA (the source map applied to the target), after ADDA and "
            f"after RESET (momentum reset), both by the {stop}; mean ± sample sd over seeds (n: "
            "runs that reached the criterion; before DA averaged per seed over both schemes "
            "first). The thesis stopped by the confusion score. Thesis numbers marked (T2) are its "
            "pair with MR T2 in place of this run's MR sequence."
        ),
        header=header,
        rows=rows,
        num_label_columns=3,
    )


def stopping_table(runs: Sequence[Run]) -> Table:
    """§15-7: per pair, test F1 of each stopping criterion the runs have, for ADDA and RESET,
    the thesis' numbers beside (for the criteria it has)."""
    adda_runs = [run for run in runs if run.kind == "adda"]
    names = criterion_names(run.results for run in adda_runs)
    header = ["data", "pair", "results"] + [
        f"{criterion_label(adda_runs, name)} {scheme.upper()}"
        for name in names
        for scheme in SCHEMES
    ]
    rows = []
    for (_, _, pair), group in groups_of(runs, "adda"):
        schemes = _by_scheme(group)
        ours = [
            mean_sd([criterion_metric(run, name, "f1") for run in schemes[scheme]])
            for name in names
            for scheme in SCHEMES
        ]
        data_label, pair_cell = data_cell(group[0]), pair_display(pair)
        rows.append([data_label, pair_cell, "ours", *ours])
        beside, mark = thesis.thesis_pair(pair)
        numbers = thesis.THESIS_TABLE_15_7.get(beside)
        if numbers is not None:
            theirs = [
                thesis.thesis_value(numbers[scheme].get(name), mark=mark)
                for name in names
                for scheme in SCHEMES
            ]
            rows.append([data_label, pair_cell, "thesis", *theirs])
    oracles = [
        criterion_label(adda_runs, name)
        for name in names
        if any(run.results["criteria"].get(name, {}).get("oracle") for run in adda_runs)
    ]
    if len(oracles) == 1:
        oracle_note = f" {oracles[0]} uses target labels: an oracle, a ceiling only."
    elif oracles:
        oracle_note = f" {', '.join(oracles)} use target labels: oracles, ceilings only."
    else:
        oracle_note = ""
    return Table(
        title="Stopping criteria (thesis Table 15-7)",
        caption=(
            "Target test F1 of the model each stopping criterion keeps, for ADDA and RESET; "
            "mean ± sample sd over seeds (n: runs that reached the criterion)."
            + oracle_note
            + " Thesis numbers marked (T2) are its pair with MR T2 in place of this run's MR "
            "sequence."
        ),
        header=header,
        rows=rows,
        num_label_columns=3,
    )


def patient_f1(section: Mapping) -> dict[str, float]:
    """Per patient, the mean test F1 of its images (a section with test_per_image patient keys)."""
    per_image = section.get("test_per_image", {})
    keys, values = per_image.get("patient_key", []), per_image.get("f1", [])
    by_patient: dict[str, list[float]] = {}
    for key, value in zip(keys, values, strict=True):
        by_patient.setdefault(key, []).append(value)
    return {key: float(np.mean(found)) for key, found in sorted(by_patient.items())}


def score_columns(group: Sequence[Run]) -> list[tuple[str, list[Mapping]]]:
    """What the per-patient table and box plots compare for a group: (label, one results section
    with test_per_image per run). Segmentation: the U-Net and the intensity threshold; ADDA:
    before DA (one run per seed) and ADDA and RESET at the recommended criterion."""
    if group[0].kind == "segmentation":
        return [
            ("U-Net (ours)", [run.results for run in group]),
            ("intensity threshold", [run.results["baseline_threshold"] for run in group]),
        ]
    before, after = criteria_lib.BEFORE_DA, criteria_lib.RECOMMENDED
    one_per_seed = list({run.seed: run for run in group}.values())
    columns = [("before DA", [run.results["criteria"].get(before) for run in one_per_seed])]
    stop = criterion_label(group, after)
    for scheme, runs in _by_scheme(group).items():
        columns.append(
            (f"{scheme.upper()} ({stop})", [run.results["criteria"].get(after) for run in runs])
        )
    return [(label, [section for section in sections if section]) for label, sections in columns]


def cross_validated_groups(runs: Iterable[Run], kind: str) -> list[tuple[tuple, list[Run]]]:
    """groups_of(runs, kind) restricted to cross-validated runs (every patient tested once)."""
    return [(key, group) for key, group in groups_of(runs, kind) if group[0].num_folds]


def patient_table(runs: Sequence[Run], kind: str) -> Table:
    """Per patient of each cross-validated group of `kind`: its fold, test images and F1 per
    column of score_columns (mean ± sd over seeds), then the mean ± sd over patients and the F1
    over all test images (mean ± sd over seeds, as the main table)."""
    groups = cross_validated_groups(runs, kind)
    labels = [label for label, _ in score_columns(groups[0][1])] if groups else []
    header = [
        "data",
        "modality" if kind == "segmentation" else "pair",
        "patient",
        "fold",
        "test images",
        *labels,
    ]
    rows = []
    for (_, _, subject), group in groups:
        data_label, subject_cell = data_cell(group[0]), pair_display(subject)
        columns = score_columns(group)
        per_patient = [[patient_f1(section) for section in sections] for _, sections in columns]
        patients = group[0].results.get("cross_validation", {}).get("patients", {})
        for key, info in sorted(patients.items(), key=lambda item: (item[1]["fold"], item[0])):
            cells = [
                mean_sd([seed[key] for seed in seeds if key in seed], decimals=3, show_n=False)
                for seeds in per_patient
            ]
            rows.append(
                [data_label, subject_cell, key, str(info["fold"]), str(info["test_images"]), *cells]
            )
        over_patients = [
            mean_sd(
                [
                    float(np.mean([seed[key] for seed in seeds if key in seed]))
                    for key in patients
                    if any(key in seed for seed in seeds)
                ],
                decimals=3,
                show_n=True,
            )
            for seeds in per_patient
        ]
        rows.append(
            [data_label, subject_cell, "all patients (± sd over patients)", "", "", *over_patients]
        )
        over_seeds = [
            mean_sd([section["test"]["f1"] for section in sections], decimals=3)
            for _, sections in columns
        ]
        rows.append(
            [
                data_label,
                subject_cell,
                "all test images (± sd over seeds)",
                "",
                str(sum(info["test_images"] for info in patients.values())),
                *over_seeds,
            ]
        )
    return Table(
        title="Per patient, cross-validated (every patient tested once)",
        caption=(
            "Test F1 per patient (the mean over its test images) from the fold that held it out; "
            "mean ± sample sd over seeds. 'all patients': the mean ± sample sd over patients of "
            "their seed-mean F1 (n: patients). 'all test images': the F1 over every test image "
            "of every fold, mean ± sample sd over seeds (n: seeds), as in the main table."
        ),
        header=header,
        rows=rows,
        num_label_columns=5,
    )
