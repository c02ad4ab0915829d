"""The elastic training loop: a curriculum of stages over one jitted step, with exact resume and preemption saves.

A stage fixes the sequence length, batch size, step count and budget probabilities (spec §6: stage 1 uniform over
budgets at short context; stage 2 skewed to the full model at long context). Budget probabilities are a step
*input*, so a stage change recompiles only when the batch shape changes, and at most once.

Everything a resumed run needs is in the checkpoint: train state (student, router, both optimizer states, step,
PRNG), the data iterator's position, the stage, and the configuration. Resuming continues exactly as if never
stopped: same batches, same budget draws, same losses, and ``metrics.jsonl`` keeps exactly one row per step.

A changed configuration is refused, naming the field, except for the settings of a stage: a stage that has not
started at the checkpoint simply takes the new values, and checkpoints inside a stage whose settings changed are
set aside (renamed) so that the run restarts that stage from the checkpoint at its start (the end of every stage is
always kept).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from elastic_jax.model import HybridLM, ModelConfig
from elastic_jax.model.hybrid import init_boxed_params
from elastic_jax.train import distributed
from elastic_jax.train.checkpoint import Checkpointer, PreemptionGuard, check_config, config_differences
from elastic_jax.train.sharding import (DEFAULT_RULES, LogicalRules, batch_sharding, logical_shardings, make_mesh,
                                        replicated, shard_params, sharded_jit)
from elastic_jax.train.optim import OptimizerConfig, default_router_optimizer_config, make_optimizer
from elastic_jax.elastic.extract import child_config
from elastic_jax.elastic.space import Choice
from elastic_jax.elastic.param_count import choice_param_count, memory_bytes
from elastic_jax.elastic.deploy import deployed_choices, router_argmax_choices
from elastic_jax.train.elastic_step import ElasticSetup, check_budget_probs, init_elastic_state, make_elastic_step
from elastic_jax.train.lm_step import make_lm_step
from elastic_jax.train.microbatch import check_grad_accum
from elastic_jax.train.state import TrainState

Params = Any


@dataclasses.dataclass(frozen=True)
class Stage:
  """One curriculum stage: ``steps`` steps of ``batch_size`` sequences of ``seq_len`` tokens."""

  name: str
  steps: int
  batch_size: int
  seq_len: int
  budget_probs: tuple[float, ...]

  def validate(self, num_budgets: int) -> None:
    for field in ("steps", "batch_size", "seq_len"):
      value = getattr(self, field)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"stage {self.name!r}: {field}={value!r} must be a positive integer.")
    check_budget_probs(self.budget_probs, num_budgets, f"stage {self.name!r} budget_probs")


class TokenIterator(Protocol):
  """What a stage's data source must be: batches of int32 [batch, seq_len + 1] and a JSON-able position."""

  def __next__(self) -> np.ndarray: ...
  def get_state(self) -> dict[str, Any]: ...
  def set_state(self, state: dict[str, Any]) -> None: ...


DataFactory = Callable[[Stage, int], TokenIterator]  # (stage, stage index) -> iterator


@dataclasses.dataclass
class TrainResult:
  state: TrainState
  history: list[dict[str, Any]]  # one dict of host metrics per step run in this call
  preempted: bool


def _stage_at(stages: Sequence[Stage], step: int) -> tuple[int, int]:
  """Global step -> (stage index, steps already done inside that stage)."""
  start = 0
  for index, stage in enumerate(stages):
    if step < start + stage.steps:
      return index, step - start
    start += stage.steps
  return len(stages), 0


def _to_host(metrics: dict[str, jax.Array]) -> dict[str, Any]:
  return {k: (np.asarray(v).tolist()) for k, v in jax.device_get(metrics).items()}


