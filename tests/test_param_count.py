"""Exact and expected parameter counts.

References: the sum of leaf sizes of the model's own parameter tree (``jax.eval_shape``, nothing allocated), the
published sizes of NVIDIA's checkpoints (spec §2: Nano V2 12B = 12.31B; Nemotron-3-Nano-4B = 3973.6M), and a
brute-force enumeration of every sub-network for the expected count.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import small_config
from elastic_jax.elastic.extract import child_config, extract_params
from elastic_jax.elastic.param_count import choice_param_count, expected_param_count, param_count
from elastic_jax.elastic.space import Choice, ElasticSpace, SpaceError
from elastic_jax.model import ModelConfig, param_shapes


def leaf_count(tree) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


# Public config.json facts. Nano V2 12B: the spec's table. Nano V2 9B: NVIDIA-Nemotron-Nano-9B-v2. Nemotron-3-Nano-4B:
# NVIDIA-Nemotron-3-Nano-4B-BF16 (pruned from the 9B with Nemotron Elastic: 42 blocks, d=3136, 96 Mamba heads).
NANO_V2_12B = ModelConfig(
    pattern="M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-", vocab_size=131072,
    hidden_size=5120, intermediate_size=20480, num_attention_heads=40, num_key_value_heads=8, head_dim=128,
    mamba_num_heads=128, mamba_head_dim=80, n_groups=8, ssm_state_size=128, conv_kernel=4, chunk_size=128)
NANO_V2_9B = NANO_V2_12B.replace(pattern="M-M-M-MM-M-M-M*-M-M-M*-M-M-M-M*-M-M-M-M*-M-MM-M-M-M-M-M-",
                                 hidden_size=4480, intermediate_size=15680)
NANO_3_4B = NANO_V2_9B.replace(pattern="M-M-M-MM-M-M*-M-M*-M-M-M*-M-M-MM*-MMM-M-M-", hidden_size=3136,
                               intermediate_size=12544, mamba_num_heads=96, chunk_size=256)

SMALL_CONFIGS = {
    "homogeneous": small_config("M-*M-*"),
    "heterogeneous": small_config("M-*M-*-", intermediate_size_per_layer=(8, 48, 20),
                                  num_attention_heads_per_layer=(2, 6), mamba_num_heads_per_layer=(2, 6),
                                  mamba_head_dim_per_layer=(3, 8)),
    "mamba_only": small_config("MM", n_groups=4, mamba_num_heads=8, conv_kernel=3),
    "attention_mlp": small_config("*-*", num_key_value_heads=4, num_attention_heads=8, head_dim=5),
}


@pytest.mark.parametrize("name", list(SMALL_CONFIGS))
def test_analytic_count_equals_parameter_tree(name):
  config = SMALL_CONFIGS[name]
  assert param_count(config) == leaf_count(param_shapes(config))


def test_nano_v2_12b():
  count = param_count(NANO_V2_12B)
  print(f"Nano V2 12B: {count:,} parameters")
  assert abs(count - 12.31e9) <= 0.01e9
  assert count == leaf_count(param_shapes(NANO_V2_12B))  # abstract: nothing is allocated


def test_nemotron_3_nano_4b():
  count = param_count(NANO_3_4B)
  print(f"Nemotron-3-Nano-4B: {count:,} parameters")
  assert round(count / 1e6, 1) == 3973.6
  assert count == leaf_count(param_shapes(NANO_3_4B))


def test_nano_family_as_sub_networks():
  """The 9B is a sub-network of the 12B and the 4B one of the 9B (same G, N, heads dim, KV heads): counting the
  choice on the parent equals counting the published child config."""
  def order_keeping(parent: ModelConfig, child_pattern: str) -> list[int]:
    # The first blocks of each kind as the child has them, then the rest: any order with these kinds on top works.
    need = {ch: child_pattern.count(ch) for ch in "M-*"}
    top = [i for i, ch in enumerate(parent.pattern) if (need.__setitem__(ch, need[ch] - 1) or need[ch] >= 0)]
    return top + [i for i in range(parent.num_layers) if i not in top]

  for parent, child in ((NANO_V2_12B, NANO_V2_9B), (NANO_V2_9B, NANO_3_4B)):
    choice = Choice.homogeneous(parent, hidden=child.hidden_size, mlp=child.intermediate_size,
                                mamba_heads=child.mamba_num_heads, depth=child.num_layers)
    assert choice_param_count(parent, choice, order_keeping(parent, child.pattern)) == param_count(child)
  assert abs(param_count(NANO_V2_9B) - 8.89e9) <= 0.01e9


def test_choice_count_equals_extracted_leaves():
  parent = SMALL_CONFIGS["homogeneous"]
  rng = np.random.default_rng(0)
  for _ in range(6):
    choice = Choice(hidden=int(rng.integers(1, 33)), mlp=tuple(int(v) for v in rng.integers(1, 49, 2)),
                    attention_heads=tuple(2 * int(v) for v in rng.integers(1, 3, 2)),
                    mamba_heads=tuple(2 * int(v) for v in rng.integers(1, 3, 2)),
                    mamba_head_dim=tuple(int(v) for v in rng.integers(1, 9, 2)), depth=int(rng.integers(1, 7)))
    order = [int(i) for i in rng.permutation(6)]
    child = jax.eval_shape(lambda p: extract_params(parent, p, choice, order), param_shapes(parent))
    assert choice_param_count(parent, choice, order) == leaf_count(child)
    assert leaf_count(child) == leaf_count(param_shapes(child_config(parent, choice, order)))
  assert choice_param_count(parent, Choice.full(parent)) == param_count(parent)


SPACE_VALUES = {"hidden": [16, 32], "mlp": [12, 24, 48], "attention_heads": [2, 4], "mamba_heads": [2, 4],
                "mamba_head_dim": [4, 8], "depth": [3, 6]}


def brute_force_expectation(parent, space, probs, order) -> float:
  """Σ over every combination of candidates of P(combination) · exact count of that sub-network.

  probs[axis] is one distribution (homogeneous) or a list of distributions, one per block of the axis' kind.
  """
  full = Choice.full(parent)
  slots = []  # (axis, block position or None, distribution)
  for axis in SPACE_VALUES:
    p = np.asarray(probs[axis])
    if p.ndim == 1:
      slots.append((axis, None, p))
    else:
      slots.extend((axis, k, p[k]) for k in range(p.shape[0]))
  total = 0.0
  for picks in itertools.product(*(range(len(p)) for _, _, p in slots)):
    weight = math.prod(float(p[i]) for (_, _, p), i in zip(slots, picks))
    values = {axis: list(getattr(full, axis)) if isinstance(getattr(full, axis), tuple) else None
              for axis in SPACE_VALUES}
    for (axis, k, _), i in zip(slots, picks):
      size = space.candidates(axis)[i]
      if values[axis] is None:
        values[axis] = size
      elif k is None:
        values[axis] = [size] * len(values[axis])
      else:
        values[axis][k] = size
    choice = Choice(**{a: tuple(v) if isinstance(v, list) else v for a, v in values.items()})
    total += weight * choice_param_count(parent, choice, order)
  return total


@pytest.mark.parametrize("mode", ["homogeneous", "heterogeneous"])
def test_expected_count_equals_brute_force_expectation(mode):
  parent = SMALL_CONFIGS["homogeneous"]
  space = ElasticSpace.from_dict({**SPACE_VALUES, "mlp_mode": mode, "mamba_mode": mode}, parent)
  rng = np.random.default_rng(1)
  order = [int(i) for i in rng.permutation(6)]
  probs = {}
  for axis, cands in SPACE_VALUES.items():
    per_block = mode == "heterogeneous" and axis in ("mlp", "mamba_heads", "mamba_head_dim")
    probs[axis] = rng.dirichlet(np.ones(len(cands)), size=2 if per_block else None)
  expected = float(expected_param_count(parent, space, probs, order))
  reference = brute_force_expectation(parent, space, probs, order)
  print(f"{mode}: expected {expected:.1f}, brute force {reference:.1f}")
  assert expected == pytest.approx(reference, rel=1e-6)


def test_expected_count_one_hot_batch_and_gradient():
  parent = SMALL_CONFIGS["homogeneous"]
  space = ElasticSpace.from_dict({**SPACE_VALUES, "mlp_mode": "heterogeneous"}, parent)
  order = [2, 0, 4, 1, 5, 3]
  # One-hot rows = exact sub-networks; a leading batch of two budgets; a router's [b, 1, n] row for hidden.
  probs = {"hidden": np.array([[[1.0, 0.0]], [[0.0, 1.0]]]), "mlp": np.array([[[1, 0, 0], [0, 0, 1]],
                                                                            [[0, 1, 0], [0, 1, 0]]], np.float32),
           "mamba_heads": np.array([[0.0, 1.0], [1.0, 0.0]]), "depth": np.array([[1.0, 0.0], [0.0, 1.0]])}
  counts = expected_param_count(parent, space, probs, order)
  assert counts.shape == (2,)
  choices = [Choice(hidden=16, mlp=(12, 48), attention_heads=(4, 4), mamba_heads=(4, 4), mamba_head_dim=(8, 8),
                    depth=3),
             Choice(hidden=32, mlp=(24, 24), attention_heads=(4, 4), mamba_heads=(2, 2), mamba_head_dim=(8, 8),
                    depth=6)]
  for count, choice in zip(np.asarray(counts), choices):
    assert count == pytest.approx(choice_param_count(parent, choice, order), rel=1e-6)

  def loss(logits):
    probs = {axis: jax.nn.softmax(logits[axis]) for axis in logits}
    return expected_param_count(parent, space, probs, order) / param_count(parent)

  logits = {axis: jnp.zeros((len(c),)) for axis, c in SPACE_VALUES.items() if axis != "mlp"}
  grads = jax.grad(loss)(logits)
  for axis, g in grads.items():  # a larger candidate costs more parameters on every axis
    assert np.all(np.isfinite(g)) and g[-1] > g[0], (axis, g)


def test_expected_count_errors():
  parent = SMALL_CONFIGS["homogeneous"]
  space = ElasticSpace.from_dict({**SPACE_VALUES, "mlp_mode": "heterogeneous"}, parent)
  with pytest.raises(SpaceError, match="hidden probs have 3 entries on the last axis but the space has 2"):
    expected_param_count(parent, space, {"hidden": np.ones(3) / 3})
  with pytest.raises(SpaceError, match="mlp is heterogeneous: probs must be"):
    expected_param_count(parent, space, {"mlp": np.ones((3, 3)) / 3})
  with pytest.raises(SpaceError, match="depth probabilities need depth_order"):
    expected_param_count(parent, space, {"depth": np.ones(2) / 2})
