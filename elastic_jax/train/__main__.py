"""``python -m elastic_jax.train --config configs/<name>.py [--config.key=value ...] [--workdir DIR]``

The main job: parent (HF import or a short pretraining run) -> importance -> permutation -> elastic stages ->
extraction of every budget and of the zero-shot pruned baseline of the same size -> evaluation -> report
(``DIR/report.md``, ``DIR/report.json``, PNG plots). Finished phases are skipped, so re-running the same command
after an interruption resumes.

The whole config is validated first (``train.config.validate_run_config``: every key and value, and every shape
against the mesh) and ``--workdir`` proved writable, in seconds, before any phase. A bad value or input file ends
the run with one line, ``config error: <key>: <what> (<fix>)`` or ``error: <file>: ...``, and exit status 2
(``--verbosity=1`` adds the traceback).
"""

from __future__ import annotations

import os
import time

from absl import app, flags, logging
from ml_collections import config_flags

from elastic_jax import cli
from elastic_jax.eval.report import evaluate_and_report
from elastic_jax.train import distributed
from elastic_jax.train.config import validate_run_config
from elastic_jax.train.pipeline import run_pipeline

# Overrides may set any key of the schema (train.config.default_config), also one the file leaves out; a key the
# schema does not know is refused by validate_run_config, naming the closest known key.
_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a Python config file (get_config()).",
                                          lock_config=False, accept_new_attributes=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder of the run (default: workdir/<config name>). "
                               "Re-running with the same folder resumes.")
_REUSE_STALE = flags.DEFINE_bool("reuse-stale", False, "Keep finished phases whose config values changed since they "
                                 "ran (default: rerun them and every later phase); the report lists them.")


def main(argv) -> None:
  del argv
  cfg = _CONFIG.value
  if cfg is None:
    raise app.UsageError("--config is required, e.g. --config configs/tiny.py")
  if not flags.FLAGS["verbosity"].present:  # Orbax logs every save at INFO; --verbosity=0 brings it back
    logging.set_verbosity(logging.WARNING)
  config_name = os.path.splitext(os.path.basename(config_flags.get_config_filename(flags.FLAGS["config"])))[0]
  workdir = _WORKDIR.value or os.path.join("workdir", config_name)
  started = time.perf_counter()
  with cli.refusals():  # a bad config value or input file: one line and exit 2, whenever it is found
    # Joins a multi-host run (TPU pod slice, SLURM, explicit ELASTIC_JAX_* variables) before anything touches a
    # device; a no-op for a single process. Then the whole config, against the mesh, before any phase.
    distributed.initialize()
    cfg = validate_run_config(cfg)
    cli.check_writable_dir(workdir, "--workdir")
    result = run_pipeline(cfg, workdir, reuse_stale=_REUSE_STALE.value)
    files = evaluate_and_report(cfg, result)
  print(f"[elastic_jax] done in {time.perf_counter() - started:.0f} s; report: {files}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_config_flags)
