"""Segmentation of PT slices (thesis §14.2: lr 1e-3); `:smoke` for a quick run, `:strong` (and
`:strong,smoke`) for the options beyond the thesis (configs/segment_base.py)."""

from configs import segment_base


def get_config(arg: str | None = None):
    return segment_base.get_config(arg, modality="PT", learning_rate=1e-3)
