"""Train-step and ADDA-cycle speed: our JAX code against an equivalent PyTorch version, interleaved.

python benchmarks/train_step.py [--repeats 10] [--k_d 5] [--k_t 2] [--torch_threads 0,1]

Times, in one process, after warm-up, round-robin (one of each per round, so both frameworks see
the same machine load), the median over --repeats rounds of:
  matmul            float32 (2048, 2048) @ (2048, 2048), full precision, in JAX and in torch: the
                    machine's peak (--bf16_peak: also bfloat16 in JAX, for GPUs; benchmarks/gpu.sh)
  train_step jax    sarcoma_jax.steps.train_step (jit, state donated): the reference
                    U-Net (SPEC §3), batch 5 at 128x128, Adam, pixel BCE summed over pixels and
                    averaged over the batch, BatchNorm in training mode
                    (on CPU also a variant compiled with YNNPACK's convolutions off)
  train_step torch  the same network (benchmarks/torch_reference.py), loss and Adam in PyTorch
  adda_cycle jax    one ADDA cycle (adda/game.py; config adda_ct_pt, --k_d discriminator steps on
                    5 + 5 logit maps, then --k_t target-map steps through the frozen
                    discriminator with inverted labels): fused (`run_cycle`, one compiled call) and
                    unfused (one `disc_step` / `target_step` call per step)
  adda_cycle torch  the same cycle in PyTorch
Torch runs on --torch_device (cpu, or cuda with a CUDA build of torch), on CPU with each thread
count in --torch_threads (0 = os.cpu_count()). The ratios use the fastest torch setting (never a
torch slowed by a bad thread count) and, for the ADDA cycle, the faster JAX variant (named).

Prints images/s (train step: batch images per step; ADDA: 2 x batch images per step, source and
target), the fraction of the measured matmul peak that the FLOPs reach (FLOPs from XLA's cost
analysis of the JAX functions, used for torch too: the same math), the machine load, and last:
  adda_cycle_jax_over_torch=<images/s ratio of the ADDA cycle, JAX over the best torch>
  jax_over_torch=<images/s ratio of the train step, default JAX over the best torch>
"""

import argparse
import contextlib
import functools
import os
import pathlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # torch is in the 'bench' extra; --skip_torch runs without it.
    torch = None

# This checkout's code and configs (not another installed copy), and the sibling torch module.
BENCHMARKS_DIR = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(BENCHMARKS_DIR.parent), str(BENCHMARKS_DIR)]

import torch_reference  # noqa: E402

from configs import adda_ct_pt, segment_ct  # noqa: E402
from sarcoma_jax.adda import criteria  # noqa: E402
from sarcoma_jax.adda import game as game_lib  # noqa: E402
from sarcoma_jax.segment import steps  # noqa: E402

if torch is not None:
    import torch_reference

# XLA:CPU with YNNPACK's convolutions off (Eigen's instead): they use both cores where YNNPACK's
# ran on one here (benchmarks/README.md); timed as a variant, not the default.
CPU_WITHOUT_YNNPACK = {"xla_cpu_experimental_ynn_fusion_type": ""}


def _load() -> str:
    return " ".join(f"{value:.1f}" for value in os.getloadavg())


def _cost_flops(compiled: jax.stages.Compiled) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older jax returned one dict per device
        analysis = analysis[0]
    return float(analysis["flops"])


class Timed:
    """A named unit of work timed by the round-robin loop; `run` must finish its work."""

    def __init__(self, name: str, run: Callable[[], None], images: int, flops: float):
        self.name, self.run, self.images, self.flops = name, run, images, flops
        self.seconds: list[float] = []

    def time_once(self) -> None:
        start = time.perf_counter()
        self.run()
        self.seconds.append(time.perf_counter() - start)

    @property
    def median_s(self) -> float:
        return float(np.median(self.seconds))

    @property
    def images_per_s(self) -> float:
        return self.images / self.median_s


# ---------------------------------------------------------------------------------------------
# JAX


def _batch(rng: np.random.Generator, batch_size: int, size: int) -> dict[str, np.ndarray]:
    return {
        "image": rng.normal(size=(batch_size, size, size, 1)).astype(np.float32),
        "mask": (rng.random((batch_size, size, size, 1)) > 0.8).astype(np.float32),
    }


