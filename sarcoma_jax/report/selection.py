"""The label-free model selection benchmark (SPEC §10): how well each stopping criterion picks
among the target maps of an ADDA run, measured on target test, against the source map (before
DA), `latest` and the oracle.

Per run and criterion: the step it picks and where that lies in the game (its position: the
step over the run's last evaluated step, 0 = the source map, 1 = the end), target test metric
(F1 or accuracy) there, the change against the source map, the regret against the oracle's pick
(its test metric minus the criterion's), and Spearman's rho between the criterion's score at
every evaluation after the start (metrics.jsonl `<name>_score`, signed so that higher is better)
and the target val metric there. Aggregated per data set (and config variant): mean ± sd over
runs, wins / losses / ties against `latest` and against the source map with a two-sided sign
test (ties left out), the median position, and the fraction of degenerate evaluations (the
discriminator's recall and specificity both exactly 0 or 1, where eq. 26 is 0). A figure per
data set shows target val against the position in the game with each criterion's median pick.

A cross-validated run (every fold, sarcoma_jax/folds.py) is one game per fold: each fold trains
or loads its own source map, plays its own trajectory and tests on its own patients, so the
per-run numbers, figures and the first table count fold runs. A second table pools each
cross-validated run's folds (every patient tested once): the test metric there is over all
patients, the step and ρ are the folds' (first table).
"""

import dataclasses
import math
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np
import scipy.stats
from matplotlib.figure import Figure  # not pyplot: no global figure state, no display backend.

from sarcoma_jax.adda import criteria as criteria_lib
from sarcoma_jax.report.plots import CRITERION_COLOURS
from sarcoma_jax.report.runs import Run
from sarcoma_jax.report.tables import (
    Table,
    criterion_label,
    criterion_names,
    mean_sd,
)

LATEST = "latest"  # what a run without a stopping rule ends with: the baseline to beat


def _metric(run: Run) -> str:
    return run.results.get("primary_metric", "f1")


def _test_value(run: Run, name: str) -> float | None:
    entry = run.results.get("criteria", {}).get(name)
    return None if entry is None else entry["test"].get(_metric(run))


def _oracle_names(runs: Sequence[Run]) -> set[str]:
    return {
        name
        for run in runs
        for name, entry in run.results.get("criteria", {}).items()
        if entry.get("oracle")
    }


def _after_start(run: Run) -> list[Mapping]:
    return [row for row in run.history if row.get("phase") != "before_da"]


def spearman(run: Run, name: str) -> float | None:
    """Spearman's rho between a criterion's score and the target val metric over the run's
    evaluations after the start (None without at least 3 evaluations with both, or when either
    is constant)."""
    metric_column = f"target_val_{_metric(run)}"
    pairs = [
        (row[f"{name}_score"], row[metric_column])
        for row in _after_start(run)
        if row.get(f"{name}_score") is not None and row.get(metric_column) is not None
    ]
    if len(pairs) < 3:
        return None
    scores, values = np.asarray(pairs, np.float64).T
    if np.ptp(scores) == 0 or np.ptp(values) == 0:
        return None
    return float(scipy.stats.spearmanr(scores, values).statistic)


def degenerate_evaluations(run: Run) -> tuple[int, int]:
    """(evaluations after the start with recall and specificity both 0 or 1, all of them)."""
    rows = [
        row
        for row in _after_start(run)
        if row.get("recall") is not None and row.get("specificity") is not None
    ]
    degenerate = sum(
        row["recall"] in (0.0, 1.0) and row["specificity"] in (0.0, 1.0) for row in rows
    )
    return degenerate, len(rows)


def _last_step(run: Run) -> int:
    """The run's last evaluated step: the scale of positions in the game (0 if none)."""
    return max((row["step"] for row in run.history if row.get("step") is not None), default=0)


def position(run: Run, name: str) -> float | None:
    """Where in the game a criterion picks: its step over the last evaluated step (0 = the
    source map, 1 = the end of the game); None if it picked nothing."""
    step = run.results.get("criteria", {}).get(name, {}).get("step")
    last = _last_step(run)
    return None if step is None or last <= 0 else step / last


def per_run(run: Run, name: str) -> dict[str, float | None]:
    """The benchmark's numbers of one criterion in one run (None where it has none)."""
    value = _test_value(run, name)
    source = _test_value(run, criteria_lib.BEFORE_DA)
    oracles = [_test_value(run, oracle) for oracle in sorted(_oracle_names([run]))]
    oracle = max((v for v in oracles if v is not None), default=None)
    entry = run.results.get("criteria", {}).get(name, {})
    return {
        "step": entry.get("step"),
        "position": position(run, name),
        "test": value,
        "delta_source": None if value is None or source is None else value - source,
        "regret": None if value is None or oracle is None else oracle - value,
        "spearman": spearman(run, name),
    }


