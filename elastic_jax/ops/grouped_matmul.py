"""Grouped matmul: rows sorted by group, each group multiplied by its own matrix (the experts' matmul of an MoE block).

    out[r] = x[r] @ w[group(r)]      rows [start_g, start_g + group_sizes[g]) belong to group g, in group order;
                                     rows after the last group are zero

computed in one of two ways behind :func:`grouped_matmul`, chosen with ``impl``:

- ``"ragged_dot"``: ``jax.lax.ragged_dot``. TPU and GPU lower it to a grouped GEMM, whose cost follows the rows.
  XLA's CPU backend has no such kernel: JAX lowers it there by expanding ``x`` into one masked copy per group
  ([G, m, k]), i.e. G times the work of the rows, more than computing every expert for every token.
- ``"tiled"``: every group's rows are padded to a multiple of a tile of ``t`` rows, so that each tile belongs to one
  group; one batched matmul over the tiles multiplies each by its group's matrix (gathered per tile). With at most
  min(G, m) groups holding rows, that is at most (m + min(G, m) (t - 1)) k n multiply-adds and as many weight reads
  as tiles, (m / t + min(G, m)) k n, with static shapes and no row dropped, on any backend. ``t`` is about the mean
  rows per group (``tile_rows``): padding then adds about half the rows, and each gathered weight serves t rows.
- ``"auto"``: ``"ragged_dot"`` when the program is compiled for a TPU or GPU (``kernel_registry.compile_target``,
  so a CPU host compiling for H100s picks what an H100 runs), ``"tiled"`` otherwise.

Both are differentiable (w.r.t. ``x`` and ``w``). ``group_sizes`` is data (traced): one compile serves every
routing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from elastic_jax.ops import kernel_registry

Array = jax.Array

IMPLS = ("auto", "ragged_dot", "tiled")
_ACCELERATORS = ("tpu", "gpu", "cuda", "rocm")
_MAX_TILE_ROWS = 256


def resolve_impl(impl: str) -> str:
  """``impl`` with ``"auto"`` replaced by the implementation for the compile target."""
  if impl not in IMPLS:
    raise ValueError(f"grouped matmul impl={impl!r} is not one of {IMPLS}.")
  if impl != "auto":
    return impl
  return "ragged_dot" if kernel_registry.compile_target().platform in _ACCELERATORS else "tiled"


def grouped_matmul(x: Array, w: Array, group_sizes: Array, *, impl: str = "auto",
                   preferred_element_type=jnp.float32) -> Array:
  """x [m, k] (rows sorted by group), w [G, k, n], group_sizes [G] int (sum <= m) -> [m, n].

  Operands are multiplied in their own dtype and accumulated in ``preferred_element_type``.
  """
  if x.ndim != 2 or w.ndim != 3 or group_sizes.shape != (w.shape[0],) or x.shape[1] != w.shape[1]:
    raise ValueError(f"grouped_matmul needs x [m, k], w [G, k, n], group_sizes [G]; got x {x.shape}, w {w.shape}, "
                     f"group_sizes {group_sizes.shape}.")
  group_sizes = group_sizes.astype(jnp.int32)
  match resolve_impl(impl):
    case "ragged_dot":
      return jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=preferred_element_type)
    case "tiled":
      return _tiled(x, w, group_sizes, preferred_element_type)
  raise AssertionError(impl)


def tile_rows(rows: int, groups: int) -> int:
  """Rows per tile: the largest power of two <= the mean rows per group (at least 1, at most 256); 1 for a decode
  step's few rows, where every row gets its own expert's weight. Measured on a 2-core CPU (m = 1024-8192 rows, 8-64
  groups, k = n = 256): within 1.2x of the best power of two, where tiles 4x smaller or larger cost up to 3x."""
  target = min(_MAX_TILE_ROWS, rows // groups)
  t = 1
  while t * 2 <= target:
    t *= 2
  return t


def _ends_at_or_before(ends: Array, n: int) -> Array:
  """[n]: for each position p < n, how many of the non-decreasing ``ends`` are <= p (``searchsorted(ends, p,
  side="right")``), by marking each end and a running sum: O(n + G), and no search primitive inside ``shard_map``."""
  marks = jnp.zeros((n + 1,), jnp.int32).at[jnp.minimum(ends, n)].add(1)
  return jnp.cumsum(marks)[:n]


def _tiled(x: Array, w: Array, group_sizes: Array, preferred_element_type) -> Array:
  m, k = x.shape
  g, _, n = w.shape
  t = tile_rows(m, g)
  # sum_g ceil(size_g / t) <= this whatever the sizes: at most min(g, m) groups hold rows, each pads < t rows.
  num_tiles = -(-(m + min(g, m) * (t - 1)) // t)
  row_end = jnp.cumsum(group_sizes)
  row_start = row_end - group_sizes
  tiles = (group_sizes + t - 1) // t
  tile_end = jnp.cumsum(tiles)
  tile_start = tile_end - tiles

  # Padded slot p (tile p // t) holds row row_start[group] + (p - t * tile_start[group]) of its tile's group, or zero.
  tile_group = jnp.minimum(_ends_at_or_before(tile_end, num_tiles), g - 1)
  slot = jnp.arange(num_tiles * t)
  slot_group = jnp.repeat(tile_group, t, total_repeat_length=num_tiles * t)
  rank = slot - t * tile_start[slot_group]
  filled = rank < group_sizes[slot_group]
  source = jnp.where(filled, row_start[slot_group] + rank, 0)
  padded = jnp.where(filled[:, None], x[source], jnp.zeros((), x.dtype))

  out = jnp.einsum("tik,tkn->tin", padded.reshape(num_tiles, t, k), w[tile_group],
                   preferred_element_type=preferred_element_type).reshape(num_tiles * t, n)

  # Row r's slot: its group's first slot plus its rank in the group; rows past the last group are zero.
  row = jnp.arange(m)
  row_group = jnp.minimum(_ends_at_or_before(row_end, m), g - 1)
  assigned = row < row_end[-1]
  slot_of_row = jnp.where(assigned, t * tile_start[row_group] + row - row_start[row_group], 0)
  return jnp.where(assigned[:, None], out[slot_of_row], jnp.zeros((), out.dtype))