def jax_train_step(
    batch: dict[str, np.ndarray], compiler_options: dict | None = None
) -> tuple[Callable[[], None], float]:
    """The real steps.train_step on the reference U-Net (configs/segment_ct.py: Adam
    1e-3), compiled with XLA `compiler_options`; returns (run, FLOPs per call)."""
    config = segment_ct.get_config()
    model = steps.create_model(config.model)
    state = steps.create_train_state(
        jax.random.PRNGKey(0),
        model,
        batch["image"].shape[1:],
        steps.create_optimizer(config.optimizer),
    )
    device_batch = jax.device_put(batch)
    flops = _cost_flops(jax.jit(steps.train_step).lower(state, device_batch).compile())
    step = jax.jit(steps.train_step, donate_argnums=0, compiler_options=compiler_options)
    holder = {"state": state}

    def run() -> None:
        holder["state"], step_metrics = step(holder["state"], device_batch)
        jax.block_until_ready(step_metrics)

    return run, flops


def adda_config(k_d: int, k_t: int):
    """configs/adda_ct_pt.py (full size) with k_d discriminator and k_t target steps per cycle."""
    config = adda_ct_pt.get_config()
    config.disc_steps_per_cycle = k_d
    config.target_steps_per_cycle = k_t
    return config


def jax_adda_cycle(
    config, source_images: np.ndarray, target_images: np.ndarray
) -> tuple[Callable[[], None], Callable[[], None], float]:
    """the ADDA game's cycle, fused (run_cycle) and unfused (a call per step), on stacked batches
    (steps, batch, h, w, 1); returns (fused run, unfused run, FLOPs per cycle)."""
    k_d, k_t = config.disc_steps_per_cycle, config.target_steps_per_cycle
    game = game_lib.create_game(config)
    input_shape = source_images.shape[2:]
    source_variables = jax.jit(
        lambda rng: game.map_model.init(rng, jnp.zeros((1, *input_shape)), train=False)
    )(jax.random.PRNGKey(1))
    state = game_lib.create_game_state(
        jax.random.PRNGKey(0),
        game,
        source_variables,
        input_shape,
        criteria.init(criteria.build(config)),
    )
    disc_source, disc_target = jax.device_put((source_images[:k_d], target_images[:k_d]))
    map_source, map_target = jax.device_put((source_images[k_d:], target_images[k_d:]))

    disc_step = functools.partial(game_lib.disc_step, game)
    target_step = functools.partial(game_lib.target_step, game)
    one_batch = (disc_source[0], disc_target[0])
    flops = k_d * _cost_flops(
        jax.jit(disc_step).lower(state, source_variables, *one_batch).compile()
    ) + k_t * _cost_flops(jax.jit(target_step).lower(state, source_variables, *one_batch).compile())

    cycle = jax.jit(functools.partial(game_lib.run_cycle, game), donate_argnums=0)
    disc_step_fn = jax.jit(disc_step, donate_argnums=0)
    target_step_fn = jax.jit(target_step, donate_argnums=0)
    holder = {"state": state}

    def fused() -> None:
        holder["state"], step_metrics = cycle(
            holder["state"], source_variables, disc_source, disc_target, map_source, map_target
        )
        jax.block_until_ready(step_metrics)

    def unfused() -> None:
        state = holder["state"]
        for step_fn, sources, targets in (
            (disc_step_fn, disc_source, disc_target),
            (target_step_fn, map_source, map_target),
        ):
            for index in range(sources.shape[0]):
                state, step_metrics = step_fn(
                    state, source_variables, sources[index], targets[index]
                )
        jax.block_until_ready(step_metrics)
        holder["state"] = state

    return fused, unfused, flops


def jax_matmul(size: int, dtype: jnp.dtype) -> Callable[[], None]:
    """(size, size) @ (size, size) at full precision of `dtype` (no TF32 for float32 on GPUs)."""
    keys = jax.random.split(jax.random.PRNGKey(0))
    a, b = (jax.random.normal(key, (size, size), dtype) for key in keys)
    matmul = jax.jit(functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST))
    return lambda: jax.block_until_ready(matmul(a, b))


# ---------------------------------------------------------------------------------------------
# PyTorch


