"""Nemotron-H's MLP block: up-projection, squared ReLU, down-projection; no gate, no biases."""

from __future__ import annotations

import math

import flax.linen as nn
import jax

from elastic_jax.model.config import BlockSpec, ModelConfig
from elastic_jax.model.layers import Projection, constrain, record_importance

Array = jax.Array


class MLP(nn.Module):
  config: ModelConfig
  spec: BlockSpec

  @nn.compact
  def __call__(self, u: Array, masks: dict[str, Array] | None = None) -> Array:
    """masks: optional {"mlp": [b, F]} neuron mask, applied to the up-projection output."""
    cfg = self.config
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    hidden = Projection((self.spec.intermediate_size,), ("embed",), ("mlp",), cfg.initializer_range,
                        name="up_proj", **kw)(u)
    record_importance(self, "mlp", hidden)  # D-3: neurons ranked on the up-projection output
    if masks and masks.get("mlp") is not None:
      hidden = hidden * masks["mlp"][:, None, :].astype(hidden.dtype)
    with jax.named_scope("squared_relu"):
      hidden = constrain(jax.nn.relu(hidden) ** 2, ("batch", "length", "mlp"))
    return Projection((cfg.hidden_size,), ("mlp",), ("embed",), cfg.initializer_range / math.sqrt(cfg.num_layers),
                      name="down_proj", **kw)(hidden)
