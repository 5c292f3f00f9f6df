"""Seeds per hour: N seeds one after another against N seeds in one vmapped program
(`--config.num_seeds=N`), for segmentation training or for the ADDA game.

python benchmarks/seeds.py [--seeds 4] [--config configs/segment_pt.py] [--image_size 64]
                           [--epochs 3]
python benchmarks/seeds.py --config configs/adda_ct_pt.py [--target_epochs 1]

Runs, in this one process and on the same (phantom, by default) data:
  N = 1      train_and_evaluate with num_seeds=1 (seed 0), timed
  N = seeds  the same config with num_seeds=seeds: one jit-compiled, vmapped program
and prints, for each, the wall time (training loop only, and the whole run with compilation,
evaluation and figures) and seeds/hour, then `vmapped_over_sequential=<ratio of seeds/hour>`
(the N = 1 figure stands for N sequential runs). Each seed's numbers are those of its single
run (tests/train_segment_test.py, tests/train_adda_test.py); this measures only the speed.

An ADDA config times the game only: the warm-up trains one source map (`--epochs` epochs),
which every timed run reuses through config.source_checkpoint. Its "training loop" is the whole
game with its evaluations (results' wall_time_s); the whole run adds scoring the criteria.
"""

import argparse
import importlib.util
import pathlib
import sys
import tempfile
import time

from sarcoma_jax import train_adda, train_segment

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(path: str):
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))  # configs/ import `from configs import ...`
    spec = importlib.util.spec_from_file_location("bench_config", REPO_ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(None)


def timed_run(config, workdir: pathlib.Path) -> tuple[float, float]:
    """(seconds of the whole run, seconds of its training loop)."""
    start = time.perf_counter()
    if config.experiment == "adda":
        results = train_adda.train_and_evaluate(config, workdir)
        return time.perf_counter() - start, float(results["wall_time_s"])
    results = train_segment.train_and_evaluate(config, workdir)
    return time.perf_counter() - start, float(results["train_wall_time_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--config", default="configs/segment_pt.py")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3, help="segmentation (or source) epochs")
    parser.add_argument("--target_epochs", type=float, default=1.0, help="ADDA only")
    args = parser.parse_args()
    if args.seeds < 2:
        sys.exit("error: --seeds must be >= 2")
    config = load_config(args.config)
    config.data.image_size = args.image_size
    config.progress_bar = False
    adda = config.experiment == "adda"
    budget = f"{args.target_epochs} target epochs" if adda else f"{args.epochs} epochs"
    with tempfile.TemporaryDirectory() as tmp:
        # Warm-up: the phantom and its index are built (and cached) before anything is timed;
        # for ADDA, the source map all runs start from.
        if adda:
            source = config.source.copy_and_resolve_references()
            source.num_epochs = args.epochs
            train_segment.train_and_evaluate(source, pathlib.Path(tmp) / "source")
            config.source_checkpoint = str(pathlib.Path(tmp) / "source")
            config.target_epochs = args.target_epochs
        else:
            config.num_epochs = args.epochs
            warm = config.copy_and_resolve_references()
            warm.num_epochs = 1
            train_segment.train_and_evaluate(warm, pathlib.Path(tmp) / "warm")
        single_total, single_train = timed_run(config, pathlib.Path(tmp) / "single")
        vmapped = config.copy_and_resolve_references()
        vmapped.num_seeds = args.seeds
        many_total, many_train = timed_run(vmapped, pathlib.Path(tmp) / "vmapped")
    n = args.seeds
    print(f"{args.config} {args.image_size}x{args.image_size}, {budget}")
    rows = (("N = 1", 1, single_total, single_train), (f"N = {n}", n, many_total, many_train))
    for label, seeds, total, train in rows:
        print(
            f"{label:8s} whole run {total:7.1f} s ({3600 * seeds / total:6.1f} seeds/hour), "
            f"training loop {train:7.1f} s ({3600 * seeds / train:6.1f} seeds/hour)"
        )
    print(f"vmapped_over_sequential={(n / many_total) / (1 / single_total):.2f}  (whole runs)")
    print(
        f"vmapped_over_sequential_train={(n / many_train) / (1 / single_train):.2f}  "
        "(training loops)"
    )


if __name__ == "__main__":
    main()
