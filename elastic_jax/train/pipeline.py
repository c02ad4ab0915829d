"""The main job, phase by phase: parent -> importance -> permutation -> elastic stages -> extraction -> evaluation.

Each phase writes its output under the workdir and is skipped when that output exists, so re-running the same
command after an interruption resumes (parent pretraining and the elastic phase resume from their own checkpoints
mid-run; a kill -9 at any moment loses only the steps since the last checkpoint).

  W/parent/        the parent (HF import, or a short pretraining run on the configured data: checkpoints,
                   metrics.jsonl, tensorboard/)
  W/importance/    rankings.json: importance order of every axis (+ depth order)
  W/permuted/      the parent in importance order (the teacher, and the student's starting point)
  W/elastic/       checkpoints, metrics.jsonl, tensorboard/, deployed_choices.json, student/
  W/children/<b>/  each budget's extracted child; W/baselines/<b>/ the zero-shot pruned model of the same size
  W/report.*       the evaluation report (evaluation runs again on every run: it stores nothing to reuse)

A finished phase is reused only under the config values that produced it (``PhaseLedger``): each phase folder
records them in ``phase_config.json``; a re-run under other values reruns that phase and every later one, saying
which key changed, unless ``reuse_stale`` keeps the old results (the report then lists them).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from elastic_jax.data.pipeline import SourceConfig, data_factory, source_tokenizer
from elastic_jax.data.tokenizer import check_vocab_fits
from elastic_jax.elastic.extract import extract_sharded
from elastic_jax.elastic.importance import Rankings, estimate_importance, rankings
from elastic_jax.elastic.param_count import param_count
from elastic_jax.elastic.permute import permute_sharded
from elastic_jax.elastic.space import Choice
from elastic_jax.model import ModelConfig, param_shapes
from elastic_jax.model.config import ConfigError
from elastic_jax.prune import select_choice
from elastic_jax.train.checkpoint import load_model, save_model
from elastic_jax.train.config import (elastic_setup_from_config, memory_from_config, mesh_from_config,
                                      optimizers_from_config, plain, section, stages_from_config,
                                      validate_run_config)
from elastic_jax.train.distributed import barrier, global_batch, is_primary
from elastic_jax.train.flops import lm_step_flops
from elastic_jax.train.loop import (Segment, Stage, TrainResult, compiled_lm_step, log, read_json, read_metrics_rows,
                                    run_training, train_elastic, write_json_atomically)
from elastic_jax.train.optim import OptimizerConfig
from elastic_jax.train.result import ExtractedModel, FamilyMember, PipelineResult, member_name
from elastic_jax.train.sharding import LogicalRules, param_shardings
from elastic_jax.train.microbatch import check_grad_accum

Params = Any


def _phase(workdir: str, name: str, done_marker: str) -> tuple[str, bool]:
  path = os.path.join(workdir, name)
  return path, os.path.exists(os.path.join(path, done_marker))



def _mark_done(path: str) -> None:
  """Marks a phase's folder complete, once every process has written its part (process 0 writes the marker)."""
  barrier(f"elastic_jax_done:{path}")
  if is_primary():
    with open(os.path.join(path, "DONE"), "w", encoding="utf-8") as f:
      f.write(time.strftime("%Y-%m-%d %H:%M:%S\n"))


def save_output(path: str, config: ModelConfig, params: Params, metadata: Mapping[str, Any] | None = None) -> None:
  """Saves a phase's model to ``path/model`` and marks ``path`` done. What an interrupted save left there (no DONE
  marker: never used) is removed first."""
  if is_primary() and os.path.exists(os.path.join(path, "model")):
    shutil.rmtree(os.path.join(path, "model"))
  barrier(f"elastic_jax_cleared:{path}")
  save_model(os.path.join(path, "model"), config.to_dict(), params, metadata)  # every process writes its shards
  _mark_done(path)


class DivergedError(ConfigError):
  """A training phase produced a non-finite loss: its output is not marked done, and nothing later runs on it."""


def check_finite(rows: Sequence[Mapping[str, Any]], phase: str, keys: str) -> None:
  """Raises ``DivergedError`` naming the phase and the first step whose loss is not finite (``rows``: metrics rows,
  each with its ``step`` and ``loss``)."""
  if not rows:
    return
  values = np.asarray([row["loss"] for row in rows], np.float64)
  bad = np.flatnonzero(~np.isfinite(values))
  if bad.size:
    raise DivergedError(f"{phase}: the loss is {values[bad[0]]} at step {rows[int(bad[0])]['step']} "
                        f"({bad.size} of {values.size} steps not finite); its result is not kept and no later phase "
                        f"runs on it (check {keys})")