def train_elastic(setup: ElasticSetup, stages: Sequence[Stage], teacher_params: Params, student_params: Params,
                  make_data: DataFactory, workdir: str | os.PathLike, *,
                  optimizer: OptimizerConfig = OptimizerConfig(),
                  router_optimizer: OptimizerConfig | None = None, seed: int = 0,
                  checkpoint_every: int = 100, log_every: int = 10, max_steps: int | None = None,
                  run_config: Mapping[str, Any] | None = None, progress: bool = True, mesh: Mesh | None = None,
                  rules: LogicalRules = DEFAULT_RULES, metadata: Mapping[str, Any] | None = None) -> TrainResult:
  """Runs (or resumes) the curriculum in ``workdir``; returns the final state and this call's metrics.

  Args:
    setup: the elastic setup (model config, space, budgets, depth order, router schedule, loss options).
    stages: the curriculum, run in order.
    teacher_params: the frozen parent (never updated); held in its shardings in ``setup.memory.teacher_dtype``.
    student_params: the student's starting point (normally the parent itself: the train state gets its own
      sharded copy); ignored when resuming.
    make_data: builds the token iterator of a stage; the loop restores its position when resuming.
    workdir: checkpoints go to ``workdir/checkpoints`` and metrics to ``workdir/metrics.jsonl``.
    optimizer, router_optimizer: the model's and the router's optimizers (separate states and learning rates).
    seed: PRNG seed of the run (budget draws, Gumbel noise).
    checkpoint_every: steps between periodic checkpoints (one is also written at the end and on SIGTERM).
    log_every: steps between metric flushes to the host (the step itself never waits for the host).
    max_steps: stop after this global step (saving a checkpoint), e.g. to split a run; None runs all stages.
    run_config: JSON-able description of everything that must match on resume; defaults to the setup's.
    progress: show a progress bar, and log the step it starts or resumes from and each stage it enters.
    metadata: JSON-able records saved with every checkpoint (e.g. the importance rankings the student's weights
      were permuted with), so a checkpoint is self-describing for extraction and export.
    mesh, rules: the device mesh (default: every device on the data axis) and the logical-axis rules that map
      params, optimizer state and batches onto it.
  """
  for stage in stages:
    stage.validate(len(setup.budgets))
    check_grad_accum(stage.batch_size, setup.memory.grad_accum_steps, f"stage {stage.name!r}")
  total_steps = sum(stage.steps for stage in stages)
  stage_ends = np.cumsum([stage.steps for stage in stages]).tolist()
  router_optimizer = router_optimizer or default_router_optimizer_config()
  run_config = dict(run_config) if run_config is not None else describe_run(setup, stages, optimizer,
                                                                            router_optimizer, seed)
  workdir = os.fspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep_steps=stage_ends)

  mesh = mesh or make_mesh()
  training = compiled_elastic_step(setup, optimizer, router_optimizer, total_steps, seed, mesh, rules)
  step_fn = training.step
  teacher_params = place_teacher(setup, teacher_params, training.state_shardings.params)
  tokens_sharding = batch_sharding(mesh, rules)
  data_state = None
  # The newest checkpoint that restores and fits the run, straight into its shardings; the student is not needed.
  fits = lambda step, saved: stage_change(saved.get("config", {}), run_config, stages, step, checkpointer.directory)
  restored = checkpointer.restore_latest(training.abstract_state, accept=fits)
  if restored is not None:
    state, saved = restored
    data_state = distributed.own_state(saved["data_state"], checkpointer.directory)
  else:  # the optimizer states are created beside the sharded params, never on one device first
    state = training.init(shard_params(student_params, training.state_shardings.params))
  start_step = int(state.step)
  talk = progress and distributed.is_primary()
  if distributed.is_primary():  # shared files are written by process 0 only
    _truncate_metrics(os.path.join(workdir, "metrics.jsonl"), start_step)
  if talk:
    _log(_resume_message(stages, start_step, restored is not None))

  stop_at = total_steps if max_steps is None else min(max_steps, total_steps)
  history: list[dict[str, Any]] = []
  pending: list[tuple[int, dict[str, jax.Array]]] = []
  preempted = False
  bar = tqdm(total=stop_at, initial=start_step, disable=not progress or not distributed.is_primary(),
             desc="elastic training", unit="step")

  def flush() -> None:
    records = [{"step": step, **_to_host(metrics)} for step, metrics in pending]
    history.extend(records)
    if distributed.is_primary():
      with open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
    if pending:
      last = history[-1]
      bar.set_postfix(loss=f"{last['loss']:.4f}", kd=",".join(f"{x:.3f}" for x in last["kd_per_budget"]),
                      tau=f"{last['tau']:.3f}")
    pending.clear()

  last_saved = start_step

  def save(step: int, iterator: "_TrackedIterator") -> None:
    nonlocal last_saved
    if step != last_saved:
      flush()  # every step up to a checkpoint is in metrics.jsonl before the checkpoint exists
      checkpointer.save(step, state, {**(metadata or {}), "config": run_config, "step": step,
                                      "data_state": distributed.process_states(iterator.get_state()),
                                      "depth_order": list(setup.depth_order),
                                      "deployed_choices": deployed_choice_records(setup, state.router_params)})
      last_saved = step

  step = start_step
  try:
    with PreemptionGuard() as guard:
      while step < stop_at and not preempted:
        stage_index, done_in_stage = _stage_at(stages, step)
        stage = stages[stage_index]
        iterator = make_data(stage, stage_index)
        if data_state is not None and data_state.get("stage") == stage_index:
          iterator.set_state(data_state["iterator"])
        data_state = None
        tracked = _TrackedIterator(iterator, stage_index)
        probs = jnp.asarray(stage.budget_probs, jnp.float32)
        stage_end = min(stop_at, step - done_in_stage + stage.steps)
        bar.set_description(stage.name)
        if talk:
          first = step - done_in_stage + 1
          _log(f"{stage.name} (stage {stage_index + 1} of {len(stages)}, steps {first}-{first + stage.steps - 1})"
               + (f" from step {step + 1}" if done_in_stage else ""))
        tic = time.perf_counter()
        while step < stage_end:
          tokens = _check_batch(next(iterator), stage, tokens_sharding)
          state, metrics = step_fn(state, teacher_params, tokens, probs)
          step += 1
          pending.append((step, metrics))
          bar.update(1)
          if step % log_every == 0:
            flush()
            elapsed = time.perf_counter() - tic
            bar.set_description(f"{stage.name} {stage.batch_size * stage.seq_len * log_every / elapsed:,.0f} tok/s")
            tic = time.perf_counter()
          # SIGTERM: save where we are and stop cleanly (all processes at the same step: they agree at log steps).
          if distributed.agreed_stop(guard.requested, sync_now=step % log_every == 0):
            preempted = True
            break
          if step % checkpoint_every == 0:
            save(step, tracked)
        save(step, tracked)  # end of the stage (or of this call): always resumable from here
  finally:  # whatever stops the loop, a save in flight completes before it propagates
    flush()
    bar.close()
    checkpointer.close()
  if step == total_steps:
    records = deployed_choice_records(setup, state.router_params)
    if distributed.is_primary():
      write_json_atomically(os.path.join(workdir, "deployed_choices.json"), records, indent=1)
    distributed.barrier("deployed_choices_written")  # the other processes read it next
  return TrainResult(state, history, preempted)


