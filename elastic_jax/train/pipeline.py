"""The main job, phase by phase: parent -> importance -> permutation -> elastic stages -> extraction -> evaluation.

Each phase writes its output under the workdir and is skipped when that output exists, so re-running the same
command after an interruption resumes (the elastic phase resumes from its own checkpoints mid-stage).

  W/parent/        the parent (HF import, or a short pretraining run on the configured data)
  W/importance/    rankings.json: importance order of every axis (+ depth order)
  W/permuted/      the parent in importance order (the teacher, and the student's starting point)
  W/elastic/       checkpoints, metrics.jsonl, deployed_choices.json
  W/children/<b>/  each budget's extracted child; W/baselines/<b>/ the zero-shot pruned model of the same size
  W/report.*       the evaluation report
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import Mesh
from tqdm.auto import tqdm

from elastic_jax.data.pipeline import SourceConfig, data_factory, source_tokenizer
from elastic_jax.data.tokenizer import check_vocab_fits
from elastic_jax.elastic.extract import extract_sharded
from elastic_jax.elastic.importance import Rankings, estimate_importance, rankings
from elastic_jax.elastic.param_count import param_count
from elastic_jax.elastic.permute import permute_sharded
from elastic_jax.elastic.space import Choice
from elastic_jax.model import ModelConfig, param_shapes
from elastic_jax.prune import select_choice
from elastic_jax.train.checkpoint import Checkpointer, PreemptionGuard, load_model, save_model
from elastic_jax.train.config import (elastic_setup_from_config, memory_from_config, mesh_from_config,
                                      optimizers_from_config, plain, section, stages_from_config,
                                      validate_run_config)
from elastic_jax.train.distributed import (agreed_stop, barrier, global_batch, is_primary, own_state,
                                           process_states)
from elastic_jax.train.loop import Stage, compiled_lm_step, train_elastic
from elastic_jax.train.optim import OptimizerConfig
from elastic_jax.train.sharding import LogicalRules, param_shardings
from elastic_jax.train.microbatch import check_grad_accum

Params = Any


def _log(message: str) -> None:
  print(f"[elastic_jax] {message}", flush=True)


def _phase(workdir: str, name: str, done_marker: str) -> tuple[str, bool]:
  path = os.path.join(workdir, name)
  return path, os.path.exists(os.path.join(path, done_marker))


def _read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _mark_done(path: str) -> None:
  """Marks a phase's folder complete, once every process has written its part (process 0 writes the marker)."""
  barrier(f"elastic_jax_done:{path}")
  if is_primary():
    with open(os.path.join(path, "DONE"), "w", encoding="utf-8") as f:
      f.write(time.strftime("%Y-%m-%d %H:%M:%S\n"))


def _load(path: str, config: ModelConfig, mesh: Mesh, rules: LogicalRules) -> Params:
  """A saved model restored straight into its shardings on ``mesh``: each process reads only its devices' shards."""
  abstract = jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                          param_shapes(config), param_shardings(config, mesh, rules))
  _, params = load_model(os.path.join(path, "model"), abstract)
  return params


