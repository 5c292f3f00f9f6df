"""`snd`: soft neighbourhood density of the target map's features on target val; higher is better.

Saito, Kim, Teterwak, Sclaroff, Darrell, Saenko, "Tune it the right way: unsupervised validation
of domain adaptation via soft neighborhood density", ICCV 2021; SPEC §10. Implemented:

    F = n feature vectors sampled from target val units, each L2-normalised
    S = F F^T / tau, its diagonal excluded;  P_i = softmax of row i of S
    snd = mean_i H(P_i)

with n = `num_samples` (1024) and tau = 0.05 as in the paper. Features: the U-Net's last hidden
layer (`dec0_conv1` after its ReLU, 16 channels at the reference width), one vector per pixel,
for segmentation; LeNet's 500-wide hidden layer, one per image, for digits (`Task.feature_module`).
The units are drawn with a generator seeded by the run's seed, so every evaluation of a run
samples the same units (fewer units than n: all of them).
"""

import dataclasses

import numpy as np
import scipy.special

from sarcoma_jax.adda.criteria.entropy import unit_entropies
from sarcoma_jax.adda.criteria.validator import Validator


def soft_neighbourhood_density(features: np.ndarray, temperature: float) -> float:
    """SND of (n, channels) feature vectors, computed in float32 (the n x n similarities are the
    cost; a test checks it against float64)."""
    features = np.asarray(features, np.float32)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    normalised = features / np.maximum(norms, 1e-12)
    similarity = normalised @ normalised.T / temperature
    np.fill_diagonal(similarity, -np.inf)
    return float(np.mean(unit_entropies(scipy.special.softmax(similarity, axis=1))))


@dataclasses.dataclass(frozen=True)
class SoftNeighbourhoodDensity(Validator):
    num_samples: int = 1024
    temperature: float = 0.05
    name: str = "snd"
    label: str = "soft neighbourhood density"

    def measure(self, probe) -> dict[str, float]:
        features = probe.target_val_features
        vectors = features.reshape(-1, features.shape[-1])
        if len(vectors) > self.num_samples:
            rows = np.random.default_rng(probe.seed).choice(
                len(vectors), self.num_samples, replace=False
            )
            vectors = vectors[np.sort(rows)]
        return {self.name: soft_neighbourhood_density(vectors, self.temperature)}
