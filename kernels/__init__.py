"""Fused accelerator kernels for elastic_jax, one sub-package per kernel.

Each kernel plugs into the dispatcher of the op it accelerates (``elastic_jax.ops.ssd`` for :mod:`kernels.ssd`) and
is tested against that op's pure-JAX reference in interpret mode. Importing this package imports no kernel code.
"""