def deployed_choice_records(setup: ElasticSetup, router_params: Params) -> list[dict[str, Any]]:
  """Each budget's deployed choice as JSON records: the budget, the choice, its exact parameter count and its
  fraction of the parent (in the budget's metric); and, when the deployed choice is not the router's argmax (which
  missed the dead zone), the argmax and its fraction under ``router_argmax``."""
  def describe(choice: Choice) -> dict[str, Any]:
    count = choice_param_count(setup.config, choice, setup.depth_order)
    record = {"params": count, "fraction": count / setup.parent_params}
    if setup.budget_metric == "memory":
      size = memory_bytes(child_config(setup.config, choice, setup.depth_order), context=setup.memory_context)
      record.update(memory_bytes=size, fraction=size / setup.parent_size)
    return {**record, "choice": choice.to_dict()}

  records = []
  for budget, choice, argmax in zip(setup.budgets, deployed_choices(setup, router_params),
                                    router_argmax_choices(setup, router_params)):
    record = {"budget": budget, **describe(choice)}
    if choice != argmax:
      record["router_argmax"] = describe(argmax)
    records.append(record)
  return records


def place_teacher(setup: ElasticSetup, teacher_params: Params, shardings: Params) -> Params:
  """The frozen teacher in its shardings and in ``setup.memory.teacher_dtype`` (bf16 halves its memory)."""
  teacher = shard_params(teacher_params, shardings)
  dtype = jnp.dtype(setup.memory.teacher_dtype)
  if all(x.dtype == dtype for x in jax.tree.leaves(teacher)):
    return teacher
  cast = lambda tree: jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
  return jax.jit(cast, out_shardings=shardings)(teacher)


class ShardedTraining(NamedTuple):
  """A train step compiled for a mesh, with the initialiser that creates its state directly in its shardings.

  step: the jitted step (state donated; metrics replicated). init: builds the train state inside ``jax.jit`` with
  ``out_shardings`` (from sharded params for the elastic state, from a PRNG key for fresh LM params), so nothing
  is first materialised on one device. abstract_state: shapes, dtypes and shardings of the state (the restore
  target). batch_sharding: where a token batch goes.
  """

  step: Callable
  init: Callable
  state_shardings: TrainState
  abstract_state: TrainState
  batch_sharding: Any


def _with_shardings(abstract_boxed: Any, mesh: Mesh, rules: LogicalRules) -> tuple[Any, Any]:
  """(shardings, abstract unboxed tree with those shardings) of an abstract tree with logical-axis boxes."""
  shardings = logical_shardings(abstract_boxed, mesh, rules)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nn.meta.unbox(abstract_boxed), shardings)
  return shardings, abstract


