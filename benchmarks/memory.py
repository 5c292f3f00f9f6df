"""Peak resident memory of ADDA runs: the ':smoke' config and a full-size run cut short.

python benchmarks/memory.py [--runs smoke,full] [--full_target_epochs 0.1] [--keep_workdirs]

Each run is `python main.py --config=configs/adda_ct_pt.py[...] --workdir=<temporary>` in its own
subprocess; its peak resident set size is `ru_maxrss` of that child alone (os.wait4), which
includes the source segmentation run it trains first. The runs:
  smoke  configs/adda_ct_pt.py:smoke as is (32x32 phantom, a few short cycles)
  full   configs/adda_ct_pt.py: 128x128, batches 5 + 5, the reference U-Net and discriminator,
         (k_d, k_t) = (50, 20) after 100 initial discriminator steps, phantom data; cut short by
         training the source map for one epoch and the game for --full_target_epochs target
         epochs (a few cycles), so every compiled function and buffer of a full run exists
Prints one line per run: peak RSS in MiB, wall time, exit status.
"""

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_args(name: str, full_target_epochs: float, fused_cycles: bool) -> list[str]:
    """main.py arguments of a run (without --workdir)."""
    if name == "smoke":
        return ["--config=configs/adda_ct_pt.py:smoke", "--config.progress_bar=False"]
    return [
        "--config=configs/adda_ct_pt.py",
        "--config.source.num_epochs=1",
        f"--config.target_epochs={full_target_epochs}",
        f"--config.fused_cycles={fused_cycles}",
        "--config.progress_bar=False",
    ]


def peak_rss_mib(arguments: list[str], workdir: str) -> tuple[float, float, int, str]:
    """Runs main.py in a child; returns (peak RSS MiB, wall seconds, exit status, stderr tail)."""
    command = [sys.executable, "main.py", *arguments, f"--workdir={workdir}"]
    start = time.perf_counter()
    with tempfile.TemporaryFile() as stderr:
        child = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        stderr.seek(0)
        tail = stderr.read().decode(errors="replace").strip().splitlines()[-3:]
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    kib = usage.ru_maxrss / (1024 if sys.platform == "darwin" else 1)
    return kib / 1024, time.perf_counter() - start, child.returncode, " | ".join(tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="smoke,full", help="comma-separated: smoke, full")
    parser.add_argument(
        "--full_target_epochs",
        type=float,
        default=0.1,
        help="target epochs of the full-size run (the run stops after them)",
    )
    parser.add_argument(
        "--fused_cycles",
        choices=("True", "False"),
        default="True",
        help="config.fused_cycles of the full-size run",
    )
    parser.add_argument("--keep_workdirs", action="store_true", help="print and keep them")
    args = parser.parse_args()
    names = [name for name in args.runs.split(",") if name]
    unknown = sorted(set(names) - {"smoke", "full"})
    if unknown:
        sys.exit(f"error: unknown run(s) {', '.join(unknown)}; use smoke and/or full")
    if not args.full_target_epochs > 0:
        sys.exit("error: --full_target_epochs must be > 0")

    print(f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}; {sys.executable}")
    for name in names:
        workdir = tempfile.mkdtemp(prefix=f"memory_{name}_")
        arguments = run_args(name, args.full_target_epochs, args.fused_cycles == "True")
        peak_mib, seconds, status, tail = peak_rss_mib(arguments, workdir)
        print(
            f"{name:5s} peak RSS {peak_mib:7.0f} MiB  wall {seconds:6.0f} s  exit {status}  "
            f"main.py {' '.join(arguments)}"
            + (f"  [stderr: {tail}]" if status else "")
            + (f"  workdir {workdir}" if args.keep_workdirs else "")
        )
        if not args.keep_workdirs:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
