"""`im`: information maximisation of the target map on target val; higher is better.

IM as a validator (Musgrave, Belongie, Lim, "Benchmarking validation methods for unsupervised
domain adaptation", ECCV 2022; the IM loss of Gomes, Krause, Perona, NeurIPS 2010 and SHOT),
SPEC §10. Implemented:

    im = H(mean over units of p_u) - mean over units of H(p_u)

over target val units (pixels for segmentation, images for digits; `entropy.unit_entropies`).
The first term (diversity) falls when the map predicts one class everywhere, e.g. a collapsed
segmenter that finds no tumour; the second (confidence) is the `entropy` validator.
"""

import dataclasses

import numpy as np

from sarcoma_jax.adda.criteria.entropy import unit_entropies
from sarcoma_jax.adda.criteria.validator import Validator


@dataclasses.dataclass(frozen=True)
class InformationMaximisation(Validator):
    name: str = "im"
    label: str = "information maximisation"

    def measure(self, probe) -> dict[str, float]:
        probabilities = probe.target_val_probabilities
        diversity = unit_entropies(probabilities.mean(axis=0, keepdims=True))[0]
        return {self.name: float(diversity - np.mean(unit_entropies(probabilities)))}
