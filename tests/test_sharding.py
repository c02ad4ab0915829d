"""Logical-axis rules: params, optimizer moments and batches get the shardings the rules table says."""

from __future__ import annotations

import flax.linen as nn
import jax
import pytest
from conftest import small_config
from jax.sharding import PartitionSpec as P

from elastic_jax.elastic.router import RouterSchedule
from elastic_jax.elastic.space import ElasticSpace
from elastic_jax.train.loop import compiled_elastic_step
from elastic_jax.train.optim import OptimizerConfig, default_router_optimizer_config
from elastic_jax.train.sharding import DEFAULT_RULES, MESH_AXES, batch_sharding, make_mesh
from elastic_jax.train.elastic_step import ElasticSetup


def test_state_shardings_follow_the_rules_table():
  config = small_config("M-*")
  setup = ElasticSetup(config, ElasticSpace.from_fractions(config, (0.5, 1.0)), (1.0, 0.5), (0, 1, 2),
                       RouterSchedule(total_steps=10), router_width=8)
  mesh = make_mesh()
  shardings = compiled_elastic_step(setup, OptimizerConfig(), default_router_optimizer_config(), 10, 0, mesh,
                                     DEFAULT_RULES).state_shardings
  params = shardings.params
  assert params["layers_1"]["mixer"]["up_proj"]["kernel"].spec == P("fsdp", "tensor")
  assert params["layers_1"]["mixer"]["down_proj"]["kernel"].spec == P("tensor", "fsdp")
  assert params["layers_0"]["mixer"]["x_proj"]["kernel"].spec == P("fsdp", "tensor", None)
  assert params["layers_0"]["mixer"]["B_proj"]["kernel"].spec == P("fsdp", None, None)
  assert params["layers_2"]["mixer"]["q_proj"]["kernel"].spec == P("fsdp", "tensor", None)
  assert params["embed"]["embedding"].spec == P("tensor", "fsdp")
  # AdamW's moments are sharded like the params they track; counters, PRNG and router are replicated.
  adam = [s for s in jax.tree.leaves(shardings.opt_state) if s.spec == P("fsdp", "tensor")]
  assert len(adam) >= 2
  assert shardings.step.spec == P() and shardings.rng.spec == P()
  assert all(s.spec == P() for s in jax.tree.leaves(shardings.router_params))
  assert batch_sharding(mesh).spec == P(("data", "fsdp", "expert"), None)


def test_mesh_shape_must_match_devices():
  with pytest.raises(ValueError, match=r"mesh shape \(2, 2, 2\) needs 8 devices but 1 are available"):
    make_mesh((2, 2, 2))
  with pytest.raises(ValueError, match=r"mesh shape \(1, 1, 1, 1, 1, 1\) has 6 axes but the mesh has only 5"):
    make_mesh((1, 1, 1, 1, 1, 1))


def test_shorter_mesh_shapes_pad_trailing_axes_and_length_maps_to_context():
  mesh = make_mesh((1,))
  assert mesh.axis_names == MESH_AXES == ("data", "fsdp", "tensor", "context", "expert")
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1, "context": 1, "expert": 1}
  assert dict(make_mesh((1, 1, 1, 1)).shape) == dict(mesh.shape)
  assert dict(DEFAULT_RULES)["length"] == "context"
  activations = nn.logical_to_mesh_sharding(P("batch", "length", "embed"), mesh, DEFAULT_RULES)
  assert activations.spec == P(("data", "fsdp", "expert"), "context", None)


def test_mesh_and_rules_come_from_the_run_config():
  import ml_collections  # pylint: disable=import-outside-toplevel
  from elastic_jax.train.pipeline import mesh_from_config  # pylint: disable=import-outside-toplevel
  mesh, rules = mesh_from_config(ml_collections.ConfigDict({"mesh": {"shape": [1, 1, 1],
                                                                    "rules": [["batch", ["data"]], ["mlp", None]]}}))
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1, "context": 1, "expert": 1}
  assert rules == (("batch", ("data",)), ("mlp", None))
  _, default = mesh_from_config(ml_collections.ConfigDict({}))
  assert default == DEFAULT_RULES
  with pytest.raises(ValueError, match=r"mesh\.axes: unknown key \(known keys: rules, shape\)"):
    mesh_from_config(ml_collections.ConfigDict({"mesh": {"axes": 1}}))
