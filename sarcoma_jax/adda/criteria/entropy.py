"""`entropy`: mean prediction entropy of the target map on target val; lower is better.

Entropy minimisation as a validator (Morerio, Cavazza, Murino, "Minimal-entropy correlation
alignment for unsupervised deep domain adaptation", ICLR 2018), SPEC §10. Implemented:

    entropy = mean over target val units u of H(p_u),  H(q) = -sum_k q_k log q_k

where a unit is a pixel (p = sigmoid(logit), classes tumour / background) for segmentation, an
image (softmax over 10) for digits; natural log, 0 log 0 = 0. Score: -entropy.
"""

import dataclasses

import numpy as np

from sarcoma_jax.adda.criteria.validator import Validator


def unit_entropies(probabilities: np.ndarray) -> np.ndarray:
    """H of each row of (units, classes) probabilities, in nats (0 log 0 = 0)."""
    logs = np.log(np.where(probabilities > 0, probabilities, 1.0))
    return -np.sum(probabilities * logs, axis=1)


@dataclasses.dataclass(frozen=True)
class Entropy(Validator):
    name: str = "entropy"
    label: str = "entropy"
    higher_is_better: bool = False

    def measure(self, probe) -> dict[str, float]:
        probabilities = probe.target_val_probabilities
        return {self.name: float(np.mean(unit_entropies(probabilities)))}
