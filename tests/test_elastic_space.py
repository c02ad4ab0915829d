"""The elastic search space and ``Choice``: construction, defaults, (de)serialisation and errors naming the field."""

from __future__ import annotations

import json

import ml_collections
import pytest

from conftest import small_config
from elastic_jax.elastic.space import Choice, ElasticSpace, SpaceError

# Mamba: 16 heads in 8 groups, head dim 8; attention: 6 query heads over 3 KV heads; MLP 48; 7 blocks.
PARENT = small_config("M-*M-*-", mamba_num_heads=16, n_groups=8, num_attention_heads=6, num_key_value_heads=3)


def test_from_dict_sorts_fills_defaults_and_round_trips():
  space = ElasticSpace.from_dict({"hidden": [32, 16], "mamba_heads": [16, 8], "mlp": [12, 48, 24],
                                  "mlp_mode": "heterogeneous"}, PARENT)
  assert space.hidden == (16, 32) and space.mlp == (12, 24, 48) and space.mamba_heads == (8, 16)
  assert space.attention_heads == (6,) and space.mamba_head_dim == (8,) and space.depth == (7,)  # not elastic
  assert space.mode("mlp") == "heterogeneous" and space.mode("mamba_heads") == "homogeneous"
  assert space.mode("hidden") == "homogeneous"
  assert ElasticSpace.from_dict(json.loads(space.to_json()), PARENT) == space
  assert ElasticSpace.from_dict(ml_collections.ConfigDict(space.to_dict()), PARENT) == space


def test_absent_block_kind_has_no_candidates():
  mamba_mlp = small_config("M-")
  space = ElasticSpace.from_dict({"hidden": [16, 32]}, mamba_mlp)
  assert space.attention_heads == ()
  with pytest.raises(SpaceError, match="attention_heads has candidates \\[2\\] but pattern='M-' has no attention "
                                       "blocks"):
    ElasticSpace.from_dict({"attention_heads": [2]}, mamba_mlp)


def test_from_fractions_rounds_to_group_multiples():
  space = ElasticSpace.from_fractions(PARENT, (0.25, 0.5, 1.0), mamba_mode="heterogeneous")
  assert space.hidden == (8, 16, 32)
  assert space.mlp == (12, 24, 48)
  assert space.mamba_heads == (8, 16)  # 0.25 * 16 = 4 rounds down to 0 groups of 8: dropped
  assert space.attention_heads == (3, 6)  # 1.5 -> 0 dropped, 3, 6
  assert space.mamba_head_dim == (2, 4, 8)
  assert space.depth == (7,)
  assert space.mamba_mode == "heterogeneous"


@pytest.mark.parametrize("values, message", [
    ({"mamba_heads": [12]}, "mamba_heads candidate 12 is not a multiple of n_groups=8"),
    ({"mamba_heads": [8, 32]}, "mamba_heads candidate 32 is larger than the parent's mamba_num_heads=16"),
    ({"attention_heads": [4]}, "attention_heads candidate 4 is not a multiple of num_key_value_heads=3"),
    ({"mlp": [24, 64]}, "mlp candidate 64 is larger than the parent's intermediate_size=48"),
    ({"hidden": [40]}, "hidden candidate 40 is larger than the parent's hidden_size=32"),
    ({"mamba_head_dim": [9]}, "mamba_head_dim candidate 9 is larger than the parent's mamba_head_dim=8"),
    ({"depth": [3, 8]}, "depth candidate 8 is larger than the parent's num_layers=7"),
    ({"mlp": []}, "mlp candidate list is empty"),
    ({"hidden": [0, 8]}, "hidden candidate 0 must be positive"),
    ({"hidden": [8, 8]}, "hidden candidate 8 appears more than once"),
    ({"hidden": [8.5]}, "hidden candidate 8.5 is not an integer"),
    ({"hidden": 8}, "hidden must be a list of candidate sizes, got 8"),
    ({"mlp_mode": "per_layer"}, "mlp_mode='per_layer' is not one of"),
    ({"hiden": [8]}, "unknown elastic space key\\(s\\) \\['hiden'\\]"),
])
def test_invalid_spaces_name_the_field(values, message):
  with pytest.raises(SpaceError, match=message):
    ElasticSpace.from_dict(values, PARENT)


