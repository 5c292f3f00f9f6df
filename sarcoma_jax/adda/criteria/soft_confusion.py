"""`soft_confusion`: the confusion stop on the discriminator's probabilities instead of its
argmax verdicts (SPEC §10):

    soft_confusion = 1 - mean over the window of (|r~ - 1/2| + |s~ - 1/2|)

with r~ the mean probability the discriminator gives source val samples of being source and s~
the mean probability it gives target val samples of being target (adda/game.py
`evaluate_game`), the same window, delay and tie rule as the `confusion` criterion. Where eq. 26
on argmax verdicts is 0 whenever recall and specificity are both 0 or 1, this still moves with the
discriminator's confidence.
"""

import dataclasses

from sarcoma_jax.adda.criteria.confusion import ConfusionStop


@dataclasses.dataclass(frozen=True)
class SoftConfusionStop(ConfusionStop):
    name: str = "soft_confusion"
    label: str = "soft confusion stop"
    recall_column: str = "soft_recall"
    specificity_column: str = "soft_specificity"
