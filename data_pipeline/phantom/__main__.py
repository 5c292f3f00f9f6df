"""python -m data_pipeline.phantom --out DIR --patients N --seed S [--image_size] [--num_slices]"""

import pathlib
import sys
import time

from absl import app, flags

from data_pipeline.phantom.plan import SERIES_NAMES
from data_pipeline.phantom.writer import write_phantom

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """The CLI's flags, defined only when run as a program so importing this module defines none."""
    flags.DEFINE_string("out", None, "Folder to write the phantom to (must not exist or be empty).")
    flags.DEFINE_integer("patients", 20, "Number of patients.")
    flags.DEFINE_integer("seed", 0, "Seed; the same seed gives the same bytes.")
    flags.DEFINE_integer("image_size", 128, "CT/MR rows and columns (PET gets half).")
    flags.DEFINE_integer("num_slices", 30, "CT slices (PET ~0.8x, MR ~2/3x).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}")
    if not FLAGS.out:
        sys.exit("error: --out is required")
    start = time.perf_counter()
    try:
        keys = write_phantom(
            FLAGS.out, FLAGS.patients, FLAGS.seed, FLAGS.image_size, FLAGS.num_slices
        )
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    files = [p for p in pathlib.Path(FLAGS.out).rglob("*.dcm")]
    megabytes = sum(p.stat().st_size for p in files) / 1e6
    print(
        f"wrote {len(keys)} patients, {len(keys) * 2 * len(SERIES_NAMES)} series, "
        f"{len(files)} DICOM files ({megabytes:.1f} MB) and clinical.csv to {FLAGS.out} in "
        f"{time.perf_counter() - start:.1f} s"
    )


if __name__ == "__main__":
    _define_flags()
    app.run(main)
