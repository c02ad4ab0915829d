"""Weight permutation: importance order is a reparametrisation (same logits), heads never leave their group."""

from __future__ import annotations

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_params, small_config
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic_jax.elastic.importance import (Rankings, descending_order_within_groups, estimate_importance,
                                            rankings)
from elastic_jax.elastic.permute import RankingError, check_rankings, permute_params
from elastic_jax.model import HybridLM

HOMOGENEOUS = small_config("M-*M-")
HETEROGENEOUS = small_config("M-M*-", intermediate_size_per_layer=(16, 40), mamba_num_heads_per_layer=(2, 6),
                             mamba_head_dim_per_layer=(8, 4), num_attention_heads_per_layer=(6,),
                             num_key_value_heads=3)
TOKENS = np.random.default_rng(1).integers(0, 64, (2, 12)).astype(np.int32)


def random_valid_rankings(config, rng: np.random.Generator) -> Rankings:
  """Uniformly random permutations of every axis, heads shuffled only inside their own group."""

  def within_groups(size: int, groups: int) -> np.ndarray:
    per = size // groups
    return np.concatenate([g * per + rng.permutation(per) for g in range(groups)])

  specs = config.block_specs()
  return Rankings(
      hidden=rng.permutation(config.hidden_size),
      mlp={s.index: rng.permutation(s.intermediate_size) for s in specs if s.kind == "mlp"},
      attention_heads={s.index: within_groups(s.num_attention_heads, config.num_key_value_heads)
                       for s in specs if s.kind == "attention"},
      mamba_heads={s.index: within_groups(s.mamba_num_heads, config.n_groups) for s in specs if s.kind == "mamba"},
      mamba_head_dim={s.index: rng.permutation(s.mamba_head_dim) for s in specs if s.kind == "mamba"},
      depth=rng.permutation(config.num_layers))


@pytest.mark.parametrize("config", [HOMOGENEOUS, HETEROGENEOUS], ids=["homogeneous", "heterogeneous"])
def test_permutation_into_importance_order_or_any_valid_order_keeps_logits(config):
  params = random_params(config)
  forward = jax.jit(HybridLM(config).apply)
  want = np.asarray(forward({"params": params}, TOKENS))
  importance = estimate_importance(config, params, [TOKENS], depth=False, progress=False)
  for order in (rankings(importance, config), random_valid_rankings(config, np.random.default_rng(7))):
    assert not np.array_equal(order.hidden, np.arange(config.hidden_size))  # something actually moves
    got = np.asarray(forward({"params": permute_params(config, params, order)}, TOKENS))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_permutation_reorders_exactly_the_tensors_that_share_each_axis():
  config = HOMOGENEOUS  # blocks: 0 M, 1 -, 2 *, 3 M, 4 -
  params = jax.tree.map(np.asarray, random_params(config))
  order = random_valid_rankings(config, np.random.default_rng(3))
  new = permute_params(config, params, order)
  d = order.hidden
  mamba, mlp, attn = params["layers_0"]["mixer"], params["layers_1"]["mixer"], params["layers_2"]["mixer"]
  new_mamba, new_mlp, new_attn = new["layers_0"]["mixer"], new["layers_1"]["mixer"], new["layers_2"]["mixer"]
  heads, channels, neurons, q_heads = order.mamba_heads[0], order.mamba_head_dim[0], order.mlp[1], \
      order.attention_heads[2]
  expected = {
      "embedding": (new["embed"]["embedding"], params["embed"]["embedding"][:, d]),
      "lm_head": (new["lm_head"]["kernel"], params["lm_head"]["kernel"][d]),
      "norm_f": (new["norm_f"]["scale"], params["norm_f"]["scale"][d]),
      "block norm": (new["layers_3"]["norm"]["scale"], params["layers_3"]["norm"]["scale"][d]),
      "z_proj": (new_mamba["z_proj"]["kernel"], mamba["z_proj"]["kernel"][d][:, heads][:, :, channels]),
      "x_proj": (new_mamba["x_proj"]["kernel"], mamba["x_proj"]["kernel"][d][:, heads][:, :, channels]),
      "B_proj (hidden only)": (new_mamba["B_proj"]["kernel"], mamba["B_proj"]["kernel"][d]),
      "C_proj (hidden only)": (new_mamba["C_proj"]["kernel"], mamba["C_proj"]["kernel"][d]),
      "dt_proj": (new_mamba["dt_proj"]["kernel"], mamba["dt_proj"]["kernel"][d][:, heads]),
      "conv_x kernel": (new_mamba["conv_x"]["kernel"], mamba["conv_x"]["kernel"][:, heads][:, :, channels]),
      "conv_x bias": (new_mamba["conv_x"]["bias"], mamba["conv_x"]["bias"][heads][:, channels]),
      "conv_B (untouched)": (new_mamba["conv_B"]["kernel"], mamba["conv_B"]["kernel"]),
      "conv_C bias (untouched)": (new_mamba["conv_C"]["bias"], mamba["conv_C"]["bias"]),
      "A_log": (new_mamba["A_log"], mamba["A_log"][heads]),
      "D": (new_mamba["D"], mamba["D"][heads]),
      "dt_bias": (new_mamba["dt_bias"], mamba["dt_bias"][heads]),
      "gated norm": (new_mamba["norm"]["scale"], mamba["norm"]["scale"][heads][:, channels]),
      "out_proj": (new_mamba["out_proj"]["kernel"], mamba["out_proj"]["kernel"][heads][:, channels][:, :, d]),
      "up_proj": (new_mlp["up_proj"]["kernel"], mlp["up_proj"]["kernel"][d][:, neurons]),
      "down_proj": (new_mlp["down_proj"]["kernel"], mlp["down_proj"]["kernel"][neurons][:, d]),
      "q_proj": (new_attn["q_proj"]["kernel"], attn["q_proj"]["kernel"][d][:, q_heads]),
      "k_proj (hidden only)": (new_attn["k_proj"]["kernel"], attn["k_proj"]["kernel"][d]),
      "v_proj (hidden only)": (new_attn["v_proj"]["kernel"], attn["v_proj"]["kernel"][d]),
      "o_proj": (new_attn["o_proj"]["kernel"], attn["o_proj"]["kernel"][q_heads][:, :, d]),
  }
  for name, (got, want) in expected.items():
    np.testing.assert_array_equal(got, want, err_msg=name)
  assert isinstance(new["layers_0"]["mixer"]["A_log"], np.ndarray)  # numpy in, numpy out
  assert np.array_equal(params["embed"]["embedding"], random_params(config)["embed"]["embedding"])  # not mutated


