"""Dispatch of the fused SSD kernel: where it applies, its block sizes, and its registration.

Importing this module registers :func:`ssd_kernel` under :data:`KERNEL_NAME` for the op ``"ssd"`` in
``elastic_jax.ops.kernel_registry``, whatever the device: :func:`supports` decides per target. It takes NVIDIA GPUs
(compute capability >= 8.0); elsewhere ``"auto"`` keeps the chunked XLA path and ``"pallas"`` raises, saying why
(:func:`unsupported_reason`). Setting :data:`INTERPRET_ENV_VAR` to ``1`` lets it take CPU targets too, where it runs
in Pallas interpret mode: slow, meant for tests of the dispatch path.

:func:`supports` refuses shapes whose kernels would need more shared memory than the target GPU gives one block
(:func:`shared_memory_bytes`, :data:`SHARED_MEMORY_PER_BLOCK`): Triton would fail to compile them, so ``"auto"`` runs
the chunked XLA path for them instead.

This module imports no Pallas code (the kernel is imported when it is first traced) and, of elastic_jax, only the
registry: the ops never import the kernels, nor the kernels the ops.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
from typing import Any

import jax.numpy as jnp

from elastic_jax.ops import kernel_registry

KERNEL_NAME = "pallas_triton"
INTERPRET_ENV_VAR = "ELASTIC_JAX_PALLAS_INTERPRET"

# The largest head dim p the kernel is offered: Mamba-2 models use 64 to 128, and larger tiles are untested.
MAX_HEAD_DIM = 128
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
# Triton's matrix units need every side of a product to be at least 16.
MIN_TILE = 16
# The largest chunk a program processes: [chunk, chunk] fp32 scores must fit in registers. Longer chunks are split.
MAX_CHUNK_TILE = 256
# The most shared memory one thread block may opt into, by NVIDIA compute capability (CUDA's
# sharedMemPerBlockOptin): the limit Triton checks a kernel's allocation against. Other capabilities get the
# smallest of these.
SHARED_MEMORY_PER_BLOCK = {(8, 0): 166_912, (8, 6): 101_376, (8, 7): 166_912, (8, 9): 101_376, (9, 0): 232_448,
                           (10, 0): 232_448, (12, 0): 101_376}


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes and launch parameters of the two forward kernels (all tile sizes powers of two, >= 16).

  Attributes:
    state_block_p: Head-dim rows of the state carried by one program of the state-passing kernel.
    state_block_n: State columns carried by one program of the state-passing kernel.
    output_block_q: Output rows (tokens of a chunk) per program of the output kernel.
    output_block_p: Head dims per program of the output kernel (each block recomputes the chunk's C . B).
    output_block_n: State columns per step of the output kernel's loop over the state size.
    state_num_warps: Warps per program of the state-passing kernel.
    output_num_warps: Warps per program of the output kernel.
    num_stages: Software-pipelining depth of the loops (Triton ``num_stages``).
  """

  state_block_p: int
  state_block_n: int
  output_block_q: int
  output_block_p: int
  output_block_n: int
  state_num_warps: int = 4
  output_num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    for field in ("state_block_p", "state_block_n", "output_block_q", "output_block_p", "output_block_n"):
      value = getattr(self, field)
      if value < MIN_TILE or value & (value - 1):
        raise ValueError(f"BlockSizes.{field}={value} must be a power of two >= {MIN_TILE}.")


# (head dim p, state size n) -> block sizes. Starting points chosen for register budgets, not yet tuned on a GPU:
# the state-passing kernel keeps a [state_block_p, state_block_n] fp32 tile per program (<= 32 registers per thread
# at 4 warps; p = 80 splits into five exact blocks of 16), and the output kernel [output_block_q, chunk] scores next
# to a [output_block_q, output_block_p] output tile.
BLOCK_SIZES: dict[tuple[int, int], BlockSizes] = {
    (64, 64): BlockSizes(state_block_p=32, state_block_n=64, output_block_q=64, output_block_p=64,
                         output_block_n=64),
    (64, 128): BlockSizes(state_block_p=32, state_block_n=128, output_block_q=64, output_block_p=64,
                          output_block_n=64),
    (80, 128): BlockSizes(state_block_p=16, state_block_n=128, output_block_q=64, output_block_p=128,
                          output_block_n=64, output_num_warps=8),
    (128, 128): BlockSizes(state_block_p=32, state_block_n=128, output_block_q=64, output_block_p=64,
                           output_block_n=64),
}


