"""The training loop (``run_training``), for parent pretraining and elastic training alike, and the elastic
curriculum on it (``train_elastic``): a sequence of stages over one jitted step, with exact resume and preemption
saves.

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
import gc
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
from elastic_jax.elastic.deploy import deployed_choices, pinned_indices, router_argmax_choices
from elastic_jax.train.elastic_step import (ElasticSetup, Pins, check_budget_probs, init_elastic_state,
                                            make_elastic_step)
from elastic_jax.train.flops import elastic_step_flops
from elastic_jax.train.lm_step import make_lm_step
from elastic_jax.train.microbatch import check_grad_accum
from elastic_jax.train.result import member_name
from elastic_jax.train.state import TrainState
from elastic_jax.train.tensorboard_log import DIRECTORY as TENSORBOARD_DIRECTORY, TensorBoardLog

Params = Any


@dataclasses.dataclass(frozen=True)
class Stage:
  """One curriculum stage: ``steps`` steps of ``batch_size`` sequences of ``seq_len`` tokens."""

  name: str
  steps: int
  batch_size: int
  seq_len: int
  budget_probs: tuple[float, ...]
  # Pinned: the router is frozen and each sample trains its budget's deployed choice (``deploy.deployed_choices`` at
  # the stage's start), so the sub-networks extraction cuts are the ones the last steps trained.
  pinned: bool = False
  # The task settings this stage reads: ``data.stage_tasks[tasks]``; None reads its own position's (the last entry
  # for stages past the end). Lets a later stage train on an earlier stage's settings (e.g. stage 2 switched off).
  tasks: int | None = None

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


class Feed(Protocol):
  """A segment's data as the loop reads it: the global batch of each step, on the mesh, and a JSON-able position."""

  def batch(self, step: int) -> jax.Array: ...  # ``step``: the global index (0-based) of the step it feeds
  def get_state(self) -> Any: ...
  def set_state(self, state: Any) -> None: ...


class Segment(NamedTuple):
  """Consecutive steps sharing one step function and one data source: a curriculum stage, or all of a pretraining
  run. ``open_data`` builds the data source when the loop enters the segment (it then restores its position when
  resuming); ``tokens_per_step`` and ``flops_per_step`` (the step's model FLOPs, ``train.flops``; 0: unknown, no
  MFU) are for the speed readout."""

  name: str
  steps: int
  tokens_per_step: int
  open_data: Callable[[], Feed]
  step: Callable[[TrainState, jax.Array], tuple[TrainState, dict[str, jax.Array]]]
  flops_per_step: float = 0.0


