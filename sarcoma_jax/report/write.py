"""Writes the report: python -m sarcoma_jax.report W1 W2 ... --out R."""

import argparse
import datetime
import pathlib
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import tqdm

from sarcoma_jax import provenance
from sarcoma_jax.adda import criteria as criteria_lib
from sarcoma_jax.adda.game import SCHEMES
from sarcoma_jax.report import digits, plots, selection, tables
from sarcoma_jax.report import overlays as overlay_figures
from sarcoma_jax.report.runs import ReportError, Run, commit_of, load_runs


def _file_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text.replace("->", "_to_")).strip("_")


def _by_data(
    groups: Sequence[tuple[tuple[str, str, str], list[Run]]],
) -> dict[tuple[str, str], list[tuple[str, list[Run]]]]:
    """(data label, variant) -> [(subject, runs)], from `groups_of`."""
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
    table: tables.Table, runs: Iterable[Run], out: pathlib.Path, stem: str, extra_markdown: str = ""
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
    for (data_label, variant), groups in _by_data(tables.groups_of(runs, "segmentation")).items():
        label = f"{data_label} [{variant}]" if variant else data_label
        link = f"figures/segmentation_f1_{_file_name(f'{data_label}_{variant}')}.png"
        caption = plots.plot_segmentation_boxplot(groups, out / link)
        figure_lines.append(_figure_markdown(link, label, caption))
    _write_table(
        tables.segmentation_table(runs),
        [run for run in runs if run.kind == "segmentation"],
        out,
        "segmentation",
        "\nTraining curves and example slices (Figure 15-2) are in each workdir "
        "(training_curves.png, segmentation_examples.png).\n\n"
        "## Test F1 per modality (as Figure 15-1)\n\n" + "\n".join(figure_lines),
    )


def _write_patients(runs: Sequence[Run], out: pathlib.Path, kind: str) -> str | None:
    """patients_<kind>.md / .tex: the per-patient table and box plots of the cross-validated
    groups of `kind`; returns the file name (None when there are none)."""
    groups = tables.cross_validated_groups(runs, kind)
    if not groups:
        return None
    figure_lines = []
    for (data_label, variant, subject), group in groups:
        label = " ".join(part for part in (tables.data_cell(group[0]), subject) if part)
        link = f"figures/patients_{_file_name(f'{data_label}_{variant}_{subject}')}.png"
        patients = sorted(
            group[0].results["cross_validation"]["patients"].items(),
            key=lambda item: (item[1]["fold"], item[0]),
        )
        caption = plots.plot_patient_boxplot(
            label,
            [(key, info["fold"]) for key, info in patients],
            tables.score_columns(group),
            out / link,
        )
        figure_lines.append(_figure_markdown(link, label, caption))
    stem = f"patients_{kind}"
    _write_table(
        tables.patient_table(runs, kind),
        [run for _, group in groups for run in group],
        out,
        stem,
        "\n## Test F1 per patient\n\n" + "\n".join(figure_lines),
    )
    return f"{stem}.md"


