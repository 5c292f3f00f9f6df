"""The thesis' numbers, as data (SPEC §7; accuracy and AUC of §15-6 and all of §15-7 transcribed
from the thesis text), and how to set them beside ours."""

# Table 15-4 (validation = test patients in the thesis), per downsampling variant of the U-Net.
THESIS_TABLE_15_4 = {
    "conv": {
        "PT": {"f1": 0.925, "accuracy": 0.982, "auc": 0.969},
        "T2": {"f1": 0.923, "accuracy": 0.981, "auc": 0.968},
        "CT": {"f1": 0.844, "accuracy": 0.917, "auc": 0.903},
    },
    "maxpool": {
        "PT": {"f1": 0.924, "accuracy": 0.982, "auc": 0.979},
        "T2": {"f1": 0.902, "accuracy": 0.980, "auc": 0.976},
        "CT": {"f1": 0.847, "accuracy": 0.918, "auc": 0.902},
    },
}
# Table 15-5: fraction of zero pixels in the truth of tumour slices (= all-zero accuracy).


THESIS_ZERO_RATIO = {"CT": 0.9848, "PT": 0.9904, "T2": 0.9631}
# Table 15-6: metric -> (before DA, ADDA with confusion stop, RESET with confusion stop).


THESIS_TABLE_15_6 = {
    "CT->PT": {
        "f1": (0.0754, 0.0401, 0.2038),
        "accuracy": (0.9697, 0.9092, 0.9666),
        "auc": (0.5116, 0.5612, 0.6724),
    },
    "CT->T2": {
        "f1": (0.1107, 0.1407, 0.2264),
        "accuracy": (0.8829, 0.8591, 0.8247),
        "auc": (0.4945, 0.5608, 0.6422),
    },
    "PT->CT": {
        "f1": (0.0292, 0.0292, 0.1221),
        "accuracy": (0.0149, 0.0149, 0.9514),
        "auc": (0.4937, 0.5529, 0.5789),
    },
    "PT->T2": {
        "f1": (0.3367, 0.3073, 0.3922),
        "accuracy": (0.8853, 0.8849, 0.8774),
        "auc": (0.5640, 0.5738, 0.6386),
    },
    "T2->CT": {
        "f1": (0.2024, 0.1173, 0.0266),
        "accuracy": (0.9368, 0.8998, 0.9347),
        "auc": (0.7986, 0.8039, 0.7576),
    },
    "T2->PT": {
        "f1": (0.3799, 0.0268, 0.2602),
        "accuracy": (0.9705, 0.8504, 0.9495),
        "auc": (0.8077, 0.7570, 0.8181),
    },
}


STOP_CRITERIA = ("highest_peak", "confusion", "latest", "best_loss")  # §15-7's column order


def _stops(highest_peak, confusion, latest, best_loss):
    return dict(zip(STOP_CRITERIA, (highest_peak, confusion, latest, best_loss), strict=True))


# Table 15-7: test F1 per pair, scheme and stopping criterion.


THESIS_TABLE_15_7 = {
    "CT->PT": {
        "adda": _stops(0.1049, 0.0401, 0.0401, 0.0186),
        "reset": _stops(0.3485, 0.2038, 0.2038, 0.0186),
    },
    "CT->T2": {
        "adda": _stops(0.2948, 0.1407, 0.0728, 0.0728),
        "reset": _stops(0.3870, 0.2264, 0.2831, 0.2264),
    },
    "PT->CT": {
        "adda": _stops(0.1656, 0.0292, 0.0873, 0.0292),
        "reset": _stops(0.1624, 0.1221, 0.0948, 0.1221),
    },
    "PT->T2": {
        "adda": _stops(0.2812, 0.3073, 0.2668, 0.3271),
        "reset": _stops(0.3986, 0.3922, 0.3889, 0.3089),
    },
    "T2->CT": {
        "adda": _stops(0.1919, 0.1173, 0.0708, 0.0292),
        "reset": _stops(0.1954, 0.0266, 0.0266, 0.1642),
    },
    "T2->PT": {
        "adda": _stops(0.2537, 0.0268, 0.0186, 0.2066),
        "reset": _stops(0.5186, 0.2602, 0.2776, 0.4466),
    },
}


THESIS_PAIR_ORDER = tuple(THESIS_TABLE_15_6)


# Table 10-3 (SVHN -> MNIST accuracy), SPEC §7.
THESIS_TABLE_10_3 = {
    "source": 0.9095,
    "before_da": 0.6424,
    "adda": {"highest_peak": 0.8218, "confusion": 0.7994, "latest": 0.8128, "best_loss": 0.7994},
    "reset": {"highest_peak": 0.8169, "confusion": 0.7944, "latest": 0.8114, "best_loss": 0.7944},
}


def thesis_value(value: float | None, decimals: int = 4, mark: str = "") -> str:
    return "–" if value is None else f"{value:.{decimals}f}{mark}"


def thesis_pair(pair: str) -> tuple[str | None, str]:
    """The thesis' pair to set beside `pair` and a mark for its cells.

    The thesis' MR is T2; a pair with another MR sequence (e.g. T1, the only MR in the real data
    here) gets the T2 pair's numbers marked '(T2)', so a reader sees the nearest comparison and
    that it is not the same one. None where there is none.
    """
    if pair in THESIS_TABLE_15_6:
        return pair, ""
    domains = pair.split("->")
    as_t2 = "->".join("T2" if domain in ("T1", "STIR") else domain for domain in domains)
    if as_t2 != pair and as_t2 in THESIS_TABLE_15_6:
        return as_t2, " (T2)"
    return None, ""
