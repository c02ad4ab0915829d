"""The Mamba-2 mixer: projections, causal conv, SSD scan, grouped gated RMSNorm, output projection.

Nemotron-H's fused ``in_proj`` (rows z | x | B | C | dt) is stored here as five projections with explicit head axes,
and its conv over [x | B | C] as three depthwise convs: the same function, but every tensor that shares the
Mamba-head axis (z, x, dt, conv_x, A_log, D, dt_bias, norm, out_proj) names it, so elastic masks, importance
permutations and shardings address heads and head channels without index arithmetic. B and C (never elastic)
live apart from the heads.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from elastic_jax.model.config import BlockSpec, ModelConfig
from elastic_jax.model.layers import (CausalConv, Projection, constrain, dtype_of, gated_group_rms_norm, param,
                                      record_importance)
from elastic_jax.ops import context_parallel
from elastic_jax.ops import ssd as ssd_ops

Array = jax.Array
MambaCache = dict[str, Array]  # conv_x [b,K-1,H,P], conv_B / conv_C [b,K-1,G,N], ssm [b,H,P,N] (fp32)


def init_mamba_cache(config: ModelConfig, spec: BlockSpec, batch: int) -> MambaCache:
  dt = dtype_of(config.dtype)
  k1, h, p = config.conv_kernel - 1, spec.mamba_num_heads, spec.mamba_head_dim
  g, n = config.n_groups, config.ssm_state_size
  return {
      "conv_x": jnp.zeros((batch, k1, h, p), dt),
      "conv_B": jnp.zeros((batch, k1, g, n), dt),
      "conv_C": jnp.zeros((batch, k1, g, n), dt),
      "ssm": jnp.zeros((batch, h, p, n), jnp.float32),
  }


def _a_log_init(key, shape, dtype):
  del key  # deterministic: A = -(1, 2, ..., H), Mamba-2's usual initialisation
  return jnp.log(jnp.arange(1, shape[0] + 1, dtype=jnp.float32)).astype(dtype)


def _dt_bias_init(dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4):
  """dt_bias = softplus^-1(dt) with dt log-uniform in [dt_min, dt_max], so initial step sizes span that range."""

  def init(key, shape, dtype):
    u = jax.random.uniform(key, shape, jnp.float32)
    dt = jnp.maximum(jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)), floor)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

  return init


class Mamba2Mixer(nn.Module):
  """u [b, l, d] -> [b, l, d]; with a cache, continues from it and returns the updated cache.

  Without a cache, under a mesh whose "context" axis has more than one device, the sequence is split along its length
  and the conv and scan exchange what crosses shard boundaries (``elastic_jax.ops.context_parallel``).

  With a cache, ``start`` [b] (optional) is each row's first real position, ``position`` the index of u's first
  token: the tokens before ``start`` are a left-padded prompt's pad prefix. They enter the conv as zero inputs and
  the scan with dt = 0 (no decay, no input), which is exactly how a sequence begins (zero conv history, zero state),
  so the row's conv and SSM states, and its outputs from ``start`` on, are those of its prompt alone. Their own
  outputs (the D skip, the conv bias) are never read.
  """

  config: ModelConfig
  spec: BlockSpec

  @nn.compact
  def __call__(self, u: Array, cache: MambaCache | None = None, masks: dict[str, Array] | None = None,
               position: Array | int = 0, start: Array | None = None) -> tuple[Array, MambaCache | None]:
    """masks: optional {"ssm_heads": [b, H], "mamba_head_dim": [b, P]} nested masks (either may be absent)."""
    cfg, spec = self.config, self.spec
    h, p, g, n = spec.mamba_num_heads, spec.mamba_head_dim, cfg.n_groups, cfg.ssm_state_size
    std, out_std = cfg.initializer_range, cfg.initializer_range / math.sqrt(cfg.num_layers)
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    pdt = dtype_of(cfg.param_dtype)
    heads, groups = ("ssm_heads", "mamba_head_dim"), ("ssm_groups", "ssm_state")

    z = Projection((h, p), ("embed",), heads, std, name="z_proj", **kw)(u)
    x = Projection((h, p), ("embed",), heads, std, name="x_proj", **kw)(u)
    b_in = Projection((g, n), ("embed",), groups, std, name="B_proj", **kw)(u)
    c_in = Projection((g, n), ("embed",), groups, std, name="C_proj", **kw)(u)
    dt_raw = Projection((h,), ("embed",), ("ssm_heads",), std, name="dt_proj", **kw)(u)
    real = None  # [b, l], False at a left-padded prompt's pad positions
    if start is not None:  # zero conv inputs there (``where``, not a multiply: no pad value can leak)
      real = (position + jnp.arange(u.shape[1]))[None, :] >= start[:, None]
      x, b_in, c_in = (jnp.where(real[:, :, None, None], t, 0) for t in (x, b_in, c_in))

    record_importance(self, "ssm", x)  # the x slice of in_proj, [b, H, P]: channel and head scores derive from it
    get = (lambda key: None) if cache is None else cache.get
    # A whole sequence under a mesh with a context axis > 1 is split along its length: the conv and the scan (the
    # only steps that mix tokens) exchange boundaries between shards. A cached call continues one sequence as is.
    context = (None if cache is not None else
               context_parallel.active_context(*u.shape[:2], min_shard_length=cfg.conv_kernel - 1))
    with jax.named_scope("conv"):
      x, conv_x = CausalConv(cfg.conv_kernel, heads, name="conv_x", **kw)(x, get("conv_x"), context)
      b_in, conv_b = CausalConv(cfg.conv_kernel, groups, name="conv_B", **kw)(b_in, get("conv_B"), context)
      c_in, conv_c = CausalConv(cfg.conv_kernel, groups, name="conv_C", **kw)(c_in, get("conv_C"), context)
      x, b_in, c_in = jax.nn.silu(x), jax.nn.silu(b_in), jax.nn.silu(c_in)
    channel_mask = _head_channel_mask(masks, h, p)  # [b, 1, H, P] or None
    if channel_mask is not None:  # after the conv: a masked channel must not pick up the conv bias
      x = x * channel_mask.astype(x.dtype)
    x = constrain(x, ("batch", "length", *heads))

    a_log = param(self, "A_log", _a_log_init, (h,), ("ssm_heads",), pdt)
    d_skip = param(self, "D", nn.initializers.ones, (h,), ("ssm_heads",), pdt)
    dt_bias = param(self, "dt_bias", _dt_bias_init(), (h,), ("ssm_heads",), pdt)
    dt = jax.nn.softplus(dt_raw.astype(jnp.float32) + dt_bias.astype(jnp.float32))
    dt = jnp.clip(dt, *cfg.time_step_limit)
    if real is not None:  # after the clip: a pad step must neither decay nor feed the state, whatever the limits
      dt = jnp.where(real[:, :, None], dt, 0.0)
    a = -jnp.exp(a_log.astype(jnp.float32))
    d_skip = d_skip.astype(jnp.float32)

    with jax.named_scope("ssd"):
      if cache is not None and u.shape[1] == 1:  # one decode token: a single recurrence step, no scan
        y, state = ssd_ops.ssd_step(cache["ssm"], x[:, 0], dt[:, 0], a, b_in[:, 0], c_in[:, 0], d_skip)
        y = y[:, None]
      elif context is not None:
        y, state = context_parallel.ssd(x, dt, a, b_in, c_in, d_skip, context=context, chunk_size=cfg.chunk_size,
                                        impl=cfg.ssd_impl, inter_chunk=cfg.ssd_inter_chunk)
      else:
        y, state = ssd_ops.ssd(x, dt, a, b_in, c_in, d_skip, chunk_size=cfg.chunk_size,
                               initial_state=None if cache is None else cache["ssm"],
                               impl=cfg.ssd_impl, inter_chunk=cfg.ssd_inter_chunk)

    y = GatedGroupNorm(g, cfg.layer_norm_epsilon, param_dtype=cfg.param_dtype, name="norm")(y, z, channel_mask)
    out = Projection((cfg.hidden_size,), heads, ("embed",), out_std, name="out_proj", **kw)(
        y.astype(dtype_of(cfg.dtype)))
    new_cache = None if cache is None else {"conv_x": conv_x, "conv_B": conv_b, "conv_C": conv_c, "ssm": state}
    return out, new_cache


def _head_channel_mask(masks: dict[str, Array] | None, h: int, p: int) -> Array | None:
  """The outer product of the Mamba head and head-channel masks, shaped [b, 1, H, P] to broadcast over length."""
  if not masks:
    return None
  heads = masks.get("ssm_heads")
  channels = masks.get("mamba_head_dim")
  heads = jnp.ones((1, h), jnp.float32) if heads is None else heads.astype(jnp.float32)
  channels = jnp.ones((1, p), jnp.float32) if channels is None else channels.astype(jnp.float32)
  return (heads[:, :, None] * channels[:, None, :])[:, None]


class GatedGroupNorm(nn.Module):
  """Holds the grouped gated RMSNorm's scale [H, P]; see ``gated_group_rms_norm``."""

  n_groups: int
  eps: float
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, y: Array, gate: Array, mask: Array | None = None) -> Array:
    scale = param(self, "scale", nn.initializers.ones, y.shape[-2:], ("ssm_heads", "mamba_head_dim"),
                  dtype_of(self.param_dtype))
    return gated_group_rms_norm(y, gate, scale, self.n_groups, self.eps, mask)