def abstract_boxed_state(setup: ElasticSetup, tx, router_tx, seed: int = 0) -> TrainState:
  """The train state's shapes with the model's logical-axis boxes kept (optimizer moments inherit them)."""
  def build():
    boxed = HybridLM(setup.config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    return init_elastic_state(setup, boxed, tx, router_tx, seed)
  return jax.eval_shape(build)


@functools.lru_cache(maxsize=8)
def compiled_elastic_step(setup: ElasticSetup, optimizer: OptimizerConfig, router_optimizer: OptimizerConfig,
                           total_steps: int, seed: int, mesh: Mesh, rules: LogicalRules) -> ShardedTraining:
  """One jitted step per (setup, optimizers, length, mesh): a resumed or repeated run in one process reuses it.

  The state is donated; the teacher and the batch are inputs with their own shardings; metrics come back
  replicated. ``init(params)`` takes the student's params already in their shardings and creates the optimizer
  states and the router beside them.
  """
  tx, router_tx = make_optimizer(optimizer, total_steps), make_optimizer(router_optimizer, total_steps)
  state_shardings, abstract_state = _with_shardings(abstract_boxed_state(setup, tx, router_tx, seed), mesh, rules)
  tokens = batch_sharding(mesh, rules)
  step = sharded_jit(make_elastic_step(setup, tx, router_tx), mesh, rules,
                     in_shardings=(state_shardings, state_shardings.params, tokens, replicated(mesh)),
                     out_shardings=(state_shardings, replicated(mesh)), donate_argnums=(0,))
  init = sharded_jit(lambda params: init_elastic_state(setup, params, tx, router_tx, seed), mesh, rules,
                     in_shardings=(state_shardings.params,), out_shardings=state_shardings)
  return ShardedTraining(step, init, state_shardings, abstract_state, tokens)


def init_lm_state(config: ModelConfig, tx, key: jax.Array) -> TrainState:
  """A fresh LM train state: new params (logical-axis boxes kept, ``init_boxed_params``) and their optimizer state."""
  params = init_boxed_params(config, key)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.key_data(jax.random.key(0)))


@functools.lru_cache(maxsize=4)
def compiled_lm_step(config: ModelConfig, optimizer: OptimizerConfig, total_steps: int, mesh: Mesh,
                     rules: LogicalRules = DEFAULT_RULES, grad_accum_steps: int = 1, remat: Any = ()
                     ) -> ShardedTraining:
  """Next-token training of one model over ``mesh`` (parent pretraining), in the elastic step's sharded pattern.

  ``init(key)`` draws fresh params and their optimizer state directly into their shardings. ``remat`` must be
  hashable (``remat_policies`` pairs).
  """
  tx = make_optimizer(optimizer, total_steps)
  boxed_state = jax.eval_shape(lambda: init_lm_state(config, tx, jax.random.key(0)))
  state_shardings, abstract_state = _with_shardings(boxed_state, mesh, rules)
  tokens = batch_sharding(mesh, rules)
  step = sharded_jit(make_lm_step(config, tx, grad_accum_steps, remat), mesh, rules,
                     in_shardings=(state_shardings, tokens), out_shardings=(state_shardings, replicated(mesh)),
                     donate_argnums=(0,))
  init = sharded_jit(lambda key: nn.meta.unbox(init_lm_state(config, tx, key)), mesh, rules,
                     in_shardings=(replicated(mesh),), out_shardings=state_shardings)
  return ShardedTraining(step, init, state_shardings, abstract_state, tokens)


class _TrackedIterator:
  """Wraps an iterator's state with its stage index, the form checkpoints store."""

  def __init__(self, iterator: TokenIterator, stage_index: int):
    self._iterator, self._stage = iterator, stage_index

  def get_state(self) -> dict[str, Any]:
    return {"stage": self._stage, "iterator": self._iterator.get_state()}


def _check_batch(tokens: Any, stage: Stage, sharding: jax.sharding.Sharding) -> jax.Array:
  """This process's rows of a stage batch -> the global batch on the mesh (``stage.batch_size`` is global)."""
  local_rows = distributed.local_batch_size(stage.batch_size, f"stage {stage.name!r}: batch_size")
  expected = (local_rows, stage.seq_len + 1)
  if tuple(np.shape(tokens)) != expected:
    share = f" (this process's share of {stage.batch_size} rows)" if local_rows != stage.batch_size else ""
    raise ValueError(f"stage {stage.name!r}: the data source gave a batch of shape {tuple(np.shape(tokens))}, "
                     f"expected {expected}{share} (batch_size, seq_len + 1 tokens: inputs plus next-token targets).")
  return distributed.global_batch(tokens, sharding)


