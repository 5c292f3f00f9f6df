"""Seeds per hour: N seeds one after another against N seeds in one vmapped program
(`--config.num_seeds=N`), for segmentation training or for the ADDA game.

python benchmarks/seeds.py [--seeds 4] [--config configs/segment_pt.py] [--image_size 64]
                           [--epochs 3]
python benchmarks/seeds.py --config configs/adda_ct_pt.py [--target_epochs 1]
python benchmarks/seeds.py --per_step      # one step: single seed, jax.vmap, unrolled

Runs, in this one process and on the same (phantom, by default) data:
  N = 1      train_and_evaluate with num_seeds=1 (seed 0), timed
  N = seeds  the same config with num_seeds=seeds: one jit-compiled, vmapped program
and prints, for each, the wall time (training loop only, and the whole run with compilation,
evaluation and figures) and seeds/hour, then `vmapped_over_sequential=<ratio of seeds/hour>`
(the N = 1 figure stands for N sequential runs). Each seed's numbers are those of its single
run (tests/segment_train_test.py, tests/adda_train_test.py); this measures only the speed.

An ADDA config times the game only: the warm-up trains one source map (`--epochs` epochs),
which every timed run reuses through config.source_checkpoint. Its "training loop" is the whole
game with its evaluations (results' wall_time_s); the whole run adds scoring the criteria.
"""

import argparse
import functools
import importlib.util
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from sarcoma_jax import seed_map
from sarcoma_jax.adda import criteria
from sarcoma_jax.adda import game as game_lib
from sarcoma_jax.adda import train as adda_train
from sarcoma_jax.segment import steps
from sarcoma_jax.segment import train as segment_train

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
        results = adda_train.train_and_evaluate(config, workdir)
        return time.perf_counter() - start, float(results["wall_time_s"])
    results = segment_train.train_and_evaluate(config, workdir)
    return time.perf_counter() - start, float(results["train_wall_time_s"])


def _median_seconds(function, args, repeats: int) -> float:
    """Median wall time of `function(*args)` after two warm-up calls (state threaded through)."""
    state, *rest = args
    for _ in range(2):
        state, outputs = function(state, *rest)
        jax.block_until_ready(outputs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state, outputs = function(state, *rest)
        jax.block_until_ready(outputs)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def per_step(image_size: int, num_seeds: int, repeats: int) -> None:
    """One step of one seed against one step of `num_seeds` seeds, by jax.vmap and unrolled:
    the segmentation train step (configs/segment_pt.py) and the ADDA discriminator and target
    steps (configs/adda_ct_pt.py), batch 5, random inputs."""
    segment_config = load_config("configs/segment_pt.py")
    model = steps.create_model(segment_config.model)
    optimizer = steps.create_optimizer(segment_config.optimizer)
    shape = (image_size, image_size, 1)
    keys = jnp.stack([jax.random.PRNGKey(seed) for seed in range(num_seeds)])
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.uniform(size=(5, *shape)).astype(np.float32),
        "mask": (rng.uniform(size=(5, *shape)) > 0.8).astype(np.uint8),
    }

    def stacked(tree):
        return jax.tree.map(lambda leaf: np.stack([leaf] * num_seeds), tree)

    cases = [
        (
            "segmentation train step",
            steps.train_step,
            steps.create_train_state(keys[0], model, shape, optimizer),
            steps.create_train_state(keys, model, shape, optimizer),
            (batch,),
        )
    ]
    adda_config = load_config("configs/adda_ct_pt.py")
    game = game_lib.create_game(adda_config)
    source = dict(
        jax.jit(lambda key: game.map_model.init(key, jnp.zeros((1, *shape)), train=False))(keys[0])
    )
    criteria_state = criteria.init(criteria.build(adda_config))
    states = [game_lib.create_game_state(key, game, source, shape, criteria_state) for key in keys]
    for name, step in (
        ("ADDA discriminator step", game_lib.disc_step),
        ("ADDA target step", game_lib.target_step),
    ):
        cases.append(
            (
                name,
                functools.partial(step, game),
                states[0],
                jax.tree.map(lambda *leaves: jnp.stack(leaves), *states),
                (source, batch["image"], batch["image"]),
            )
        )
    print(f"one step, {image_size}x{image_size}, batch 5, {num_seeds} seeds, median of {repeats}:")
    for name, step, state, seed_states, inputs in cases:
        single = _median_seconds(jax.jit(step), (state, *inputs), repeats)
        line = f"{name:26s} {num_seeds} x single {num_seeds * single * 1e3:7.1f} ms"
        for vmap in (True, False):
            mapped = seed_map.seed_map(
                step, (0,) * (1 + len(inputs)), num_seeds=num_seeds, vmap=vmap
            )
            seconds = _median_seconds(
                jax.jit(mapped), (seed_states, *map(stacked, inputs)), repeats
            )
            label = "vmap" if vmap else "unrolled"
            line += f", {label} {seconds * 1e3:7.1f} ms ({num_seeds * single / seconds:.2f}x)"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--config", default="configs/segment_pt.py")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3, help="segmentation (or source) epochs")
    parser.add_argument("--target_epochs", type=float, default=1.0, help="ADDA only")
    parser.add_argument(
        "--vmap_seeds",
        choices=("auto", "true", "false"),
        default="auto",
        help="config.vmap_seeds: jax.vmap or an unrolled loop over the seeds (auto: the default)",
    )
    parser.add_argument(
        "--per_step",
        action="store_true",
        help="time single steps (one seed, vmap, unrolled) instead of whole runs",
    )
    args = parser.parse_args()
    if args.seeds < 2:
        sys.exit("error: --seeds must be >= 2")
    if args.per_step:
        per_step(args.image_size, args.seeds, repeats=10)
        return
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
            segment_train.train_and_evaluate(source, pathlib.Path(tmp) / "source")
            config.source_checkpoint = str(pathlib.Path(tmp) / "source")
            config.target_epochs = args.target_epochs
        else:
            config.num_epochs = args.epochs
            warm = config.copy_and_resolve_references()
            warm.num_epochs = 1
            segment_train.train_and_evaluate(warm, pathlib.Path(tmp) / "warm")
        single_total, single_train = timed_run(config, pathlib.Path(tmp) / "single")
        vmapped = config.copy_and_resolve_references()
        vmapped.num_seeds = args.seeds
        if args.vmap_seeds != "auto":
            vmapped.vmap_seeds = args.vmap_seeds == "true"
        many_total, many_train = timed_run(vmapped, pathlib.Path(tmp) / "vmapped")
    n = args.seeds
    batching = "vmap" if seed_map.use_vmap(vmapped) else "unrolled"
    print(
        f"{args.config} {args.image_size}x{args.image_size}, {budget}, seeds batched by {batching}"
    )
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
