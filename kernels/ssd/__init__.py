"""Fused Mamba-2 SSD kernels (Pallas), registered with ``elastic_jax.ops.kernel_registry`` for the op ``"ssd"``.

- ``api``: where the kernel applies (``supports``), its block-size table, its registration (on import).
- ``fused``: ``ssd_pallas``, the backend-neutral entry point with an exact ``jax.custom_vjp``.
- ``pallas_triton``: the forward kernels, lowered through Triton (NVIDIA GPUs) or interpreted (any backend).
- ``xla_backward``: the backward in XLA from the chunk-start states the forward saved.

The reference the kernels are tested against is ``elastic_jax.ops.ssd.ssd(impl="oracle")``. ``ssd_pallas`` is
imported on first access, so that importing this package (which the registry does on the first SSD dispatch)
does not import Pallas.
"""

from elastic_jax_kernels.ssd.api import BLOCK_SIZES, INTERPRET_ENV_VAR, KERNEL_NAME, BlockSizes, register, supports


def __getattr__(name: str):
  if name == "ssd_pallas":
    from elastic_jax_kernels.ssd.fused import ssd_pallas  # pylint: disable=import-outside-toplevel

    return ssd_pallas
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BLOCK_SIZES", "INTERPRET_ENV_VAR", "KERNEL_NAME", "BlockSizes", "register", "ssd_pallas", "supports"]