def test_heterogeneous_parent_needs_explicit_candidates():
  parent = small_config("M-*-", intermediate_size_per_layer=(24, 48))
  with pytest.raises(SpaceError, match="mlp candidates must be given explicitly: the parent's per-layer "
                                       "intermediate_size differ"):
    ElasticSpace.from_dict({}, parent)
  with pytest.raises(SpaceError, match="mlp candidate 32 is larger than the parent's smallest per-layer "
                                       "intermediate_size=24"):
    ElasticSpace.from_dict({"mlp": [12, 32]}, parent)
  assert ElasticSpace.from_dict({"mlp": [12, 24]}, parent).mlp == (12, 24)


def test_choice_full_homogeneous_and_round_trip():
  full = Choice.full(PARENT)
  assert full == Choice(hidden=32, mlp=(48, 48, 48), attention_heads=(6, 6), mamba_heads=(16, 16),
                        mamba_head_dim=(8, 8), depth=7)
  assert full.is_homogeneous
  small = Choice.homogeneous(PARENT, hidden=16, mlp=24, mamba_heads=8, depth=5)
  assert small.mlp == (24, 24, 24) and small.attention_heads == (6, 6) and small.depth == 5
  assert Choice.from_dict(json.loads(json.dumps(small.to_dict()))) == small
  hetero = Choice(hidden=16, mlp=[12, 24, 48], attention_heads=[3, 6], mamba_heads=[8, 16], mamba_head_dim=[8, 2],
                  depth=7)
  assert hetero.mlp == (12, 24, 48) and not hetero.is_homogeneous
  hetero.validate(PARENT)


@pytest.mark.parametrize("changes, message", [
    (dict(mamba_heads=(16, 12)), r"Choice.mamba_heads\[1\] 12 is not a multiple of n_groups=8"),
    (dict(attention_heads=(6, 2)), r"Choice.attention_heads\[1\] 2 is not a multiple of num_key_value_heads=3"),
    (dict(mlp=(48, 64, 8)), r"Choice.mlp\[1\] 64 is larger than the parent's intermediate_size=48"),
    (dict(mlp=(48, 48)), "Choice.mlp has 2 entries but pattern='M-\\*M-\\*-' has 3 mlp blocks"),
    (dict(hidden=33), "Choice.hidden 33 is larger than the parent's hidden_size=32"),
    (dict(hidden=0), "Choice.hidden 0 must be positive"),
    (dict(mamba_head_dim=(0, 8)), r"Choice.mamba_head_dim\[0\] 0 must be positive"),
    (dict(depth=0), r"Choice.depth 0 must be an integer in \[1, num_layers=7\]"),
    (dict(depth=8), r"Choice.depth 8 must be an integer in \[1, num_layers=7\]"),
])
def test_invalid_choices_name_the_field(changes, message):
  values = {**Choice.full(PARENT).to_dict(), **changes}
  with pytest.raises(SpaceError, match=message):
    Choice(**values).validate(PARENT)


def test_choice_against_space():
  space = ElasticSpace.from_dict({"hidden": [16, 32], "mlp": [24, 48], "mamba_heads": [8, 16]}, PARENT)
  Choice.homogeneous(PARENT, hidden=16, mlp=24).validate(PARENT, space)
  with pytest.raises(SpaceError, match=r"Choice.mlp\[0\] 12 is not a candidate of the space; mlp candidates are "
                                       r"\[24, 48\]"):
    Choice.homogeneous(PARENT, mlp=12).validate(PARENT, space)
  with pytest.raises(SpaceError, match="Choice.hidden 8 is not a candidate"):
    Choice.homogeneous(PARENT, hidden=8).validate(PARENT, space)
  mixed = Choice(hidden=32, mlp=(24, 48, 48), attention_heads=(6, 6), mamba_heads=(16, 16), mamba_head_dim=(8, 8),
                 depth=7)
  with pytest.raises(SpaceError, match=r"Choice.mlp \[24, 48, 48\] differs between blocks but the space's mlp_mode "
                                       "is 'homogeneous'"):
    mixed.validate(PARENT, space)
  mixed.validate(PARENT, ElasticSpace.from_dict({**space.to_dict(), "mlp_mode": "heterogeneous"}, PARENT))
  with pytest.raises(SpaceError, match="Choice keys: unknown \\['width'\\], missing \\['hidden'\\]"):
    Choice.from_dict({**{k: v for k, v in mixed.to_dict().items() if k != "hidden"}, "width": 3})
