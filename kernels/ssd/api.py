"""Dispatch of the fused SSD kernel: where it applies, its block sizes, and its registration with ``ops.ssd``.

``elastic_jax.ops.ssd.ssd`` calls :func:`register_builtin` on every ``impl="auto"``/``"pallas"`` dispatch. On a GPU
the first call registers :func:`ssd_kernel` under :data:`KERNEL_NAME`; elsewhere nothing is registered, so ``"auto"``
keeps the chunked XLA path and ``"pallas"`` raises. Setting :data:`INTERPRET_ENV_VAR` to ``1`` registers the kernel on
CPU too, where it runs in Pallas interpret mode: slow, meant for tests of the dispatch path.

This module imports no Pallas code: the kernel is imported when it is first traced.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os

import jax
import jax.numpy as jnp

KERNEL_NAME = "pallas_triton"
INTERPRET_ENV_VAR = "ELASTIC_JAX_PALLAS_INTERPRET"

# The largest head dim p the kernel is offered: Mamba-2 models use 64 to 128, and larger tiles are untested.
MAX_HEAD_DIM = 128
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
# Triton's matrix units need every side of a product to be at least 16.
MIN_TILE = 16
# The largest chunk a program processes: [chunk, chunk] fp32 scores must fit in registers. Longer chunks are split.
MAX_CHUNK_TILE = 256


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


def block_sizes(head_dim: int, state_size: int) -> BlockSizes:
  """Block sizes for the (head dim, state size) pair: from :data:`BLOCK_SIZES`, else a rule that fits any size."""
  if (head_dim, state_size) in BLOCK_SIZES:
    return BLOCK_SIZES[(head_dim, state_size)]
  return BlockSizes(state_block_p=min(32, padded_size(head_dim)), state_block_n=min(128, padded_size(state_size)),
                    output_block_q=64, output_block_p=min(64, padded_size(head_dim)),
                    output_block_n=min(64, padded_size(state_size)))


def interpret_forced() -> bool:
  """Whether :data:`INTERPRET_ENV_VAR` asks for the kernel on CPU in interpret mode."""
  return os.environ.get(INTERPRET_ENV_VAR, "") == "1"


@functools.cache
def _is_cuda_sm80_or_newer() -> bool:
  """Whether the first GPU is an NVIDIA GPU with bf16 matrix units (Ampere or newer) and this JAX still has Pallas'
  Triton backend (deprecated from JAX 0.11), as the kernel needs."""
  try:
    device = jax.devices("gpu")[0]
    return ("cuda" in device.client.platform_version.lower()
            and float(device.compute_capability) >= 8.0
            and importlib.util.find_spec("jax.experimental.pallas.triton") is not None)
  except (RuntimeError, AttributeError, ValueError, IndexError, ImportError):
    return False


def supports(x_shape: tuple[int, ...], x_dtype: jnp.dtype, backend: str) -> bool:
  """Whether the kernel takes inputs ``x`` of this shape and dtype on ``backend`` (cheap, never raises).

  True on NVIDIA GPUs (compute capability >= 8.0) for fp32/bf16 inputs with head dim <= MAX_HEAD_DIM, and on CPU
  under the same conditions only when interpret mode is forced. Any sequence length, chunk size, group count and
  state size work: the kernel pads and tiles them.
  """
  if backend == "gpu":
    backend_ok = _is_cuda_sm80_or_newer()
  else:
    backend_ok = backend == "cpu" and interpret_forced()
  return (backend_ok and len(x_shape) == 4 and 1 <= x_shape[3] <= MAX_HEAD_DIM
          and jnp.dtype(x_dtype) in SUPPORTED_DTYPES)


def ssd_kernel(x, dt, A, B, C, D=None, *, chunk_size: int, initial_state=None):
  """The registered kernel: :func:`kernels.ssd.fused.ssd_pallas`, interpreted where the backend is not a GPU."""
  from kernels.ssd import fused  # pylint: disable=import-outside-toplevel  (keeps Pallas out of dispatch imports)

  return fused.ssd_pallas(x, dt, A, B, C, D, chunk_size=chunk_size, initial_state=initial_state,
                          interpret=jax.default_backend() != "gpu")


_registered_by_dispatch = False


def register():
  """Registers :func:`ssd_kernel` with ``elastic_jax.ops.ssd`` under :data:`KERNEL_NAME` and returns the entry."""
  from elastic_jax.ops import ssd as ssd_ops  # pylint: disable=import-outside-toplevel  (ops.ssd imports this lazily)

  return ssd_ops.register_kernel(KERNEL_NAME, supports, ssd_kernel)


def register_builtin(backend: str) -> None:
  """Registers the kernel once, on the first dispatch on a GPU (or on CPU with interpret mode forced).

  Only once, so that a later ``unregister_kernel(KERNEL_NAME)`` stays in effect.
  """
  global _registered_by_dispatch
  if _registered_by_dispatch or not (backend == "gpu" or (backend == "cpu" and interpret_forced())):
    return
  _registered_by_dispatch = True
  register()
