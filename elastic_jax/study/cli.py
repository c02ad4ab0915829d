"""``python -m elastic_jax.study --config configs/study.py [--workdir DIR] [--config.key=value ...]``

Runs every arm x seed of the study not finished in ``DIR`` (default ``workdir/<config name>``), then writes
``DIR/study.json``, ``DIR/study.md`` and the plots (also after each seed, from the arms finished so far).
Re-running the same command resumes: finished arms are skipped, interrupted ones continue from their checkpoints.

Same conventions as the main job (``python -m elastic_jax.train``): any config key can be overridden
(``--config.study.seeds=[0]``, ``--config.parent.pretrain_steps=300``); the whole study, the config of every arm
included, is checked before anything runs, and a mistake ends in one line, ``config error: <key>: <what> (<fix>)``,
exit status 2 (``--verbosity=1`` adds the traceback).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence

from absl import flags, logging
from ml_collections import config_flags

from elastic_jax import cli
from elastic_jax.study.config import validate_study_config
from elastic_jax.study.run import Study
from elastic_jax.study.summary import write_summary
from elastic_jax.train import distributed
from elastic_jax.train.loop import log

PROGRAM = "elastic_jax.study"


def main(argv: Sequence[str] | None = None) -> int:
  """The study's command line (``argv`` without the program name; default ``sys.argv[1:]``); returns the exit
  status: 0 done, 2 refused input. Callable more than once in a process (its flags are its own)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  flag_values = flags.FlagValues()
  config_flag = config_flags.DEFINE_config_file(
      "config", None, "Path to the study's Python config file (get_config()), e.g. configs/study.py.",
      flag_values=flag_values, lock_config=False, accept_new_attributes=True, sys_argv=[PROGRAM, *argv])
  workdir_flag = flags.DEFINE_string("workdir", None, "Output folder of the study (default: workdir/<config name>). "
                                     "Re-running with the same folder resumes.", flag_values=flag_values)
  verbosity = flags.DEFINE_integer("verbosity", 0, "1: tracebacks with refusals and INFO logs.",
                                   flag_values=flag_values)
  try:
    cli.parse_config_flags([PROGRAM, *argv], flag_values)
  except SystemExit as stop:
    return cli.exit_status(stop)
  logging.set_verbosity(logging.INFO if verbosity.value >= 1 else logging.WARNING)  # Orbax logs every save at INFO
  try:
    with cli.refusals(argv):  # a bad config value or input file: one line and exit 2, whenever it is found
      if config_flag.value is None:
        raise cli.InputError("--config is required, e.g. --config configs/study.py")
      config_name = os.path.splitext(os.path.basename(config_flags.get_config_filename(flag_values["config"])))[0]
      workdir = workdir_flag.value or os.path.join("workdir", config_name)
      started = time.perf_counter()
      distributed.initialize()
      study = validate_study_config(config_flag.value)
      cli.check_writable_dir(workdir, "--workdir")
      os.makedirs(workdir, exist_ok=True)
      summarize = lambda: write_summary(study, workdir, config_name) if distributed.is_primary() else {}
      log(f"study: {len(study.arms)} arms x {len(study.seeds)} seeds into {workdir}")
      Study(study, workdir).run(after_seed=lambda seed: summarize())
      files = summarize()
  except SystemExit as stop:
    return cli.exit_status(stop)
  log(f"study: done in {time.perf_counter() - started:.0f} s; {files.get('markdown', '')}")
  return 0
