"""Segmentation of MR T1 slices (not in the thesis; lr as CT and PT); `:smoke` for a quick run,
`:strong` (and `:strong,smoke`) for the options beyond the thesis (configs/segment_base.py)."""

from configs import segment_base


def get_config(arg: str | None = None):
    return segment_base.get_config(arg, modality="T1", learning_rate=1e-3)