# ------------------------------------------------------------------------------------------------ phases
def parent_phase(cfg: Any, workdir: str, make_data: Callable, mesh: Mesh | None = None,
                 rules: LogicalRules | None = None) -> tuple[ModelConfig, Params]:
  """The parent, in its shardings on ``mesh`` (default: ``config.mesh``): an HF Nemotron-H checkpoint when
  ``cfg.parent.hf_path`` is set (each process reads only its devices' slices, in the checkpoint's dtype), else a
  short pretraining run."""
  if mesh is None:
    mesh, rules = mesh_from_config(cfg)
  path, done = _phase(workdir, "parent", "DONE")
  parent_cfg = section(cfg, "parent")
  if parent_cfg["hf_path"]:
    from elastic_jax.interop import hf  # pylint: disable=import-outside-toplevel
    return hf.load(parent_cfg["hf_path"], mesh=mesh, rules=rules)
  config = ModelConfig.from_dict(cfg.model)
  if done:
    _log(f"parent: reusing {path}")
    return config, _load(path, config, mesh, rules)
  steps = parent_cfg["pretrain_steps"]
  stage = Stage("pretrain", steps, parent_cfg["batch_size"], parent_cfg["seq_len"], (1.0,))
  optimizer = OptimizerConfig(learning_rate=float(parent_cfg["learning_rate"]),
                              warmup_steps=parent_cfg["warmup_steps"], weight_decay=0.01)
  memory = memory_from_config(cfg)
  check_grad_accum(stage.batch_size, memory.grad_accum_steps, "parent pretraining (config.parent.batch_size)")
  # The same sharded pattern as the elastic step: params and optimizer state are created in their shardings.
  training = compiled_lm_step(config, optimizer, steps, mesh, rules, grad_accum_steps=memory.grad_accum_steps,
                              remat=memory.remat)
  # Its own document streams (another seed): the stage-1 task settings, and every long_every-th batch the stage-2
  # (long-context) settings, so the parent knows both variants before it is elastified (0: short ones only).
  streams = [make_data(stage, 0), make_data(stage, 1)]
  long_every = parent_cfg["long_every"]
  # Checkpoints every checkpoint_every steps and on SIGTERM (train state and both streams' positions): a re-run
  # resumes pretraining where it stopped, refusing a changed configuration.
  checkpointer = Checkpointer(os.path.join(path, "checkpoints"))
  run_config = json.loads(json.dumps({"model": config.to_dict(), "parent": parent_cfg, "seed": int(cfg.seed),
                                      "memory": str(memory)}))
  if checkpointer.latest_step() is not None:
    state, metadata = checkpointer.restore(training.abstract_state, expected_config=run_config)
    for stream, position in zip(streams, own_state(metadata["data_state"], checkpointer.directory)):
      stream.set_state(position)
    _log(f"parent: resuming pretraining at step {int(state.step)}")
  else:  # params and optimizer state are created directly in their shardings
    state = training.init(jax.random.key(int(cfg.seed)))
  every = section(cfg, "checkpoint_every")

  def save(step: int) -> None:
    checkpointer.save(step, state, {"config": run_config, "step": step,
                                    "data_state": process_states([stream.get_state() for stream in streams])})

  tokens_sharding = training.batch_sharding  # each process's rows of the global batch
  start = int(state.step)
  bar = tqdm(range(start, steps), initial=start, total=steps, desc="parent pretraining", unit="step",
             disable=not is_primary())
  try:
    with PreemptionGuard() as guard:
      for i in bar:
        stream = streams[1] if long_every and i % long_every == long_every - 1 else streams[0]
        state, metrics = training.step(state, global_batch(next(stream), tokens_sharding))
        if i % 20 == 0 or i == steps - 1:
          bar.set_postfix(loss=f"{float(metrics['loss']):.3f}")
        if agreed_stop(guard.requested, sync_now=(i + 1) % 10 == 0):
          save(i + 1)
          raise SystemExit("[elastic_jax] stopped by SIGTERM after saving a checkpoint; run the same command to "
                           "resume.")
        if (i + 1) % every == 0 and i + 1 < steps:
          save(i + 1)
  finally:  # whatever stops the loop, a save in flight completes before it propagates
    checkpointer.close()
  os.makedirs(path, exist_ok=True)
  save_model(os.path.join(path, "model"), config.to_dict(), state.params, {"pretrain_steps": steps})
  _mark_done(path)
  return config, state.params


def importance_phase(cfg: Any, workdir: str, config: ModelConfig, params: Params, make_data: Callable,
                     mesh: Mesh, rules: LogicalRules) -> Rankings:
  path, done = _phase(workdir, "importance", "rankings.json")
  if done:
    _log(f"importance: reusing {path}")
    return Rankings.from_json(_read_json(os.path.join(path, "rankings.json")), os.path.join(path, "rankings.json"))
  imp_cfg = section(cfg, "importance")
  stage = Stage("calibration", 1, imp_cfg["batch_size"], imp_cfg["seq_len"], (1.0,))
  data = make_data(stage, 0)
  batches = [next(data)[:, :-1] for _ in range(imp_cfg["batches"])]
  # Sharded programs under the run's mesh: every process passes the same full batches and gets the same scores.
  importance = estimate_importance(config, params, batches, depth=True,
                                   depth_batches=imp_cfg["depth_batches"], progress=is_primary(),
                                   mesh=mesh, rules=rules)
  ranks = rankings(importance, config)
  if is_primary():
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "rankings.json"), "w", encoding="utf-8") as f:
      json.dump(ranks.to_json(), f)
  barrier("importance_written")
  return ranks


def permutation_phase(workdir: str, config: ModelConfig, params: Params, ranks: Rankings, mesh: Mesh,
                      rules: LogicalRules) -> Params:
  path, done = _phase(workdir, "permuted", "DONE")
  if done:
    _log(f"permutation: reusing {path}")
    return _load(path, config, mesh, rules)
  permuted = permute_sharded(config, params, ranks, mesh, rules)  # a jitted gather: the shardings are kept
  save_model(os.path.join(path, "model"), config.to_dict(), permuted)  # every process writes its own shards
  _mark_done(path)
  return permuted


