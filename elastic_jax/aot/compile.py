"""Compile a program for a target in a worker process and read XLA's memory analysis back.

A compiler check that fails (libtpu's ``Check failed``, an LLVM assertion) aborts the process that compiles. So the
program is built, lowered and compiled in a fresh Python process (``python -m elastic_jax.aot.compile``), and this
module turns its exit into a :class:`CompileResult` or a :class:`CompileFailed` that says what went wrong: an abort
(with the compiler's own message), an error the compiler raised (e.g. Triton's shared-memory limit), or a timeout.

JAX's persistent compilation cache does not serve these compiles (an executable for compile-only devices cannot be
loaded back without their client), so every call compiles.

A program is a builder ``fn(devices, **kwargs) -> jax.stages.Lowered``, named by ``"module:function"`` or by a short
name of :data:`elastic_jax.aot.programs.PROGRAMS`; ``kwargs`` travel as JSON.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import Any

from elastic_jax.aot import targets as targets_lib

MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
                 "generated_code_size_in_bytes")
# Lines of a dying compiler's log worth showing: glog fatals and failed checks, LLVM/MLIR assertions.
_FATAL_LINE = re.compile(r"(Check failed|^F\d{4} |Assertion .* failed|LLVM ERROR|Fatal Python error)")


@dataclasses.dataclass(frozen=True)
class CompileResult:
  """What a successful compile reports.

  Attributes:
    target: The target's name ("v5p:2x2x1").
    program: The builder's name.
    device_kind: The compile-only devices' kind ("TPU v5", "NVIDIA H100 80GB HBM3").
    num_devices: Devices of the target (the program may use fewer).
    lower_seconds: Time to trace and lower the program.
    compile_seconds: Time XLA took to compile it.
    memory: XLA's memory analysis in bytes per device (:data:`MEMORY_FIELDS`) and ``total`` = argument + output -
      alias + temp.
    pallas_kernels: Names of the Pallas kernels in the lowered program (e.g. "ssd_chunk_output"), sorted.
  """

  target: str
  program: str
  device_kind: str
  num_devices: int
  lower_seconds: float
  compile_seconds: float
  memory: dict[str, float]
  pallas_kernels: tuple[str, ...]


class CompileFailed(RuntimeError):
  """The worker did not compile the program.

  Attributes:
    reason: "abort" (the process died of a signal, e.g. SIGABRT from a failed compiler check), "error" (an exception,
      e.g. XLA's RESOURCE_EXHAUSTED), "timeout" or "unavailable" (the target's compiler is not installed).
    log: The tail of the worker's output.
  """

  def __init__(self, message: str, reason: str, log: str = ""):
    super().__init__(message)
    self.reason, self.log = reason, log


def memory_figures(analysis: Any) -> dict[str, float]:
  """XLA's ``CompiledMemoryStats`` -> {field: bytes per device} with ``total`` = argument + output - alias + temp."""
  out = {name: float(getattr(analysis, name)) for name in MEMORY_FIELDS}
  out["total"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"] - out["alias_size_in_bytes"]
                  + out["temp_size_in_bytes"])
  return out


def _resolve(program: str):
  if ":" not in program:
    from elastic_jax.aot.programs import PROGRAMS  # pylint: disable=import-outside-toplevel

    if program not in PROGRAMS:
      raise ValueError(f"unknown program {program!r}; give 'module:function' or one of {sorted(PROGRAMS)}.")
    return PROGRAMS[program]
  module, _, name = program.partition(":")
  return getattr(importlib.import_module(module), name)


def pallas_kernel_names(lowered_text: str) -> list[str]:
  """Names of the Pallas kernels (Triton or Mosaic custom calls) in a lowered module's text, sorted."""
  names = set()
  for line in lowered_text.splitlines():
    if "custom_call @__gpu$xla.gpu.triton" in line or "custom_call @tpu_custom_call" in line:
      names.update(re.findall(r'name = "([\w.]+)"', line))
  return sorted(names)


def _fatal_lines(log: str) -> str:
  lines = [line.strip() for line in log.splitlines() if _FATAL_LINE.search(line)]
  return "\n".join(dict.fromkeys(lines[:10]))  # glog repeats a fatal line on stderr


