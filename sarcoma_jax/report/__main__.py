"""python -m sarcoma_jax.report W1 W2 ... --out R (see sarcoma_jax/report/__init__.py)."""

import sys

from sarcoma_jax.report.write import main

if __name__ == "__main__":
    sys.exit(main())
