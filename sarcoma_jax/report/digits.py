"""The §10-3 table (digits ADDA: source accuracy, before DA, each stopping criterion)."""

import json
import pathlib
from collections.abc import Sequence

import numpy as np

from sarcoma_jax.adda import criteria as criteria_lib
from sarcoma_jax.adda.game import SCHEMES
from sarcoma_jax.report import thesis
from sarcoma_jax.report.tables import criterion_names, mean_sd


def table_10_3(workdirs: Sequence[str | pathlib.Path], include_thesis: bool = True) -> str:
    """The §10-3 table as markdown from digits ADDA workdirs (their results.json).

    Rows ADDA and RESET (from each run's scheme); columns source accuracy, before DA (the
    `criteria_lib.BEFORE_DA` criterion), then every other criterion the runs have (in the
    registry's order: highest peak (oracle) / confusion / latest / best loss stop by default),
    each the test accuracy as mean ± sample sd over the runs (n = runs; a criterion a run did not
    reach is left out of its cell). Source and before-DA accuracy are averaged per seed first,
    since both schemes of one seed share them. With include_thesis, the thesis' numbers follow as
    a last pair of rows ('–' for criteria the thesis has not).

    Raises:
      FileNotFoundError: a workdir without results.json.
    """
    all_results = [
        json.loads((pathlib.Path(workdir) / "results.json").read_text()) for workdir in workdirs
    ]
    names = criterion_names(all_results)
    labels = {name: criteria_lib.label(name) for name in names}
    per_seed: dict[str, dict[int, list[float]]] = {"source": {}, "before_da": {}}
    cells = {scheme: {name: [] for name in names} for scheme in SCHEMES}
    for results in all_results:
        criteria = results["criteria"]
        per_seed["source"].setdefault(results["seed"], []).append(
            results["source_test"]["accuracy"]
        )
        if criteria_lib.BEFORE_DA in criteria:
            per_seed["before_da"].setdefault(results["seed"], []).append(
                criteria[criteria_lib.BEFORE_DA]["test"]["accuracy"]
            )
        for name in names:
            if name in criteria:
                labels[name] = criteria[name].get("label", labels[name])
                cells[results["scheme"]][name].append(criteria[name]["test"]["accuracy"])
    shared = {
        column: mean_sd([float(np.mean(values)) for values in by_seed.values()])
        for column, by_seed in per_seed.items()
    }
    header = ["source accuracy", "before DA", "scheme", *(labels[name] for name in names)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for scheme in SCHEMES:
        row = [shared["source"], shared["before_da"], scheme.upper()]
        row += [mean_sd(cells[scheme][name]) for name in names]
        lines.append("| " + " | ".join(row) + " |")
    if include_thesis:
        numbers = thesis.THESIS_TABLE_10_3
        for scheme in SCHEMES:
            row = [f"{numbers[key]:.4f}" for key in ("source", "before_da")]
            row.append(f"{scheme.upper()} (thesis, SVHN→MNIST)")
            row += [thesis.thesis_value(numbers[scheme].get(name)) for name in names]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