def _write_curves(
    runs: Sequence[Run], out: pathlib.Path, progress: bool, warnings: list[str]
) -> dict[pathlib.Path, str]:
    """§17-1 curves of every ADDA and digits run; returns workdir -> link."""
    # A cross-validated run's curves are its folds' (one run each).
    curve_runs = [
        fold_run
        for run in runs
        if run.kind in ("adda", "digits")
        for fold_run in (run.fold_runs or [run])
    ]
    links = {}
    (out / "figures" / "curves").mkdir(exist_ok=True)
    for index, run in enumerate(
        tqdm.tqdm(curve_runs, desc="curves (§17-1)", disable=not progress or not curve_runs)
    ):
        if not run.history:
            warnings.append(f"no metrics.jsonl in {run.workdir}: no §17-1 curves")
            continue
        link = f"figures/curves/{index:03d}_{_file_name(run.description)}.png"
        plots.plot_adda_curves(run, out / link)
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
        for scheme in SCHEMES
        if any(run.scheme == scheme for run in group)
    ]
    (out / "figures" / "overlays").mkdir(exist_ok=True)
    data_cache: dict[str, Any] = {}
    lines = []
    # A cross-validated run shows its first fold's test slices.
    lowest_seed_runs = [(run.fold_runs or [run])[0] for run in lowest_seed_runs]
    for run in tqdm.tqdm(lowest_seed_runs, desc="overlays", disable=not progress):
        if criteria_lib.RECOMMENDED not in run.results["criteria"]:
            label = criteria_lib.label(criteria_lib.RECOMMENDED)
            lines.append(f"- {run.description}: the {label} was not reached")
            continue
        name = _file_name(f"{tables.data_cell(run)}_{run.subject}_{run.scheme}")
        link = f"figures/overlays/{name}.png"
        note = overlay_figures.render_overlays(run, out / link, num_slices, data_cache)
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
    with_overlays: bool,
    overlay_slices: int,
    progress: bool,
    warnings: list[str],
) -> None:
    """da.md / .tex with the §15-3 box plots and overlays; stopping.md / .tex with the curves."""
    adda_groups = tables.groups_of(runs, "adda")
    box_lines = []
    for (data_label, variant), groups in _by_data(adda_groups).items():
        label = f"{data_label} [{variant}]" if variant else data_label
        link = f"figures/da_boxplots_{_file_name(f'{data_label}_{variant}')}.png"
        box_lines.append(_figure_markdown(link, label, plots.plot_da_boxplots(groups, out / link)))
    if with_overlays:
        overlay_lines = _write_overlays(adda_groups, out, overlay_slices, progress, warnings)
    else:
        overlay_lines = ["- not rendered (--no-overlays)"]
    adda_runs = [run for run in runs if run.kind == "adda"]
    curve_runs = [fold_run for run in adda_runs for fold_run in (run.fold_runs or [run])]
    before = criteria_lib.label(criteria_lib.BEFORE_DA)
    after = criteria_lib.label(criteria_lib.RECOMMENDED)
    _write_table(
        tables.da_table(runs),
        adda_runs,
        out,
        "da",
        "\n## F1 and accuracy box plots (as Figure 15-3)\n\n"
        + "\n".join(box_lines)
        + "\n## Before/after overlays (as Figures 15-4..6)\n\nOne run (the lowest seed) per "
        "pair and scheme: target test slices whose F1 after DA lies between its 60th and 80th "
        f"percentile; before DA = the {before} target map, after DA = the {after} one.\n\n"
        + "\n".join(overlay_lines)
        + "\n",
    )
    _write_table(
        tables.stopping_table(runs),
        adda_runs,
        out,
        "stopping",
        f"\n## {after.capitalize()} score and losses against steps (as Figure 17-1)\n\n"
        + _link_list(curve_runs, curve_links),
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
    commit = commit_of(run)
    if run.provenance.get("git", {}).get("dirty"):
        commit += " (dirty)"
    wall = run.wall_time_s
    cells = [
        f"`{run.workdir}`",
        run.kind,
        tables.data_cell(run),
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
        patients = _write_patients(runs, out, "segmentation")
        if patients:
            sections.append((patients, "segmentation per patient, cross-validated (also .tex)"))
    curve_links = _write_curves(runs, out, progress, warnings)
    if "adda" in kinds:
        _write_adda(runs, out, curve_links, overlays, overlay_slices, progress, warnings)
        sections.append(("da.md", "domain adaptation §15-6 (also .tex), box plots, overlays"))
        sections.append(("stopping.md", "stopping criteria §15-7 (also .tex), §17-1 curves"))
        patients = _write_patients(runs, out, "adda")
        if patients:
            sections.append((patients, "domain adaptation per patient, cross-validated"))
    if "digits" in kinds:
        _write_digits(runs, out, curve_links)
        sections.append(("digits.md", "digits §10-3, §17-1 curves"))
    if selection.write(runs, out, _file_name):
        sections.append(("selection.md", "label-free model selection, SPEC §10 (also .tex)"))
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
