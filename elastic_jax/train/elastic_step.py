"""The elastic train step (spec §5–§6), all inside one compiled program:

  budgets ~ stage probabilities (per sample, from the step's PRNG key)
  router(budget) -> Gumbel-softmax sample per axis -> nested masks (exact binary forward, straight-through backward)
  student(tokens, masks) vs frozen teacher(tokens) -> forward KL (+ optional CE)
  expected params(router probabilities) vs budget target -> router loss (+ full-budget anchor)
  grads: model <- KD only (the router loss does not touch the model); router <- KD + lambda * router loss

Budgets only change mask *values*, so one compilation serves every budget draw and every stage with the same
shapes; stage probabilities are an input, not a constant. So are ``Pins``: in a pinned stage every sample trains its
budget's fixed choice (the one deployment extracts) and the router stays as it is. With ``memory.grad_accum_steps`` k the KD part runs as k
micro-batches (``train.microbatch``); the routing and budget draws are made once for the global batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from elastic_jax.elastic import router as router_lib
from elastic_jax.elastic.masks import masks_from_weights
from elastic_jax.elastic.param_count import (active_param_count, expected_memory_bytes, expected_param_count,
                                             memory_bytes, param_count)
from elastic_jax.elastic.space import ElasticSpace
from elastic_jax.model import HybridLM, ModelConfig
from elastic_jax.train.lm_step import split_batch
from elastic_jax.train.losses import kd_loss, mean_by_group
from elastic_jax.train.microbatch import (accumulate_gradients, check_grad_accum,
                                          merge_micro_batches, micro_batches, micro_rows)
from elastic_jax.train.memory import MemoryConfig, teacher_config
from elastic_jax.train.sampling import sample_budgets
from elastic_jax.train.state import TrainState

Array = jax.Array
Params = Any
# What a budget is a fraction of (see ``ElasticSetup.budget_metric``).
BUDGET_METRICS = ("params", "active_params", "memory")


@dataclasses.dataclass(frozen=True)
class ElasticSetup:
  """What the elastic step needs besides the train state; static (hashable) except the arrays it holds.

  budgets: target fractions of the parent's parameter count, one per family member (e.g. (1.0, 0.75, 0.5)).
  depth_order: block indices, most important first (from importance), used by depth masks and counts.
  hard: straight-through binary masks (default, D-5) or soft staircase masks.
  memory: the levers that trade compute or precision for memory and leave the step's result unchanged (up to the
    teacher's rounding in bf16): micro-batches per step, the student's per-block-kind rematerialisation, and the
    frozen teacher's storage dtype (``train.memory.MemoryConfig``).
  """

  config: ModelConfig
  space: ElasticSpace
  budgets: tuple[float, ...]
  depth_order: tuple[int, ...]
  schedule: router_lib.RouterSchedule
  router_width: int = 256
  hard: bool = True
  estimator: str = "chosen"  # straight-through estimator of hard masks: "chosen" (D-5) or "softmax"
  kd_temperature: float = 1.0
  ce_weight: float = 0.0
  router_loss_weight: float = 1.0
  # Weight of the budget loss on each budget's router argmax (the choice extraction cuts); 0 keeps the paper's
  # loss on sampled choices alone (D-6).
  argmax_loss_weight: float = 0.0
  dead_zone: float = 0.02
  stratified: bool = False
  # What a budget is a fraction of (BUDGET_METRICS): "params" (the paper: every parameter), "active_params" (the
  # parameters one token computes with: an MoE block counts its num_experts_per_tok routed experts, not all) or
  # "memory" (weights + KV cache + SSM state when serving one sequence of memory_context tokens, in bf16).
  budget_metric: str = "params"
  memory_context: int = 8192
  memory: MemoryConfig = MemoryConfig()

  def __post_init__(self):
    if not isinstance(self.memory, MemoryConfig):
      raise TypeError(f"memory={self.memory!r} is not a MemoryConfig, e.g. MemoryConfig(grad_accum_steps=2).")
    if self.estimator not in router_lib.ESTIMATORS:
      raise ValueError(f"router estimator={self.estimator!r} is not one of {router_lib.ESTIMATORS}.")
    if not self.budgets:
      raise ValueError("budgets is empty: give at least one target fraction, e.g. (1.0, 0.75, 0.5).")
    for b in self.budgets:
      if not 0.0 < b <= 1.0:
        raise ValueError(f"budget {b} is outside (0, 1]: budgets are fractions of the parent's parameter count.")
    if self.budget_metric not in BUDGET_METRICS:
      raise ValueError(f"budget_metric={self.budget_metric!r} is not one of {BUDGET_METRICS}.")
    if sorted(self.depth_order) != list(range(self.config.num_layers)):
      raise ValueError(f"depth_order {list(self.depth_order)} is not a permutation of range({self.config.num_layers}).")
    self.space.validate(self.config)

  @property
  def router(self) -> router_lib.Router:
    return router_lib.Router(router_lib.router_axes(self.space, self.config), len(self.budgets), self.router_width)

  @property
  def parent_params(self) -> int:
    return param_count(self.config)

  @property
  def parent_size(self) -> float:
    """The parent's size in the budget's metric (parameters, or bytes of deployment memory), as a float: the step
    divides traced values by it, and a Python int above 2**31 (a 12B parent's count) cannot enter a jitted
    computation."""
    if self.budget_metric == "memory":
      return float(memory_bytes(self.config, context=self.memory_context))
    if self.budget_metric == "active_params":
      return float(active_param_count(self.config))
    return float(self.parent_params)

  def target_sizes(self) -> np.ndarray:
    return np.asarray(self.budgets, np.float64) * self.parent_size

  def expected_size(self, probs: dict[str, Array], depth_order: np.ndarray) -> Array:
    """The differentiable expected size under the router's probabilities, in the budget's metric."""
    if self.budget_metric == "memory":
      return expected_memory_bytes(self.config, self.space, probs, depth_order, context=self.memory_context)
    return expected_param_count(self.config, self.space, probs, depth_order,
                                active=self.budget_metric == "active_params")

  @property
  def student(self) -> HybridLM:
    return HybridLM(self.config, remat=self.memory.remat)

  @property
  def teacher(self) -> HybridLM:
    """The frozen teacher's module: the model's compute dtype, lowered to bf16 when ``memory.teacher_dtype`` is bf16."""
    return HybridLM(teacher_config(self.config, self.memory.teacher_dtype))

  def full_index(self) -> dict[str, int]:
    """Per routed axis, the index of the parent's (largest) size: the anchor of the 100% budget."""
    return {axis.name: axis.num_choices - 1 for axis in self.router.axes}


class Pins(NamedTuple):
  """Fixed choices for the step: ``indices[axis]`` int32 [n_budgets, num_layers] (``deploy.pinned_indices``), used
  where ``active`` (a bool scalar) is true. Pinned steps train each budget's pinned sub-network and leave the router
  and its optimizer state unchanged."""

  indices: dict[str, Array]
  active: Array

  @classmethod
  def off(cls, setup: "ElasticSetup") -> "Pins":
    """No pinning (every sample routed), in the shapes a pinned stage passes: the same compiled step serves both."""
    return cls({axis.name: jnp.zeros((len(setup.budgets), axis.num_layers), jnp.int32) for axis in setup.router.axes},
               jnp.asarray(False))


def check_budget_probs(probs: Sequence[float], num_budgets: int, where: str = "budget_probs") -> np.ndarray:
  probs = np.asarray(probs, np.float64)
  if probs.shape != (num_budgets,):
    raise ValueError(f"{where} has {probs.size} entries but there are {num_budgets} budgets.")
  if (probs < 0).any() or abs(probs.sum() - 1.0) > 1e-6:
    raise ValueError(f"{where} {probs.tolist()} must be non-negative and sum to 1 (they sum to {probs.sum():.6g}).")
  return probs.astype(np.float32)


def _router_loss(setup: ElasticSetup, router_params: Params, route: Callable, budget_ids: Array, scale: Array
                 ) -> tuple[Array, tuple[Array, Array, Array]]:
  """The router's loss: the budget loss of the sampled choices (+ the 100% budget's anchor to the parent) and,
  weighted by ``argmax_loss_weight``, of every budget's argmax choice, whether sampled in this batch or not.

  Depends on the router only (not on the model), so it needs no micro-batching. Returns (weighted loss,
  (per-sample loss, per-sample expected size, per-budget argmax size)).
  """
  space, depth_order = setup.space, np.asarray(setup.depth_order, np.int32)
  targets = jnp.asarray(setup.target_sizes(), jnp.float32)
  full_budget = int(np.argmax(setup.budgets)) if max(setup.budgets) == 1.0 else -1
  samples = route(router_params)
  expected = setup.expected_size(router_lib.probabilities(samples, space), depth_order)
  router_loss = router_lib.budget_loss(expected, targets[budget_ids], setup.dead_zone)
  if full_budget >= 0:
    anchor = router_lib.full_choice_anchor({n: s.probs for n, s in samples.items()}, setup.full_index())
    router_loss = router_loss + jnp.where(budget_ids == full_budget, anchor, 0.0)
  argmax_size = setup.expected_size(router_lib.argmax_weights(
      setup.router.apply({"params": router_params}, jnp.arange(len(setup.budgets))), scale, space), depth_order)
  argmax_loss = jnp.mean(router_lib.budget_loss(argmax_size, targets, setup.dead_zone))
  total = jnp.mean(router_loss) + setup.argmax_loss_weight * argmax_loss
  return setup.router_loss_weight * total, (router_loss, expected, argmax_size)


def _distillation_loss(setup: ElasticSetup, params: Params, router_params: Params, teacher_params: Params,
                       route: Callable, micro: tuple[Array, Array, Array], batch: int) -> tuple[Array, Array]:
  """One micro-batch's KD loss (+ CE) of the masked student against the frozen teacher: (its share of the
  global-batch mean, per-sample loss [b/k])."""
  index, micro_inputs, micro_next = micro
  # The router is tiny: rerouting the global batch and taking this micro-batch's rows keeps the noise global.
  samples = jax.tree.map(lambda x: micro_rows(x, index, setup.memory.grad_accum_steps), route(router_params))
  weights = router_lib.candidate_weights(samples, setup.space, hard=setup.hard, estimator=setup.estimator)
  masks = masks_from_weights(setup.config, setup.space, weights, np.asarray(setup.depth_order, np.int32))
  teacher_logits = jax.lax.stop_gradient(setup.teacher.apply({"params": teacher_params}, micro_inputs))
  logits = setup.student.apply({"params": params}, micro_inputs, masks=masks)
  kd = kd_loss(logits, teacher_logits, micro_next, temperature=setup.kd_temperature,
               ce_weight=setup.ce_weight)  # [b/k]
  return jnp.sum(kd) / batch, kd


def make_elastic_step(setup: ElasticSetup, tx: optax.GradientTransformation,
                      router_tx: optax.GradientTransformation) -> Callable:
  """``step(state, teacher_params, tokens [b, l+1], budget_probs [n_budgets], pins=None) -> (state, metrics)``;
  ``pins`` (``Pins``) fixes each budget's choice where active."""
  router, num_budgets, k = setup.router, len(setup.budgets), setup.memory.grad_accum_steps

  def step(state: TrainState, teacher_params: Params, tokens: Array, budget_probs: Array, pins: Pins | None = None
           ) -> tuple[TrainState, dict[str, Array]]:
    inputs, next_tokens = split_batch(tokens)
    batch = inputs.shape[0]
    check_grad_accum(batch, k, "the elastic step's batch")
    key, budget_key, route_key = jax.random.split(state.key(), 3)
    budget_ids = sample_budgets(budget_key, batch, budget_probs, stratified=setup.stratified)
    tau, scale = setup.schedule.tau(state.step), setup.schedule.scale(state.step)

    def route(router_params):
      # The whole global batch's routing, with one draw of Gumbel noise whatever the micro-batch split.
      samples = router_lib.route(route_key, router.apply({"params": router_params}, budget_ids), tau, scale)
      return samples if pins is None else router_lib.pin(samples, pins.indices, budget_ids, pins.active)

    (router_term, (router_loss, expected, argmax_size)), router_loss_grads = jax.value_and_grad(
        lambda rp: _router_loss(setup, rp, route, budget_ids, scale), has_aux=True)(state.router_params)
    kd_grad_fn = jax.value_and_grad(
        lambda p, rp, m: _distillation_loss(setup, p, rp, teacher_params, route, m, batch), argnums=(0, 1),
        has_aux=True)
    micro = (jnp.arange(k), micro_batches(inputs, k), micro_batches(next_tokens, k))
    kd_mean, (grads, kd_router_grads), kd = accumulate_gradients(
        lambda m: kd_grad_fn(state.params, state.router_params, m), micro, (state.params, state.router_params))
    kd = merge_micro_batches(kd)
    router_grads = jax.tree.map(jnp.add, kd_router_grads, router_loss_grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    router_updates, router_opt_state = router_tx.update(router_grads, state.router_opt_state, state.router_params)
    kd_per_budget, count_per_budget = mean_by_group(kd, budget_ids, num_budgets)
    size_per_budget, _ = mean_by_group(expected / setup.parent_size, budget_ids, num_budgets)
    metrics = {
        "loss": kd_mean + router_term, "kd": jnp.mean(kd), "router_loss": jnp.mean(router_loss),
        "kd_per_budget": kd_per_budget, "samples_per_budget": count_per_budget,
        "expected_size_per_budget": size_per_budget, "argmax_size_per_budget": argmax_size / setup.parent_size,
        "tau": tau, "logit_scale": scale,
        "grad_norm": optax.tree.norm(grads),
    }
    router_params = optax.apply_updates(state.router_params, router_updates)
    if pins is not None:  # a pinned step leaves the router and its moments as they are
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(pins.active, o, n), new, old)
      router_params = keep(router_params, state.router_params)
      router_opt_state = keep(router_opt_state, state.router_opt_state)
      metrics["pinned"] = jnp.asarray(pins.active, jnp.int32)
    new_state = state.replace(
        step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state,
        router_params=router_params, router_opt_state=router_opt_state, rng=jax.random.key_data(key))
    return new_state, metrics

  return step


def init_elastic_state(setup: ElasticSetup, params: Params, tx: optax.GradientTransformation,
                       router_tx: optax.GradientTransformation, seed: int) -> TrainState:
  key, router_key = jax.random.split(jax.random.key(seed))
  router_params = setup.router.init(router_key, jnp.zeros((1,), jnp.int32))["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.key_data(key), router_params=router_params,
                    router_opt_state=router_tx.init(router_params))