class TorchSetting(NamedTuple):
    """Where and how torch runs: device ('cpu' | 'cuda'), memory format, CPU threads."""

    device: str
    memory_format: Any  # torch.memory_format
    threads: int

    def label(self) -> str:
        return f"torch {self.threads} threads" if self.device == "cpu" else f"torch {self.device}"

    def to(self, module_or_tensor):
        return module_or_tensor.to(self.device, memory_format=self.memory_format)

    def run(self, work: Callable[[], None]) -> Callable[[], None]:
        """`work` with this setting's thread count, waiting for the GPU at the end."""

        def timed_work() -> None:
            if self.device == "cpu":
                torch.set_num_threads(self.threads)
            work()
            if self.device == "cuda":
                torch.cuda.synchronize()

        return timed_work


def _to_torch(images: np.ndarray, setting: TorchSetting) -> torch.Tensor:
    """(batch, h, w, c) float32 NumPy -> (batch, c, h, w) torch on the setting's device."""
    return setting.to(torch.from_numpy(np.moveaxis(images, -1, 1).copy()))


def torch_train_step(batch: dict[str, np.ndarray], setting: TorchSetting) -> Callable[[], None]:
    torch.manual_seed(0)
    config = segment_ct.get_config()
    unet = setting.to(torch_reference.UNet().train())
    images = _to_torch(batch["image"], setting)
    masks = _to_torch(batch["mask"], setting)
    optimizer = torch.optim.Adam(
        unet.parameters(),
        lr=config.optimizer.learning_rate,
        betas=(config.optimizer.b1, config.optimizer.b2),
        eps=config.optimizer.eps,
    )

    def run() -> None:
        optimizer.zero_grad(set_to_none=True)
        logits = unet(images)
        loss = F.binary_cross_entropy_with_logits(logits, masks, reduction="sum") / len(images)
        loss.backward()
        optimizer.step()

    return setting.run(run)


@contextlib.contextmanager
def _frozen_batch_norm_statistics(module: torch.nn.Module) -> Iterator[None]:
    """Training-mode BatchNorm (batch statistics) that leaves its running averages alone, as the
    JAX target step does with the discriminator's (momentum 0 keeps them)."""
    norms = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.momentum = 0.0
    try:
        yield
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum


def torch_adda_cycle(
    config,
    source_images: np.ndarray,
    target_images: np.ndarray,
    setting: TorchSetting,
) -> Callable[[], None]:
    """the ADDA game's cycle in PyTorch: the same maps (source frozen; target map's BatchNorm on its
    running averages, target_map_train_mode=False), discriminator, losses and Adams."""
    torch.manual_seed(0)
    k_d = config.disc_steps_per_cycle
    source_map = setting.to(torch_reference.UNet().eval())
    source_map.requires_grad_(False)
    target_map = setting.to(torch_reference.UNet().eval())
    target_map.load_state_dict(source_map.state_dict())
    target_map.requires_grad_(True)
    discriminator = setting.to(torch_reference.LogitMapDiscriminator().train())

    def adam(parameters, optimizer_config):
        return torch.optim.Adam(
            parameters,
            lr=optimizer_config.learning_rate,
            betas=(optimizer_config.b1, optimizer_config.b2),
            eps=optimizer_config.eps,
        )

    disc_optimizer = adam(discriminator.parameters(), config.disc_optimizer)
    target_optimizer = adam(target_map.parameters(), config.target_optimizer)
    sources = [_to_torch(images, setting) for images in source_images]
    targets = [_to_torch(images, setting) for images in target_images]
    batch_size = source_images.shape[1]
    # The game's labels: source 1, target 0 (confusion.SOURCE_DOMAIN_LABEL).
    domain_labels = torch.cat([torch.ones(batch_size), torch.zeros(batch_size)]).long()
    domain_labels = domain_labels.to(setting.device)
    inverted_labels = torch.ones(batch_size, dtype=torch.long, device=setting.device)

    def disc_step(source_batch: torch.Tensor, target_batch: torch.Tensor) -> None:
        with torch.no_grad():
            inputs = torch.cat([source_map(source_batch), target_map(target_batch)])
        logits = discriminator(inputs)
        loss = F.cross_entropy(logits, domain_labels)
        loss = loss + config.discriminator_l2 * torch_reference.kernel_l2_penalty(discriminator)
        disc_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        disc_optimizer.step()

    def target_step(source_batch: torch.Tensor, target_batch: torch.Tensor) -> None:
        with torch.no_grad():
            source_outputs = source_map(source_batch)
        discriminator.requires_grad_(False)
        with _frozen_batch_norm_statistics(discriminator):
            logits = discriminator(torch.cat([source_outputs, target_map(target_batch)]))
        discriminator.requires_grad_(True)
        loss = F.cross_entropy(logits[batch_size:], inverted_labels)
        target_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        target_optimizer.step()

    def run() -> None:
        for index in range(len(sources)):
            step = disc_step if index < k_d else target_step
            step(sources[index], targets[index])

    return setting.run(run)


