"""ADDA on the offline digits pair (SPEC §8): printed digits on clutter -> scikit-learn's digits.

Needs no download: the source is rendered with Pillow's bundled font, the target is scikit-learn's
bundled handwritten digits upsampled to 28x28. Same game and hyperparameters as
configs/adda_svhn_mnist.py (SPEC §4), except that the confusion stop may select after 500
discriminator steps instead of 2000: the whole run has 2700 (5 epochs of 1078 target images,
batch 20, k_d = 10). `--config.scheme=reset` for momentum reset; `:smoke` for a quick run.
"""

import ml_collections

from configs import adda_svhn_mnist


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = adda_svhn_mnist.get_config(arg, dataset="offline")
    if arg != "smoke":
        config.confusion_delay = 500
    return config
