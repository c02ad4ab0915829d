"""Deployment-time choice selection: the ``Choice`` each budget of a trained router deploys with (spec §7).

The router's argmax per axis and layer, or, when that misses its budget's target, the most probable joint choice
that lands within the dead zone, found by an exact top-k beam over the router's independent per-axis, per-layer
logits. A budget between two trained ones is deployed the same way from the router fed their interpolated one-hots
(``interpolated_choice``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax.numpy as jnp
import numpy as np

from elastic_jax.elastic import axes
from elastic_jax.elastic import router as router_lib
from elastic_jax.elastic.space import Choice, ElasticSpace
from elastic_jax.model.config import ModelConfig

if TYPE_CHECKING:  # the setup is the train step's; only its fields are read here
  from elastic_jax.train.elastic_step import ElasticSetup

Params = Any


def choice_from_indices(config: ModelConfig, space: ElasticSpace, indices: dict[str, np.ndarray]) -> Choice:
  """Per routed axis, candidate indices [num_layers] (one entry for homogeneous axes) -> the ``Choice``."""
  fields = {}
  for axis in axes.AXES:
    if axis.name not in indices or not space.candidates(axis.name):  # not in the parent (``axes.present``)
      fields[axis.name] = ()
      continue
    value = tuple(space.candidates(axis.name)[int(i)] for i in indices[axis.name])
    if not axis.per_layer:
      fields[axis.name] = value[0]
    else:
      fields[axis.name] = value * axes.kind_count(config, axis.kind) if len(value) == 1 else value
  return Choice(**fields)


def choice_indices(config: ModelConfig, space: ElasticSpace, choice: Choice) -> dict[str, np.ndarray]:
  """The inverse of ``choice_from_indices``: per routed axis, the candidate index of the choice's size in each of
  the router's rows for that axis ([1] for a homogeneous axis, [num_layers] for a heterogeneous one)."""
  indices = {}
  for axis in router_lib.router_axes(space, config):
    candidates, value = space.candidates(axis.name), getattr(choice, axis.name)
    sizes = (value,) if isinstance(value, int) else tuple(value)[:axis.num_layers]
    try:
      indices[axis.name] = np.asarray([candidates.index(size) for size in sizes], np.int32)
    except ValueError:
      raise ValueError(f"choice {choice} has {axis.name}={value}, not among the space's candidates "
                       f"{candidates}.") from None
  return indices


def pinned_indices(setup: ElasticSetup, choices: list[Choice]) -> dict[str, np.ndarray]:
  """Each budget's choice (in budget order) as per-axis candidate indices [n_budgets, rows]: what the elastic step
  trains when its choices are pinned."""
  rows = [choice_indices(setup.config, setup.space, choice) for choice in choices]
  return {name: np.stack([r[name] for r in rows]) for name in rows[0]}


def _budget_logits(setup: ElasticSetup, router_params: Params) -> dict[str, np.ndarray]:
  """Per routed axis the router's logits for every budget, [n_budgets, num_layers, num_choices]."""
  return {name: np.asarray(l) for name, l in
          setup.router.apply({"params": router_params}, jnp.arange(len(setup.budgets))).items()}


def _argmax_of(setup: ElasticSetup, logits: dict[str, np.ndarray]) -> list[Choice]:
  """Per row of the router's logits, its argmax per axis and layer (no noise) as a ``Choice``."""
  picked = {name: np.asarray(index) for name, index in router_lib.deterministic_choice(logits).items()}
  rows = next(iter(picked.values())).shape[0]
  return [choice_from_indices(setup.config, setup.space, {name: idx[b] for name, idx in picked.items()})
          for b in range(rows)]


def router_argmax_choices(setup: ElasticSetup, router_params: Params) -> list[Choice]:
  """The router's argmax per axis and layer for each budget (no noise), in budget order (spec §7)."""
  return _argmax_of(setup, _budget_logits(setup, router_params))


