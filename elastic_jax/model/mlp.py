"""Nemotron-H's MLP block: up-projection, squared ReLU, down-projection; no gate, no biases."""

from __future__ import annotations

import math

import flax.linen as nn
import jax

from elastic_jax.model.config import BlockSpec, ModelConfig
from elastic_jax.model.layers import Projection, constrain

Array = jax.Array


class MLP(nn.Module):
  config: ModelConfig
  spec: BlockSpec

  @nn.compact
  def __call__(self, u: Array) -> Array:
    cfg = self.config
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    hidden = Projection((self.spec.intermediate_size,), ("embed",), ("mlp",), cfg.initializer_range,
                        name="up_proj", **kw)(u)
    hidden = constrain(jax.nn.relu(hidden) ** 2, ("batch", "length", "mlp"))
    return Projection((cfg.hidden_size,), ("mlp",), ("embed",), cfg.initializer_range / math.sqrt(cfg.num_layers),
                      name="down_proj", **kw)(hidden)