def padded_size(size: int) -> int:
  """The power of two >= max(size, MIN_TILE) that a tile of ``size`` elements occupies."""
  return max(MIN_TILE, 1 << (size - 1).bit_length())


def chunk_tiling(chunk_size: int) -> tuple[int, int]:
  """(tile, tokens per tile): the kernel's chunk tile and how many of the caller's tokens fill each tile."""
  if chunk_size > MAX_CHUNK_TILE:
    return MAX_CHUNK_TILE, MAX_CHUNK_TILE
  return padded_size(chunk_size), chunk_size


def block_sizes(head_dim: int, state_size: int) -> BlockSizes:
  """Block sizes for the (head dim, state size) pair: from :data:`BLOCK_SIZES`, else a rule that fits any size."""
  if (head_dim, state_size) in BLOCK_SIZES:
    return BLOCK_SIZES[(head_dim, state_size)]
  return BlockSizes(state_block_p=min(32, padded_size(head_dim)), state_block_n=min(128, padded_size(state_size)),
                    output_block_q=64, output_block_p=min(64, padded_size(head_dim)),
                    output_block_n=min(64, padded_size(state_size)))


@dataclasses.dataclass(frozen=True)
class Tiles:
  """The tiles the two kernels use for one shape (block sizes clipped to the padded shape).

  Attributes:
    chunk: Tokens per chunk tile (a power of two in [16, MAX_CHUNK_TILE]).
    state_p, state_n: The state-passing kernel's [head dims, state columns] tile.
    output_q, output_p, output_n: The output kernel's rows per program, head dims per program, state columns per
      step of its loop over the state size.
  """

  chunk: int
  state_p: int
  state_n: int
  output_q: int
  output_p: int
  output_n: int


def kernel_tiles(head_dim: int, state_size: int, chunk: int, blocks: BlockSizes) -> Tiles:
  """The tiles of both kernels for x [.., head_dim], B [.., state_size] in chunk tiles of ``chunk`` tokens."""
  return Tiles(chunk=chunk, state_p=min(blocks.state_block_p, padded_size(head_dim)),
               state_n=min(blocks.state_block_n, padded_size(state_size)), output_q=min(blocks.output_block_q, chunk),
               output_p=min(blocks.output_block_p, padded_size(head_dim)),
               output_n=min(blocks.output_block_n, padded_size(state_size)))


def shared_memory_bytes(head_dim: int, state_size: int, chunk_size: int, dtype: Any,
                        blocks: BlockSizes | None = None) -> dict[str, int]:
  """Shared memory each kernel needs per thread block, in bytes: {"ssd_state_passing": .., "ssd_chunk_output": ..}.

  An upper bound of what Triton allocates, from the tiles that are resident at the kernel's peak:

  - ``ssd_state_passing``: the chunk's x [chunk, p] and B [chunk, n] tiles (input dtype), its dt and a_cum ([chunk]
    fp32), and either the decay-weighted x (the matmul operand, input dtype) or, once that is consumed, 8.25 KiB of
    reduction and layout-conversion scratch.
  - ``ssd_chunk_output``: the four matmul operands of the loop over the state size, x [chunk, p], B [chunk, n],
    C [rows, n] and the start state [p, n] (input dtype); or after the loop x, the weighted scores [rows, chunk]
    (input dtype) and the output tile [rows, p] in fp32.

  Tile sides are counted at least 64 wide (the state kernel's n at least 32, its p as it is): Triton lays small
  operands out in padded tiles. Checked against Triton's own figures for sm80 and sm90 (``tests/test_aot_compile.py``
  and ``benchmarks/ssd_compile_grid.py`` read them from compiles for A100 and H100): never below them over p in
  {16, .., 128}, n in {16, .., 128}, chunks 16 to 256, fp32 and bf16; equal in fp32 where the tiles are 64 or more
  (where the limits bind); at most 2x above where p, n and the chunk are 64 or more (smaller tiles are overcounted
  more, up to 7x for p = n = 16).
  """
  blocks = blocks or block_sizes(head_dim, state_size)
  tiles = kernel_tiles(head_dim, state_size, chunk_tiling(chunk_size)[0], blocks)
  item = jnp.dtype(dtype).itemsize
  chunk = max(tiles.chunk, 64)
  p, n = tiles.state_p, max(tiles.state_n, 32)
  resident = (chunk * n + chunk * p) * item + 2 * chunk * 4
  state_passing = resident + max(chunk * p * item, 8448)
  q, p, n = max(tiles.output_q, 64), max(tiles.output_p, 64), max(tiles.output_n, 64)
  chunk_output = max((chunk * p + chunk * n + q * n + p * n) * item, chunk * p * item + q * chunk * item + q * p * 4)
  return {"ssd_state_passing": state_passing, "ssd_chunk_output": chunk_output}


