"""The router: for a target budget, a distribution over candidate sizes on every elastic axis (spec §5).

One small MLP per axis maps the one-hot budget to logits over that axis's candidates (per layer in heterogeneous
mode); a budget between two trained ones feeds the linear interpolation of their one-hots (``budget_weights``). Router parameters are their own tree (``Router.init`` / ``Router.apply``), separate from the model's, with
their own optimizer state.

Sampling is Gumbel-softmax on ``scale * logits / tau``. The default straight-through mode (D-5) makes the forward
pass use the *exact* binary prefix mask of the sampled choice, while the gradient reaches the router through the
chosen option's probability: the mask is multiplied by ``p / stop_gradient(p)``, which is exactly 1.0 in the
forward pass. The soft "staircase" mode instead mixes the candidates' masks with the Gumbel-softmax weights.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from elastic_jax.elastic import axes as axes_lib
from elastic_jax.elastic.space import ElasticSpace
from elastic_jax.model.config import ModelConfig

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class RouterAxis:
  """One routed axis: ``num_choices`` candidate sizes, decided once (homogeneous) or per layer."""

  name: str
  num_choices: int
  num_layers: int = 1


class AxisRouter(nn.Module):
  """one-hot budget [b, n_budgets] -> logits [b, num_layers, num_choices]: Dense -> LeakyReLU -> Dense."""

  axis: RouterAxis
  width: int = 256

  @nn.compact
  def __call__(self, budget_one_hot: Array) -> Array:
    h = nn.leaky_relu(nn.Dense(self.width, name="hidden")(budget_one_hot))
    # Zero-initialised output: every candidate starts equally likely, so early samples explore all sizes.
    logits = nn.Dense(self.axis.num_layers * self.axis.num_choices, kernel_init=nn.initializers.zeros,
                      name="logits")(h)
    # Bounded logits: the logit-scale schedule (1 -> 10), not the size the optimizer lets raw outputs grow to,
    # decides how deterministic sampling is. Unbounded, Adam saturates the softmax within tens of steps, the
    # budget loss's gradient vanishes, and a budget can freeze far from its target.
    logits = jnp.tanh(logits)
    return logits.reshape(*logits.shape[:-1], self.axis.num_layers, self.axis.num_choices)


class Router(nn.Module):
  """budget indices [b] int, or budget weights [b, num_budgets] float (``budget_weights``: a budget between two
  trained ones) -> {axis name: logits [b, num_layers, num_choices]}."""

  axes: tuple[RouterAxis, ...]
  num_budgets: int
  width: int = 256

  @nn.compact
  def __call__(self, budgets: Array) -> dict[str, Array]:
    budgets = jnp.asarray(budgets)
    if jnp.issubdtype(budgets.dtype, jnp.integer):
      budgets = jax.nn.one_hot(budgets, self.num_budgets, dtype=jnp.float32)
    return {axis.name: AxisRouter(axis, self.width, name=axis.name)(budgets.astype(jnp.float32))
            for axis in self.axes}


def budget_weights(budgets: tuple[float, ...] | list[float], budget: float) -> np.ndarray:
  """The router's input for ``budget``: the one-hot of a trained budget, or between two neighbouring trained budgets
  ``lo < budget < hi`` the linear interpolation of their one-hots (weight ``(budget - lo) / (hi - lo)`` on ``hi``).

  Raises ValueError, naming the trained range, for a budget outside it."""
  trained = np.asarray(budgets, np.float64)
  lo, hi = float(trained.min()), float(trained.max())
  if not lo - 1e-9 <= budget <= hi + 1e-9:
    raise ValueError(f"budget {budget:g} is outside the trained range [{lo:g}, {hi:g}]; the router interpolates "
                     "between the budgets it was trained on only.")
  weights = np.zeros(len(trained), np.float32)
  exact = np.flatnonzero(np.abs(trained - budget) < 1e-9)
  if exact.size:
    weights[exact[0]] = 1.0
    return weights
  below = int(np.argmax(np.where(trained < budget, trained, -np.inf)))
  above = int(np.argmin(np.where(trained > budget, trained, np.inf)))
  share = (budget - trained[below]) / (trained[above] - trained[below])
  weights[below], weights[above] = 1.0 - share, share
  return weights


# ------------------------------------------------------------------------------------------------ schedules (D-4)
@dataclasses.dataclass(frozen=True)
class RouterSchedule:
  """tau anneals tau_start -> tau_end (exponential by default) and the logit scale grows linearly, over
  ``total_steps`` (the whole run, D-4)."""

  total_steps: int
  tau_start: float = 1.0
  tau_end: float = 0.05
  scale_start: float = 1.0
  scale_end: float = 10.0
  tau_decay: str = "exponential"  # or "linear"

  def __post_init__(self):
    if self.tau_decay not in ("exponential", "linear"):
      raise ValueError(f"router tau_decay={self.tau_decay!r} is not one of ('exponential', 'linear').")
    if not (self.tau_start > 0 and self.tau_end > 0):
      raise ValueError(f"router tau_start={self.tau_start} and tau_end={self.tau_end} must be > 0.")
    if self.total_steps <= 0:
      raise ValueError(f"router total_steps={self.total_steps} must be > 0.")

  def tau(self, step: Array | int) -> Array:
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / self.total_steps, 0.0, 1.0)
    if self.tau_decay == "linear":
      return self.tau_start + (self.tau_end - self.tau_start) * frac
    return self.tau_start * (self.tau_end / self.tau_start) ** frac

  def scale(self, step: Array | int) -> Array:
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / self.total_steps, 0.0, 1.0)
    return self.scale_start + (self.scale_end - self.scale_start) * frac


# ------------------------------------------------------------------------------------------------ sampling
@dataclasses.dataclass
class AxisSample:
  """One axis's routed decision for a batch.

  probs: [b, L, C] Gumbel-softmax weights (differentiable). index: [b, L] sampled choice (argmax of probs).
  st_weight: [b, L] ``p_index / stop_gradient(p_index)`` (== 1 in value; carries the straight-through gradient).
  """

  probs: Array
  index: Array
  st_weight: Array


jax.tree_util.register_dataclass(AxisSample, data_fields=["probs", "index", "st_weight"], meta_fields=[])


def gumbel_softmax(key: Array, logits: Array, tau: Array | float, scale: Array | float) -> AxisSample:
  gumbel = -jnp.log(-jnp.log(jax.random.uniform(key, logits.shape, jnp.float32, 1e-20, 1.0)))
  probs = jax.nn.softmax((scale * logits.astype(jnp.float32) + gumbel) / tau, axis=-1)
  index = jnp.argmax(probs, axis=-1)
  chosen = jnp.take_along_axis(probs, index[..., None], axis=-1)[..., 0]
  return AxisSample(probs, index.astype(jnp.int32), chosen / jax.lax.stop_gradient(chosen))


def route(key: Array, logits: dict[str, Array], tau: Array | float, scale: Array | float) -> dict[str, AxisSample]:
  """Gumbel-softmax samples for every axis, with independent noise per axis."""
  keys = jax.random.split(key, len(logits))
  return {name: gumbel_softmax(k, logits[name], tau, scale) for k, name in zip(keys, sorted(logits))}


def pin(samples: dict[str, AxisSample], pinned: dict[str, Array], budget_ids: Array, active: Array
        ) -> dict[str, AxisSample]:
  """Where ``active``, every sample takes its budget's pinned choice (``pinned[axis]``: candidate indices
  [n_budgets, num_layers]) as a constant one-hot: the masks are that choice's, and no gradient reaches the router.
  Elsewhere the samples pass unchanged (one program serves pinned and routed steps)."""
  out = {}
  for name, s in samples.items():
    index = jnp.where(active, jnp.asarray(pinned[name], jnp.int32)[budget_ids], s.index)
    probs = jnp.where(active, jax.nn.one_hot(index, s.probs.shape[-1], dtype=s.probs.dtype), s.probs)
    chosen = jnp.take_along_axis(probs, index[..., None], axis=-1)[..., 0]
    out[name] = AxisSample(probs, index, chosen / jax.lax.stop_gradient(chosen))
  return out


def deterministic_choice(logits: dict[str, Array]) -> dict[str, Array]:
  """The deployed choice: argmax of the logits per axis and layer (no noise), [b, L] indices."""
  return {name: jnp.argmax(l, axis=-1).astype(jnp.int32) for name, l in logits.items()}


# ------------------------------------------------------------------------------------------------ router loss (D-6)
def budget_loss(expected_params: Array, target_params: Array, dead_zone: float = 0.02) -> Array:
  """``max(|P(pi)/target - 1| - dead_zone, 0)`` per sample: zero inside the dead zone, linear outside."""
  return jax.nn.relu(jnp.abs(expected_params / target_params - 1.0) - dead_zone)


def full_choice_anchor(probs: dict[str, Array], full_index: dict[str, int]) -> Array:
  """-sum over axes/layers of log pi(full choice), per sample: pulls the 100% budget to the parent on every axis."""
  total = 0.0
  for name, p in probs.items():
    total = total - jnp.sum(jnp.log(p[..., full_index[name]] + 1e-9), axis=-1)
  return total


def router_param_fraction(router_params, parent_param_count: int) -> float:
  """Router size relative to the parent (the paper's overhead bound is < 2%)."""
  n = sum(math.prod(x.shape) for x in jax.tree.leaves(router_params))
  return n / parent_param_count


# ------------------------------------------------------------------------------------------------ space <-> router
def router_axes(space: ElasticSpace, config: ModelConfig) -> tuple[RouterAxis, ...]:
  """One routed axis per axis of the space, per layer where the space is heterogeneous.

  An axis with a single candidate is routed too (trivially): its mask and parameter count then follow the space
  even when that one size is smaller than the parent's. Axes of block kinds absent from the pattern are skipped.
  """
  routed = []
  for axis in axes_lib.AXES:
    n = len(space.candidates(axis.name))
    if n == 0:
      continue
    layers = 1
    if axis.per_layer and space.mode(axis.name) == "heterogeneous":
      layers = axes_lib.kind_count(config, axis.kind)
    routed.append(RouterAxis(axis.name, n, layers))
  return tuple(routed)


ESTIMATORS = ("chosen", "softmax")


def candidate_weights(samples: dict[str, AxisSample], space: ElasticSpace, *, hard: bool = True,
                      estimator: str = "chosen") -> dict[str, Array]:
  """Per-axis weights over candidates for ``masks_from_weights``.

  hard=True: the one-hot of the sampled choice in the forward pass (the exact binary mask), with router gradients
  from one of two straight-through estimators:

  - ``"chosen"`` (D-5): ``one_hot · p_index / stop_gradient(p_index)``. Only the chosen option's probability gets a
    gradient: d loss / d(scale of the chosen mask). That derivative mixes in how a uniform gain on the kept channels
    would change the loss, which rewards whatever was sampled, small choices most (they lost the most signal).
  - ``"softmax"`` (straight-through Gumbel-softmax): ``one_hot + p - stop_gradient(p)``. Every candidate's relaxed
    weight gets ``<d loss / d mask, mask_candidate>``; the part all nested candidates share (the common prefix, and
    so any uniform gain) is the same for every candidate and cancels in the softmax, leaving the loss change of
    adding or removing the channels between candidates: a larger choice is preferred exactly when its extra
    channels lower the loss.

  hard=False: the Gumbel-softmax probabilities themselves (the soft staircase mask). Heterogeneous axes are
  [b, L, C]; the others [b, C].
  """
  if estimator not in ESTIMATORS:
    raise ValueError(f"router estimator={estimator!r} is not one of {ESTIMATORS}.")
  weights = {}
  for name, s in samples.items():
    one_hot = jax.nn.one_hot(s.index, s.probs.shape[-1], dtype=s.probs.dtype)
    if not hard:
      weights[name] = s.probs
    elif estimator == "chosen":
      weights[name] = one_hot * s.st_weight[..., None]
    else:
      weights[name] = one_hot + (s.probs - jax.lax.stop_gradient(s.probs))
  return layout_for_space(weights, space)


def argmax_weights(logits: dict[str, Array], scale: Array | float, space: ElasticSpace) -> dict[str, Array]:
  """The router's argmax (noise-free) as one-hot weights, with a straight-through gradient through the router's own
  distribution ``softmax(scale · logits)``: ``one_hot + pi - stop_gradient(pi)``.

  The expected size of these weights is exactly the size of the argmax child, the one extraction cuts, so a budget
  loss on it holds that choice to its target, not only the average over sampled choices (which a mixture of a
  too-small and a too-large choice can satisfy while its argmax misses the target).
  """
  weights = {}
  for name, l in logits.items():
    pi = jax.nn.softmax(scale * l.astype(jnp.float32), axis=-1)
    one_hot = jax.nn.one_hot(jnp.argmax(pi, axis=-1), pi.shape[-1], dtype=pi.dtype)
    weights[name] = one_hot + (pi - jax.lax.stop_gradient(pi))
  return layout_for_space(weights, space)


def probabilities(samples: dict[str, AxisSample], space: ElasticSpace) -> dict[str, Array]:
  """The Gumbel-softmax probabilities pi in the layout of ``candidate_weights`` (for the expected count, D-6)."""
  return layout_for_space({name: s.probs for name, s in samples.items()}, space)


def layout_for_space(weights: dict[str, Array], space: ElasticSpace) -> dict[str, Array]:
  """Per-axis router outputs [b, L, C] -> the layout masks and counts take: [b, L, C] for heterogeneous axes (one
  distribution per block), [b, C] for the others (their single row)."""
  return {name: w if space.mode(name) == "heterogeneous" else w[:, 0] for name, w in weights.items()}
