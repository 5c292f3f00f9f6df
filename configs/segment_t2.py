"""Segmentation of T2 slices (thesis §14.2: lr 5e-4); `:smoke` for a quick run, `:strong` (and
`:strong,smoke`) for the options beyond the thesis (configs/segment_base.py)."""

from configs import segment_base


def get_config(arg: str | None = None):
    # Data seed 3: its 4 smoke phantom patients have T2 (not STIR) slices in every split.
    return segment_base.get_config(arg, modality="T2", learning_rate=5e-4, smoke_data_seed=3)
