"""What a run's folder holds and how it is written: config.json, provenance.json, metrics.jsonl,
results.json, and the lines a run prints.

Only the first host writes (`runtime.is_primary`); the others read. A run started again in its
workdir must have the same config (`start` refuses another), and `MetricsWriter` truncates the
rows of metrics.jsonl that lie past the step it resumes from, so the file always describes the
run that produced the checkpoints.
"""

import json
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
import tqdm
from absl import logging

from sarcoma_jax import provenance, runtime
from sarcoma_jax.input_pipeline import ConfigError

METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
CONFIG_FILE = "config.json"
PROVENANCE_FILE = "provenance.json"


def jsonable(tree: Any) -> Any:
    """`tree` with numpy numbers as Python numbers and NaN or inf as None (strict JSON)."""
    if isinstance(tree, Mapping):
        return {key: jsonable(value) for key, value in tree.items()}
    if isinstance(tree, list | tuple):
        return [jsonable(value) for value in tree]
    if isinstance(tree, float | np.floating):
        value = float(tree)
        return value if math.isfinite(value) else None
    if isinstance(tree, np.integer):
        return int(tree)
    if isinstance(tree, np.bool_):
        return bool(tree)
    return tree


def write_json(path: pathlib.Path, tree: Any) -> None:
    """Indented strict JSON (see `jsonable`)."""
    pathlib.Path(path).write_text(json.dumps(jsonable(tree), indent=2) + "\n")


def write_config(
    config: ml_collections.ConfigDict, workdir: pathlib.Path, ignored_keys: Sequence[str] = ()
) -> None:
    """Writes config.json, refusing a workdir that holds a run of another config.

    Args:
      config: the run's config.
      workdir: the run's folder.
      ignored_keys: top-level fields a resumed run may change (budgets, logging).

    Raises:
      ConfigError: the workdir's config.json differs in another field.
    """
    config_dict = json.loads(config.to_json())
    path = pathlib.Path(workdir) / CONFIG_FILE
    if path.exists():
        previous = json.loads(path.read_text())

        def comparable(values: Mapping[str, Any]) -> dict:
            return {key: value for key, value in values.items() if key not in ignored_keys}

        if comparable(previous) != comparable(config_dict):
            raise ConfigError(
                f"{workdir} holds a run with another config (see its config.json); "
                "use a new --workdir to start a different run"
            )
    path.write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")


def start(
    config: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    ignored_keys: Sequence[str] = (),
    primary: bool = True,
) -> pathlib.Path:
    """Creates the workdir and records what runs in it: config.json (see `write_config`) and
    provenance.json (config, seed, package versions, git commit). Returns the workdir."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if primary:
        write_config(config, workdir, ignored_keys)
        provenance.write(workdir / PROVENANCE_FILE, provenance.collect(config, config.seed))
    return workdir


def write_results(
    workdir: pathlib.Path, results: Mapping[str, Any], provenance_extra: Mapping[str, Any]
) -> None:
    """results.json, and what the run measured of itself (data counts, wall time) added to
    provenance.json."""
    write_json(pathlib.Path(workdir) / RESULTS_FILE, results)
    provenance.add(pathlib.Path(workdir) / PROVENANCE_FILE, provenance_extra)


def read_rows(path: pathlib.Path) -> list[dict]:
    """The rows of a metrics.jsonl ([] when there is none)."""
    path = pathlib.Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsWriter:
    """The one writer of a run's metrics.jsonl: one JSON row per evaluation, in step order.

    clu's metric writers were the model here, but their file sinks are TensorFlow summaries (TF is
    not a dependency) and their rows are scalars only, where ours carry a phase name and nulls;
    so this is a small JSONL sink with the same contract: created once per run folder, written by
    the first host only.

    Attributes:
      rows: every row of the run so far (the kept ones after a resume, then the new ones).
    """

    def __init__(self, path: pathlib.Path, resume_step: int | None, primary: bool = True):
        """Opens metrics.jsonl.

        Args:
          path: the file.
          resume_step: None for a fresh run (the file is emptied); else the step the run resumes
            from: rows up to it are kept, later ones (written after the last checkpoint before
            a kill) are dropped.
          primary: whether this process writes (the others only keep `rows`).
        """
        self.path = pathlib.Path(path)
        self.primary = primary
        kept = [] if resume_step is None else read_rows(self.path)
        self.rows = [row for row in kept if row["step"] <= resume_step]
        runtime.sync_hosts(f"read {self.path}")  # every host has read it before it is rewritten
        if primary:
            self.path.write_text("".join(json.dumps(row) + "\n" for row in self.rows))

    def write(self, row: Mapping[str, Any]) -> dict:
        """Appends a row (NaN and inf as null); returns it as written."""
        row = jsonable(dict(row))
        self.rows.append(row)
        if self.primary:
            with open(self.path, "a") as metrics_file:
                metrics_file.write(json.dumps(row) + "\n")
        return row


def report_line(message: str, show: bool) -> None:
    """Logs a line, and shows it under the progress bar when there is one."""
    logging.info(message)
    if show:
        tqdm.tqdm.write(message)
