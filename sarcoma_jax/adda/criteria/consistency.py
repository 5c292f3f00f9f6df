"""`consistency`: agreement of the target map's predictions under small changes of its input;
higher is better.

Augmentation consistency as a validator (cf. arXiv 2503.00450; SPEC §10). Implemented:

    consistency = mean over target val images x of agreement(f(x), t_x^-1(f(t_x(x))))

where the transforms t are a left-right flip (only where the task is flip invariant:
segmentation, not digits), intensity x 0.9 and intensity x 1.1 (the inputs are scaled to [0, 1];
t^-1 is the identity on the outputs for these). The images x are every m-th target val image (m
the number of transforms: images 0, m, 2m, ...), and t_x deals the transforms out in turn among
them, so each transform sees every m-th of those. The measurement costs a forward pass of 1/m
of target val: its cost is one of the validators' budget (README: they may not more than double
an evaluation), and a third of the segmentation val images (30 of 90 on sts_ibsi) still spans
every val patient. Agreement is the task's: per-image Dice at p >= 0.5 (empty and empty agree)
for segmentation, equal predicted classes for digits; the mean over images weights each image
alike.
"""

import dataclasses

import numpy as np

from sarcoma_jax.adda.criteria.validator import Validator

INTENSITY_FACTORS = (0.9, 1.1)


def _flip(array: np.ndarray) -> np.ndarray:
    """Left-right flip of (n, h, w, c) images or outputs."""
    return array[:, :, ::-1]


@dataclasses.dataclass(frozen=True)
class Consistency(Validator):
    name: str = "consistency"
    label: str = "consistency"

    def measure(self, probe) -> dict[str, float]:
        images, outputs = probe.target_val_images, probe.target_val_outputs
        transforms = [(lambda x, f=factor: np.float32(f) * x, None) for factor in INTENSITY_FACTORS]
        if probe.task.flip_invariant:
            transforms.append((_flip, _flip))
        chosen = np.arange(0, len(images), len(transforms))
        groups = [chosen[k :: len(transforms)] for k in range(len(transforms))]
        groups = [group for group in groups if len(group)]
        transforms = transforms[: len(groups)]
        transformed = np.concatenate(
            [forward(images[group]) for (forward, _), group in zip(transforms, groups, strict=True)]
        )
        mapped = probe.outputs_on(np.ascontiguousarray(transformed))
        total, start = 0.0, 0
        for (_, inverse), group in zip(transforms, groups, strict=True):
            back = mapped[start : start + len(group)]
            start += len(group)
            if inverse is not None:
                back = inverse(back)
            # Task.agreement is a mean over the images given: weighted by their number.
            total += len(group) * probe.task.agreement(outputs[group], back)
        return {self.name: total / len(chosen)}