def _stage_at(stages: Sequence[Stage | Segment], step: int) -> tuple[int, int]:
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
    workdir: checkpoints go to ``workdir/checkpoints``, metrics to ``workdir/metrics.jsonl`` and the same metrics
      as TensorBoard events to ``workdir/tensorboard``.
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
  router_optimizer = router_optimizer or default_router_optimizer_config()
  run_config = dict(run_config) if run_config is not None else describe_run(setup, stages, optimizer,
                                                                            router_optimizer, seed)
  mesh = mesh or make_mesh()
  training = compiled_elastic_step(setup, optimizer, router_optimizer, total_steps, seed, mesh, rules)
  teacher_params = place_teacher(setup, teacher_params, training.state_shardings.params)

  unpinned = Pins.off(setup)

  def segment(index: int, stage: Stage) -> Segment:
    probs = jnp.asarray(stage.budget_probs, jnp.float32)
    pins = {}  # a pinned stage's choices, fixed at its first step

    def step(state: TrainState, tokens: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
      if stage.pinned and not pins:
        # The router is frozen inside the stage, so a resumed stage pins the same choices.
        choices = deployed_choices(setup, state.router_params)
        pins["pins"] = Pins({name: jnp.asarray(value) for name, value in pinned_indices(setup, choices).items()},
                            jnp.asarray(True))
        _log("elastic training", f"stage {stage.name!r}: router frozen; each budget trains its deployed choice")
      return training.step(state, teacher_params, tokens, probs, pins.get("pins", unpinned))

    return Segment(stage.name, stage.steps, stage.batch_size * stage.seq_len,
                   lambda: StageFeed(make_data(stage, index), stage, training.batch_sharding), step,
                   elastic_step_flops(setup.config, stage.batch_size, stage.seq_len))

  def records(state: TrainState) -> dict[str, Any]:
    return {**(metadata or {}), "depth_order": list(setup.depth_order),
            "deployed_choices": deployed_choice_records(setup, state.router_params)}

  # The optimizer states are created beside the sharded params, never on one device first.
  result = run_training([segment(index, stage) for index, stage in enumerate(stages)], workdir,
                        "elastic training", training.abstract_state,
                        lambda: training.init(shard_params(student_params, training.state_shardings.params)),
                        run_config, checkpoint_every=checkpoint_every, log_every=log_every, max_steps=max_steps,
                        progress=progress, checkpoint_records=records,
                        budget_names=[member_name(budget) for budget in setup.budgets])
  if int(result.state.step) == total_steps:
    choices = deployed_choice_records(setup, result.state.router_params)
    if distributed.is_primary():
      write_json_atomically(os.path.join(os.fspath(workdir), "deployed_choices.json"), choices, indent=1)
    distributed.barrier("deployed_choices_written")  # the other processes read it next
  return result


def run_training(segments: Sequence[Segment], workdir: str | os.PathLike, label: str, abstract_state: TrainState,
                 init_state: Callable[[], TrainState], run_config: Mapping[str, Any], *, checkpoint_every: int,
                 log_every: int = 10, max_steps: int | None = None, progress: bool = True,
                 checkpoint_records: Callable[[TrainState], Mapping[str, Any]] | None = None,
                 budget_names: Sequence[str] = (), peak_flops: float | None = None) -> TrainResult:
  """Runs (or resumes) ``segments`` in order in ``workdir``, for any step function: the one training loop.

  Resume: the newest checkpoint in ``workdir/checkpoints`` that restores (a torn one is set aside) and fits
  ``run_config`` (``stage_change``: a changed value outside ``run_config["stages"]`` is refused, naming it; a started
  segment whose ``stages`` entry changed restarts from its start) is restored straight into ``abstract_state``'s
  shardings, with each process's data position; otherwise ``init_state()`` starts afresh. SIGTERM on any process:
  every process stops at the same step (agreed at log steps), saves, and the result says ``preempted``.
  Checkpoints every ``checkpoint_every`` steps and at the end of each segment (kept: the latest two and every
  segment's end), with ``checkpoint_records(state)`` beside the config, step and data positions.
  ``workdir/metrics.jsonl`` gets one row per step (host metrics, flushed every ``log_every`` steps and before each
  checkpoint), and keeps exactly one per step across kills and resumes. The last row of each flush also holds the
  speed of the steps since the previous one (``step_time_s``, ``tokens_per_s`` and ``mfu``: model FLOPs per second
  over ``peak_flops``, by default the planner's peak of the devices' kind times their count; a segment's first step
  in a call, which compiles, and checkpoint writes are not timed). The same rows go, at each flush, to
  TensorBoard event files in ``workdir/tensorboard`` (``train.tensorboard_log``; per-budget metrics named by
  ``budget_names``), process 0 only; a resumed run's points replace those of steps it runs again. ``label`` names the
  run in its log lines and progress bar; ``max_steps`` stops early (saving), e.g. to split a run.
  """
  workdir = os.fspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  total_steps = sum(segment.steps for segment in segments)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"),
                              keep_steps=np.cumsum([segment.steps for segment in segments]).tolist())
  # The newest checkpoint that restores and fits the run, straight into its shardings.
  fits = lambda step, saved: stage_change(saved.get("config", {}), run_config, segments, step, checkpointer.directory)
  restored = checkpointer.restore_latest(abstract_state, accept=fits)
  data_state = None
  if restored is not None:
    state, saved = restored
    data_state = distributed.own_state(saved["data_state"], checkpointer.directory)
  else:
    state = init_state()
  start_step = int(state.step)
  talk = progress and distributed.is_primary()
  if talk:
    _log(label, _resume_message(segments, start_step, restored is not None))
  stop_at = total_steps if max_steps is None else min(max_steps, total_steps)
  preempted = False
  bar = tqdm(total=stop_at, initial=start_step, disable=not talk, desc=label, unit="step")
  metrics_log = _MetricsLog(os.path.join(workdir, "metrics.jsonl"), start_step, bar,
                            os.path.join(workdir, TENSORBOARD_DIRECTORY), budget_names)
  peak_flops = devices_peak_flops() if peak_flops is None else peak_flops
  last_saved = start_step

  def save(step: int, index: int, feed: Feed) -> None:
    nonlocal last_saved
    if step != last_saved:
      metrics_log.flush()  # every step up to a checkpoint is in metrics.jsonl before the checkpoint exists
      records = checkpoint_records(state) if checkpoint_records is not None else {}
      position = {"stage": index, "iterator": feed.get_state()}
      checkpointer.save(step, state, {**records, "config": run_config, "step": step,
                                      "data_state": distributed.process_states(position)})
      last_saved = step
      metrics_log.restart_timing()  # the next speed readout times steps, not the checkpoint's write

  step = start_step
  try:
    with PreemptionGuard() as guard:
      while step < stop_at and not preempted:
        index, done_in_segment = _stage_at(segments, step)
        segment = segments[index]
        feed = segment.open_data()
        if data_state is not None and data_state.get("stage") == index:
          feed.set_state(data_state["iterator"])
        data_state = None
        segment_end = min(stop_at, step - done_in_segment + segment.steps)
        bar.set_description(segment.name)
        if talk and len(segments) > 1:
          first, last = step - done_in_segment + 1, step - done_in_segment + segment.steps
          _log(label, f"{segment.name} (stage {index + 1} of {len(segments)}, steps {first}-{last})"
               + (f" from step {step + 1}" if done_in_segment else ""))
        timed = False
        while step < segment_end:
          state, metrics = segment.step(state, feed.batch(step))
          step += 1
          metrics_log.add(step, metrics)
          if not timed:  # the segment's first step in this call compiles: the speed is timed from its end
            jax.block_until_ready(metrics)
            metrics_log.time_segment(segment, peak_flops)
            timed = True
          bar.update(1)
          if step % log_every == 0:
            metrics_log.flush()
          # SIGTERM: save where we are and stop cleanly (all processes at the same step: they agree at log steps).
          if distributed.agreed_stop(guard.requested, sync_now=step % log_every == 0):
            preempted = True
            break
          if step % checkpoint_every == 0:
            save(step, index, feed)
        save(step, index, feed)  # end of the segment (or of this call): always resumable from here
  finally:  # whatever stops the loop, a save in flight completes before it propagates
    metrics_log.flush()
    metrics_log.close()
    bar.close()
    checkpointer.close()
  return TrainResult(state, metrics_log.history, preempted)