LOG_EVERY = 10  # training steps between metric flushes (and between the processes' agreements to stop)


def stop_if_preempted(result: TrainResult) -> None:
  if result.preempted:
    raise SystemExit("[elastic_jax] stopped by SIGTERM after saving a checkpoint; run the same command to resume.")


# ------------------------------------------------------------------------------------------------ phase records
RECORD_FILE = "phase_config.json"


def _flat(values: Any, prefix: str = "") -> dict[str, Any]:
  """Nested config values as {dotted key: value}; lists of sections are indexed (``stages[1].batch_size``)."""
  if isinstance(values, Mapping):
    out = {}
    for key, value in values.items():
      out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out
  if isinstance(values, list) and values and all(isinstance(value, Mapping) for value in values):
    out = {}
    for index, value in enumerate(values):
      out.update(_flat(value, f"{prefix}[{index}]"))
    return out
  return {prefix: values}


def _short(value: Any) -> str:
  text = json.dumps(value)
  return text if len(text) <= 60 else text[:57] + "..."


def _describe(changes: Sequence[tuple[str, Any, Any]]) -> str:
  shown = "; ".join(f"{key}: {_short(old)} -> {_short(new)}" for key, old, new in changes[:3])
  return shown + (f"; and {len(changes) - 3} more" if len(changes) > 3 else "")


class PhaseLedger:
  """The config values every phase of a workdir was made under, in each phase folder's ``phase_config.json``.

  A phase's record holds the values it reads from the config and, under the same keys, the record of the phase
  before it (the values its inputs were made under), so a change anywhere upstream makes every later phase stale
  too, also when a run stops half-way through rerunning them. Keys are dotted config keys (``parent.pretrain_steps``,
  ``stages[1].batch_size``); the mesh and ``checkpoint_every`` are left out (they do not change results).
  """

  def __init__(self, workdir: str, reuse_stale: bool = False):
    self.workdir = workdir
    self.reuse_stale = reuse_stale
    self.kept_stale: list[dict[str, Any]] = []  # phases kept under older values: {"phase", "changes"}
    self.upstream: dict[str, Any] = {}  # the record the next phase builds on

  def chain(self, own: Mapping[str, Any]) -> None:
    """A phase that stores nothing in the workdir (an imported parent): its values only pass downstream."""
    self.upstream = {**self.upstream, **_flat(json.loads(json.dumps(own)))}

  def begin(self, phase: str, folder: str, own: Mapping[str, Any], done: bool, *, also: Sequence[str] = (),
            stage_keys: bool = False) -> bool:
    """Compares the phase's record with the one stored in ``W/folder`` before the phase is reused or resumed;
    returns whether its finished output can be used as it is.

    Same values: ``done``. Other values: with ``reuse_stale`` a finished output is kept (and listed in
    ``kept_stale``); else ``W/folder`` and the ``also`` folders are set aside as ``<folder>.stale`` (one previous
    version kept) and the phase runs again, after one log line naming the changed key. ``stage_keys``: changes to
    ``stages[i]`` settings alone keep the folder, for the elastic loop resumes from its last checkpoint that still
    fits (a stage not started yet simply takes the new values).
    """
    path = os.path.join(self.workdir, folder)
    record = {**self.upstream, **_flat(json.loads(json.dumps(own)))}
    stored = read_json(os.path.join(path, RECORD_FILE)) if os.path.exists(os.path.join(path, RECORD_FILE)) else None
    present = [f for f in (folder, *also) if os.path.exists(os.path.join(self.workdir, f))]
    barrier(f"elastic_jax_record_read:{path}")  # every process decides on the same files before any is changed
    if stored is None and not present:
      self._write(path, record)
      return False
    if stored is None:
      changes = [("(no phase_config.json: made by an older version or stopped before it was written)", None, None)]
    else:
      changes = [(key, stored.get(key), record.get(key)) for key in sorted(set(stored) | set(record))
                 if stored.get(key) != record.get(key) or (key in stored) != (key in record)]
    if not changes:
      self.upstream = record
      return done
    what = _describe(changes) if stored is not None else changes[0][0]
    if done and self.reuse_stale:
      log(f"{phase}: made under other config values ({what}); kept as it is (--reuse-stale), and the report says so")
      self.kept_stale.append({"phase": phase, "changes": [f"{key}: {_short(old)} -> {_short(new)}"
                                                         for key, old, new in changes]})
      self.upstream = stored
      return True
    if stage_keys and stored is not None and all(key.startswith("stages[") for key, _, _ in changes):
      log(f"{phase}: made under other stage settings ({what}); it continues from its last checkpoint that fits "
           "them, and every later phase runs again")
    else:
      aside = [self._set_aside(f) for f in present]
      log(f"{phase}: made under other config values ({what}); rerunning it and every later phase (previous "
           f"output kept as {', '.join(aside)}" + ("; --reuse-stale would keep using it)" if done else ")"))
    self._write(path, record)
    return False

  def _set_aside(self, folder: str) -> str:
    source = os.path.join(self.workdir, folder)
    target = f"{source}.stale"
    if is_primary():
      if os.path.exists(target):  # one previous version is kept
        shutil.rmtree(target)
      os.rename(source, target)
    barrier(f"elastic_jax_stale:{source}")
    return target

  def _write(self, path: str, record: dict[str, Any]) -> None:
    if is_primary():
      os.makedirs(path, exist_ok=True)
      write_json_atomically(os.path.join(path, RECORD_FILE), record, indent=1, sort_keys=True)
    barrier(f"elastic_jax_record:{path}")
    self.upstream = record


