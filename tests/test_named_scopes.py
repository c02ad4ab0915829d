"""Profiles and HLO dumps read as the model does: every block is named by its kind, and the steps inside a mixer that
are not modules of their own (the conv, the SSD scan, the attention core, the squared ReLU) by what they compute."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from conftest import small_config

from elastic_jax.model import HybridLM

# Pattern "M*-": layer 0 Mamba, layer 1 attention, layer 2 MLP. Flax adds the module path (layers_{i}/mixer).
SCOPES = ("HybridLM/layers_0/mamba_block/mixer/conv/", "HybridLM/layers_0/mamba_block/mixer/ssd/",
          "HybridLM/layers_1/attention_block/mixer/attention_core/", "HybridLM/layers_2/mlp_block/mixer/squared_relu/")


def forward_texts():
  """(StableHLO with locations, compiled HLO with op metadata) of a forward pass."""
  model = HybridLM(small_config("M*-"))
  tokens = jnp.zeros((2, 8), jnp.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))
  lowered = jax.jit(model.apply).lower(params, tokens)
  return lowered.as_text(debug_info=True), lowered.compile().as_text()


def test_blocks_and_mixer_steps_are_named_in_the_hlo():
  stablehlo, hlo = forward_texts()
  locations = set(re.findall(r'loc\("([^"]*)"', stablehlo))
  op_names = set(re.findall(r'op_name="([^"]*)"', hlo))
  for scope in SCOPES:
    assert any(scope in name for name in locations), f"{scope} in no StableHLO location"
    assert any(scope in name for name in op_names), f"{scope} in no HLO op_name"
