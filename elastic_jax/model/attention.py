"""Causal GQA self-attention without positional encoding (Nemotron-H's attention blocks are NoPE)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from elastic_jax.model.config import BlockSpec, ModelConfig
from elastic_jax.model.layers import Projection, constrain, dtype_of, record_importance
from elastic_jax.ops import context_parallel
from elastic_jax.ops.attention import causal_gqa

Array = jax.Array
AttentionCache = dict[str, Array]  # k, v: [b, max_len, Hkv, hd]


def init_attention_cache(config: ModelConfig, spec: BlockSpec, batch: int, max_len: int) -> AttentionCache:
  del spec  # KV heads and head dim are never elastic
  shape = (batch, max_len, config.num_key_value_heads, config.head_dim)
  return {"k": jnp.zeros(shape, dtype_of(config.dtype)), "v": jnp.zeros(shape, dtype_of(config.dtype))}


class Attention(nn.Module):
  """u [b, l, d] -> [b, l, d]. With a cache, ``position`` is the index of u's first token in the sequence.

  With a cache, ``start`` [b] (optional) is each row's first real position: cache slots before it hold a left-padded
  prompt's pad prefix and are never attended, in this call or any later one.

  Without a cache, under a mesh whose "context" axis has more than one device, the sequence is split along its length
  and attention runs as ring attention over its shards (``elastic_jax.ops.context_parallel``).
  """

  config: ModelConfig
  spec: BlockSpec

  @nn.compact
  def __call__(self, u: Array, cache: AttentionCache | None = None, position: Array | int = 0,
               masks: dict[str, Array] | None = None, start: Array | None = None
               ) -> tuple[Array, AttentionCache | None]:
    """masks: optional {"heads": [b, Hq]} query-head mask."""
    cfg = self.config
    hq, hkv, hd = self.spec.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    std, out_std = cfg.initializer_range, cfg.initializer_range / math.sqrt(cfg.num_layers)
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    q = Projection((hq, hd), ("embed",), ("heads", "head_dim"), std, name="q_proj", **kw)(u)
    k = Projection((hkv, hd), ("embed",), ("kv_heads", "head_dim"), std, name="k_proj", **kw)(u)
    v = Projection((hkv, hd), ("embed",), ("kv_heads", "head_dim"), std, name="v_proj", **kw)(u)
    q = constrain(q, ("batch", "length", "heads", "head_dim"))

    # A whole sequence under a mesh with a context axis > 1 is split along its length: ring attention over its shards.
    context = context_parallel.active_context(*u.shape[:2]) if cache is None else None
    q_positions = position + jnp.arange(u.shape[1])
    new_cache = None
    with jax.named_scope("attention_core"):
      if context is not None:
        out = context_parallel.causal_attention(q, k, v, context)
      elif cache is None:
        out = causal_gqa(q, k, v, q_positions, q_positions)
      else:
        new_cache = {name: jax.lax.dynamic_update_slice_in_dim(cache[name], t.astype(cache[name].dtype), position, 1)
                     for name, t in (("k", k), ("v", v))}
        kv_positions = jnp.arange(new_cache["k"].shape[1])
        kv_valid = None if start is None else kv_positions[None, :] >= start[:, None]
        out = causal_gqa(q, new_cache["k"], new_cache["v"], q_positions, kv_positions, kv_valid)
    record_importance(self, "heads", out)  # per-head output [b, Hq, hd]; heads ranked by its L2 over hd
    if masks and masks.get("heads") is not None:
      # Mask the head's *output*: a zeroed query would still attend uniformly and emit the mean of V.
      out = out * masks["heads"][:, None, :, None].astype(out.dtype)
    out = Projection((cfg.hidden_size,), ("heads", "head_dim"), ("embed",), out_std, name="o_proj", **kw)(out)
    return out, new_cache
