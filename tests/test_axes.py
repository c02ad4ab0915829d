"""The elastic-axis registry: every row resolves against the model, and a new row is picked up everywhere.

The toy axis added here is the attention head dim (logical axis ``head_dim`` on q, k, v and o). Its "model code" is
only the parameter-count term (the attention formula with the head dim as an argument); no module reads its mask.
Space, masks, permutation, extraction, parameter counts and the router then follow from the row alone.
"""

from __future__ import annotations

import inspect
import math

import jax
import numpy as np
import pytest
from conftest import random_params, small_config

from elastic_jax.elastic import axes
from elastic_jax.elastic.deploy import choice_from_indices
from elastic_jax.elastic.extract import extract
from elastic_jax.elastic.importance import Rankings
from elastic_jax.elastic.masks import choice_masks
from elastic_jax.elastic.param_count import BLOCK_PARAM_COUNTS, choice_param_count, expected_param_count
from elastic_jax.elastic.permute import permute_params
from elastic_jax.elastic.router import router_axes
from elastic_jax.elastic.space import Choice, ElasticSpace, SpaceError
from elastic_jax.model.config import KINDS, BlockSpec, ModelConfig
from elastic_jax.model import param_shapes
from elastic_jax.model.hybrid import HybridLM, param_logical_axes

CONFIG = small_config("M-*M-*", hidden_size=32, intermediate_size=48, num_attention_heads=4)
TOY = axes.ElasticAxis("attention_head_dim", "attention", "head_dim", logical_axis="head_dim", count_arg="head_dim",
                       prune_rank=9, unit="channel")
# Every block kind, for the rows of every kind.
ALL_KINDS = small_config("M-*E", n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=12,
                         moe_shared_expert_intermediate_size=16, n_shared_experts=1, n_group=2, topk_group=1)


