"""The backward pass of the fused SSD in XLA, from the chunk-start states that the forward kernels saved.

The chunked SSD splits into two parts that are local to a chunk and one linear recurrence between chunks:

    y       = Y(inputs, start)         intra-chunk output + exp(a_cum) C . start + D x
    S, a    = S(inputs)                each chunk's own contribution to the state at its end, its total decay
    start   = P(S, a, initial_state)   start[c + 1] = a[c] start[c] + S[c], final_state = start[c_last + 1]

Given the saved ``start`` the backward needs no forward scan: pull the output cotangent back through Y (which also
gives d start), run P's transpose backwards over the chunks, and pull the result back through S. Y and S are
differentiated by ``jax.vjp`` of the einsum forms below, so every gradient is exact to rounding and the backward
costs the chunked XLA backward minus its inter-chunk scans.

Arrays are in the tiled layout of ``kernels/ssd/fused.py``: lp = c * q tokens, chunk boundaries every q tokens.
Shape letters as in ``elastic_jax.ops.ssd``; k is a source position within a chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def _matmul(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _chunk_log_decays(dt: jax.Array, A: jax.Array, num_chunks: int) -> jax.Array:
  """a_cum [b, c, q, h]: log-decay from the start of each chunk through each token, from dt [b, lp, h]."""
  b, lp, h = dt.shape
  return jnp.cumsum(dt.reshape(b, num_chunks, lp // num_chunks, h) * A, axis=2)


def _by_group(t: jax.Array, g: int) -> jax.Array:
  """[b, c, q, h] -> [b, c, g, r, q]: splits the heads into groups and moves the chunk-token axis last."""
  *lead, h = t.shape
  return jnp.moveaxis(t.reshape(*lead, g, h // g), 2, -1)


def outputs_given_start_states(x, dt, A, B, C, D, start_states, *, num_chunks: int) -> jax.Array:
  """Y: the outputs when each chunk starts from ``start_states``.

  Args:
    x: [b, lp, h, p] fp32. dt: [b, lp, h] fp32. A: [h]. B, C: [b, lp, g, n] fp32. D: [h].
    start_states: [b, c, h, p, n] fp32.
    num_chunks: c.

  Returns:
    y [b, lp, h, p] fp32.
  """
  b, lp, h, p = x.shape
  g, n = B.shape[2:]
  r, q = h // g, lp // num_chunks
  x_chunks = x.reshape(b, num_chunks, q, g, r, p)
  B_chunks = B.reshape(b, num_chunks, q, g, n)
  C_chunks = C.reshape(b, num_chunks, q, g, n)
  dt_chunks = _by_group(dt.reshape(b, num_chunks, q, h), g)  # [b, c, g, r, k]
  a_cum = _by_group(_chunk_log_decays(dt, A, num_chunks), g)  # [b, c, g, r, q]

  scores = _matmul("bcqgn,bckgn->bcgqk", C_chunks, B_chunks)  # [b, c, g, q, k]
  causal = jnp.tril(jnp.ones((q, q), dtype=bool))
  # Mask before exp: above the diagonal the exponent is positive (overflow) and inf * 0 is nan in the gradient.
  decay = jnp.exp(jnp.where(causal, a_cum[..., :, None] - a_cum[..., None, :], -jnp.inf))  # [b, c, g, r, q, k]
  weights = scores[:, :, :, None] * decay * dt_chunks[..., None, :]
  y = _matmul("bcgrqk,bckgrp->bcqgrp", weights, x_chunks)  # [b, c, q, g, r, p]
  y_from_start = _matmul("bcqgn,bcgrpn->bcqgrp", C_chunks, start_states.reshape(b, num_chunks, g, r, p, n))
  y = y + y_from_start * jnp.moveaxis(jnp.exp(a_cum), -1, 2)[..., None]
  y = y + D.reshape(g, r, 1) * x_chunks
  return y.reshape(b, lp, h, p)


def chunk_states_and_decays(x, dt, A, B, *, num_chunks: int) -> tuple[jax.Array, jax.Array]:
  """S: each chunk's own contribution to the state at its end, and each chunk's total decay.

  Args:
    x: [b, lp, h, p] fp32. dt: [b, lp, h] fp32. A: [h]. B: [b, lp, g, n] fp32.
    num_chunks: c.

  Returns:
    (chunk_states [b, c, h, p, n], chunk_decay [b, c, h]) fp32.
  """
  b, lp, h, p = x.shape
  g, n = B.shape[2:]
  r, q = h // g, lp // num_chunks
  a_cum = _chunk_log_decays(dt, A, num_chunks)  # [b, c, q, h]
  decay_to_end = jnp.exp(a_cum[:, :, -1:] - a_cum) * dt.reshape(b, num_chunks, q, h)  # [b, c, k, h]
  x_weighted = (x.reshape(b, num_chunks, q, h, p) * decay_to_end[..., None]).reshape(b, num_chunks, q, g, r, p)
  chunk_states = _matmul("bckgrp,bckgn->bcgrpn", x_weighted, B.reshape(b, num_chunks, q, g, n))
  return chunk_states.reshape(b, num_chunks, h, p, n), jnp.exp(a_cum[:, :, -1])


def _state_passing_transpose(start_states, chunk_decay, d_start_states, d_final_state):
  """P's backward: from the cotangents of every chunk-start state and of the final state, run backwards over chunks.

  With G[c] = dL/d start[c] (all paths), G[c_last + 1] = d_final_state and G[c] = d_start[c] + a[c] G[c + 1];
  then dL/dS[c] = G[c + 1] and dL/da[c] = <G[c + 1], start[c]>.

  Args:
    start_states: [b, c, h, p, n]. chunk_decay: [b, c, h]. d_start_states: [b, c, h, p, n] (through Y only).
    d_final_state: [b, h, p, n].

  Returns:
    (d_chunk_states [b, c, h, p, n], d_chunk_decay [b, c, h], d_initial_state [b, h, p, n]).
  """

  def step(d_next_start, chunk):  # d_next_start: G[c + 1]
    start, decay, d_start_through_y = chunk
    d_decay = jnp.sum(d_next_start * start, axis=(-2, -1))
    d_start = d_start_through_y + decay[..., None, None] * d_next_start
    return d_start, (d_next_start, d_decay)

  time_major = lambda t: jnp.moveaxis(t, 1, 0)
  d_initial_state, (d_chunk_states, d_chunk_decay) = lax.scan(
      step, d_final_state, (time_major(start_states), time_major(chunk_decay), time_major(d_start_states)),
      reverse=True)
  return time_major(d_chunk_states), time_major(d_chunk_decay), d_initial_state


def ssd_backward(residuals, cotangents, *, num_chunks: int):
  """Gradients of the tiled SSD w.r.t. (x, dt, A, B, C, D, initial_state).

  Args:
    residuals: (x, dt, A, B, C, D, start_states) as saved by the forward; x, B, C in the activation dtype.
    cotangents: (dy [b, lp, h, p], d_final_state [b, h, p, n]).
    num_chunks: c.

  Returns:
    Gradients in the dtypes of the inputs; computed in fp32.
  """
  x, dt, A, B, C, D, start_states = residuals
  dy, d_final_state = cotangents
  f32 = lambda t: t.astype(jnp.float32)

  y_of = lambda x, dt, A, B, C, D, start: outputs_given_start_states(x, dt, A, B, C, D, start,
                                                                      num_chunks=num_chunks)
  _, pull_y = jax.vjp(y_of, f32(x), dt, A, f32(B), f32(C), D, start_states)
  dx_y, ddt_y, dA_y, dB_y, dC, dD, d_start_states = pull_y(f32(dy))

  states_of = lambda x, dt, A, B: chunk_states_and_decays(x, dt, A, B, num_chunks=num_chunks)
  (_, chunk_decay), pull_states = jax.vjp(states_of, f32(x), dt, A, f32(B))
  d_chunk_states, d_chunk_decay, d_initial_state = _state_passing_transpose(start_states, chunk_decay,
                                                                            d_start_states, d_final_state)
  dx_s, ddt_s, dA_s, dB_s = pull_states((d_chunk_states, d_chunk_decay))

  return ((dx_y + dx_s).astype(x.dtype), ddt_y + ddt_s, dA_y + dA_s, (dB_y + dB_s).astype(B.dtype),
          dC.astype(C.dtype), dD, d_initial_state)
