"""sarcoma_jax: sarcoma segmentation and adversarial domain adaptation in JAX/Flax."""

from sarcoma_jax.confusion import confusion_score
from sarcoma_jax.optim import momentum_reset

__all__ = ["confusion_score", "momentum_reset"]
