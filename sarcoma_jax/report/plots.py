"""The report's figures: §15-3 box plots, the segmentation F1 box plot, §17-1 curves."""

import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure  # not pyplot: no global figure state, no display backend.
from matplotlib.patches import Patch

from sarcoma_jax.adda import criteria as criteria_lib
from sarcoma_jax.report.runs import Run
from sarcoma_jax.report.tables import before_da_per_seed, criterion_metric, pair_display


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
    axes.set_xticks(range(len(categories)), [pair_display(c) for c in categories])
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
    """§15-3: F1 and accuracy box plots per pair: before DA, ADDA and RESET (both stopped by the
    recommended criterion, the confusion stop as in the thesis).

    F1 is per image (pooled over seeds) when every run records per-image test F1
    (`criteria[name]['test_per_image']['f1']`), else one value per seed; accuracy is per seed.

    Returns:
      A caption saying which.
    """
    before, after = criteria_lib.BEFORE_DA, criteria_lib.RECOMMENDED
    columns = {"before DA": (before, None), "ADDA": (after, "adda"), "RESET": (after, "reset")}
    categories = [pair for pair, _ in groups]
    per_image = all(
        _per_image_f1(run, criterion) is not None
        for _, group in groups
        for run in group
        for criterion in (before, after)
        if criterion in run.results["criteria"]
    )
    f1_values, accuracy_values = {}, {}
    for pair, group in groups:
        for name, (criterion, scheme) in columns.items():
            chosen = [run for run in group if scheme is None or run.scheme == scheme]
            if scheme is None:
                accuracy_values[pair, name] = before_da_per_seed(group, "accuracy")
                f1_values[pair, name] = before_da_per_seed(group, "f1")
            else:
                accuracy_values[pair, name] = [
                    criterion_metric(run, criterion, "accuracy") for run in chosen
                ]
                f1_values[pair, name] = [criterion_metric(run, criterion, "f1") for run in chosen]
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
    f1_axes.set_title(f"{criteria_lib.label(after)}; ⊗ mean, line median")
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


def plot_patient_boxplot(
    title: str,
    patients: Sequence[tuple[str, int]],
    columns: Sequence[tuple[str, Sequence[Mapping]]],
    path: pathlib.Path,
) -> str:
    """Test F1 per patient of a cross-validated group: per patient one box per column
    (tables.score_columns) of its per-image F1, pooled over seeds.

    Args:
      title: the figure's title.
      patients: (patient key, fold) in the order shown.
      columns: (label, results sections with test_per_image) as tables.score_columns gives them.
      path: the PNG to write.

    Returns:
      The caption.
    """
    values: dict[tuple[str, str], list[float]] = {}
    for label, sections in columns:
        for section in sections:
            per_image = section["test_per_image"]
            for key, value in zip(per_image["patient_key"], per_image["f1"], strict=True):
                values.setdefault((key, label), []).append(value)
    figure = Figure(figsize=(max(7, 0.9 * len(patients) * max(1, len(columns)) / 2 + 2), 4.5))
    axes = figure.subplots()
    keys = [key for key, _ in patients]
    _boxes(axes, keys, [label for label, _ in columns], values, "test F1 per image")
    axes.set_xticks(range(len(keys)), [f"{key}\nfold {fold}" for key, fold in patients])
    axes.tick_params(axis="x", labelsize=8)
    axes.set_title(f"{title}; ⊗ mean, line median", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return "F1 per test image of each patient (from the fold that held it out), pooled over seeds."


# Colours of the criteria's marks: matplotlib's tab20 without its reds and greens (the curves'
# own colours), so that up to 16 criteria are told apart.
CRITERION_COLOURS = tuple(
    colour for index, colour in enumerate(colormaps["tab20"].colors) if index not in (4, 5, 6, 7)
)


def _column(history: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    return np.asarray(
        [np.nan if row.get(key) is None else float(row[key]) for row in history], np.float64
    )


def plot_adda_curves(run: Run, path: pathlib.Path) -> pathlib.Path:
    """§17-1: the recommended criterion's score (the confusion score), discriminator loss, recall /
    specificity and the target val metric against steps (discriminator + target updates), with
    each criterion's chosen step marked (oracles dash-dotted)."""
    history = run.history
    steps = _column(history, "step")
    metric = f"target_val_{run.results.get('primary_metric', 'f1')}"
    figure = Figure(figsize=(8, 9))
    panels = figure.subplots(4, 1, sharex=True)
    recommended = criteria_lib.RECOMMENDED
    score = _column(history, f"{recommended}_score")
    panels[0].plot(steps, score, "-", color="tab:red")
    panels[0].set(ylabel=f"{recommended} score")
    if np.all((score[np.isfinite(score)] >= 0) & (score[np.isfinite(score)] <= 1)):
        panels[0].set(ylim=(-0.02, 1.02))  # a score in [0, 1], as the confusion score
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
    names = [name for name in criteria_lib.sort_names(criteria) if name != criteria_lib.BEFORE_DA]
    handles = []
    for index, name in enumerate(names):
        colour = CRITERION_COLOURS[index % len(CRITERION_COLOURS)]
        style = "-." if criteria[name].get("oracle") else "-"
        for axes in panels:
            axes.axvline(criteria[name]["step"], color=colour, linestyle=style, linewidth=1)
        label = criteria[name].get("label") or criteria_lib.label(name)
        handles.append(Patch(color=colour, label=f"{label} (step {criteria[name]['step']})"))
    panels[0].legend(handles=handles, fontsize=7, loc="lower right")
    for axes in panels[1:3]:
        axes.legend(fontsize=7)
    panels[0].set_title(run.description, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path