def sign_test(differences: Sequence[float | None]) -> str:
    """'w/l/t, p=...' for paired differences (a two-sided binomial test over the non-ties)."""
    values = [d for d in differences if d is not None]
    wins = sum(d > 0 for d in values)
    losses = sum(d < 0 for d in values)
    ties = len(values) - wins - losses
    if wins + losses == 0:
        return f"{wins}/{losses}/{ties}"
    p = scipy.stats.binomtest(wins, wins + losses, 0.5).pvalue
    return f"{wins}/{losses}/{ties}, p={p:.2g}"


def _groups(runs: Sequence[Run]) -> dict[tuple[str, str], list[Run]]:
    """ADDA and digits runs by (data label, variant)."""
    grouped: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        if run.kind in ("adda", "digits"):
            grouped.setdefault((run.data_label, run.variant), []).append(run)
    return grouped


def games(runs: Sequence[Run]) -> list[Run]:
    """The games among `runs`: an ordinary run, or each fold's run of a cross-validated one
    (labelled with that run's variant)."""
    return [
        dataclasses.replace(fold_run, variant=run.variant, variant_detail=run.variant_detail)
        if run.fold_runs
        else run
        for run in runs
        for fold_run in (run.fold_runs or [run])
    ]


def aggregate_table(
    runs: Sequence[Run], title_suffix: str = "", unit: str = "runs", pooled: bool = False
) -> Table:
    """One row per criterion, over `runs` (one data set and variant); `unit` names them in the
    caption; `pooled`: cross-validated runs, each over all its folds' test patients."""
    names = criterion_names(run.results for run in runs)
    oracles = _oracle_names(runs)
    metric = _metric(runs[0])
    rows = []
    for name in sorted(names, key=lambda n: (n not in oracles, names.index(n))):
        numbers = [per_run(run, name) for run in runs]
        versus_latest = [
            None
            if numbers[i]["test"] is None or _test_value(run, LATEST) is None
            else numbers[i]["test"] - _test_value(run, LATEST)
            for i, run in enumerate(runs)
        ]
        label = criterion_label(runs, name)
        if name in oracles and "oracle" not in label:
            label += " (oracle)"
        rows.append(
            [
                label,
                str(sum(n["test"] is not None for n in numbers)),
                mean_sd([n["test"] for n in numbers], 3, show_n=False),
                mean_sd([n["delta_source"] for n in numbers], 3, show_n=False),
                mean_sd([n["regret"] for n in numbers], 3, show_n=False),
                mean_sd([n["spearman"] for n in numbers], 2),
                "–" if name == LATEST else sign_test(versus_latest),
                sign_test([n["delta_source"] for n in numbers]),
            ]
            # A pooled run has no single trajectory: the folds' positions are in the games' table.
            + ([] if pooled else [_median_quartiles([n["position"] for n in numbers])])
        )
    metric_label = {"f1": "F1", "accuracy": "accuracy"}.get(metric, metric)
    return Table(
        title=f"Label-free model selection{title_suffix}",
        caption=(
            f"Target test {metric_label} of the map each criterion picks, mean ± sample sd over "
            f"{len(runs)} {unit} (n: {unit} where it picked one); "
            + (
                f"each {metric_label} pools a cross-validated run's folds (every patient tested "
                "once; each fold's map is that fold's pick); "
                if pooled
                else ""
            )
            + "Δ source: against the source map "
            "(before DA); regret: the oracle's pick minus it; ρ: Spearman correlation of its "
            f"per-evaluation score with target val {metric_label} (n: {unit} where defined); "
            f"w/l/t: {unit} where it is above / below / level with latest and with the source map, "
            "p from a two-sided sign test over the non-ties"
            + (
                ""
                if pooled
                else "; position: where in the game it picks (its step over the last evaluated "
                f"step, 0 = the source map, 1 = the end), median and quartiles over {unit}"
            )
            + ". Oracles read target labels."
        ),
        header=[
            "criterion",
            "n",
            f"test {metric_label}",
            "Δ source",
            "regret",
            "Spearman ρ",
            "vs latest (w/l/t)",
            "vs source (w/l/t)",
        ]
        + ([] if pooled else ["position"]),
        rows=rows,
        num_label_columns=1,
    )