def elastic_phase(cfg: Any, workdir: str, config: ModelConfig, teacher: Params, ranks: Rankings,
                  make_data: Callable, mesh: Mesh, rules: LogicalRules) -> tuple[list[dict[str, Any]], Params]:
  """Elastic training; returns each budget's deployed choice and the trained student, the weights every child is
  sliced from. The student is saved to ``W/elastic/student`` once training is complete."""
  path = os.path.join(workdir, "elastic")
  choices_file = os.path.join(path, "deployed_choices.json")
  student_path, done = _phase(path, "student", "DONE")
  if done:
    _log(f"elastic training: reusing {path}")
    return _read_json(choices_file), _load(student_path, config, mesh, rules)
  stages = stages_from_config(cfg)
  total = sum(stage.steps for stage in stages)
  setup = elastic_setup_from_config(cfg, config, [int(i) for i in ranks.depth], total)
  optimizer, router_optimizer = optimizers_from_config(cfg)
  # The teacher is also the student's starting point: the loop copies it into the student's sharded train state.
  result = train_elastic(setup, stages, teacher, teacher, make_data, path, optimizer=optimizer,
                router_optimizer=router_optimizer, seed=int(cfg.seed), log_every=10,
                checkpoint_every=section(cfg, "checkpoint_every"),
                metadata={"rankings": ranks.to_json()}, mesh=mesh, rules=rules)
  if result.preempted:
    raise SystemExit("[elastic_jax] stopped by SIGTERM after saving a checkpoint; run the same command to resume.")
  save_model(os.path.join(student_path, "model"), config.to_dict(), result.state.params,
             {"step": int(result.state.step), "depth_order": [int(i) for i in ranks.depth]})
  _mark_done(student_path)
  return _read_json(choices_file), result.state.params


def extraction_phase(workdir: str, config: ModelConfig, student: Params, permuted: Params, ranks: Rankings,
                     records: list[dict[str, Any]], space_cfg: Any, mesh: Mesh, rules: LogicalRules
                     ) -> list[dict[str, Any]]:
  """Each budget's child: the router's argmax choice sliced from the elastically trained ``student``; and the
  zero-shot pruned baseline of the same size: a choice of that size sliced from the untrained ``permuted`` parent
  (same importance ranking, no training). Each is sliced by one jitted program straight into its own shardings on
  ``mesh`` and saved by every process (its own shards)."""
  from elastic_jax.elastic.space import ElasticSpace  # pylint: disable=import-outside-toplevel
  space = ElasticSpace.from_dict(plain(space_cfg), config)
  depth_order = [int(i) for i in ranks.depth]
  models = []
  for record in records:
    name = f"{int(round(100 * record['budget']))}pct"
    choice = Choice.from_dict(record["choice"])
    baseline = select_choice(config, space, record["params"], tolerance=0.02, depth_order=depth_order)
    for kind, pick, source in (("children", choice, student), ("baselines", baseline, permuted)):
      path = os.path.join(workdir, kind, name)
      child_config, child_params = extract_sharded(config, source, pick, depth_order, mesh, rules)
      if not os.path.exists(os.path.join(path, "DONE")):
        save_model(os.path.join(path, "model"), child_config.to_dict(), child_params,
                   {"choice": pick.to_dict(), "budget": record["budget"]})
        _mark_done(path)
      models.append({"kind": kind, "name": name, "budget": record["budget"], "config": child_config,
                     "params": child_params, "param_count": param_count(child_config)})
  return models


def run_pipeline(cfg: Any, workdir: str) -> dict[str, Any]:
  """Runs every phase not already done in ``workdir``, each under the run's mesh; returns what the evaluation needs
  (the models in their shardings, and the mesh)."""
  os.makedirs(workdir, exist_ok=True)
  started = time.perf_counter()
  mesh, rules = mesh_from_config(cfg)
  # The whole config with its defaults, every shape against the mesh included, before any phase runs.
  cfg = validate_run_config(cfg, mesh, rules)
  source = SourceConfig.from_dict(plain(cfg.get("data")) or {})
  tokenizer = source_tokenizer(source)  # config.data.tokenizer; UTF-8 bytes when empty
  # The tokenizer must fit the model before any training: config.model's vocabulary for a parent pretrained here,
  # an imported parent's own vocabulary as soon as it is loaded.
  imported_parent = bool(plain(cfg.get("parent")).get("hf_path"))
  if not imported_parent:
    check_vocab_fits(tokenizer, int(cfg.model.vocab_size))
  make_data = data_factory(source, seed=int(cfg.seed), tokenizer=tokenizer)
  # Pretraining and calibration read streams of their own seed, apart from the elastic stages' streams.
  side_data = data_factory(source, seed=int(cfg.seed) + 7919, tokenizer=tokenizer)
  config, params = parent_phase(cfg, workdir, side_data, mesh, rules)
  if imported_parent:
    check_vocab_fits(tokenizer, config.vocab_size)
  _log(f"parent: {param_count(config):,} parameters, pattern {config.pattern!r}")
  # Calibration is repeated on every process and must give each the same rankings: all read the same full batches.
  calibration_data = data_factory(source, seed=int(cfg.seed) + 7919, tokenizer=tokenizer, process_index=0,
                                  process_count=1)
  ranks = importance_phase(cfg, workdir, config, params, calibration_data, mesh, rules)
  permuted = permutation_phase(workdir, config, params, ranks, mesh, rules)
  del params  # the unpermuted parent is no longer needed
  records, student = elastic_phase(cfg, workdir, config, permuted, ranks, make_data, mesh, rules)
  models = extraction_phase(workdir, config, student, permuted, ranks, records, cfg.elastic.space, mesh, rules)
  _log(f"phases done in {time.perf_counter() - started:.0f} s")
  return {"config": config, "parent": permuted, "models": models, "records": records, "source": source,
          "tokenizer": tokenizer, "mesh": mesh, "rules": rules}
