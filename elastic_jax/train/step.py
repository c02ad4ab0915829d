"""The jitted train steps: plain next-token training (parent pretraining, baselines) and the elastic step.

Elastic step (spec §5–§6), all inside one compiled program:

  budgets ~ stage probabilities (per sample, from the step's PRNG key)
  router(budget) -> Gumbel-softmax sample per axis -> nested masks (exact binary forward, straight-through backward)
  student(tokens, masks) vs frozen teacher(tokens) -> forward KL (+ optional CE)
  expected params(router probabilities) vs budget target -> router loss (+ full-budget anchor)
  grads: model <- KD only (the router loss does not touch the model); router <- KD + lambda * router loss

Budgets only change mask *values*, so one compilation serves every budget draw and every stage with the same
shapes; stage probabilities are an input, not a constant.

Gradient accumulation (``grad_accum_steps`` k): the global batch is split into k micro-batches run one after the
other under ``lax.scan`` (micro-batch i takes rows i, i+k, i+2k, ..., so every micro-batch keeps the batch's
spread over the data-parallel devices), their gradients are summed, and one optimizer update follows. Every random
draw (budgets, Gumbel noise) is made for the whole global batch before the split, and each micro-batch's loss is its
share of the global mean, so k micro-batches compute the same step as one batch of the global size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from elastic_jax.elastic import router as router_lib
from elastic_jax.elastic.masks import masks_from_weights
from elastic_jax.elastic.param_count import expected_memory_bytes, expected_param_count, memory_bytes, param_count
from elastic_jax.elastic.space import AXES, PER_LAYER_AXES, Choice, ElasticSpace, kind_count
from elastic_jax.model import HybridLM, ModelConfig
from elastic_jax.model.hybrid import RematPolicies, remat_policies
from elastic_jax.train.losses import cross_entropy, forward_kl, mean_by_group
from elastic_jax.train.sampling import sample_budgets

Array = jax.Array
Params = Any


@flax.struct.dataclass
class TrainState:
  """Everything a step changes. The PRNG key is stored as raw key data so checkpoints hold plain arrays."""

  step: Array
  params: Params
  opt_state: Any
  rng: Array
  router_params: Params = None
  router_opt_state: Any = None

  def key(self) -> Array:
    return jax.random.wrap_key_data(self.rng)


def split_batch(tokens: Array) -> tuple[Array, Array]:
  """[b, l+1] token ids -> (inputs [b, l], next-token targets [b, l])."""
  return tokens[:, :-1], tokens[:, 1:]


# ------------------------------------------------------------------------------------------------ micro-batches
TEACHER_DTYPES = ("float32", "bfloat16")


def check_grad_accum_steps(grad_accum_steps: Any, name: str = "grad_accum_steps") -> None:
  if isinstance(grad_accum_steps, bool) or not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
    raise ValueError(f"{name}={grad_accum_steps!r} must be a positive integer (1 = no accumulation).")


def check_grad_accum(batch_size: int, grad_accum_steps: int, where: str) -> int:
  """The micro-batch size of ``batch_size`` rows split into ``grad_accum_steps`` micro-batches; ``where`` names the
  stage (or step) in the error when it does not divide."""
  check_grad_accum_steps(grad_accum_steps)
  if batch_size % grad_accum_steps:
    raise ValueError(f"{where}: batch_size={batch_size} is not divisible by grad_accum_steps={grad_accum_steps}; "
                     "make the batch size a multiple of the number of micro-batches.")
  return batch_size // grad_accum_steps


def micro_batches(x: Array, k: int) -> Array:
  """[B, ...] -> [k, B/k, ...]: micro-batch i holds rows i, i+k, i+2k, ... (strided, so that each micro-batch
  draws rows from every data-parallel shard of the batch rather than from a few devices)."""
  return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)


def micro_rows(x: Array, index: Array, k: int) -> Array:
  """Rows of micro-batch ``index`` of a global-batch array [B, ...] -> [B/k, ...] (same split as ``micro_batches``)."""
  return jax.lax.dynamic_index_in_dim(x.reshape(x.shape[0] // k, k, *x.shape[1:]), index, axis=1, keepdims=False)


def merge_micro_batches(x: Array) -> Array:
  """Inverse of ``micro_batches``: [k, B/k, ...] -> [B, ...] in the global batch's row order."""
  return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def accumulate_gradients(value_and_grad_fn: Callable, xs: Any, grads_like: Any) -> tuple[Array, Any, Any]:
  """Sums ``value_and_grad_fn(x) -> ((loss, aux), grads)`` over micro-batches ``xs`` (leading axis k) with
  ``lax.scan``; returns (summed loss, summed grads, aux stacked [k, ...]).

  Sums are kept in at least fp32 whatever the params' dtype, and only one micro-batch's activations are alive at a
  time, which is the point of accumulating.
  """
  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)), grads_like)

  def body(carry, x):
    loss_sum, grad_sum = carry
    (loss, aux), grads = value_and_grad_fn(x)
    return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), aux

  (loss, grads), aux = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), xs)
  return loss, grads, aux