def _median_quartiles(values: Sequence[float | None]) -> str:
    """'median (q1-q3)' of the values that exist, '–' if none."""
    present = [v for v in values if v is not None]
    if not present:
        return "–"
    q1, median, q3 = np.percentile(present, [25, 50, 75])
    return f"{median:.2f} ({q1:.2f}-{q3:.2f})"


def per_run_table(runs: Sequence[Run]) -> str:
    """Markdown: per run and criterion the step, test metric, Δ source, regret and ρ."""

    def cell(value, decimals=3):
        return "–" if value is None else f"{value:.{decimals}f}"

    lines = [
        "| run | criterion | step | test | Δ source | regret | Spearman ρ |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        for name in criterion_names([run.results]):
            numbers = per_run(run, name)
            lines.append(
                f"| {run.description} | {criterion_label([run], name)} | "
                f"{numbers['step'] if numbers['step'] is not None else '–'} | "
                f"{cell(numbers['test'])} | {cell(numbers['delta_source'])} | "
                f"{cell(numbers['regret'])} | {cell(numbers['spearman'], 2)} |"
            )
    return "\n".join(lines) + "\n"


def _normalised(values: np.ndarray) -> np.ndarray:
    finite = np.isfinite(values)
    if not finite.any() or np.ptp(values[finite]) == 0:
        return np.where(finite, 0.5, np.nan)
    low, high = np.min(values[finite]), np.max(values[finite])
    return (values - low) / (high - low)


def _column(rows: Sequence[Mapping], key: str) -> np.ndarray:
    return np.asarray([np.nan if row.get(key) is None else row[key] for row in rows], np.float64)


def plot_run(run: Run, path: pathlib.Path) -> pathlib.Path:
    """Each label-free criterion's score over the run, normalised to [0, 1], its pick marked,
    with the target val metric (not normalised) for reference."""
    rows = _after_start(run)
    steps = _column(rows, "step")
    names = [n for n in criterion_names([run.results]) if n not in _oracle_names([run])]
    figure = Figure(figsize=(9, 4.5))
    axes = figure.subplots()
    metric_column = f"target_val_{_metric(run)}"
    axes.plot(
        steps,
        _column(rows, metric_column),
        "-",
        color="black",
        linewidth=2.5,
        label=f"{metric_column} (needs target labels)",
    )
    criteria = run.results.get("criteria", {})
    for index, name in enumerate(names):
        colour = CRITERION_COLOURS[index % len(CRITERION_COLOURS)]
        scores = _column(rows, f"{name}_score")
        if np.isfinite(scores).any():
            axes.plot(
                steps,
                _normalised(scores),
                "-",
                color=colour,
                linewidth=1,
                label=criterion_label([run], name),
            )
        if criteria.get(name, {}).get("step") is not None:
            axes.axvline(criteria[name]["step"], color=colour, linestyle=":", linewidth=1)
    axes.set(
        xlabel="step (disc + target updates)",
        ylabel="score normalised over the run",
        ylim=(-0.03, 1.03),
        title=run.description,
    )
    axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def plot_scatter(runs: Sequence[Run], path: pathlib.Path) -> pathlib.Path:
    """Per label-free criterion: its score (normalised per run) against the target val metric,
    every evaluation after the start of every run."""
    names = [
        n for n in criterion_names(run.results for run in runs) if n not in _oracle_names(runs)
    ]
    columns = 4
    rows_of_panels = max(1, math.ceil(len(names) / columns))
    figure = Figure(figsize=(3.2 * columns, 2.8 * rows_of_panels))
    panels = np.atleast_1d(figure.subplots(rows_of_panels, columns, squeeze=False)).ravel()
    metric = _metric(runs[0])
    for panel, name in zip(panels, names, strict=False):
        for run in runs:
            rows = _after_start(run)
            panel.plot(
                _normalised(_column(rows, f"{name}_score")),
                _column(rows, f"target_val_{metric}"),
                ".",
                markersize=3,
                alpha=0.5,
            )
        panel.set(
            title=criterion_label(runs, name),
            xlabel="score (normalised per run)",
            ylabel=f"target val {metric}",
        )
    for panel in panels[len(names) :]:
        panel.set_axis_off()
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    return path


def plot_trajectory(runs: Sequence[Run], path: pathlib.Path) -> pathlib.Path:
    """Target val metric against the position in the game (step over the last evaluated step):
    every run thin, the mean over runs and its quartile band bold, and each criterion's median
    pick position as a dotted line: where the good maps lie, and where each criterion looks."""
    grid = np.linspace(0.0, 1.0, 101)
    metric = _metric(runs[0])
    figure = Figure(figsize=(9, 4.5))
    axes = figure.subplots()
    curves = []
    for run in runs:
        points = {
            row["step"]: row[f"target_val_{metric}"]
            for row in run.history
            if row.get("step") is not None and row.get(f"target_val_{metric}") is not None
        }
        last = _last_step(run)  # the same scale as the criteria's positions
        if len(points) < 2 or last <= 0:
            continue
        steps = np.asarray(sorted(points), np.float64) / last
        values = np.asarray([points[s] for s in sorted(points)], np.float64)
        curves.append(np.interp(grid, steps, values))
        axes.plot(steps, values, "-", color="grey", linewidth=0.5, alpha=0.4)
    if curves:
        stacked = np.stack(curves)
        q1, q3 = np.percentile(stacked, [25, 75], axis=0)
        axes.fill_between(grid, q1, q3, color="black", alpha=0.15, linewidth=0)
        axes.plot(
            grid,
            stacked.mean(axis=0),
            "-",
            color="black",
            linewidth=2.5,
            label=f"mean over {len(curves)} (band: quartiles)",
        )
    names = criterion_names(run.results for run in runs)
    for index, name in enumerate(names):
        picks = [p for p in (position(run, name) for run in runs) if p is not None]
        if picks:
            axes.axvline(
                float(np.median(picks)),
                color=CRITERION_COLOURS[index % len(CRITERION_COLOURS)],
                linestyle=":",
                linewidth=1.5,
                label=f"{criterion_label(runs, name)}: median pick",
            )
    axes.set(
        xlabel="position in the game (step / last evaluated step)",
        ylabel=f"target val {metric} (needs target labels)",
        xlim=(0, 1),
    )
    axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def write(runs: Sequence[Run], out: pathlib.Path, file_name) -> bool:
    """selection.md and selection.tex with figures under figures/selection/; False when there is
    no ADDA or digits run."""
    groups = _groups(runs)
    if not groups:
        return False
    (out / "figures" / "selection").mkdir(parents=True, exist_ok=True)
    markdown = [
        "# Label-free model selection (SPEC §10)\n\n" + __doc__.split("\n\n", 1)[1].strip() + "\n"
    ]
    latex = []
    for (data_label, variant), runs_of_group in sorted(groups.items()):
        label = f"{data_label} [{variant}]" if variant else data_label
        group = games(runs_of_group)
        cross_validated = [run for run in runs_of_group if run.fold_runs]
        unit = "games (fold runs)" if cross_validated else "runs"
        table = aggregate_table(group, f", {label}", unit=unit)
        tables = [table]
        pooled_text = ""
        if cross_validated:
            pooled = aggregate_table(
                cross_validated,
                f", {label}, folds pooled",
                unit="cross-validated runs",
                pooled=True,
            )
            tables.append(pooled)
            pooled_text = (
                f"\n### Folds pooled: every patient tested once\n\n{pooled.caption}\n\n"
                f"{pooled.to_markdown()}\n"
            )
        degenerate = [degenerate_evaluations(run) for run in group]
        bad, total = sum(d for d, _ in degenerate), sum(t for _, t in degenerate)
        share = f"{bad} of {total} ({100 * bad / total:.0f}%)" if total else "–"
        scatter = f"figures/selection/{file_name(f'scatter_{label}')}.png"
        plot_scatter(group, out / scatter)
        trajectory = f"figures/selection/{file_name(f'trajectory_{label}')}.png"
        plot_trajectory(group, out / trajectory)
        run_figures = []
        for run in group:
            link = f"figures/selection/{file_name(run.description)}.png"
            plot_run(run, out / link)
            run_figures.append(f"- {run.description}: [{link}]({link})")
        markdown.append(
            f"\n## {label}\n\n{table.caption}\n\n{table.to_markdown()}\n"
            f"Degenerate evaluations (recall and specificity both 0 or 1): {share}.\n"
            + pooled_text
            + f"\n![target val over the game, each criterion's median pick]({trajectory})\n"
            + f"\n![scores against target val]({scatter})\n\n### Per run\n\n"
            + per_run_table(group)
            + "\nScores over each run, normalised, with target val (the dotted lines: picks):\n\n"
            + "\n".join(run_figures)
            + "\n"
        )
        latex.extend(t.to_latex() for t in tables)
    (out / "selection.md").write_text("".join(markdown))
    (out / "selection.tex").write_text("\n".join(latex))
    return True
