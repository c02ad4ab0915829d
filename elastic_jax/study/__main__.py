"""``python -m elastic_jax.study --config configs/study.py``: see ``elastic_jax.study.cli``."""

import sys

from elastic_jax.study.cli import main

if __name__ == "__main__":
  sys.exit(main())
