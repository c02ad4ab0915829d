"""Causal grouped-query attention core (no positional encoding: Nemotron-H attention is NoPE)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def causal_gqa(q: Array, k: Array, v: Array, q_positions: Array, kv_positions: Array,
               kv_valid: Array | None = None) -> Array:
  """Softmax attention where query i sees key j iff ``kv_positions[j] <= q_positions[i]`` (and ``kv_valid[b, j]``).

  q: [b, l, Hq, hd]; k, v: [b, s, Hkv, hd] with Hq a multiple of Hkv (query head h reads KV head h // (Hq/Hkv));
  q_positions: [l]; kv_positions: [s]. A decode cache stores position j in slot j, so slots not yet written lie
  in the future of every query and are masked by causality alone.
  kv_valid: optional [b, s] bool, False for keys row b must never see (the pad prefix of a left-padded prompt).
  NoPE makes this exact: a row whose first ``start`` keys are masked attends as if its sequence began at ``start``.
  A query that sees no key at all (a pad query) averages every value uniformly; its output is never read.
  Scores and softmax in fp32; returns [b, l, Hq, hd] in q.dtype.
  """
  b, l, hq, hd = q.shape
  hkv = k.shape[2]
  q = q.reshape(b, l, hkv, hq // hkv, hd)
  scores = jnp.einsum("blkrd,bskd->bkrls", q, k, preferred_element_type=jnp.float32) * (hd ** -0.5)
  allowed = (kv_positions[None, :] <= q_positions[:, None])[None]  # [1, l, s]
  if kv_valid is not None:
    allowed = allowed & kv_valid[:, None, :]  # [b, l, s]
  allowed = allowed[:, None, None]  # broadcasts over the KV-head and group axes of the scores
  scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkrls,bskd->blkrd", probs, v)
  return out.reshape(b, l, hq, hd)