class _MetricsLog:
  """``metrics.jsonl`` of a run: exactly the rows of steps 1..``start_step`` are kept (a resumed run's log reads as
  one uninterrupted run), then each step's device metrics are held until ``flush`` brings them to the host (the steps
  never wait for it), appends them (process 0 only: a shared file) and shows the latest on the progress bar. The
  same rows go to TensorBoard events in ``tensorboard_dir`` (process 0; the file is opened at the first rows), and
  the last row of a flush gets the speed of the steps timed since the previous flush (``_Speed``)."""

  def __init__(self, path: str, start_step: int, bar: tqdm, tensorboard_dir: str, budget_names: Sequence[str]):
    self.path, self.bar, self.start_step = path, bar, start_step
    self.history: list[dict[str, Any]] = []  # every row flushed in this call
    self.pending: list[tuple[int, dict[str, jax.Array]]] = []
    self.speed: _Speed | None = None
    self.tensorboard_dir, self.budget_names = tensorboard_dir, tuple(budget_names)
    self.tensorboard: TensorBoardLog | None = None
    if distributed.is_primary():
      _truncate_metrics(path, start_step)

  def time_segment(self, segment: Segment, peak_flops: float | None) -> None:
    """Times the steps of ``segment`` added from now on (the device has finished every step before)."""
    self.speed = _Speed(segment.name, segment.tokens_per_step, segment.flops_per_step, peak_flops)

  def restart_timing(self) -> None:
    if self.speed is not None:
      self.speed.restart()

  def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
    self.pending.append((step, metrics))
    if self.speed is not None:
      self.speed.steps += 1

  def flush(self) -> None:
    rows = [{"step": step, **_to_host(metrics)} for step, metrics in self.pending]  # waits for the steps
    if rows and self.speed is not None and self.speed.steps:
      rows[-1].update(self.speed.readout())
      self.bar.set_description(f"{self.speed.name} {rows[-1]['tokens_per_s']:,.0f} tok/s")
    if self.speed is not None:
      self.speed.restart()
    self.history.extend(rows)
    if distributed.is_primary() and rows:
      with open(self.path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
      if self.tensorboard is None:
        self.tensorboard = TensorBoardLog(self.tensorboard_dir, self.start_step, self.budget_names)
      self.tensorboard.write(rows)
      self.tensorboard.flush()  # on disk before any checkpoint that follows, like the rows above
    if rows:
      self.bar.set_postfix(_postfix(rows[-1]))
    self.pending.clear()

  def close(self) -> None:
    if self.tensorboard is not None:
      self.tensorboard.close()
      self.tensorboard = None


class _Speed:
  """The speed of a segment's steps over a window of consecutive steps: from a moment the device had finished every
  step before the window (the end of the previous flush or checkpoint, or of the segment's first step in this call,
  which compiles and is not timed) to the flush that waits for the window's last step."""

  def __init__(self, name: str, tokens_per_step: int, flops_per_step: float, peak_flops: float | None):
    self.name, self.tokens_per_step, self.flops_per_step, self.peak_flops = (name, tokens_per_step, flops_per_step,
                                                                             peak_flops)
    self.restart()

  def restart(self) -> None:
    self.start, self.steps = time.perf_counter(), 0

  def readout(self) -> dict[str, float]:
    """``step_time_s`` (seconds per step), ``tokens_per_s`` and, where the step's FLOPs and the devices' peak are
    known, ``mfu`` (model FLOPs per second over the peak)."""
    seconds = time.perf_counter() - self.start
    speed = {"step_time_s": seconds / self.steps, "tokens_per_s": self.tokens_per_step * self.steps / seconds}
    if self.flops_per_step and self.peak_flops:
      speed["mfu"] = self.flops_per_step * self.steps / seconds / self.peak_flops
    return speed


def devices_peak_flops() -> float | None:
  """The dense bf16 peak FLOP/s of all the run's devices together: the planner's figure for the devices' kind
  (``plan.DEVICES``; on CPU a nominal 1e11 each) times their count; None for a kind with no known peak."""
  from elastic_jax import plan  # pylint: disable=import-outside-toplevel  (plan imports this module)
  try:
    kind = plan.detect_device()
  except ValueError:
    return None
  return plan.DEVICES[kind].peak_flops * jax.device_count()


def _postfix(row: Mapping[str, Any]) -> dict[str, str]:
  """The progress bar's readout of a metrics row: the loss, and the elastic step's per-budget KD and temperature."""
  shown = {"loss": f"{row['loss']:.4f}"}
  if "kd_per_budget" in row:
    shown["kd"] = ",".join(f"{x:.3f}" for x in row["kd_per_budget"])
  if "tau" in row:
    shown["tau"] = f"{row['tau']:.3f}"
  return shown


def deployed_choice_records(setup: ElasticSetup, router_params: Params) -> list[dict[str, Any]]:
  """Each budget's deployed choice as JSON records: the budget, the choice, its exact parameter count and its
  fraction of the parent (in the budget's metric); and, when the deployed choice is not the router's argmax (which
  missed the dead zone), the argmax and its fraction under ``router_argmax``."""
  def describe(choice: Choice) -> dict[str, Any]:
    count = choice_param_count(setup.config, choice, setup.depth_order)
    record = {"params": count, "fraction": count / setup.parent_params}
    if setup.budget_metric == "active_params":
      active = choice_param_count(setup.config, choice, setup.depth_order, active=True)
      record.update(active_params=active, fraction=active / setup.parent_size)
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
  return place_frozen(teacher_params, shardings, setup.memory.teacher_dtype)


def release_compiled_programs() -> None:
  """Drops every program JAX has compiled in this process (``jax.clear_caches``) and collects the garbage.

  Library-level jitted functions keep one executable per shape and static argument they meet, for the life of the
  process, and each executable holds a few memory mappings of JIT code. A process that compiles many programs (the
  study's arms, each with its evaluation's decode programs per model and prompt length; a whole test run) reaches
  the kernel's limit on mappings per process (``vm.max_map_count``, 65,530 by default), after which XLA's compiler
  crashes. Call it between independent pieces of work; what runs next compiles again what it needs."""
  jax.clear_caches()
  gc.collect()


def place_frozen(params: Params, shardings: Params, dtype: str) -> Params:
  """Frozen params (a teacher) in their shardings, their floating leaves in ``dtype``, cast on the devices."""
  teacher = shard_params(params, shardings)
  dtype = jnp.dtype(dtype)
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


def with_shardings(abstract_boxed: Any, mesh: Mesh, rules: LogicalRules) -> tuple[Any, Any]:
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
  state_shardings, abstract_state = with_shardings(abstract_boxed_state(setup, tx, router_tx, seed), mesh, rules)
  tokens = batch_sharding(mesh, rules)
  step = sharded_jit(make_elastic_step(setup, tx, router_tx), mesh, rules,
                     in_shardings=(state_shardings, state_shardings.params, tokens, replicated(mesh),
                                   replicated(mesh)),
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
  state_shardings, abstract_state = with_shardings(boxed_state, mesh, rules)
  tokens = batch_sharding(mesh, rules)
  step = sharded_jit(make_lm_step(config, tx, grad_accum_steps, remat), mesh, rules,
                     in_shardings=(state_shardings, tokens), out_shardings=(state_shardings, replicated(mesh)),
                     donate_argnums=(0,))
  init = sharded_jit(lambda key: nn.meta.unbox(init_lm_state(config, tx, key)), mesh, rules,
                     in_shardings=(replicated(mesh),), out_shardings=state_shardings)
  return ShardedTraining(step, init, state_shardings, abstract_state, tokens)


class StageFeed:
  """A stage's token iterator as a ``Feed``: each batch checked against the stage and placed on the mesh."""

  def __init__(self, iterator: TokenIterator, stage: Stage, sharding: jax.sharding.Sharding):
    self._iterator, self._stage, self._sharding = iterator, stage, sharding

  def batch(self, step: int) -> jax.Array:
    del step  # a stage reads its stream in order
    return _check_batch(next(self._iterator), self._stage, self._sharding)

  def get_state(self) -> dict[str, Any]:
    return self._iterator.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._iterator.set_state(state)


def _check_batch(tokens: Any, stage: Stage, sharding: jax.sharding.Sharding) -> jax.Array:
  """This process's rows of a stage batch -> the global batch on the mesh (``stage.batch_size`` is global)."""
  local_rows = distributed.local_batch_size(stage.batch_size, f"stage {stage.name!r}: batch_size")
  expected = (local_rows, stage.seq_len + 1)
  if tuple(np.shape(tokens)) != expected:
    share = f" (this process's share of {stage.batch_size} rows)" if local_rows != stage.batch_size else ""
    raise ValueError(f"stage {stage.name!r}: the data source gave a batch of shape {tuple(np.shape(tokens))}, "
                     f"expected {expected}{share} (batch_size, seq_len + 1 tokens: inputs plus next-token targets).")
  return distributed.global_batch(tokens, sharding)


def log(message: str) -> None:
  """One line of the run's log."""
  print(f"[elastic_jax] {message}", flush=True)


def _log(label: str, message: str) -> None:
  log(f"{label}: {message}")


def _resume_message(segments: Sequence[Segment], step: int, restored: bool) -> str:
  total = sum(segment.steps for segment in segments)
  if not restored:
    return f"starting at step 0 of {total}"
  index, done_in_segment = _stage_at(segments, step)
  if index == len(segments):
    return f"resuming from the checkpoint of step {step} of {total}: every stage is done"
  if len(segments) == 1:
    return f"resuming from the checkpoint of step {step} of {total}"
  where = "at the start of" if done_in_segment == 0 else f"{done_in_segment} steps into"
  return f"resuming from the checkpoint of step {step} of {total}, {where} {segments[index].name}"


def stage_change(saved: Mapping[str, Any], current: Mapping[str, Any], stages: Sequence[Stage | Segment], step: int,
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


def write_atomically(path: str, write: Callable[[Any], Any]) -> None:
  """``write(file)`` into a temporary file, then renamed into place: readers never see half a file."""
  temporary = f"{path}.tmp"
  with open(temporary, "w", encoding="utf-8") as f:
    write(f)
  os.replace(temporary, path)


def write_json_atomically(path: str, value: Any, **dump_kwargs: Any) -> None:
  """Writes JSON so that readers never see half a file."""
  write_atomically(path, lambda f: json.dump(value, f, **dump_kwargs))


def read_json(path: str | os.PathLike) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def read_metrics_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Every row of a run's ``metrics.jsonl`` (one per step), or none when the run has not logged yet."""
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


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
    log(f"warning: {path} has no rows for steps {missing[0]}..{missing[-1]} ({len(missing)} "
        "steps), written before they were saved with every checkpoint")
  write_atomically(path, lambda f: f.writelines(rows[step] for step in sorted(rows)))


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


def setup_from_description(config: ModelConfig, description: Mapping[str, Any]) -> ElasticSetup:
  """The inverse of ``describe_run`` for the setup: the ``ElasticSetup`` of a recorded run (its ``space`` and
  ``elastic`` entries; the router schedule and memory levers when recorded), e.g. to deploy its router again."""
  from elastic_jax.elastic.router import RouterSchedule  # pylint: disable=import-outside-toplevel
  from elastic_jax.elastic.space import ElasticSpace  # pylint: disable=import-outside-toplevel
  from elastic_jax.train.memory import MemoryConfig  # pylint: disable=import-outside-toplevel
  elastic = dict(description["elastic"])
  budgets, depth = tuple(float(b) for b in elastic.pop("budgets")), elastic.pop("depth_order", None)
  depth = tuple(range(config.num_layers)) if depth is None else tuple(int(i) for i in depth)
  schedule = RouterSchedule(**description.get("router_schedule", {"total_steps": 1}))
  memory = MemoryConfig.from_dict(description["memory"]) if "memory" in description else MemoryConfig()
  return ElasticSetup(config, ElasticSpace.from_dict(description["space"], config), budgets, depth, schedule,
                      memory=memory, **elastic)