def top_joint_choices(rows: list[np.ndarray], top_k: int) -> np.ndarray:
  """The ``top_k`` best joint picks of independent factors, best first: ``rows[f]`` scores factor f's options,
  a joint pick scores the sum. Exact: the top k of a sum stays within the top k after every added term, so the
  beam prunes to k after each factor. Returns [min(top_k, n_joint), n_factors] option indices."""
  scores, picks = np.zeros(1), np.zeros((1, 0), np.int64)
  for row in rows:
    total = (scores[:, None] + row[None, :]).reshape(-1)
    keep = np.argsort(-total, kind="stable")[:top_k]
    picks = np.concatenate([picks[keep // row.size], (keep % row.size)[:, None]], axis=1)
    scores = total[keep]
  return picks


def _deploy(setup: ElasticSetup, logits: dict[str, np.ndarray], argmax: list[Choice], targets: np.ndarray,
            top_k: int) -> list[tuple[Choice, bool]]:
  """Per row of the router's ``logits`` ([rows, num_layers, num_choices] per axis; ``argmax`` its argmax choices),
  the deployed choice for size ``targets[row]`` and whether it lands within the dead zone (see
  ``deployed_choices``)."""
  logits = {name: l.astype(np.float64) for name, l in logits.items()}
  factors = [(name, layer) for name in sorted(logits) for layer in range(logits[name].shape[1])]
  depth_order = np.asarray(setup.depth_order)
  out = []
  for b, choice in enumerate(argmax):
    picks = top_joint_choices([logits[name][b, layer] for name, layer in factors], top_k)
    one_hot = {}
    for column, (name, layer) in enumerate(factors):
      one_hot.setdefault(name, []).append(np.eye(logits[name].shape[-1])[picks[:, column]])
    stacked = {name: jnp.asarray(np.stack(rows, axis=1), jnp.float32) for name, rows in one_hot.items()}
    sizes = np.asarray(setup.expected_size(router_lib.layout_for_space(stacked, setup.space), depth_order),
                       np.float64)
    inside = np.flatnonzero(np.abs(sizes / targets[b] - 1.0) <= setup.dead_zone)
    if not inside.size or inside[0] == 0:  # the best-scored joint choice is the argmax
      out.append((choice, bool(inside.size)))
      continue
    indices = {}
    for column, (name, layer) in enumerate(factors):
      indices.setdefault(name, []).append(picks[inside[0], column])
    out.append((choice_from_indices(setup.config, setup.space, {name: np.asarray(v) for name, v in indices.items()}),
                True))
  return out


def deployed_choices(setup: ElasticSetup, router_params: Params, top_k: int = 4096) -> list[Choice]:
  """The ``Choice`` each budget deploys with, in budget order.

  The router's argmax (spec §7) when its size lands within ``dead_zone`` of the budget's target. Otherwise the most
  probable choice under the router's distribution that does land there: the joint choices are ranked by their
  summed logits (the order of their probability at any logit scale, the axes and layers being independent), the
  ``top_k`` best are found exactly by a beam over axes and layers (``top_joint_choices``), and the first within the
  dead zone is taken. When none of them is, the argmax stays (``deployed_choice_records`` shows how far it is from
  the target).
  """
  logits = _budget_logits(setup, router_params)
  deployed = _deploy(setup, logits, _argmax_of(setup, logits), setup.target_sizes(), top_k)
  return [choice for choice, _ in deployed]


def interpolated_choice(setup: ElasticSetup, router_params: Params, budget: float, top_k: int = 4096) -> Choice:
  """The choice deployed for any ``budget`` in the trained range: the router fed the interpolation of the
  neighbouring trained budgets' one-hots (``router.budget_weights``), then the choice of ``deployed_choices`` for a
  target of ``budget`` times the parent's size. A trained budget gives exactly its deployed choice.

  Raises ValueError for a budget outside the trained range, or when no choice among the ``top_k`` most probable
  lands within the dead zone of its target.
  """
  weights = router_lib.budget_weights(setup.budgets, budget)
  logits = {name: np.asarray(l) for name, l in
            setup.router.apply({"params": router_params}, jnp.asarray(weights)[None]).items()}
  [(choice, inside)] = _deploy(setup, logits, _argmax_of(setup, logits),
                               np.asarray([budget * setup.parent_size]), top_k)
  if not inside:
    raise ValueError(f"no choice of the router for budget {budget:g} lands within the dead zone "
                     f"({setup.dead_zone:g}) of its target; pick another budget in "
                     f"[{min(setup.budgets):g}, {max(setup.budgets):g}] or one of the trained budgets "
                     f"{list(setup.budgets)}.")
  return choice
