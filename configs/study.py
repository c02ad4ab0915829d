"""The paper's comparisons on the embedded default (configs/tiny.py's model, data, parent and curriculum), every arm,
3 seeds, on a 2-core CPU:

    python -m elastic_jax.study --config configs/study.py [--workdir DIR] [--config.study.seeds="(0,)"]

Everything but the study section and the evaluation size is configs/tiny.py's own config, read from that file, so
the study follows it: any task family and difficulty (``--config.data.stage_tasks...``), or an imported parent
(``--config.parent.hf_path=/path/to/nemotron-h`` with a ``model`` section and ``elastic.space`` that fit it, as for
the main job). See docs/study.md for what each arm is.

Time on 2 cores (estimated from the main job's timing, 8 min 35 s per run of configs/tiny.py: the parent's 1500
pretraining steps 5 min 15 s, the 540 elastic steps 2 min 14 s, evaluation 48 s): per seed the shared parent
(~5.5 min), three elastic runs (~3 min each with their evaluation), sequential compression at T/2 and at T tokens
per member (~2 and ~3 min: a distillation step of a child costs about 0.65 of a parent pretraining step) and
training from scratch (~2.5 min), 256 problems per set in every arm's evaluation: about 25 minutes per seed, 1 h 15
min for the 3 seeds. A longer parent or curriculum in configs/tiny.py lengthens the study in proportion.
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