def _logical_names(config: ModelConfig) -> set[str]:
  specs = jax.tree.leaves(param_logical_axes(config), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  return {name for spec in specs for name in spec}


@pytest.mark.parametrize("axis", axes.AXES, ids=lambda a: a.name)
def test_every_row_resolves_against_the_model(axis):
  """Each entry point of a row: its config fields exist, its logical axis is one the parameters carry, its count
  argument is one its kind's formula takes, its groups divide the parent's sizes."""
  fields = {f.name for f in ModelConfig.__dataclass_fields__.values()}
  assert axis.config_field in fields or axis.config_field == "num_layers"
  if axis.per_layer:
    assert axis.per_layer_field in fields and axis.config_field in BlockSpec.__dataclass_fields__
    assert axis.count_arg in inspect.signature(BLOCK_PARAM_COUNTS[axis.kind]).parameters
    assert len(axis.parent_sizes(ALL_KINDS)) == ALL_KINDS.pattern.count({k.name: k.char for k in KINDS}[axis.kind])
  if axis.logical_axis:
    assert axis.logical_axis in _logical_names(ALL_KINDS)
  if axis.group_field:
    assert all(size % axis.groups(ALL_KINDS) == 0 for size in axis.parent_sizes(ALL_KINDS))
  assert axes.names().count(axis.name) == 1
  assert sorted(a.prune_rank for a in axes.AXES) == list(range(len(axes.AXES)))


@pytest.fixture
def toy_axis(monkeypatch):
  """The registry with the toy row, and the attention count formula taking the head dim (the toy's model code)."""
  monkeypatch.setattr(axes, "AXES", axes.AXES + (TOY,))

  def attention(config, hidden, heads, head_dim):
    return hidden * heads * head_dim + 2 * hidden * config.num_key_value_heads * head_dim + heads * head_dim * hidden \
        + hidden

  monkeypatch.setitem(BLOCK_PARAM_COUNTS, "attention", attention)
  return TOY


def _toy_choice(depth: int = 6) -> Choice:
  return Choice(hidden=24, mlp=(24, 48), attention_heads=(2, 4), mamba_heads=(2, 4), mamba_head_dim=(8, 4),
                attention_head_dim=(4, 4), depth=depth)


def test_a_new_row_is_picked_up_by_space_choice_and_router(toy_axis):
  space = ElasticSpace.from_dict(dict(hidden=[24, 32], attention_head_dim=[4, 8]), CONFIG)
  assert space.attention_head_dim == (4, 8) and space.mode("attention_head_dim") == "homogeneous"
  assert Choice.full(CONFIG).attention_head_dim == (8, 8)
  with pytest.raises(SpaceError, match="attention_head_dim candidate 16 is larger than the parent's head_dim=8"):
    ElasticSpace.from_dict(dict(attention_head_dim=[4, 16]), CONFIG)
  routed = {a.name: a for a in router_axes(space, CONFIG)}
  assert routed["attention_head_dim"].num_choices == 2
  choice = choice_from_indices(CONFIG, space, {axis: [0] for axis in axes.names()})
  assert choice.attention_head_dim == (4, 4) and choice.hidden == 24 and choice.mlp == (48, 48)
  choice.validate(CONFIG, space)
  assert Choice.from_dict(choice.to_dict()) == choice


def test_a_new_row_is_picked_up_by_masks(toy_axis):
  masks = choice_masks(CONFIG, _toy_choice())
  for index in (2, 5):  # the attention blocks
    np.testing.assert_array_equal(masks[f"layers_{index}"]["head_dim"], [[1, 1, 1, 1, 0, 0, 0, 0]])
    assert set(masks[f"layers_{index}"]) == {"heads", "head_dim"}


def test_a_new_row_is_picked_up_by_permutation(toy_axis):
  """Reordering head_dim in q, k, v and o together leaves the logits unchanged (NoPE attention), and every tensor
  naming head_dim is reordered."""
  params = jax.tree.map(np.asarray, random_params(CONFIG, seed=0))
  identity = Rankings.identity(CONFIG)
  rng = np.random.default_rng(0)
  orders = {i: rng.permutation(CONFIG.head_dim) for i in identity.attention_head_dim}
  permuted = permute_params(CONFIG, params, Rankings(**{**identity.fields(), "attention_head_dim": orders}))
  for index, order in orders.items():
    block, new = params[f"layers_{index}"]["mixer"], permuted[f"layers_{index}"]["mixer"]
    for name in ("q_proj", "k_proj", "v_proj"):
      np.testing.assert_array_equal(new[name]["kernel"], block[name]["kernel"][..., order])
    np.testing.assert_array_equal(new["o_proj"]["kernel"], block["o_proj"]["kernel"][:, order])
  tokens = np.arange(2 * 12).reshape(2, 12) % CONFIG.vocab_size
  model = HybridLM(CONFIG)
  np.testing.assert_allclose(model.apply({"params": permuted}, tokens), model.apply({"params": params}, tokens),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("depth", [6, 4])
def test_a_new_row_is_picked_up_by_extraction_and_the_parameter_count(toy_axis, depth):
  """The child is a HybridLM with the toy size: its leaves have the shapes the child model initialises, and their
  sizes sum to the analytic count, exact and expected (one-hot)."""
  params = jax.tree.map(np.asarray, random_params(CONFIG, seed=1))
  depth_order = (0, 2, 1, 4, 3, 5)
  choice = _toy_choice(depth)
  child_config, child = extract(CONFIG, params, choice, depth_order)
  assert child_config.head_dim == 4
  assert jax.tree.map(np.shape, child) == jax.tree.map(lambda x: x.shape, param_shapes(child_config))
  leaves = sum(math.prod(np.shape(x)) for x in jax.tree.leaves(child))
  assert choice_param_count(CONFIG, choice, depth_order) == leaves
  space = ElasticSpace.from_dict(dict(hidden=[24, 32], mlp=[24, 48], attention_heads=[2, 4], mamba_heads=[2, 4],
                                      mamba_head_dim=[4, 8], attention_head_dim=[4, 8], depth=[4, 6],
                                      mlp_mode="heterogeneous", mamba_mode="heterogeneous"), CONFIG)
  one_hot = lambda index, n: np.eye(n)[np.asarray(index)][None]
  probs = {"hidden": one_hot(0, 2), "mlp": one_hot([0, 1], 2), "attention_heads": one_hot(1, 2),
           "mamba_heads": one_hot([0, 1], 2), "mamba_head_dim": one_hot([1, 0], 2),
           "attention_head_dim": one_hot(0, 2), "depth": one_hot(0 if depth == 4 else 1, 2)}
  choice_hom = Choice(**{**choice.to_dict(), "attention_heads": (4, 4)})
  assert float(expected_param_count(CONFIG, space, probs, depth_order)[0]) == choice_param_count(
      CONFIG, choice_hom, depth_order)


def test_files_written_under_other_axis_names_fail_with_the_rename_that_converts_them():
  """A run's rankings.json or deployed_choices.json whose key for an axis differs from the registry's name (e.g.
  one written before the names were unified) is refused with the key to rename."""
  stored = Rankings.identity(CONFIG).to_json()
  restored = Rankings.from_json(stored)
  assert restored.to_json() == stored
  stored["older_name"] = stored.pop("mamba_head_dim")
  with pytest.raises(ValueError, match="rename the key 'older_name' to 'mamba_head_dim'"):
    Rankings.from_json(stored, "W/importance/rankings.json")
  deployed = Choice.full(CONFIG).to_dict()
  deployed["older_name"] = deployed.pop("mamba_head_dim")
  with pytest.raises(SpaceError, match="Choice keys: .* rename the key 'older_name' to 'mamba_head_dim'"):
    Choice.from_dict(deployed)
