"""The paper's comparisons on the embedded default (configs/tiny.py's model, data, parent and curriculum), every arm,
3 seeds, on a 2-core CPU:

    python -m elastic_jax.study --config configs/study.py [--workdir DIR] [--config.study.seeds="(0,)"]

Everything but the study section and the evaluation size is configs/tiny.py's own config, read from that file, so
the study follows it: any task family and difficulty (``--config.data.stage_tasks...``), or an imported parent
(``--config.parent.hf_path=/path/to/nemotron-h`` with a ``model`` section and ``elastic.space`` that fit it, as for
the main job). See docs/study.md for what each arm is.

Time on 2 cores (measured 2026-12-05, docs/study.md): about 1 h 45 min for the 3 seeds. Per seed: the shared parent,
importance and permutation about 6 min, the elastic arms 5.3, 5.9 and 4.9 min, sequential compression at T/2 and T
tokens per member 3.1 and 5.2 min, scratch 4.9 min. A longer parent or curriculum in configs/tiny.py lengthens the
study in proportion.
"""

import importlib.util
import os

import ml_collections


def _tiny_config() -> ml_collections.ConfigDict:
  """configs/tiny.py's config (the folder is not a package: the file is loaded by its path)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py")
  spec = importlib.util.spec_from_file_location("elastic_jax_configs_tiny", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config() -> ml_collections.ConfigDict:
  config = _tiny_config()
  # Tuples, so that the command line can override them (--config.study.seeds="(0, 1)").
  config.study = ml_collections.ConfigDict(dict(
      seeds=(0, 1, 2),
      arms=("elastic", "elastic_stage1_only", "elastic_uniform", "sequential_equal", "sequential_full", "scratch"),
  ))
  # 256 held-out problems per set and seed (64 tell 9% from 16% apart only by chance); the arms of one seed are
  # graded on the same problems, so their differences are paired.
  config.eval.examples = max(int(config.eval.examples), 256)
  return config