def test_permutation_under_jit_with_traced_rankings():
  config = HETEROGENEOUS
  params = random_params(config)
  order = random_valid_rankings(config, np.random.default_rng(5))
  eager = permute_params(config, params, order)
  traced = jax.jit(lambda p, r: permute_params(config, p, r))(params, order)
  jax.tree.map(np.testing.assert_array_equal, traced, eager)


@settings(max_examples=60, deadline=None)
@given(groups=st.sampled_from([1, 2, 4]), per_group=st.integers(1, 6), data=st.data())
def test_group_rankings_stay_in_group_and_sort_descending_with_stable_ties(groups, per_group, data):
  # Few distinct values, so ties are common.
  scores = data.draw(hnp.arrays(np.float32, groups * per_group, elements=st.sampled_from([0.0, 0.5, 1.0, 2.0])))
  order = descending_order_within_groups(scores, groups)
  assert sorted(order.tolist()) == list(range(groups * per_group))
  for g in range(groups):
    block = order[g * per_group:(g + 1) * per_group]
    assert np.all(block // per_group == g)
    # Descending score, ascending index among equal scores.
    keys = [(-scores[i], i) for i in block]
    assert keys == sorted(keys)


def test_real_rankings_never_move_heads_across_groups():
  config = HETEROGENEOUS  # Mamba heads 2 and 6 in 2 groups; 6 query heads over 3 KV heads
  params = random_params(config)
  order = rankings(estimate_importance(config, params, [TOKENS], depth=False, progress=False), config)
  check_rankings(config, order)
  for spec in config.block_specs():
    if spec.kind == "mamba":
      heads, groups = order.mamba_heads[spec.index], config.n_groups
    elif spec.kind == "attention":
      heads, groups = order.attention_heads[spec.index], config.num_key_value_heads
    else:
      continue
    per_group = len(heads) // groups
    np.testing.assert_array_equal(heads // per_group, np.arange(len(heads)) // per_group)


def _replace(order: Rankings, **changes) -> Rankings:
  return Rankings(**{**order.fields(), **changes})


@pytest.mark.parametrize("change, message", [
    (lambda r: dict(mamba_heads={**r.mamba_heads, 0: np.array([0, 2, 1, 3])}),
     r"mamba block 0: the ranking puts head 2 \(group 1\) at position 1 \(group 0\); heads may only be reordered "
     r"within their own group"),
    (lambda r: dict(attention_heads={2: np.array([2, 1, 0, 3])}),
     r"attention block 2: the ranking puts query head 2 \(KV group 1\) at position 0 \(KV group 0\); query heads "
     r"may only be reordered within their own KV group"),
    (lambda r: dict(hidden=np.r_[0, np.arange(31)]),
     r"rankings.hidden is not a permutation of range\(32\): missing \[31\], repeated \[0\]"),
    (lambda r: dict(mlp={**r.mlp, 4: np.arange(47)}),
     r"rankings.mlp\[4\] must be integer indices of shape \(48,\); got int64 \(47,\)"),
    (lambda r: dict(mlp={1: r.mlp[1]}),
     r"rankings.mlp has entries for blocks \[1\] but pattern 'M-\*M-' needs exactly blocks \[1, 4\]"),
    (lambda r: dict(mamba_head_dim={0: r.mamba_head_dim[0], 3: np.arange(8.0)}),
     r"rankings.mamba_head_dim\[3\] must be integer indices"),
    (lambda r: dict(depth=np.arange(4)), r"rankings.depth must be integer indices of shape \(5,\)"),
])
def test_invalid_rankings_raise_with_a_clear_message(change, message):
  config = HOMOGENEOUS
  order = Rankings.identity(config)
  bad = _replace(order, **change(order))
  with pytest.raises(RankingError, match=message):
    check_rankings(config, bad)
  with pytest.raises(RankingError, match=message):
    permute_params(config, jax.tree.map(np.asarray, random_params(config)), bad)
