"""Fused Mamba-2 SSD kernels (Pallas), plugged into ``elastic_jax.ops.ssd``'s kernel registry.

- ``api``: where the kernel applies (``supports``), its block-size table, registration with the dispatcher.
- ``fused``: ``ssd_pallas``, the backend-neutral entry point with an exact ``jax.custom_vjp``.
- ``pallas_triton``: the forward kernels, lowered through Triton (NVIDIA GPUs) or interpreted (any backend).
- ``xla_backward``: the backward in XLA from the chunk-start states the forward saved.

The reference the kernels are tested against is ``elastic_jax.ops.ssd.ssd(impl="oracle")``. ``ssd_pallas`` is
imported on first access, so that importing this package for dispatch does not import Pallas.
"""

from kernels.ssd.api import BLOCK_SIZES, INTERPRET_ENV_VAR, KERNEL_NAME, BlockSizes, register, supports


def __getattr__(name: str):
  if name == "ssd_pallas":
    from kernels.ssd.fused import ssd_pallas  # pylint: disable=import-outside-toplevel

    return ssd_pallas
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BLOCK_SIZES", "INTERPRET_ENV_VAR", "KERNEL_NAME", "BlockSizes", "register", "ssd_pallas", "supports"]
