"""A record of what produced a run: config, seed, library versions, git commit, devices."""

import datetime
import functools
import importlib.metadata
import json
import pathlib
import platform
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

import jax

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# Distributions whose versions can change a result.
PACKAGES = (
    "sarcoma_jax",
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "numpy",
    "scipy",
    "scikit-learn",
    "scikit-image",
    "pydicom",
    "pillow",
    "grain",
    "tensorflow-datasets",
    "ml_collections",
)


def package_versions(packages=PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution (None when it is not installed)."""
    versions = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(
            ["git", "-C", str(REPO_ROOT), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def git_state() -> dict[str, Any]:
    """The commit of the source tree (None outside git or before the first commit) and whether
    the tree differs from it: changed tracked files, or files git does not track yet (and does not
    ignore), since a run may import those.

    Read once per process, at its first run: the code a process runs is what it imported then,
    so a commit made while it runs (e.g. between the folds or seeds it runs one after another)
    must not be recorded for its later runs.
    """
    return dict(_git_state_at_first_call())


@functools.cache
def _git_state_at_first_call() -> tuple[tuple[str, Any], ...]:
    commit = _git("rev-parse", "HEAD")
    changes = _git("status", "--porcelain") if commit else None
    return (("commit", commit), ("dirty", None if changes is None else bool(changes)))


def collect(config: Mapping[str, Any], seed: int, extra: Mapping[str, Any] | None = None) -> dict:
    """Everything needed to say how a run was made.

    Args:
      config: the run's config (a ConfigDict or a plain dict; stored as JSON).
      seed: the run's seed.
      extra: anything else to record (e.g. data counts per split).

    Returns:
      A JSON-serialisable dict.
    """
    config_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seed": int(seed),
        "config": json.loads(json.dumps(config_dict, default=str)),
        "git": git_state(),
        "packages": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "argv": list(sys.argv),
        "devices": [str(device) for device in jax.devices()],
        **dict(extra or {}),
    }


def write(path: str | pathlib.Path, record: Mapping[str, Any]) -> pathlib.Path:
    """Writes a record from `collect` as indented JSON; returns the path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    return path


def add(path: str | pathlib.Path, extra: Mapping[str, Any]) -> pathlib.Path:
    """Adds fields to the record at `path` (written at the start of the run), keeping the rest.

    What produced a run is what was there when it started: collecting again at the end would
    record files edited while it ran (a dirty tree) and the end time as its creation.
    """
    path = pathlib.Path(path)
    record = json.loads(path.read_text()) if path.is_file() else {}
    record.update(json.loads(json.dumps(dict(extra), default=str)))
    return write(path, record)