def _parent_values(cfg: Any) -> dict[str, Any]:
  parent = section(cfg, "parent")
  if parent["hf_path"]:
    return {"parent": {"hf_path": parent["hf_path"]}}
  return {"model": plain(cfg.model), "parent": parent, "data": section(cfg, "data"), "seed": int(cfg.seed),
          "memory": section(cfg, "memory")}


def load_output(path: str, config: ModelConfig, mesh: Mesh, rules: LogicalRules) -> Params:
  """A saved model restored straight into its shardings on ``mesh``: each process reads only its devices' shards."""
  abstract = jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                          param_shapes(config), param_shardings(config, mesh, rules))
  _, params = load_model(os.path.join(path, "model"), abstract)
  return params


# ------------------------------------------------------------------------------------------------ phases
def parent_phase(cfg: Any, workdir: str, make_data: Callable, mesh: Mesh | None = None,
                 rules: LogicalRules | None = None, ledger: PhaseLedger | None = None) -> tuple[ModelConfig, Params]:
  """The parent, in its shardings on ``mesh`` (default: ``config.mesh``): an HF Nemotron-H checkpoint when
  ``cfg.parent.hf_path`` is set (each process reads only its devices' slices, in the checkpoint's dtype), else a
  short pretraining run. A pretraining run whose loss is not finite raises ``DivergedError`` (nothing is marked
  done)."""
  if mesh is None:
    mesh, rules = mesh_from_config(cfg)
  ledger = ledger or PhaseLedger(workdir)
  path, done = _phase(workdir, "parent", "DONE")
  parent_cfg = section(cfg, "parent")
  if parent_cfg["hf_path"]:
    from elastic_jax.interop import hf  # pylint: disable=import-outside-toplevel
    ledger.chain(_parent_values(cfg))
    log(f"parent: importing {parent_cfg['hf_path']}")
    return hf.load(parent_cfg["hf_path"], mesh=mesh, rules=rules)
  config = ModelConfig.from_dict(cfg.model)
  if ledger.begin("parent", "parent", _parent_values(cfg), done):
    log(f"parent: reusing {path}")
    return config, load_output(path, config, mesh, rules)
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
  # (long-context) settings, so the parent knows both variants before it is elastified.
  open_data = lambda: PretrainFeed([make_data(stage, 0), make_data(stage, 1)], parent_cfg["long_every"],
                                   training.batch_sharding)
  segment = Segment(stage.name, steps, stage.batch_size * stage.seq_len, open_data, training.step,
                    lm_step_flops(config, stage.batch_size, stage.seq_len))
  # A re-run resumes pretraining from its last checkpoint (train state and both streams' positions), refusing a
  # changed configuration.
  run_config = json.loads(json.dumps({"model": config.to_dict(), "parent": parent_cfg, "seed": int(cfg.seed),
                                      "memory": memory.to_json()}))
  result = run_training([segment], path, "parent pretraining", training.abstract_state,
                        lambda: training.init(jax.random.key(int(cfg.seed))), run_config,
                        checkpoint_every=section(cfg, "checkpoint_every"), log_every=LOG_EVERY)
  stop_if_preempted(result)
  check_finite(result.history, "parent pretraining",
               "parent.seq_len, parent.batch_size, parent.learning_rate and the data")
  save_output(path, config, result.state.params, {"pretrain_steps": steps})
  return config, result.state.params


