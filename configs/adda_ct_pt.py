"""ADDA CT -> PT (SPEC §4 table row); `--config.scheme=reset` for momentum reset; `:smoke`."""

from configs import adda_base


def get_config(arg: str | None = None):
    return adda_base.get_config(arg, source="CT", target="PT")
