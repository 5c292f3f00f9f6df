"""ADDA for any pair: `--config=configs/adda.py:CT,T1`, `:CT,T1:smoke`, `:CT,T1:strong` (the
source segmenter's ':strong' variant) or `:CT,T1:strong,smoke` (e.g. the real data)."""

from configs import adda_base


def get_config(arg: str | None = None):
    """`arg` is 'SRC,TGT' or 'SRC,TGT:VARIANTS' with domain names such as CT, PT, T1, T2, STIR and
    VARIANTS a comma-separated choice of smoke, strong (configs/adda_base.py)."""
    pair, _, variant = (arg or "").partition(":")
    domains = [domain.strip() for domain in pair.split(",")]
    if len(domains) != 2 or not all(domains):
        raise ValueError(
            f"configs/adda.py needs 'SRC,TGT[:VARIANTS]', e.g. 'CT,T1' or 'CT,T1:strong'; "
            f"got {arg!r}"
        )
    return adda_base.get_config(variant or None, source=domains[0], target=domains[1])