def torch_matmul(size: int, setting: TorchSetting) -> Callable[[], None]:
    """float32 (size, size) @ (size, size), TF32 off."""
    torch.backends.cuda.matmul.allow_tf32 = False
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator).to(setting.device) for _ in range(2))
    return setting.run(lambda: torch.mm(a, b))


# ---------------------------------------------------------------------------------------------


def _print_row(unit: Timed, peaks: dict[str, float]) -> None:
    achieved = unit.flops / unit.median_s
    fractions = ", ".join(f"{achieved / peak:6.1%} of {name} peak" for name, peak in peaks.items())
    print(
        f"{unit.name:34s} {unit.images_per_s:8.2f} images/s  "
        f"(median {unit.median_s * 1e3:7.1f} ms, best {min(unit.seconds) * 1e3:7.1f} ms)  "
        f"{achieved / 1e9:7.1f} GFLOP/s = {fractions}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds (median taken)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls of each unit")
    parser.add_argument("--batch_size", type=int, default=5)
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--k_d", type=int, default=5, help="discriminator steps per ADDA cycle")
    parser.add_argument("--k_t", type=int, default=2, help="target steps per ADDA cycle")
    parser.add_argument("--matmul_size", type=int, default=2048, help="side of the peak matmul")
    parser.add_argument(
        "--bf16_peak", action="store_true", help="also measure a bfloat16 matmul peak (GPUs)"
    )
    parser.add_argument(
        "--torch_threads",
        default="0,1",
        help="comma-separated torch CPU thread counts to time (0 = os.cpu_count())",
    )
    parser.add_argument("--torch_device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--torch_memory_format",
        choices=("channels_last", "contiguous"),
        default="channels_last",
        help="channels_last was the faster on this CPU (benchmarks/README.md)",
    )
    parser.add_argument("--skip_torch", action="store_true", help="time JAX only")
    parser.add_argument(
        "--datasheet_tflops",
        default="",
        help="the card's nominal peaks to report fractions of too, e.g. float32=67,bfloat16=989",
    )
    parser.add_argument("--skip_adda", action="store_true", help="time the train step only")
    args = parser.parse_args()
    if min(args.repeats, args.k_d, args.k_t, args.batch_size, args.matmul_size) < 1:
        sys.exit("error: --repeats, --k_d, --k_t, --batch_size and --matmul_size must be >= 1")
    if args.image_size % 8:
        sys.exit("error: --image_size must be divisible by 8 (the U-Net's three downsamplings)")
    if torch is None and not args.skip_torch:
        sys.exit("error: torch is not installed (pip install -e .[bench]); or pass --skip_torch")
    if args.torch_device == "cuda" and not args.skip_torch and not torch.cuda.is_available():
        sys.exit("error: --torch_device=cuda but this torch has no CUDA (or sees no GPU)")
    try:
        datasheet_peaks = {
            f"datasheet {name}": float(tflops) * 1e12
            for name, tflops in (
                item.split("=") for item in args.datasheet_tflops.split(",") if item
            )
        }
    except ValueError:
        sys.exit(f"error: --datasheet_tflops {args.datasheet_tflops!r}: use name=TFLOPs,...")
    try:
        thread_counts = [int(t) or os.cpu_count() for t in args.torch_threads.split(",")]
    except ValueError:
        sys.exit(f"error: --torch_threads {args.torch_threads!r} is not a list of integers")
    settings = []
    if not args.skip_torch:
        memory_format = (
            torch.channels_last
            if args.torch_memory_format == "channels_last"
            else torch.contiguous_format
        )
        settings = [
            TorchSetting(args.torch_device, memory_format, threads)
            for threads in (dict.fromkeys(thread_counts) if args.torch_device == "cpu" else [0])
        ]

    print(
        f"machine: {os.cpu_count()} CPUs, load average {_load()} (1, 5, 15 min) at start; "
        f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        + ("no torch" if args.skip_torch else f"torch {torch.__version__} on {args.torch_device}")
    )
    rng = np.random.default_rng(0)
    batch = _batch(rng, args.batch_size, args.image_size)
    matmul_flops = 2.0 * args.matmul_size**3
    units = [
        Timed("matmul float32 jax", jax_matmul(args.matmul_size, jnp.float32), 0, matmul_flops)
    ]
    if args.bf16_peak:
        units.append(
            Timed(
                "matmul bfloat16 jax", jax_matmul(args.matmul_size, jnp.bfloat16), 0, matmul_flops
            )
        )
    units += [
        Timed(
            f"matmul float32 {setting.label()}",
            torch_matmul(args.matmul_size, setting),
            0,
            matmul_flops,
        )
        for setting in settings
    ]
    step_run, step_flops = jax_train_step(batch)
    units.append(Timed("train_step jax", step_run, args.batch_size, step_flops))
    if jax.default_backend() == "cpu":
        without_ynnpack, _ = jax_train_step(batch, CPU_WITHOUT_YNNPACK)
        units.append(
            Timed("train_step jax, YNNPACK off", without_ynnpack, args.batch_size, step_flops)
        )
    units += [
        Timed(
            f"train_step {setting.label()}",
            torch_train_step(batch, setting),
            args.batch_size,
            step_flops,
        )
        for setting in settings
    ]
    if not args.skip_adda:
        config = adda_config(args.k_d, args.k_t)
        steps = args.k_d + args.k_t
        source_images = rng.normal(
            size=(steps, args.batch_size, args.image_size, args.image_size, 1)
        ).astype(np.float32)
        target_images = rng.normal(size=source_images.shape).astype(np.float32)
        fused, unfused, cycle_flops = jax_adda_cycle(config, source_images, target_images)
        cycle_images = steps * 2 * args.batch_size
        units += [
            Timed("adda_cycle jax fused", fused, cycle_images, cycle_flops),
            Timed("adda_cycle jax unfused", unfused, cycle_images, cycle_flops),
        ]
        units += [
            Timed(
                f"adda_cycle {setting.label()}",
                torch_adda_cycle(config, source_images, target_images, setting),
                cycle_images,
                cycle_flops,
            )
            for setting in settings
        ]

    for unit in units:
        for _ in range(args.warmup):
            unit.run()
    for _ in range(args.repeats):
        for unit in units:
            unit.time_once()

    matmuls = [unit for unit in units if unit.name.startswith("matmul")]
    peaks = {
        dtype: max(u.flops / u.median_s for u in matmuls if dtype in u.name)
        for dtype in ("float32", "bfloat16")
        if any(dtype in u.name for u in matmuls)
    }
    peaks.update(datasheet_peaks)
    print(f"load average {_load()} at end; {args.repeats} interleaved rounds after warm-up")
    print(
        f"peaks (median of {args.matmul_size}^3 matmuls, float32 the best of the frameworks; "
        "datasheet ones as given): "
        + ", ".join(f"{name} {peak / 1e9:.1f} GFLOP/s" for name, peak in peaks.items())
    )
    for unit in matmuls:
        print(f"{unit.name:34s} {unit.flops / unit.median_s / 1e9:8.1f} GFLOP/s")
    print(
        f"FLOPs (XLA cost analysis of the JAX functions, used for torch too): train step "
        f"{step_flops / args.batch_size / 1e9:.2f} GFLOP/image"
        + (
            ""
            if args.skip_adda
            else f"; ADDA cycle (k_d={args.k_d}, k_t={args.k_t}) "
            f"{cycle_flops / cycle_images / 1e9:.2f} GFLOP/image"
        )
    )
    for unit in units:
        if not unit.name.startswith("matmul"):
            _print_row(unit, peaks)
    if not settings:
        return

    def fastest(prefix: str) -> Timed:
        return max((u for u in units if u.name.startswith(prefix)), key=lambda u: u.images_per_s)

    if not args.skip_adda:
        cycle_jax, cycle_torch = fastest("adda_cycle jax"), fastest("adda_cycle torch")
        print(
            f"adda_cycle_jax_over_torch={cycle_jax.images_per_s / cycle_torch.images_per_s:.2f}"
            f"  ({cycle_jax.name} over {cycle_torch.name})"
        )
    step_jax = next(u for u in units if u.name == "train_step jax")  # the default, not a variant
    step_torch = fastest("train_step torch")
    print(f"jax_over_torch={step_jax.images_per_s / step_torch.images_per_s:.2f}")


if __name__ == "__main__":
    main()
