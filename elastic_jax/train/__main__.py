"""``python -m elastic_jax.train --config configs/<name>.py [--config.key=value ...] [--workdir DIR]``

The main job: parent (HF import or a short pretraining run) -> importance -> permutation -> elastic stages ->
extraction of every budget and of the zero-shot pruned baseline of the same size -> evaluation -> report
(``DIR/report.md``, ``DIR/report.json``, PNG plots). Finished phases are skipped, so re-running the same command
after an interruption resumes.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from elastic_jax.data import tasks
from elastic_jax.data.pipeline import data_factory, source_tokenizer
from elastic_jax.elastic.param_count import param_count
from elastic_jax.elastic.space import Choice
from elastic_jax.eval.measure import eval_split_batches, measure_model
from elastic_jax.eval.report import choice_fractions, write_report
from elastic_jax.model.config import ConfigError
from elastic_jax.train import distributed
from elastic_jax.train.loop import Stage
from elastic_jax.train.pipeline import run_pipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a Python config file (get_config()).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder of the run (default: workdir/<config name>). "
                               "Re-running with the same folder resumes.")


def evaluate_and_report(cfg, workdir: str, result: dict) -> dict:
  """Perplexity and answer accuracy (short and long tasks) of every child and baseline; writes the report."""
  eval_cfg = dict(cfg.get("eval", {}))
  source = result["source"]
  tokenizer = result.get("tokenizer") or source_tokenizer(source)  # the one the data was tokenized with
  # Every process reads the same full batches and examples; each batch is split over the mesh's data-parallel
  # devices and the results gathered, so every process computes the same report (process 0 writes it).
  stage = Stage("eval", 1, int(eval_cfg.get("batch_size", 8)), int(eval_cfg.get("seq_len", 256)), (1.0,))
  num_batches = int(eval_cfg.get("ppl_batches", 4))
  if source.kind == "tasks":  # the tasks' evaluation split: it never shares a prompt with the training split
    ppl_batches = eval_split_batches(source.stage_tasks[0], int(cfg.seed), tokenizer, batches=num_batches,
                                     batch_size=stage.batch_size, seq_len=stage.seq_len)
  else:  # a file corpus has no split of its own: its documents in another order than training's (not held out)
    other_order = data_factory(source, seed=int(cfg.seed) + 104729, tokenizer=tokenizer,
                               vocab_size=result["config"].vocab_size, process_index=0, process_count=1)
    ppl_batches = [np.asarray(next(other_order(stage, 0))) for _ in range(num_batches)]
  n = int(eval_cfg.get("examples", 64))
  short = tasks.generate_examples(source.stage_tasks[0], int(cfg.seed), "eval", n)
  long = tasks.generate_examples(source.stage_tasks[-1], int(cfg.seed) + 1, "eval", n)
  max_new = int(eval_cfg.get("max_new_tokens", 96))

  def measure(config, params) -> dict:
    measured = measure_model(config, params, ppl_batches, {"short": short, "long": long}, tokenizer,
                             max_new_tokens=max_new, decode_batch=int(eval_cfg.get("decode_batch", 16)),
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
                      curve_labels=list(router_choices))


def main(argv) -> None:
  del argv
  cfg = _CONFIG.value
  if cfg is None:
    raise app.UsageError("--config is required, e.g. --config configs/tiny.py")
  if not flags.FLAGS["verbosity"].present:  # Orbax logs every save at INFO; --verbosity=0 brings it back
    logging.set_verbosity(logging.WARNING)
  # Joins a multi-host run (TPU pod slice, SLURM, explicit ELASTIC_JAX_* variables) before anything touches a
  # device; a no-op for a single process.
  distributed.initialize()

  config_name = os.path.splitext(os.path.basename(config_flags.get_config_filename(flags.FLAGS["config"])))[0]
  workdir = _WORKDIR.value or os.path.join("workdir", config_name)
  started = time.perf_counter()
  try:
    result = run_pipeline(cfg, workdir)  # checks the config against the mesh before any phase runs
  except ConfigError as error:  # a value to fix, not a bug: one line, no traceback
    print(f"config error: {error}", file=sys.stderr)
    sys.exit(2)
  files = evaluate_and_report(cfg, workdir, result)
  print(f"[elastic_jax] done in {time.perf_counter() - started:.0f} s; report: {files}")


if __name__ == "__main__":
  app.run(main)
