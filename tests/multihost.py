"""Real multi-process JAX runs on this machine, for the tests: processes on localhost joined through
``distributed.initialize`` (the ``ELASTIC_JAX_*`` variables), each with its own CPU devices, gloo collectives."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
from collections.abc import Sequence

ROOT = pathlib.Path(__file__).parents[1]
CACHE = os.path.join("/tmp", "elastic_jax_test_xla_cache_mp")  # compiled programs shared by every run


def cpu_env(devices: int, **extra: str) -> dict[str, str]:
  """The environment of a JAX process with ``devices`` CPU devices, unoptimised compiles, the shared compile cache
  (``JAX_COMPILATION_CACHE_DIR``, and ``TEST_XLA_CACHE`` for scripts that set it themselves) and this checkout
  first on the path; no cluster variables unless ``extra`` sets them."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("ELASTIC_JAX_")}
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
  if not any("xla_backend_optimization_level" in f for f in flags):
    flags.append("--xla_backend_optimization_level=0")
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  env.update(JAX_PLATFORMS="cpu", TEST_XLA_CACHE=CACHE, JAX_COMPILATION_CACHE_DIR=CACHE,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
             PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p]), **extra)
  return env


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_processes(command: Sequence[str], log_prefix: str | os.PathLike, *, devices: int, count: int = 2,
                  timeout: float) -> list[str]:
  """Runs ``command`` as processes 0..count-1 of one cluster, ``devices`` CPU devices each; asserts every one exits
  0 (with the tail of its log) and returns their logs, read from ``<log_prefix><i>.log``."""
  port, procs, files = free_port(), [], []
  paths = [pathlib.Path(f"{os.fspath(log_prefix)}{i}.log") for i in range(count)]
  for process_id, path in enumerate(paths):
    env = cpu_env(devices, ELASTIC_JAX_COORDINATOR=f"localhost:{port}", ELASTIC_JAX_NUM_PROCESSES=str(count),
                  ELASTIC_JAX_PROCESS_ID=str(process_id))
    # Output to files, not pipes: a process blocked on a full pipe would stall the others in a collective.
    files.append(open(path, "w", encoding="utf-8"))
    procs.append(subprocess.Popen(list(command), env=env, stdout=files[-1], stderr=subprocess.STDOUT))
  try:
    for proc in procs:
      proc.wait(timeout=timeout)
  finally:  # a hang (one process waiting on a collective) fails the test instead of blocking it
    for proc, file in zip(procs, files):
      proc.kill()
      file.close()
  logs = [path.read_text() for path in paths]
  for process_id, (proc, log) in enumerate(zip(procs, logs)):
    assert proc.returncode == 0, f"process {process_id} exited with {proc.returncode}:\n{log[-4000:]}"
  return logs