def compile_in_subprocess(program: str, target: str, *, timeout: float = 900.0, env: Mapping[str, str] | None = None,
                          **kwargs: Any) -> CompileResult:
  """Builds ``program`` for ``target``'s compile-only devices, compiles it in a worker and returns the result.

  Args:
    program: "module:function" or a :data:`elastic_jax.aot.programs.PROGRAMS` name; called as
      ``fn(devices, **kwargs)`` and returns ``jax.stages.Lowered``.
    target: "v5p:2x2x1", "h100:1x1x8", ... (``elastic_jax.aot.targets``).
    timeout: Seconds before the worker is killed.
    env: Extra environment variables for the worker (e.g. ``XLA_FLAGS``).
    **kwargs: JSON-serialisable arguments of the builder.

  Raises:
    CompileFailed: with ``reason`` "abort", "error", "timeout" or "unavailable" and a message that says which.
  """
  parsed = targets_lib.parse(target)
  missing = targets_lib.unavailable_reason(parsed)
  if missing:
    raise CompileFailed(f"{program} for {parsed.name}: {missing}.", "unavailable")
  worker_env = dict(os.environ)
  worker_env.update(targets_lib.SUBPROCESS_ENV)
  worker_env.update(env or {})
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  worker_env["PYTHONPATH"] = os.pathsep.join(p for p in (root, worker_env.get("PYTHONPATH", "")) if p)
  with tempfile.TemporaryDirectory(prefix="elastic_jax_aot_") as workdir:
    request_path, result_path = os.path.join(workdir, "request.json"), os.path.join(workdir, "result.json")
    with open(request_path, "w", encoding="utf-8") as f:
      json.dump({"program": program, "target": parsed.name, "kwargs": kwargs}, f)
    try:
      proc = subprocess.run([sys.executable, "-m", "elastic_jax.aot.compile", request_path, result_path],
                            env=worker_env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as error:
      log = (error.stderr or b"")[-4000:]
      log = log.decode(errors="replace") if isinstance(log, bytes) else log
      raise CompileFailed(f"{program} for {parsed.name}: no result after {timeout:.0f} s (worker killed).",
                          "timeout", log) from None
    log = (proc.stdout + proc.stderr)[-8000:]
    if proc.returncode < 0:
      name = signal.Signals(-proc.returncode).name
      fatal = _fatal_lines(proc.stderr) or "\n".join(proc.stderr.strip().splitlines()[-10:])
      raise CompileFailed(f"{program} for {parsed.name}: the compiler killed the process ({name}):\n{fatal}",
                          "abort", log)
    result = None
    if os.path.exists(result_path):
      with open(result_path, encoding="utf-8") as f:
        result = json.load(f)
    if result is None or "error" in result:
      message = result["error"] if result else (f"the worker exited with status {proc.returncode} and no result:\n"
                                                + "\n".join(proc.stderr.strip().splitlines()[-15:]))
      raise CompileFailed(f"{program} for {parsed.name}: {message}", "error", log)
  return CompileResult(**{**result, "pallas_kernels": tuple(result["pallas_kernels"])})


def _worker(request_path: str, result_path: str) -> int:
  """The worker's side: build, lower and compile; write the result (or the exception) as JSON."""
  with open(request_path, encoding="utf-8") as f:
    request = json.load(f)
  try:
    devices = targets_lib.target_devices(request["target"])
    start = time.perf_counter()
    lowered = _resolve(request["program"])(devices, **request["kwargs"])
    lowered_at = time.perf_counter()
    kernels = pallas_kernel_names(lowered.as_text())
    compiled = lowered.compile()
    result = {"target": request["target"], "program": request["program"], "device_kind": devices[0].device_kind,
              "num_devices": len(devices), "lower_seconds": lowered_at - start,
              "compile_seconds": time.perf_counter() - lowered_at,
              "memory": memory_figures(compiled.memory_analysis()), "pallas_kernels": kernels}
  except Exception as error:  # pylint: disable=broad-except  (reported to the parent, which raises)
    result = {"error": f"{type(error).__name__}: {error}"}
  with open(result_path, "w", encoding="utf-8") as f:
    json.dump(result, f)
  return 0 if "error" not in result else 1


if __name__ == "__main__":
  sys.exit(_worker(*sys.argv[1:3]))
