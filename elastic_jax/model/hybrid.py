"""``HybridLM``: embeddings -> pre-norm residual blocks (Mamba-2 / attention / MLP / MoE) -> final norm -> LM head.

The same class serves the parent and every extracted child: a child is only a smaller ``ModelConfig``.

Usage::

  model = HybridLM(config)
  params = init_params(config, key)                                    # plain arrays (init's are axis-boxed)
  logits = model.apply({"params": params}, tokens)                      # [b, l, V] fp32
  cache = init_cache(config, batch, max_len)
  logits, cache = model.apply({"params": params}, tokens, cache=cache)  # continue a sequence (prefill / decode)
  cache = init_cache(config, batch, max_len, start=start)              # prompts left-padded, row i real from start[i]
  model = HybridLM(config, remat=remat_policies({"mamba": "full", "mlp": "dots"}))  # training memory lever
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from elastic_jax.model.attention import Attention, init_attention_cache
from elastic_jax.model.config import BLOCK_KINDS, BlockSpec, ModelConfig
from elastic_jax.model.layers import Embedding, Projection, RMSNorm, constrain, record_importance
from elastic_jax.model.mamba import Mamba2Mixer, init_mamba_cache
from elastic_jax.model.mlp import MLP
from elastic_jax.model.moe import MoE

Array = jax.Array
# {"position": int32 [], optional "start": int32 [b], "layers_{i}": per-block cache (Mamba and attention blocks)}
Cache = dict[str, Any]
RematPolicies = tuple[tuple[str, str], ...]  # ((block kind, policy), ...), sorted: hashable, a static attribute

# Each block kind's mixer: (config, spec, normed input, block cache, block masks, position, start) -> (output, new
# block cache or None). Stateless kinds (MLP, MoE) keep no cache, so decoding with caches needs nothing from them.
MIXERS: dict[str, Callable[..., tuple[Array, Any]]] = {
    "mamba": lambda cfg, spec, x, cache, masks, position, start: Mamba2Mixer(cfg, spec, name="mixer")(
        x, cache, masks, position, start),
    "attention": lambda cfg, spec, x, cache, masks, position, start: Attention(cfg, spec, name="mixer")(
        x, cache, position, masks, start),
    "mlp": lambda cfg, spec, x, cache, masks, position, start: (MLP(cfg, spec, name="mixer")(x, masks), None),
    "moe": lambda cfg, spec, x, cache, masks, position, start: (MoE(cfg, spec, name="mixer")(x, masks), None),
}
# The decode cache of each stateful kind: (config, spec, batch, max_len) -> its empty cache.
CACHES: dict[str, Callable[..., Any]] = {
    "mamba": lambda config, spec, batch, max_len: init_mamba_cache(config, spec, batch),
    "attention": init_attention_cache,
}

# What the backward pass keeps of a block's forward. "none": everything (no recomputation); "full": only the
# block's inputs (the whole block is recomputed); "dots": the outputs of matmuls without batch dimensions (the
# projections), recomputing the cheap elementwise work, norms and the SSD/attention cores around them.
REMAT_POLICIES = ("none", "full", "dots")


def remat_policies(remat: Mapping[str, str] | RematPolicies | None) -> RematPolicies:
  """Validates a per-block-kind remat setting (e.g. ``{"mamba": "full", "mlp": "dots"}``) into its hashable form.

  Kinds left out, and kinds set to "none", are not rematerialised (and are dropped from the result).
  """
  kinds = tuple(BLOCK_KINDS.values())
  out = []
  for kind, policy in sorted(dict(remat or {}).items()):
    if kind not in kinds:
      raise ValueError(f"remat has block kind {kind!r}; the kinds are {kinds} (map each to one of "
                       f"{REMAT_POLICIES}).")
    if policy not in REMAT_POLICIES:
      raise ValueError(f"remat[{kind!r}]={policy!r} is not a policy; use one of {REMAT_POLICIES}.")
    if policy != "none":
      out.append((kind, policy))
  return tuple(out)


def init_cache(config: ModelConfig, batch: int, max_len: int, start: Array | None = None) -> Cache:
  """An empty decode cache for ``batch`` sequences of up to ``max_len`` tokens (prompt + generated).

  start: optional [b] int, each row's first real position when the prompts are left-padded to one length (row i's
  prompt in columns ``start[i]:``). Every block then ignores the pad prefix exactly, in the prefill and in every
  later decode step, so all prompts prefill in one pass. Without it every row starts at position 0.
  """
  cache: Cache = {"position": jnp.zeros((), jnp.int32)}
  if start is not None:
    cache["start"] = jnp.asarray(start, jnp.int32)
  for spec in config.block_specs():
    if spec.kind in CACHES:
      cache[f"layers_{spec.index}"] = CACHES[spec.kind](config, spec, batch, max_len)
  return cache


def init_params(config: ModelConfig, key: Array) -> dict[str, Any]:
  """Fresh parameters as plain arrays (``HybridLM.init`` returns them boxed with their logical axis names).

  The draws use the ``rbg`` PRNG seeded from ``key``: XLA compiles one threefry draw per parameter slowly on CPU
  (about 0.5 s each), rbg several times faster, and init quality does not depend on the generator.
  """
  return nn.meta.unbox(jax.jit(init_boxed_params, static_argnums=0)(config, key))


def init_boxed_params(config: ModelConfig, key: Array) -> dict[str, Any]:
  """Fresh parameters, each boxed with its logical axis names; traceable, so ``jax.jit(..., out_shardings=...)``
  over it creates every parameter directly in its sharded layout (see ``init_params`` for the PRNG)."""
  init_key = jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl="rbg")
  return HybridLM(config).init(init_key, jnp.zeros((1, 1), jnp.int32))["params"]


def param_shapes(config: ModelConfig) -> dict[str, Any]:
  """The parameter tree as ``jax.ShapeDtypeStruct`` leaves, without allocating or compiling anything."""
  return nn.meta.unbox(jax.eval_shape(HybridLM(config).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
                       ["params"])


def param_logical_axes(config: ModelConfig) -> dict[str, Any]:
  """The logical axis names of every parameter, as a tree of ``PartitionSpec`` shaped like the params."""
  boxed = jax.eval_shape(lambda: HybridLM(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  return nn.get_partition_spec(boxed["params"])


def _checkpoint_policy(policy: str) -> Callable | None:
  """The ``jax.checkpoint`` policy of a remat setting ("full" saves nothing, so its policy is None)."""
  return jax.checkpoint_policies.dots_with_no_batch_dims_saveable if policy == "dots" else None


class Block(nn.Module):
  """``h + gate * mixer(RMSNorm(h))``; the residual stream stays fp32 whatever the compute dtype.

  hidden_mask [b, 1, d] zeroes pruned embedding channels of the norm output and of the mixer output, so the
  residual stream stays zero there; gate [b] is the depth mask (0 turns the block into the identity).
  """

  config: ModelConfig
  spec: BlockSpec

  @nn.compact
  def __call__(self, h: Array, cache: dict | None = None, position: Array | int = 0,
               hidden_mask: Array | None = None, gate: Array | None = None, masks: dict | None = None,
               start: Array | None = None) -> tuple[Array, dict | None]:
    # Named by kind, so that profiles and HLO dumps read layers_{i}/mamba_block/mixer/ssd/...
    with jax.named_scope(f"{self.spec.kind}_block"):
      cfg = self.config
      normed = RMSNorm(cfg.layer_norm_epsilon, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="norm")(
          h, hidden_mask)
      record_importance(self, "hidden", normed)
      out, cache = MIXERS[self.spec.kind](cfg, self.spec, normed, cache, masks, position, start)
      out = out.astype(h.dtype)
      if hidden_mask is not None:
        out = out * hidden_mask
      if gate is not None:
        out = out * gate.astype(h.dtype)[:, None, None]
      return h + out, cache


class HybridLM(nn.Module):
  """tokens [b, l] int -> logits [b, l, V] fp32; with ``cache`` -> (logits, updated cache).

  ``masks`` (optional) selects a nested sub-network per sample, with a leading batch axis so every row of a batch
  can run a different budget: ``{"hidden": [b, d], "depth": [b, num_layers], "layers_{i}": {...}}`` where a block's
  entry is ``{"mlp": [b, F]}``, ``{"heads": [b, Hq]}``, ``{"ssm_heads": [b, H], "mamba_head_dim": [b, P]}`` or
  ``{"expert": [b, E], "expert_mlp": [b, I], "shared_mlp": [b, S]}``. Any
  entry may be absent (that axis stays full). Values are 1/0, or fractional for soft masks. Build them with
  ``elastic_jax.elastic.masks``.
  """

  config: ModelConfig
  # Per block kind, what the backward pass recomputes (see REMAT_POLICIES; build with ``remat_policies``).
  # Training forwards only (no cache); the parameter tree is the same with or without it.
  remat: RematPolicies = ()

  def _block_class(self, kind: str, decoding: bool) -> type[nn.Module]:
    policy = dict(self.remat).get(kind, "none")
    if decoding or policy == "none":
      return Block
    # nn.remat counts self as argument 0, so 3 is ``position``: a Python int outside decoding, kept static.
    return nn.remat(Block, static_argnums=(3,), policy=_checkpoint_policy(policy))

  @nn.compact
  def __call__(self, tokens: Array, cache: Cache | None = None, masks: dict[str, Any] | None = None
               ) -> Array | tuple[Array, Cache]:
    cfg = self.config
    remat_policies(self.remat)  # fail early, naming the bad entry
    masks = masks or {}
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    hidden_mask = masks.get("hidden")
    if hidden_mask is not None:
      hidden_mask = hidden_mask.astype(jnp.float32)[:, None, :]
    depth = masks.get("depth")

    h = Embedding(cfg.vocab_size, cfg.hidden_size, cfg.initializer_range, name="embed", **kw)(tokens)
    h = h.astype(jnp.float32)
    if hidden_mask is not None:
      h = h * hidden_mask
    h = constrain(h, ("batch", "length", "embed"))
    position = 0 if cache is None else cache["position"]
    start = None if cache is None else cache.get("start")  # left-padded rows' first real positions (init_cache)
    new_cache: Cache = {} if cache is None else {"position": position + tokens.shape[1]}
    if start is not None:
      new_cache["start"] = start
    for spec in cfg.block_specs():
      name = f"layers_{spec.index}"
      block = self._block_class(spec.kind, decoding=cache is not None)
      h, layer_cache = block(cfg, spec, name=name)(
          h, None if cache is None else cache.get(name), position, hidden_mask,
          None if depth is None else depth[:, spec.index], masks.get(name), start)
      if layer_cache is not None:
        new_cache[name] = layer_cache
      h = constrain(h, ("batch", "length", "embed"))
    h = RMSNorm(cfg.layer_norm_epsilon, name="norm_f", **kw)(h, hidden_mask)
    logits = Projection((cfg.vocab_size,), ("embed",), ("vocab",), cfg.initializer_range, out_dtype="float32",
                        name="lm_head", **kw)(h)
    logits = constrain(logits, ("batch", "length", "vocab"))
    return logits if cache is None else (logits, new_cache)
