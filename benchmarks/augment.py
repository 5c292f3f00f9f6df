"""Where to augment: inside the jit-compiled train step (sarcoma_jax/augment.py) or on the host.

python benchmarks/augment.py [--image_size 128] [--batch_size 5] [--context_slices 1]
                             [--repeats 10]

Times, in one process, round-robin over `repeats` rounds after two warm-up calls each (so every
variant sees the same machine load), the median of:
  step                the train step of the `:strong` config without augmentation (bce_dice, the
                      reference U-Net, batch 5, 2k + 1 input channels)
  step + device aug   the same step with `config.augment` of the `:strong` config inside it
  device aug alone    augment.augment_batch alone, jit-compiled
  host aug            the same transforms on the host in numpy / scipy.ndimage (float64 field,
                      scipy map_coordinates order 1 and 0), what a grain map would run per batch
and prints the figures, `device_aug_overhead=<step + device aug over step>`,
`host_over_device_alone=<host aug over device aug alone>` and `host_over_device=<host aug over
the time the device augmentation adds to a step>`. A host
augmentation runs beside the step only if a core is free for it; on this 2-core machine XLA's
step already uses both, so its time adds to the step's.
"""

import argparse
import functools
import os
import sys
import time

import jax
import numpy as np
import scipy.ndimage

# The checkout this script is in, before an installed copy: configs/ and sarcoma_jax/ from here.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from configs import segment_base  # noqa: E402
from sarcoma_jax import augment  # noqa: E402
from sarcoma_jax.segment import steps  # noqa: E402


def host_augment(
    rng: np.random.Generator, images: np.ndarray, masks: np.ndarray, a: augment.Augmentation
) -> tuple[np.ndarray, np.ndarray]:
    """The augmentation of augment.py on the host, example by example, in numpy and scipy."""
    out_images, out_masks = np.empty_like(images), np.empty_like(masks)
    for i in range(images.shape[0]):
        height, width, channels = images[i].shape
        whether, what = rng.uniform(size=(2, 8))
        flip = whether[0] < a.flip_prob
        angle = np.deg2rad((2 * what[1] - 1) * a.rotation_degrees) * (whether[1] < a.rotation_prob)
        scale = a.scale_range[0] + (a.scale_range[1] - a.scale_range[0]) * what[2]
        scale = scale if whether[2] < a.scale_prob else 1.0
        rows, cols = np.mgrid[:height, :width].astype(np.float64)
        rows -= (height - 1) / 2
        cols -= (width - 1) / 2
        q_rows = np.cos(angle) * rows + np.sin(angle) * cols
        q_cols = np.cos(angle) * cols - np.sin(angle) * rows
        q_cols = -q_cols if flip else q_cols
        coordinates = np.stack(
            [q_rows / scale + (height - 1) / 2, q_cols / scale + (width - 1) / 2]
        )
        if whether[3] < a.elastic_prob:
            side = min(height, width)
            field = np.stack(
                [
                    scipy.ndimage.gaussian_filter(
                        rng.normal(size=(height, width)), a.elastic_sigma * side, truncate=3.0
                    )
                    for _ in range(2)
                ]
            )
            coordinates += field * (a.elastic_magnitude * side / np.sqrt(np.mean(field**2)))
        warped = np.stack(
            [
                scipy.ndimage.map_coordinates(
                    images[i, ..., c], coordinates, order=1, mode="nearest"
                )
                for c in range(channels)
            ],
            axis=-1,
        )
        out_masks[i, ..., 0] = scipy.ndimage.map_coordinates(
            masks[i, ..., 0], coordinates, order=0, mode="nearest"
        )
        if whether[4] < a.gamma_prob:
            warped = np.clip(warped, 0, 1) ** (a.gamma_range[0] + np.ptp(a.gamma_range) * what[4])
        if whether[5] < a.intensity_scale_prob:
            warped = warped * (
                a.intensity_scale_range[0] + np.ptp(a.intensity_scale_range) * what[5]
            )
        if whether[6] < a.intensity_shift_prob:
            warped = warped + (2 * what[6] - 1) * a.intensity_shift
        if whether[7] < a.noise_prob:
            warped = warped + rng.normal(0.0, a.noise_std * what[7], warped.shape)
        out_images[i] = warped
    return out_images, out_masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=5)
    parser.add_argument("--context_slices", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    config = segment_base.get_config("strong")
    augmentation = augment.Augmentation.from_config(config.augment)
    size, channels = args.image_size, 2 * args.context_slices + 1
    rng = np.random.default_rng(0)
    images = rng.uniform(0.0, 1.0, (args.batch_size, size, size, channels)).astype(np.float32)
    masks = np.zeros((args.batch_size, size, size, 1), np.uint8)
    masks[:, size // 3 : size // 2, size // 4 : size // 2] = 1
    batch = {"image": images, "mask": masks}
    state = steps.create_train_state(
        jax.random.PRNGKey(0),
        steps.create_model(config.model),
        (size, size, channels),
        steps.create_optimizer(config.optimizer),
    )
    plain_step = jax.jit(functools.partial(steps.train_step, loss=config.loss))
    augmented_step = jax.jit(
        functools.partial(steps.train_step, loss=config.loss, augmentation=augmentation)
    )
    device_augment = jax.jit(functools.partial(augment.augment_batch, augmentation=augmentation))
    host_rng = np.random.default_rng(1)
    key = jax.random.PRNGKey(2)

    variants = {
        "step": lambda: plain_step(state, batch)[1]["loss"],
        "step + device aug": lambda: augmented_step(state, batch)[1]["loss"],
        "device aug alone": lambda: device_augment(key, images, masks),
        "host aug": lambda: host_augment(host_rng, images, masks, augmentation),
    }
    print(
        f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()} at start; jax "
        f"{jax.__version__} on {jax.default_backend()}; batch {args.batch_size} x {size}x{size}"
        f"x{channels}, loss {config.loss}"
    )
    times = {name: [] for name in variants}
    for run in variants.values():
        for _ in range(2):  # compile and warm up
            jax.block_until_ready(run())
    for _ in range(args.repeats):
        for name, run in variants.items():
            start = time.perf_counter()
            jax.block_until_ready(run())
            times[name].append(time.perf_counter() - start)
    medians = {name: float(np.median(values)) for name, values in times.items()}
    for name, seconds in medians.items():
        print(f"{name:20s} {1e3 * seconds:8.1f} ms  (best {1e3 * min(times[name]):8.1f} ms)")
    added = medians["step + device aug"] - medians["step"]
    print(f"load average {os.getloadavg()} at end; {args.repeats} interleaved rounds")
    print(f"device_aug_overhead={medians['step + device aug'] / medians['step']:.3f}")
    print(f"host_over_device_alone={medians['host aug'] / medians['device aug alone']:.2f}")
    if added > 0:
        print(f"host_over_device={medians['host aug'] / added:.2f}")


if __name__ == "__main__":
    main()