def shared_memory_limit(compute_capability: tuple[int, int]) -> int:
  """Bytes of shared memory one block may use on a GPU of this compute capability (:data:`SHARED_MEMORY_PER_BLOCK`;
  the smallest entry for capabilities not listed)."""
  return SHARED_MEMORY_PER_BLOCK.get(tuple(compute_capability), min(SHARED_MEMORY_PER_BLOCK.values()))


def interpret_forced() -> bool:
  """Whether :data:`INTERPRET_ENV_VAR` asks for the kernel on CPU in interpret mode."""
  return os.environ.get(INTERPRET_ENV_VAR, "") == "1"


@functools.cache
def _has_triton_backend() -> bool:
  """Whether this JAX still has Pallas' Triton backend (deprecated from JAX 0.11), which the kernel is written in."""
  try:
    return importlib.util.find_spec("jax.experimental.pallas.triton") is not None
  except ImportError:
    return False


def unsupported_reason(x_shape: tuple[int, ...], x_dtype: Any, target: Any, *, state_size: int,
                       chunk_size: int) -> str | None:
  """Why the kernel does not take this input on ``target`` (a ``kernel_registry.Target``), or None when it does."""
  if len(x_shape) != 4 or not 1 <= x_shape[3] <= MAX_HEAD_DIM:
    return f"x must be [b, l, h, p] with p <= {MAX_HEAD_DIM}, got shape {tuple(x_shape)}"
  if jnp.dtype(x_dtype) not in SUPPORTED_DTYPES:
    return f"dtype {jnp.dtype(x_dtype).name} is not one of {[d.name for d in SUPPORTED_DTYPES]}"
  if target.platform == "cpu":
    return None if interpret_forced() else f"on CPU only in interpret mode ({INTERPRET_ENV_VAR}=1)"
  capability = target.compute_capability
  if target.platform != "gpu" or capability is None or tuple(capability) < (8, 0):
    return f"needs an NVIDIA GPU with compute capability >= 8.0, not {target.device_kind or target.platform}"
  if not _has_triton_backend():
    return "this JAX has no Pallas Triton backend"
  limit = shared_memory_limit(capability)
  for kernel, need in shared_memory_bytes(x_shape[3], state_size, chunk_size, x_dtype).items():
    if need > limit:
      return (f"{kernel} needs {need:,} bytes of shared memory per block, sm{capability[0]}{capability[1]} has "
              f"{limit:,}")
  return None


def supports(x_shape: tuple[int, ...], x_dtype: Any, target: Any, *, state_size: int, chunk_size: int) -> bool:
  """Whether the kernel takes inputs ``x`` of this shape and dtype, with B/C of ``state_size``, in chunks of
  ``chunk_size``, on ``target`` (a ``kernel_registry.Target``). Cheap; never raises.

  True on NVIDIA GPUs (compute capability >= 8.0, with Pallas' Triton backend) for fp32/bf16 inputs with head dim <=
  MAX_HEAD_DIM whose kernels fit the GPU's shared memory per block, and on CPU under the same shape conditions only
  when interpret mode is forced. Any sequence length and group count work: the kernel pads and tiles them.
  """
  try:
    return unsupported_reason(x_shape, x_dtype, target, state_size=state_size, chunk_size=chunk_size) is None
  except Exception:  # pylint: disable=broad-except  (dispatch must fall back, never fail, on a malformed query)
    return False


def ssd_kernel(x, dt, A, B, C, D=None, *, chunk_size: int, initial_state=None):
  """The registered kernel: :func:`elastic_jax_kernels.ssd.fused.ssd_pallas`, interpreted where the target is not a
  GPU."""
  from elastic_jax_kernels.ssd import fused  # pylint: disable=import-outside-toplevel  (keeps Pallas out of dispatch)

  return fused.ssd_pallas(x, dt, A, B, C, D, chunk_size=chunk_size, initial_state=initial_state,
                          interpret=kernel_registry.compile_target().platform != "gpu")


def register() -> kernel_registry.Kernel:
  """Registers :func:`ssd_kernel` for the op ``"ssd"`` under :data:`KERNEL_NAME` and returns the entry. Runs when this
  module is imported; call it again to restore the kernel after ``unregister_kernel``."""
  return kernel_registry.register_kernel("ssd", KERNEL_NAME, supports, ssd_kernel,
                                         unsupported_reason=unsupported_reason)


register()