def _log(message: str) -> None:
  print(f"[elastic_jax] elastic training: {message}", flush=True)


def _resume_message(stages: Sequence[Stage], step: int, restored: bool) -> str:
  total = sum(stage.steps for stage in stages)
  if not restored:
    return f"starting at step 0 of {total}"
  index, done_in_stage = _stage_at(stages, step)
  if index == len(stages):
    return f"resuming from the checkpoint of step {step} of {total}: every stage is done"
  where = "at the start of" if done_in_stage == 0 else f"{done_in_stage} steps into"
  return f"resuming from the checkpoint of step {step} of {total}, {where} {stages[index].name}"


def stage_change(saved: Mapping[str, Any], current: Mapping[str, Any], stages: Sequence[Stage], step: int,
                 where: str = "checkpoint") -> str | None:
  """Whether a checkpoint written at ``step`` under config ``saved`` fits the run described by ``current``.

  Raises ``ConfigMismatchError`` when anything outside the stages differs (model, space, optimizers, the schedule's
  length...). Stages are compared only up to the last one the checkpoint had started: a stage not started yet takes
  the new values. Returns None when it fits, else which started stage's settings changed.
  """
  saved, current = dict(saved), dict(current)
  saved_stages, current_stages = saved.pop("stages", None) or [], current.pop("stages", None) or []
  check_config(saved, current, where)
  started = sum(1 for end, stage in zip(np.cumsum([s.steps for s in stages]), stages) if end - stage.steps < step)
  diffs = []
  for index in range(started):
    before = saved_stages[index] if index < len(saved_stages) else {}
    after = current_stages[index] if index < len(current_stages) else {}
    diffs += config_differences(before, after, f"stages[{index}].")
  return f"the settings of a stage it had started changed ({'; '.join(diffs)})" if diffs else None


def write_json_atomically(path: str, value: Any, **dump_kwargs: Any) -> None:
  """Writes JSON to a temporary file and renames it into place: readers never see half a file."""
  temporary = f"{path}.tmp"
  with open(temporary, "w", encoding="utf-8") as f:
    json.dump(value, f, **dump_kwargs)
  os.replace(temporary, path)


def _truncate_metrics(path: str, last_step: int) -> None:
  """Keeps exactly the metric rows of steps 1..``last_step`` (the restored step), so a resumed run's log reads as one
  uninterrupted run: rows past it are dropped (they are run again), as is a line cut short by a kill."""
  if not os.path.exists(path):
    return
  rows = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:  # the last line of a run killed while writing it
        continue
      if row["step"] <= last_step:
        rows.setdefault(row["step"], line if line.endswith("\n") else line + "\n")
  missing = sorted(set(range(1, last_step + 1)) - set(rows))
  if missing:
    print(f"[elastic_jax] warning: {path} has no rows for steps {missing[0]}..{missing[-1]} ({len(missing)} "
          "steps), written before they were saved with every checkpoint", flush=True)
  temporary = f"{path}.tmp"
  with open(temporary, "w", encoding="utf-8") as f:
    f.writelines(rows[step] for step in sorted(rows))
  os.replace(temporary, path)


def describe_run(setup: ElasticSetup, stages: Sequence[Stage], optimizer: OptimizerConfig,
                 router_optimizer: OptimizerConfig, seed: int) -> dict[str, Any]:
  """A JSON-able record of everything a resumed run must share with the original (the memory levers included:
  they change how the step computes, so a resume under another setting is refused rather than silently mixed)."""
  elastic = {f.name: getattr(setup, f.name) for f in dataclasses.fields(setup)
             if f.name not in ("config", "space", "schedule", "memory")}
  elastic["depth_order"] = list(setup.depth_order)
  elastic["budgets"] = list(setup.budgets)
  memory = setup.memory.to_json()
  return json.loads(json.dumps({
      "model": setup.config.to_dict(), "space": setup.space.to_dict(), "elastic": elastic, "memory": memory,
      "router_schedule": dataclasses.asdict(setup.schedule),
      "stages": [dict(dataclasses.asdict(s), budget_probs=list(s.budget_probs)) for s in stages],
      "optimizer": dataclasses.asdict(optimizer), "router_optimizer": dataclasses.asdict(router_optimizer),
      "seed": seed,
  }))
