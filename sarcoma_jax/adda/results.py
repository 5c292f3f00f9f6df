"""What an ADDA run ends with: each criterion's pick scored on target test and val (results.json),
the summary line, and the progress bar's figures."""

import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from sarcoma_jax import checkpoints, runtime
from sarcoma_jax.adda import criteria as criteria_lib
from sarcoma_jax.adda import task as task_lib


def pair_name(config: ml_collections.ConfigDict) -> str:
    """'CT->PT' (the config's domains)."""
    source_domain = config.data.get("source_modality", "source")
    target_domain = config.data.get("target_modality", "target")
    return f"{source_domain}->{target_domain}"


def score_maps(
    task: task_lib.Task,
    predict: Callable,
    variables: Any,
    arrays: Mapping[str, Mapping[str, np.ndarray]],
    batch_size: int,
    sharding,
) -> dict:
    """A map's metrics on test and val (and the task's per-image test metrics, if it has them)."""
    result = {}
    for split in ("test", "val"):
        outputs = runtime.predict(predict, variables, arrays[split]["image"], batch_size, sharding)
        result[split] = task.evaluate(outputs, arrays[split])
        if split == "test" and hasattr(task, "per_image"):  # optional in the Task protocol
            result["test_per_image"] = task.per_image(outputs, arrays[split])
    return result


def score_criteria(
    criteria: Sequence[criteria_lib.Criterion],
    managers: Mapping[str, Any],
    template: Any,
    place: Callable[[Any], Any],
    score: Callable[[Any], dict],
    evaluated_columns: Sequence[str],
) -> tuple[dict, list[str]]:
    """Restores each criterion's pick and scores it.

    Args:
      criteria: the run's criteria.
      managers: their checkpoint managers, by name.
      template: target map variables shaped like the picks.
      place: puts restored variables where the programs expect them.
      score: variables -> {'test', 'val', ...} (`score_maps`).
      evaluated_columns: the row columns the pick was chosen on (kept as its 'selection').

    Returns:
      {name: {'step', 'cycle', 'disc_steps', 'target_steps', 'test', 'val', ...,
      'selection': {column: value}, 'oracle' (oracles only)}} and the names never picked.
    """
    results, not_reached = {}, []
    for criterion in criteria:
        manager = managers[criterion.name]
        if manager.latest_step() is None:
            not_reached.append(criterion.name)
            continue
        variables, row = checkpoints.restore(manager, template)
        results[criterion.name] = {
            **{key: row[key] for key in ("step", "cycle", "disc_steps", "target_steps")},
            **score(place(variables)),
            "selection": {column: row.get(column) for column in evaluated_columns},
            "label": criterion.label,
        }
        if criterion.oracle:
            results[criterion.name]["oracle"] = True  # Chosen with target labels: a ceiling.
    return results, not_reached


def summary_line(results: Mapping[str, Any], folder: pathlib.Path) -> str:
    """One line for the terminal: each criterion's target test score (oracles marked)."""
    metric = results["primary_metric"]
    scored = ", ".join(
        f"{name}{' (oracle)' if entry.get('oracle') else ''} {entry['test'][metric]:.3f}"
        for name, entry in results["criteria"].items()
    )
    return (
        f"{results['pair']} {results['scheme']} seed {results['seed']}: target test {metric} "
        f"{scored}; see {folder / 'results.json'}"
    )


def progress_fields(
    rows: Sequence[Mapping[str, Any]], metric_name: str, criteria_names: Sequence[str]
) -> dict[str, str]:
    """The progress bar's figures from each seed's latest row (space-separated over seeds): the
    discriminator loss, the target val metric and every criterion's score."""

    def shown(value: float | None) -> str:
        if value is None:  # NaN in the row (e.g. a window score before the window is full)
            return "-"
        text = f"{value:.3f}"
        return "0.000" if text == "-0.000" else text  # a score of -0.0 or -1e-9 is zero

    def joined(column: str) -> str:
        return " ".join(shown(row.get(column)) for row in rows)

    fields = {"disc_loss": joined("disc_loss"), metric_name: joined(metric_name)}
    fields.update({name: joined(f"{name}_score") for name in criteria_names})
    return fields
