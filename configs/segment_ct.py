"""Segmentation of CT slices (thesis §14.2: lr 1e-3); `:smoke` for a quick run."""

from configs import segment_base


def get_config(arg: str | None = None):
    return segment_base.get_config(arg, modality="CT", learning_rate=1e-3)
