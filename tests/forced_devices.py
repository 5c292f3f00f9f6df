"""Runs a test script in a fresh Python whose CPU platform has a forced number of devices.

XLA_FLAGS=--xla_force_host_platform_device_count must be set before jax starts, so tests of
data-parallel code run their part in a subprocess and read its last stdout line as JSON.
"""

import json
import os
import pathlib
import subprocess
import sys

TESTS_DIR = pathlib.Path(__file__).resolve().parent


def run_json_script(
    script: str, args: list[str], num_devices: int, env: dict[str, str] | None = None
) -> dict:
    """Runs `python -c script TESTS_DIR *args` from the repository root with `num_devices` CPU
    devices; returns the JSON of its last line, or raises AssertionError with its stderr."""
    environment = dict(os.environ, **(env or {}))
    environment["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
    environment["JAX_PLATFORMS"] = "cpu"
    process = subprocess.run(
        [sys.executable, "-c", script, str(TESTS_DIR), *args],
        cwd=TESTS_DIR.parent,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if process.returncode != 0:
        raise AssertionError(f"exit {process.returncode}:\n{process.stderr[-3000:]}")
    return json.loads(process.stdout.strip().splitlines()[-1])