class PretrainFeed:
  """Parent pretraining's batches: from the first stream, and every ``long_every``-th step from the second (0: the
  first only). Its position is both streams' positions."""

  def __init__(self, streams: Sequence[Any], long_every: int, sharding: Any):
    self._streams, self._long_every, self._sharding = list(streams), long_every, sharding

  def batch(self, step: int) -> jax.Array:
    long = self._long_every and step % self._long_every == self._long_every - 1
    return global_batch(next(self._streams[1] if long else self._streams[0]), self._sharding)

  def get_state(self) -> list[Any]:
    return [stream.get_state() for stream in self._streams]

  def set_state(self, state: list[Any]) -> None:
    for stream, position in zip(self._streams, state):
      stream.set_state(position)


def importance_phase(cfg: Any, workdir: str, config: ModelConfig, params: Params, make_data: Callable,
                     mesh: Mesh, rules: LogicalRules, ledger: PhaseLedger | None = None) -> Rankings:
  path, done = _phase(workdir, "importance", "rankings.json")
  ledger = ledger or PhaseLedger(workdir)
  own = {"importance": section(cfg, "importance"), "data": section(cfg, "data"), "seed": int(cfg.seed)}
  if ledger.begin("importance", "importance", own, done):
    log(f"importance: reusing {path}")
    return Rankings.from_json(read_json(os.path.join(path, "rankings.json")), os.path.join(path, "rankings.json"))
  log("importance: calibrating")
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
    write_json_atomically(os.path.join(path, "rankings.json"), ranks.to_json())
  barrier("importance_written")
  return ranks


def permutation_phase(workdir: str, config: ModelConfig, params: Params, ranks: Rankings, mesh: Mesh,
                      rules: LogicalRules, ledger: PhaseLedger | None = None) -> Params:
  path, done = _phase(workdir, "permuted", "DONE")
  if (ledger or PhaseLedger(workdir)).begin("permutation", "permuted", {}, done):
    log(f"permutation: reusing {path}")
    return load_output(path, config, mesh, rules)
  log("permutation: permuting the parent into importance order")
  permuted = permute_sharded(config, params, ranks, mesh, rules)  # a jitted gather: the shardings are kept
  save_output(path, config, permuted)
  return permuted


def elastic_phase(cfg: Any, workdir: str, config: ModelConfig, teacher: Params, ranks: Rankings,
                  make_data: Callable, mesh: Mesh, rules: LogicalRules, ledger: PhaseLedger | None = None
                  ) -> tuple[list[dict[str, Any]], Params]:
  """Elastic training; returns each budget's deployed choice and the trained student, the weights every child is
  sliced from. The student is saved to ``W/elastic/student`` once training is complete."""
  path = os.path.join(workdir, "elastic")
  choices_file = os.path.join(path, "deployed_choices.json")
  student_path, done = _phase(path, "student", "DONE")
  stages = stages_from_config(cfg)
  total = sum(stage.steps for stage in stages)
  # The schedules (learning rates, router temperature) span every stage's steps: the total is one value all stages
  # depend on, while each stage's own settings matter only once it has started.
  own = {"elastic": section(cfg, "elastic"), "stages": [plain(stage) for stage in cfg.get("stages") or ()],
         "total_steps_of_all_stages": total, "optimizer": section(cfg, "optimizer"),
         "router_optimizer": section(cfg, "router_optimizer"), "memory": section(cfg, "memory"),
         "data": section(cfg, "data"), "seed": int(cfg.seed)}
  if (ledger or PhaseLedger(workdir)).begin("elastic training", "elastic", own, done, stage_keys=True):
    log(f"elastic training: reusing {path}")
    return read_json(choices_file), load_output(student_path, config, mesh, rules)
  finished = os.path.exists(os.path.join(student_path, "DONE"))
  barrier("elastic_jax_student_checked")
  if finished:  # its stages changed after it finished: trained again from the last checkpoint that fits them
    for name in ("student", "deployed_choices.json"):
      if is_primary():
        stale = os.path.join(path, f"{name}.stale")
        if os.path.isdir(stale):
          shutil.rmtree(stale)
        os.replace(os.path.join(path, name), stale)
    barrier("elastic_jax_student_set_aside")
  setup = elastic_setup_from_config(cfg, config, [int(i) for i in ranks.depth], total)
  optimizer, router_optimizer = optimizers_from_config(cfg)
  # The teacher is also the student's starting point: the loop copies it into the student's sharded train state.
  result = train_elastic(setup, stages, teacher, teacher, make_data, path, optimizer=optimizer,
                         router_optimizer=router_optimizer, seed=int(cfg.seed), log_every=LOG_EVERY,
                         checkpoint_every=section(cfg, "checkpoint_every"),
                         metadata={"rankings": ranks.to_json()}, mesh=mesh, rules=rules)
  stop_if_preempted(result)
  # Every step's row, also those of earlier runs this one resumed.
  rows = read_metrics_rows(os.path.join(path, "metrics.jsonl"))
  check_finite(rows, "elastic training", "the stages' settings, optimizer.learning_rate and the data")
  save_output(student_path, config, result.state.params,
              {"step": int(result.state.step), "depth_order": [int(i) for i in ranks.depth]})
  return read_json(choices_file), result.state.params


