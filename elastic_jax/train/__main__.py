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

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from elastic_jax import cli
from elastic_jax.data import tasks
from elastic_jax.data.pipeline import data_factory, source_tokenizer
from elastic_jax.elastic.param_count import param_count
from elastic_jax.elastic.space import Choice
from elastic_jax.eval.measure import eval_split_batches, measure_model
from elastic_jax.eval.report import choice_fractions, write_report
from elastic_jax.train import distributed
from elastic_jax.train.config import section, validate_run_config
from elastic_jax.train.loop import Stage
from elastic_jax.train.pipeline import run_pipeline

# Overrides may set any key of the schema (train.config.default_config), also one the file leaves out; a key the
# schema does not know is refused by validate_run_config, naming the closest known key.
_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a Python config file (get_config()).",
                                          lock_config=False, accept_new_attributes=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder of the run (default: workdir/<config name>). "
                               "Re-running with the same folder resumes.")
_REUSE_STALE = flags.DEFINE_bool("reuse-stale", False, "Keep finished phases whose config values changed since they "
                                 "ran (default: rerun them and every later phase); the report lists them.")


def evaluate_and_report(cfg, workdir: str, result: dict) -> dict:
  """Perplexity and answer accuracy (short and long tasks) of every child and baseline; writes the report."""
  eval_cfg = section(cfg, "eval")
  source = result["source"]
  tokenizer = result.get("tokenizer") or source_tokenizer(source)  # the one the data was tokenized with
  # Every process reads the same full batches and examples; each batch is split over the mesh's data-parallel
  # devices and the results gathered, so every process computes the same report (process 0 writes it).
  stage = Stage("eval", 1, eval_cfg["batch_size"], eval_cfg["seq_len"], (1.0,))
  num_batches = eval_cfg["ppl_batches"]
  if source.kind == "tasks":  # the tasks' evaluation split: it never shares a prompt with the training split
    ppl_batches = eval_split_batches(source.stage_tasks[0], int(cfg.seed), tokenizer, batches=num_batches,
                                     batch_size=stage.batch_size, seq_len=stage.seq_len)
  else:  # a file corpus has no split of its own: its documents in another order than training's (not held out)
    other_order = data_factory(source, seed=int(cfg.seed) + 104729, tokenizer=tokenizer,
                               vocab_size=result["config"].vocab_size, process_index=0, process_count=1)
    ppl_batches = [np.asarray(next(other_order(stage, 0))) for _ in range(num_batches)]
  n = eval_cfg["examples"]
  short = tasks.generate_examples(source.stage_tasks[0], int(cfg.seed), "eval", n)
  long = tasks.generate_examples(source.stage_tasks[-1], int(cfg.seed) + 1, "eval", n)
  max_new = eval_cfg["max_new_tokens"]

  def measure(config, params) -> dict:
    measured = measure_model(config, params, ppl_batches, {"short": short, "long": long}, tokenizer,
                             max_new_tokens=max_new, decode_batch=eval_cfg["decode_batch"],
                             mesh=result["mesh"], rules=result["rules"])
    return {"ppl": measured["ppl"],
            **{f"accuracy_{label}": graded["accuracy"] for label, graded in measured["accuracy"].items()}}

  parent_metrics = measure(result["config"], result["parent"])
  rows = [{"budget": "parent", "role": "parent", "params": param_count(result["config"]), **parent_metrics}]
  by_name = {}
  for model in result["models"]:
    by_name.setdefault(model["name"], {})[model["kind"]] = model
  router_choices = {}
  for record in result["records"]:
    name = f"{int(round(100 * record['budget']))}pct"
    child, baseline = by_name[name]["children"], by_name[name]["baselines"]
    row = {"budget": name, "params": child["param_count"], **measure(child["config"], child["params"])}
    if baseline["param_count"] == rows[0]["params"]:  # nothing pruned: the parent row is the reference
      row["full_size"] = True
    else:
      row["baseline_params"] = baseline["param_count"]
      row.update({f"baseline_{k}": v for k, v in measure(baseline["config"], baseline["params"]).items()})
    rows.append(row)
    router_choices[name] = choice_fractions(result["config"], Choice.from_dict(record["choice"]))
  if not distributed.is_primary():  # the report is written once, by process 0
    return {}
  return write_report(workdir, rows, os.path.join(workdir, "elastic", "metrics.jsonl"), router_choices,
                      curve_labels=list(router_choices), stale=result.get("stale", ()))


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
    files = evaluate_and_report(cfg, workdir, result)
  print(f"[elastic_jax] done in {time.perf_counter() - started:.0f} s; report: {files}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_config_flags)