# ------------------------------------------------------------------------------------------------ plain LM step
def make_lm_step(config: ModelConfig, tx: optax.GradientTransformation, grad_accum_steps: int = 1,
                 remat: Any = ()) -> Callable:
  """Next-token cross-entropy training of one model: ``step(state, tokens [b, l+1]) -> (state, metrics)``.

  grad_accum_steps: micro-batches per step (b must divide by it); remat: per-block-kind rematerialisation
  (``remat_policies``), e.g. ``{"mamba": "full"}``.
  """
  check_grad_accum_steps(grad_accum_steps)
  k = grad_accum_steps
  model = HybridLM(config, remat=remat_policies(remat))

  def step(state: TrainState, tokens: Array) -> tuple[TrainState, dict[str, Array]]:
    inputs, targets = split_batch(tokens)
    batch = inputs.shape[0]
    check_grad_accum(batch, k, "the LM step's batch")

    def micro_loss(params, micro):
      micro_inputs, micro_targets = micro
      per_sample = cross_entropy(model.apply({"params": params}, micro_inputs), micro_targets)
      return jnp.sum(per_sample) / batch, ()  # this micro-batch's share of the global-batch mean

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    loss, grads, _ = accumulate_gradients(lambda micro: grad_fn(state.params, micro),
                                          (micro_batches(inputs, k), micro_batches(targets, k)), state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step


# ------------------------------------------------------------------------------------------------ elastic step
@dataclasses.dataclass(frozen=True)
class ElasticSetup:
  """What the elastic step needs besides the train state; static (hashable) except the arrays it holds.

  budgets: target fractions of the parent's parameter count, one per family member (e.g. (1.0, 0.75, 0.5)).
  depth_order: block indices, most important first (from importance), used by depth masks and counts.
  hard: straight-through binary masks (default, D-5) or soft staircase masks.
  grad_accum_steps, remat, teacher_dtype: memory levers that leave the step's result unchanged (up to the
    teacher's rounding in bf16): micro-batches per step, the student's per-block-kind rematerialisation (a dict
    or ``remat_policies`` pairs; stored as the hashable pairs), and the frozen teacher's storage dtype.
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
  # What a budget is a fraction of: "params" (the paper) or "memory" (weights + KV cache + SSM state when serving
  # one sequence of memory_context tokens, weights and caches in bf16).
  budget_metric: str = "params"
  memory_context: int = 8192
  grad_accum_steps: int = 1
  remat: RematPolicies = ()
  # "bfloat16" halves the teacher's memory: its params are stored and its forward computed in bf16 (the logits
  # stay fp32 for the KL). "float32" keeps the params fp32 and computes in the model's compute dtype.
  teacher_dtype: str = "float32"

  def __post_init__(self):
    object.__setattr__(self, "remat", remat_policies(self.remat))
    check_grad_accum_steps(self.grad_accum_steps)
    if self.teacher_dtype not in TEACHER_DTYPES:
      raise ValueError(f"teacher_dtype={self.teacher_dtype!r} is not one of {TEACHER_DTYPES}.")
    if self.estimator not in router_lib.ESTIMATORS:
      raise ValueError(f"router estimator={self.estimator!r} is not one of {router_lib.ESTIMATORS}.")
    if not self.budgets:
      raise ValueError("budgets is empty: give at least one target fraction, e.g. (1.0, 0.75, 0.5).")
    for b in self.budgets:
      if not 0.0 < b <= 1.0:
        raise ValueError(f"budget {b} is outside (0, 1]: budgets are fractions of the parent's parameter count.")
    if self.budget_metric not in ("params", "memory"):
      raise ValueError(f"budget_metric={self.budget_metric!r} is not one of ('params', 'memory').")
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
    return float(self.parent_params)

  def target_sizes(self) -> np.ndarray:
    return np.asarray(self.budgets, np.float64) * self.parent_size

  def expected_size(self, probs: dict[str, Array], depth_order: np.ndarray) -> Array:
    """The differentiable expected size under the router's probabilities, in the budget's metric."""
    if self.budget_metric == "memory":
      return expected_memory_bytes(self.config, self.space, probs, depth_order, context=self.memory_context)
    return expected_param_count(self.config, self.space, probs, depth_order)

  @property
  def student(self) -> HybridLM:
    return HybridLM(self.config, remat=self.remat)

  @property
  def teacher(self) -> HybridLM:
    """The frozen teacher's module: the model's compute dtype, lowered to bf16 when ``teacher_dtype`` is bf16."""
    if self.teacher_dtype == "bfloat16":
      return HybridLM(dataclasses.replace(self.config, dtype="bfloat16"))
    return HybridLM(self.config)

  def full_index(self) -> dict[str, int]:
    """Per routed axis, the index of the parent's (largest) size: the anchor of the 100% budget."""
    return {axis.name: axis.num_choices - 1 for axis in self.router.axes}


def check_budget_probs(probs: Sequence[float], num_budgets: int, where: str = "budget_probs") -> np.ndarray:
  probs = np.asarray(probs, np.float64)
  if probs.shape != (num_budgets,):
    raise ValueError(f"{where} has {probs.size} entries but there are {num_budgets} budgets.")
  if (probs < 0).any() or abs(probs.sum() - 1.0) > 1e-6:
    raise ValueError(f"{where} {probs.tolist()} must be non-negative and sum to 1 (they sum to {probs.sum():.6g}).")
  return probs.astype(np.float32)


def make_elastic_step(setup: ElasticSetup, tx: optax.GradientTransformation,
                      router_tx: optax.GradientTransformation) -> Callable:
  """``step(state, teacher_params, tokens [b, l+1], budget_probs [n_budgets]) -> (state, metrics)``."""
  student, teacher = setup.student, setup.teacher
  router = setup.router
  space, config = setup.space, setup.config
  depth_order = np.asarray(setup.depth_order, np.int32)
  targets = jnp.asarray(setup.target_sizes(), jnp.float32)
  full_index = setup.full_index()
  full_budget = int(np.argmax(setup.budgets)) if max(setup.budgets) == 1.0 else -1
  num_budgets = len(setup.budgets)
  k = setup.grad_accum_steps

  def step(state: TrainState, teacher_params: Params, tokens: Array, budget_probs: Array
           ) -> tuple[TrainState, dict[str, Array]]:
    inputs, next_tokens = split_batch(tokens)
    batch = inputs.shape[0]
    check_grad_accum(batch, k, "the elastic step's batch")
    key, budget_key, route_key = jax.random.split(state.key(), 3)
    budget_ids = sample_budgets(budget_key, batch, budget_probs, stratified=setup.stratified)
    tau, scale = setup.schedule.tau(state.step), setup.schedule.scale(state.step)

    def route(router_params):
      # The whole global batch's routing, with one draw of Gumbel noise whatever the micro-batch split.
      return router_lib.route(route_key, router.apply({"params": router_params}, budget_ids), tau, scale)

    def router_loss_fn(router_params):
      # Depends on the router only (not on the model), so it needs no micro-batching.
      samples = route(router_params)
      expected = setup.expected_size(router_lib.probabilities(samples, space), depth_order)
      router_loss = router_lib.budget_loss(expected, targets[budget_ids], setup.dead_zone)
      if full_budget >= 0:
        anchor = router_lib.full_choice_anchor({n: s.probs for n, s in samples.items()}, full_index)
        router_loss = router_loss + jnp.where(budget_ids == full_budget, anchor, 0.0)
      # Every budget's argmax choice, whether sampled in this batch or not.
      argmax_size = setup.expected_size(router_lib.argmax_weights(
          router.apply({"params": router_params}, jnp.arange(num_budgets)), scale, space), depth_order)
      argmax_loss = jnp.mean(router_lib.budget_loss(argmax_size, targets, setup.dead_zone))
      total = jnp.mean(router_loss) + setup.argmax_loss_weight * argmax_loss
      return setup.router_loss_weight * total, (router_loss, expected, argmax_size)

    def kd_fn(params, router_params, micro):
      index, micro_inputs, micro_next = micro
      # The router is tiny: rerouting the global batch and taking this micro-batch's rows keeps the noise global.
      samples = jax.tree.map(lambda x: micro_rows(x, index, k), route(router_params))
      weights = router_lib.candidate_weights(samples, space, hard=setup.hard, estimator=setup.estimator)
      masks = masks_from_weights(config, space, weights, depth_order)
      teacher_logits = jax.lax.stop_gradient(teacher.apply({"params": teacher_params}, micro_inputs))
      logits = student.apply({"params": params}, micro_inputs, masks=masks)
      kd = forward_kl(logits, teacher_logits, temperature=setup.kd_temperature)  # [b/k]
      if setup.ce_weight:
        kd = kd + setup.ce_weight * cross_entropy(logits, micro_next)
      return jnp.sum(kd) / batch, kd  # this micro-batch's share of the global-batch mean

    (router_term, (router_loss, expected, argmax_size)), router_loss_grads = jax.value_and_grad(
        router_loss_fn, has_aux=True)(state.router_params)
    kd_grad_fn = jax.value_and_grad(kd_fn, argnums=(0, 1), has_aux=True)
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
    new_state = state.replace(
        step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state,
        router_params=optax.apply_updates(state.router_params, router_updates), router_opt_state=router_opt_state,
        rng=jax.random.key_data(key))
    return new_state, metrics

  return step


def init_elastic_state(setup: ElasticSetup, params: Params, tx: optax.GradientTransformation,
                       router_tx: optax.GradientTransformation, seed: int) -> TrainState:
  key, router_key = jax.random.split(jax.random.key(seed))
  router_params = setup.router.init(router_key, jnp.zeros((1,), jnp.int32))["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.key_data(key), router_params=router_params,
                    router_opt_state=router_tx.init(router_params))


# ------------------------------------------------------------------------------------------------ deployment
def _choice_from_indices(setup: ElasticSetup, indices: dict[str, np.ndarray]) -> Choice:
  """Per routed axis, candidate indices [num_layers] (one entry for homogeneous axes) -> the ``Choice``."""
  config, space = setup.config, setup.space
  fields = {}
  for axis in ("hidden", "depth", *PER_LAYER_AXES):
    if axis not in indices:  # a block kind absent from the pattern
      fields[axis] = ()
      continue
    value = tuple(space.candidates(axis)[int(i)] for i in indices[axis])
    if axis in ("hidden", "depth"):
      fields[axis] = value[0]
    else:
      fields[axis] = value * kind_count(config, AXES[axis][0]) if len(value) == 1 else value
  return Choice(**fields)


def router_argmax_choices(setup: ElasticSetup, router_params: Params) -> list[Choice]:
  """The router's argmax per axis and layer for each budget (no noise), in budget order (spec §7)."""
  logits = setup.router.apply({"params": router_params}, jnp.arange(len(setup.budgets)))
  picked = {name: np.asarray(index) for name, index in router_lib.deterministic_choice(logits).items()}
  return [_choice_from_indices(setup, {name: idx[b] for name, idx in picked.items()})
          for b in range(len(setup.budgets))]


def deployed_choices(setup: ElasticSetup, router_params: Params, top_k: int = 4096) -> list[Choice]:
  """The ``Choice`` each budget deploys with, in budget order.

  The router's argmax (spec §7) when its size lands within ``dead_zone`` of the budget's target. Otherwise the most
  probable choice under the router's distribution that does land there: the joint choices are ranked by their
  summed logits (the order of their probability at any logit scale, the axes and layers being independent), the
  ``top_k`` best are found exactly by a beam over axes and layers, and the first within the dead zone is taken. When
  none of them is, the argmax stays (``deployed_choice_records`` shows how far it is from the target).
  """
  argmax = router_argmax_choices(setup, router_params)
  logits = {name: np.asarray(l, np.float64)
            for name, l in setup.router.apply({"params": router_params}, jnp.arange(len(setup.budgets))).items()}
  factors = [(name, layer) for name in sorted(logits) for layer in range(logits[name].shape[1])]
  depth_order = np.asarray(setup.depth_order)
  targets = setup.target_sizes()
  choices = []
  for b, choice in enumerate(argmax):
    scores, picks = np.zeros(1), np.zeros((1, 0), np.int64)
    for name, layer in factors:  # exact top-k of a sum of independent terms: prune to k after every term
      row = logits[name][b, layer]
      total = (scores[:, None] + row[None, :]).reshape(-1)
      keep = np.argsort(-total, kind="stable")[:top_k]
      picks = np.concatenate([picks[keep // row.size], (keep % row.size)[:, None]], axis=1)
      scores = total[keep]
    one_hot = {}
    for column, (name, layer) in enumerate(factors):
      one_hot.setdefault(name, []).append(np.eye(logits[name].shape[-1])[picks[:, column]])
    stacked = {name: jnp.asarray(np.stack(rows, axis=1), jnp.float32) for name, rows in one_hot.items()}
    probs = router_lib._layout(stacked, setup.space)  # pylint: disable=protected-access
    sizes = np.asarray(setup.expected_size(probs, depth_order), np.float64)
    inside = np.flatnonzero(np.abs(sizes / targets[b] - 1.0) <= setup.dead_zone)
    if not inside.size or inside[0] == 0:  # the best-scored joint choice is the argmax
      choices.append(choice)
      continue
    best = picks[inside[0]]
    indices = {}
    for column, (name, layer) in enumerate(factors):
      indices.setdefault(name, []).append(best[column])
    choices.append(_choice_from_indices(setup, {name: np.asarray(v) for name, v in indices.items()}))
  return choices