def extraction_phase(workdir: str, config: ModelConfig, student: Params, permuted: Params, ranks: Rankings,
                     records: list[dict[str, Any]], space_cfg: Any, mesh: Mesh, rules: LogicalRules,
                     ledger: PhaseLedger | None = None) -> tuple[FamilyMember, ...]:
  """Each budget's child: the router's argmax choice sliced from the elastically trained ``student``; and the
  zero-shot pruned baseline of the same size: a choice of that size sliced from the untrained ``permuted`` parent
  (same importance ranking, no training). Each is sliced by one jitted program straight into its own shardings on
  ``mesh`` and saved by every process (its own shards). Returns one ``FamilyMember`` per record, in order."""
  from elastic_jax.elastic.space import ElasticSpace  # pylint: disable=import-outside-toplevel
  space = ElasticSpace.from_dict(plain(space_cfg), config)
  depth_order = [int(i) for i in ranks.depth]
  names = [member_name(record["budget"]) for record in records]
  saved = lambda: sum(os.path.exists(os.path.join(workdir, kind, name, "DONE")) for kind in ("children", "baselines")
                      for name in names)
  if (ledger or PhaseLedger(workdir)).begin("extraction", "children", {}, saved() == 2 * len(names),
                                            also=("baselines",)):
    log("extraction: reusing the saved children and baselines")
  else:
    log(f"extraction: slicing {len(names)} children and their pruned baselines ({saved()} of {2 * len(names)} "
         "saved before)")
  members = []
  for record in records:
    name = member_name(record["budget"])
    choice = Choice.from_dict(record["choice"])
    baseline = select_choice(config, space, record["params"], tolerance=0.02, depth_order=depth_order)
    extracted = {}
    for kind, pick, source in (("children", choice, student), ("baselines", baseline, permuted)):
      path = os.path.join(workdir, kind, name)
      child_config, child_params = extract_sharded(config, source, pick, depth_order, mesh, rules)
      if not os.path.exists(os.path.join(path, "DONE")):
        save_output(path, child_config, child_params, {"choice": pick.to_dict(), "budget": record["budget"]})
      extracted[kind] = ExtractedModel(child_config, child_params, pick, param_count(child_config), path)
    members.append(FamilyMember(float(record["budget"]), extracted["children"], extracted["baselines"]))
  return tuple(members)


def run_pipeline(cfg: Any, workdir: str, reuse_stale: bool = False) -> PipelineResult:
  """Runs every phase not already done in ``workdir``, each under the run's mesh; returns what the evaluation needs
  (the models in their shardings, and the mesh) and ``stale``: the finished phases kept although the config changed
  since they ran (``reuse_stale``; without it they run again)."""
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
  ledger = PhaseLedger(workdir, reuse_stale)
  config, params = parent_phase(cfg, workdir, side_data, mesh, rules, ledger)
  if imported_parent:
    check_vocab_fits(tokenizer, config.vocab_size)
  log(f"parent: {param_count(config):,} parameters, pattern {config.pattern!r}")
  # Calibration is repeated on every process and must give each the same rankings: all read the same full batches.
  calibration_data = data_factory(source, seed=int(cfg.seed) + 7919, tokenizer=tokenizer, process_index=0,
                                  process_count=1)
  ranks = importance_phase(cfg, workdir, config, params, calibration_data, mesh, rules, ledger)
  permuted = permutation_phase(workdir, config, params, ranks, mesh, rules, ledger)
  del params  # the unpermuted parent is no longer needed
  records, student = elastic_phase(cfg, workdir, config, permuted, ranks, make_data, mesh, rules, ledger)
  members = extraction_phase(workdir, config, student, permuted, ranks, records, cfg.elastic.space, mesh, rules,
                             ledger)
  log(f"phases done in {time.perf_counter() - started:.0f} s; evaluation next")
  return PipelineResult(workdir, config, permuted, members, source, tokenizer, mesh, rules, tuple(ledger.kept_stale))
