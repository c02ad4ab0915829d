"""``ssd_pallas``: the Mamba-2 SSD with fused forward kernels and an exact ``jax.custom_vjp``.

Same contract as ``elastic_jax.ops.ssd.ssd``. This layer is backend-neutral: it lays the inputs out in whole chunk
tiles, computes the per-chunk log-decays, and calls a backend's forward kernels (``pallas_triton.forward`` today; a
Mosaic GPU forward with the same signature can plug in here). The backward runs in XLA (``xla_backward``) from the
chunk-start states the forward saved.

Chunk tiles: Triton needs power-of-two tiles of at least 16. A caller's chunk of such a size is used as it is; a
smaller or odd chunk (<= 256) is padded to the next power of two with zero-dt tokens, which neither decay nor add to
the state, so chunk boundaries stay where the caller put them; a chunk above 256 is processed as chunks of 256 (the
same recurrence, split more finely).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from elastic_jax_kernels.ssd import api
from elastic_jax_kernels.ssd import pallas_triton
from elastic_jax_kernels.ssd import xla_backward


def _to_tiles(t: jax.Array, *, tokens_per_tile: int, tile: int) -> jax.Array:
  """[b, l, ...] -> [b, c * tile, ...]: every run of ``tokens_per_tile`` tokens starts a new tile; zeros pad."""
  b, l, *trailing = t.shape
  num_chunks = -(-l // tokens_per_tile)
  no_pad = [(0, 0)] * len(trailing)
  if num_chunks * tokens_per_tile != l:
    t = jnp.pad(t, [(0, 0), (0, num_chunks * tokens_per_tile - l)] + no_pad)
  if tile != tokens_per_tile:
    t = t.reshape(b, num_chunks, tokens_per_tile, *trailing)
    t = jnp.pad(t, [(0, 0), (0, 0), (0, tile - tokens_per_tile)] + no_pad)
  return t.reshape(b, num_chunks * tile, *trailing)


def _from_tiles(t: jax.Array, *, length: int, tokens_per_tile: int, tile: int) -> jax.Array:
  """Inverse of :func:`_to_tiles`: [b, c * tile, ...] -> [b, length, ...]."""
  b, padded_length, *trailing = t.shape
  if tile != tokens_per_tile:
    t = t.reshape(b, padded_length // tile, tile, *trailing)[:, :, :tokens_per_tile]
    t = t.reshape(b, -1, *trailing)
  return t[:, :length]


@dataclasses.dataclass(frozen=True)
class _TileConfig:
  """The static (hashable) arguments of the custom VJP."""

  chunk: int  # tokens per tile
  blocks: api.BlockSizes
  interpret: bool


def _forward(x, dt, A, B, C, D, initial_state, config: _TileConfig):
  """(y, start_states, final_state) of the tiled inputs; see ``pallas_triton.forward``."""
  b, lp, h = dt.shape
  q = config.chunk
  # Log-decays in fp32, summed within each chunk: a_cum[.., t] = sum of dt_s * A over the chunk's tokens s <= t.
  a_cum = jnp.cumsum(dt.reshape(b, lp // q, q, h) * A, axis=2).reshape(b, lp, h)
  head_major = lambda t: jnp.swapaxes(t, 1, 2)  # [b, lp, h] -> [b, h, lp]: one contiguous row per head
  return pallas_triton.forward(x, head_major(dt), head_major(a_cum), B, C, D, initial_state, chunk=q,
                               blocks=config.blocks, interpret=config.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _ssd_tiles(x, dt, A, B, C, D, initial_state, config: _TileConfig):
  y, _, final_state = _forward(x, dt, A, B, C, D, initial_state, config)
  return y, final_state


def _ssd_tiles_fwd(x, dt, A, B, C, D, initial_state, config: _TileConfig):
  y, start_states, final_state = _forward(x, dt, A, B, C, D, initial_state, config)
  return (y, final_state), (x, dt, A, B, C, D, start_states)


def _ssd_tiles_bwd(config: _TileConfig, residuals, cotangents):
  num_chunks = residuals[0].shape[1] // config.chunk
  return xla_backward.ssd_backward(residuals, cotangents, num_chunks=num_chunks)


_ssd_tiles.defvjp(_ssd_tiles_fwd, _ssd_tiles_bwd)


def ssd_pallas(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array | None = None,
    *,
    chunk_size: int,
    initial_state: jax.Array | None = None,
    interpret: bool = False,
    block_sizes: api.BlockSizes | None = None,
) -> tuple[jax.Array, jax.Array]:
  """The Mamba-2 selective scan with fused kernels; differentiable w.r.t. every array argument.

  Args:
    x: [b, l, h, p] inputs, fp32 or bf16, p <= ``api.MAX_HEAD_DIM``.
    dt: [b, l, h] step sizes (softplus'ed, > 0).
    A: [h] negative decay rates.
    B: [b, l, g, n] and C: [b, l, g, n] state projections in x's dtype; head i reads group i // (h // g).
    D: [h] skip connection, or None.
    chunk_size: Tokens per chunk (static); see the module docstring for how it maps to kernel tiles.
    initial_state: [b, h, p, n] state before the first token, or None for zeros.
    interpret: Run the kernels in Pallas interpret mode (any backend, slow) instead of compiling them for a GPU.
    block_sizes: Tile sizes; None for ``api.block_sizes(p, n)``.

  Returns:
    (y [b, l, h, p] in x.dtype, final_state [b, h, p, n] fp32).

  Raises:
    ValueError: x is not 4-D, its head dim exceeds ``api.MAX_HEAD_DIM``, or its dtype is not fp32/bf16.
  """
  if x.ndim != 4 or not 1 <= x.shape[3] <= api.MAX_HEAD_DIM or jnp.dtype(x.dtype) not in api.SUPPORTED_DTYPES:
    raise ValueError(f"ssd_pallas: x has shape {tuple(x.shape)} and dtype {jnp.dtype(x.dtype).name}; the kernel "
                     f"takes x [b, l, h, p] with p <= {api.MAX_HEAD_DIM} in "
                     f"{[d.name for d in api.SUPPORTED_DTYPES]}.")
  b, l, h, p = x.shape
  n = B.shape[-1]
  f32 = jnp.float32
  tile, tokens_per_tile = api.chunk_tiling(chunk_size)
  config = _TileConfig(chunk=tile, blocks=block_sizes or api.block_sizes(p, n), interpret=interpret)
  D = jnp.zeros((h,), f32) if D is None else D.astype(f32)
  initial_state = jnp.zeros((b, h, p, n), f32) if initial_state is None else initial_state.astype(f32)

  to_tiles = functools.partial(_to_tiles, tokens_per_tile=tokens_per_tile, tile=tile)
  y, final_state = _ssd_tiles(to_tiles(x), to_tiles(dt.astype(f32)), A.astype(f32), to_tiles(B.astype(x.dtype)),
                              to_tiles(C.astype(x.dtype)), D, initial_state, config)
  return _from_tiles(y, length=l, tokens_per_tile=tokens_per_tile, tile=tile), final_state
