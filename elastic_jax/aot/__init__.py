"""Ahead-of-time compiles for hardware this machine does not have (TPU slices, NVIDIA GPUs), checked by the real
compilers through JAX's compile-only devices.

- ``targets``: target names ("v5p:2x2x1", "h100:1x1x8"), their compile-only devices, the GPU target configs.
- ``compile``: ``compile_in_subprocess``: build, lower and compile a program in a worker process (a compiler abort
  ends only the worker) and return XLA's memory analysis, or say why it failed.
- ``programs``: the programs we ship as builders (elastic step, LM step, generation, the SSD).

Needs the optional extras: ``pip install -e ".[tpu-aot]"`` (libtpu) and/or ``".[gpu-aot]"`` (the CUDA plugin).
"""

from elastic_jax.aot.compile import CompileFailed, CompileResult, compile_in_subprocess, memory_figures
from elastic_jax.aot.targets import (KINDS, Target, TargetError, TargetUnavailable, parse, target_devices,
                                     unavailable_reason)

__all__ = ["KINDS", "CompileFailed", "CompileResult", "Target", "TargetError", "TargetUnavailable",
           "compile_in_subprocess", "memory_figures", "parse", "target_devices", "unavailable_reason"]
