"""The chunked SSD forward as two Pallas kernels lowered through Triton (NVIDIA GPUs; interpret mode elsewhere).

Inputs arrive in whole chunks of ``chunk`` tokens, ``chunk`` a power of two >= 16 (see ``kernels/ssd/fused.py``):

1. ``_state_passing_kernel``, grid (b, h, p blocks, n blocks): walks the chunks of one head in order with a
   [block_p, block_n] tile of the state in registers, storing the state that enters each chunk and the final state.
   It fuses each chunk's own contribution with the inter-chunk recurrence, so per-chunk states never reach memory.
2. ``_chunk_output_kernel``, grid (b, c, h, row blocks, p blocks): one tile of output rows and head dims of one
   chunk of one head: the intra-chunk (attention-like) output, the chunk-start state's contribution and the D skip,
   written once in the output dtype.

Head dims and state sizes that are not powers of two are covered by padded tiles with masked loads and stores.
Matmuls take their operands in the input dtype and accumulate in fp32; fp32 operands multiply in full IEEE
precision (not TF32), so that the fp32 path stays exact to rounding.

Shape letters as in ``elastic_jax.ops.ssd``: b batch, lp padded length, c chunks, q chunk tile, h heads, g groups,
r = h // g heads per group, p head dim, n state size.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from elastic_jax_kernels.ssd.api import BlockSizes, kernel_tiles


def _dot(a: jax.Array, b: jax.Array, *, contract: tuple[int, int]) -> jax.Array:
  """a @ b contracting dim ``contract[0]`` of a with ``contract[1]`` of b (2-D), accumulated in fp32.

  Both operands are cast to a's dtype; fp32 runs in IEEE precision (Triton would otherwise pick TF32).
  """
  b = b.astype(a.dtype)
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
  return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), precision=(precision, precision),
                         preferred_element_type=jnp.float32)


def _last(values: jax.Array) -> jax.Array:
  """values[-1] of a 1-D register tile, as a masked sum (Triton cannot index into a tile)."""
  is_last = jnp.arange(values.shape[0]) == values.shape[0] - 1
  return jnp.sum(jnp.where(is_last, values, 0.0))


def _state_passing_kernel(x_ref, B_ref, dt_ref, a_cum_ref, initial_state_ref,  # inputs
                          start_states_ref, final_state_ref,  # outputs
                          *, chunk: int, num_chunks: int, head_dim: int, state_size: int):
  """One (batch row, head, p block, n block): start[c + 1] = exp(a_end[c]) start[c] + (state chunk c adds).

  Refs: x [lp, block_p], B [lp, block_n] (this head's group), dt and a_cum [lp] fp32,
  initial_state [block_p, block_n] fp32; outputs start_states [c, block_p, block_n] and final_state
  [block_p, block_n] fp32.
  """
  block_p, block_n = initial_state_ref.shape
  p_valid = pl.program_id(2) * block_p + jnp.arange(block_p) < head_dim  # [block_p]
  n_valid = pl.program_id(3) * block_n + jnp.arange(block_n) < state_size  # [block_n]
  state_valid = p_valid[:, None] & n_valid[None, :]  # [block_p, block_n]
  matmul_dtype = x_ref.dtype

  def step(chunk_index, state):  # state [block_p, block_n] fp32: the state entering chunk `chunk_index`
    plgpu.store(start_states_ref.at[chunk_index], state, mask=state_valid)
    tokens = pl.ds(chunk_index * chunk, chunk)
    x = plgpu.load(x_ref.at[tokens, :], mask=p_valid[None, :], other=0.0)  # [q, block_p]
    B = plgpu.load(B_ref.at[tokens, :], mask=n_valid[None, :], other=0.0)  # [q, block_n]
    dt = dt_ref[tokens]  # [q]
    a_cum = a_cum_ref[tokens]  # [q]: log-decay from the chunk start through each token
    a_end = _last(a_cum)
    # Token k adds dt_k outer(x_k, B_k), decayed from k to the chunk's end.
    x_weighted = (x.astype(jnp.float32) * (jnp.exp(a_end - a_cum) * dt)[:, None]).astype(matmul_dtype)
    added = _dot(x_weighted, B, contract=(0, 0))  # [block_p, block_n]
    return jnp.exp(a_end) * state + added

  initial_state = plgpu.load(initial_state_ref, mask=state_valid, other=0.0)
  final_state = lax.fori_loop(0, num_chunks, step, initial_state)
  plgpu.store(final_state_ref, final_state, mask=state_valid)


def _chunk_output_kernel(x_ref, B_ref, C_ref, dt_ref, a_cum_ref, a_cum_rows_ref, start_state_ref, D_ref,  # inputs
                         y_ref,  # output
                         *, head_dim: int, state_size: int, block_n: int):
  """One (batch row, chunk, head, block of output rows, block of head dims): y = intra-chunk output
  + exp(a_cum) C . start + D x.

  Refs: x [q, block_p] (every token of the chunk), B [q, N] and C [block_q, N] (N = state size padded to whole blocks
  of block_n), dt and a_cum [q] fp32, a_cum_rows [block_q] fp32 (the output rows'), start_state [block_p, N] fp32,
  D [h] fp32; output y [block_q, block_p].
  """
  chunk, block_p = x_ref.shape
  block_q = y_ref.shape[0]
  matmul_dtype = x_ref.dtype
  rows = pl.program_id(3) * block_q + jnp.arange(block_q)  # [block_q]: output positions within the chunk
  p_valid = pl.program_id(4) * block_p + jnp.arange(block_p) < head_dim  # [block_p]
  x = plgpu.load(x_ref, mask=p_valid[None, :], other=0.0)  # [k, block_p]
  x_rows = plgpu.load(x_ref.at[pl.ds(pl.program_id(3) * block_q, block_q), :], mask=p_valid[None, :],
                      other=0.0)  # [block_q, block_p]
  dt = dt_ref[...]  # [k]
  a_cum = a_cum_ref[...]  # [k]
  a_cum_rows = a_cum_rows_ref[...]  # [block_q]

  # Sum over the state size in blocks: C . B (the chunk's "attention scores") and C . start.
  scores = jnp.zeros((block_q, chunk), jnp.float32)  # [block_q, k]
  y_from_start = jnp.zeros((block_q, block_p), jnp.float32)
  for n_block in range(C_ref.shape[1] // block_n):
    columns = pl.ds(n_block * block_n, block_n)
    n_valid = n_block * block_n + jnp.arange(block_n) < state_size  # [block_n]
    C = plgpu.load(C_ref.at[:, columns], mask=n_valid[None, :], other=0.0)  # [block_q, block_n]
    B = plgpu.load(B_ref.at[:, columns], mask=n_valid[None, :], other=0.0)  # [k, block_n]
    start = plgpu.load(start_state_ref.at[:, columns], mask=p_valid[:, None] & n_valid[None, :],
                       other=0.0)  # [block_p, block_n]
    scores += _dot(C, B, contract=(1, 1))
    y_from_start += _dot(C, start, contract=(1, 1))

  # y_q = sum over k <= q of scores[q, k] exp(a_cum_q - a_cum_k) dt_k x_k. Mask before exp: above the diagonal the
  # exponent is positive and could overflow.
  causal = rows[:, None] >= jnp.arange(chunk)[None, :]  # [block_q, k]
  decay = jnp.exp(jnp.where(causal, a_cum_rows[:, None] - a_cum[None, :], -jnp.inf))
  weights = (scores * decay * dt[None, :]).astype(matmul_dtype)
  y = _dot(weights, x, contract=(1, 0))  # [block_q, block_p]
  y += jnp.exp(a_cum_rows)[:, None] * y_from_start
  y += D_ref[pl.program_id(2)] * x_rows.astype(jnp.float32)
  plgpu.store(y_ref, y.astype(y_ref.dtype), mask=p_valid[None, :])


def state_passing(x: jax.Array, dt: jax.Array, a_cum: jax.Array, B: jax.Array, initial_state: jax.Array, *,
                  chunk: int, blocks: BlockSizes, interpret: bool) -> tuple[jax.Array, jax.Array]:
  """The first kernel: (start_states [b, c, h, p, n], final_state [b, h, p, n]) fp32; arguments as :func:`forward`."""
  b, lp, h, p = x.shape
  g, n = B.shape[2:]
  r = h // g
  num_chunks = lp // chunk
  f32 = jnp.float32
  tiles = kernel_tiles(p, n, chunk, blocks)
  block_p, block_n = tiles.state_p, tiles.state_n
  return pl.pallas_call(
      functools.partial(_state_passing_kernel, chunk=chunk, num_chunks=num_chunks, head_dim=p, state_size=n),
      grid=(b, h, pl.cdiv(p, block_p), pl.cdiv(n, block_n)),
      in_specs=[
          pl.BlockSpec((None, lp, None, block_p), lambda i, j, k, m: (i, 0, j, k)),  # x
          pl.BlockSpec((None, lp, None, block_n), lambda i, j, k, m: (i, 0, j // r, m)),  # B
          pl.BlockSpec((None, None, lp), lambda i, j, k, m: (i, j, 0)),  # dt
          pl.BlockSpec((None, None, lp), lambda i, j, k, m: (i, j, 0)),  # a_cum
          pl.BlockSpec((None, None, block_p, block_n), lambda i, j, k, m: (i, j, k, m)),  # initial_state
      ],
      out_specs=[
          pl.BlockSpec((None, num_chunks, None, block_p, block_n), lambda i, j, k, m: (i, 0, j, k, m)),
          pl.BlockSpec((None, None, block_p, block_n), lambda i, j, k, m: (i, j, k, m)),
      ],
      out_shape=[jax.ShapeDtypeStruct((b, num_chunks, h, p, n), f32), jax.ShapeDtypeStruct((b, h, p, n), f32)],
      compiler_params=plgpu.CompilerParams(num_warps=blocks.state_num_warps, num_stages=blocks.num_stages),
      interpret=interpret,
      name="ssd_state_passing",
  )(x, B, dt, a_cum, initial_state)


def chunk_output(x: jax.Array, dt: jax.Array, a_cum: jax.Array, B: jax.Array, C: jax.Array, D: jax.Array,
                 start_states: jax.Array, *, chunk: int, blocks: BlockSizes, interpret: bool) -> jax.Array:
  """The second kernel: y [b, lp, h, p] in x.dtype from the chunk-start states; arguments as :func:`forward`."""
  _, lp, h, p = x.shape
  g, n = B.shape[2:]
  r = h // g
  num_chunks = lp // chunk
  tiles = kernel_tiles(p, n, chunk, blocks)
  output_block_p, output_block_q, output_block_n = tiles.output_p, tiles.output_q, tiles.output_n
  row_blocks = chunk // output_block_q  # row blocks per chunk
  covered_n = pl.cdiv(n, output_block_n) * output_block_n
  # Grid (batch row i, chunk j, head k, row block m, head-dim block o).
  return pl.pallas_call(
      functools.partial(_chunk_output_kernel, head_dim=p, state_size=n, block_n=output_block_n),
      grid=(x.shape[0], num_chunks, h, row_blocks, pl.cdiv(p, output_block_p)),
      in_specs=[
          pl.BlockSpec((None, chunk, None, output_block_p), lambda i, j, k, m, o: (i, j, k, o)),  # x
          pl.BlockSpec((None, chunk, None, covered_n), lambda i, j, k, m, o: (i, j, k // r, 0)),  # B
          pl.BlockSpec((None, output_block_q, None, covered_n),
                       lambda i, j, k, m, o: (i, j * row_blocks + m, k // r, 0)),  # C, the output rows
          pl.BlockSpec((None, None, chunk), lambda i, j, k, m, o: (i, k, j)),  # dt
          pl.BlockSpec((None, None, chunk), lambda i, j, k, m, o: (i, k, j)),  # a_cum
          pl.BlockSpec((None, None, output_block_q), lambda i, j, k, m, o: (i, k, j * row_blocks + m)),  # a_cum rows
          pl.BlockSpec((None, None, None, output_block_p, covered_n), lambda i, j, k, m, o: (i, j, k, o, 0)),
          pl.BlockSpec((h,), lambda i, j, k, m, o: (0,)),  # D
      ],
      out_specs=pl.BlockSpec((None, output_block_q, None, output_block_p),
                             lambda i, j, k, m, o: (i, j * row_blocks + m, k, o)),
      out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=blocks.output_num_warps, num_stages=blocks.num_stages),
      interpret=interpret,
      name="ssd_chunk_output",
  )(x, B, C, dt, a_cum, a_cum, start_states, D)


@functools.partial(jax.jit, static_argnames=("chunk", "blocks", "interpret"))
def forward(x: jax.Array, dt: jax.Array, a_cum: jax.Array, B: jax.Array, C: jax.Array, D: jax.Array,
            initial_state: jax.Array, *, chunk: int, blocks: BlockSizes,
            interpret: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Runs both kernels on inputs in whole chunks.

  Args:
    x: [b, lp, h, p] in the activation dtype; lp a multiple of ``chunk``.
    dt: [b, h, lp] fp32 step sizes (0 on padding).
    a_cum: [b, h, lp] fp32 log-decays summed from each chunk's start through each token.
    B: [b, lp, g, n] and C: [b, lp, g, n] in x's dtype.
    D: [h] fp32 skip connection (zeros for none).
    initial_state: [b, h, p, n] fp32.
    chunk: Tokens per chunk: a power of two in [16, 256].
    blocks: Tile sizes and launch parameters.
    interpret: Run in Pallas interpret mode (any backend) instead of compiling with Triton.

  Returns:
    (y [b, lp, h, p] in x.dtype, start_states [b, c, h, p, n] fp32: the state entering each chunk,
    final_state [b, h, p, n] fp32).
  """
  start_states, final_state = state_passing(x, dt, a_cum, B, initial_state, chunk=chunk, blocks=blocks,
                                            interpret=interpret)
  y = chunk_output(x, dt, a_cum, B, C, D, start_states, chunk=chunk, blocks=blocks, interpret=interpret)
  return y, start_states, final_state
