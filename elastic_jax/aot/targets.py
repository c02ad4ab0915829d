"""Compile-only devices for hardware this machine does not have: TPU slices (libtpu) and NVIDIA GPUs (the CUDA plugin).

A target is named ``kind:topology``, e.g. ``v5p:2x2x1`` (a TPU slice: chips along x, y, z) or ``h100:1x1x8`` (GPUs:
slices x hosts per slice x GPUs per host); ``kind`` alone takes :data:`DEFAULT_TOPOLOGY`. JAX's
``jax.experimental.topologies.get_topology_desc`` turns it into devices that XLA compiles for exactly as for the real
ones (Mosaic and libtpu's passes on TPU; Triton to cubin with the shared-memory check on GPU), but that cannot run.

Compile-only devices need the process to stay off the machine's own accelerators and to share libtpu with other
processes: :data:`SUBPROCESS_ENV` is what ``elastic_jax.aot.compile`` sets for its workers, which are the only place
this module's devices are meant to be made (a compiler abort kills the process that compiles).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib

SPECS_DIR = pathlib.Path(__file__).resolve().parent / "gpu_specs"
# Environment of a process that makes compile-only devices: the host's own backend is the CPU (an installed CUDA
# plugin without a driver would otherwise fail to initialise and take the compile-only CUDA topology with it), and
# libtpu may be loaded by several processes at once (it otherwise holds a machine-wide lock file).
SUBPROCESS_ENV = {"JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_SKIP_MDS_QUERY": "1"}

_INSTALL_HINT = {"tpu": 'pip install -e ".[tpu-aot]" (libtpu)', "cuda": 'pip install -e ".[gpu-aot]" (the CUDA plugin)'}


@dataclasses.dataclass(frozen=True)
class TargetKind:
  """One kind of accelerator that can be compiled for.

  Attributes:
    platform: JAX's plugin platform: "tpu" or "cuda".
    spec_file: For GPUs, the GpuTargetConfig text proto in :data:`SPECS_DIR` that describes the device.
  """

  platform: str
  spec_file: str | None = None


KINDS: dict[str, TargetKind] = {
    "v4": TargetKind("tpu"),
    "v5e": TargetKind("tpu"),
    "v5p": TargetKind("tpu"),
    "v6e": TargetKind("tpu"),
    "h100": TargetKind("cuda", "h100_sxm.txtpb"),
    "h200": TargetKind("cuda", "h200.txtpb"),
    "a100": TargetKind("cuda", "a100_sxm_80.txtpb"),
}
DEFAULT_TOPOLOGY = {"v4": "2x2x1", "v5e": "2x2", "v5p": "2x2x1", "v6e": "2x2", "h100": "1x1x8", "h200": "1x1x8",
                    "a100": "1x1x8"}


class TargetError(ValueError):
  """An unknown target name or a malformed topology."""


class TargetUnavailable(RuntimeError):
  """The compiler for a target (libtpu, the CUDA plugin) is not installed here."""


@dataclasses.dataclass(frozen=True)
class Target:
  """A parsed target name: ``kind`` (a :data:`KINDS` key) and its ``topology`` ("2x2x1", "1x1x8")."""

  kind: str
  topology: str

  @property
  def platform(self) -> str:
    return KINDS[self.kind].platform

  @property
  def name(self) -> str:
    return f"{self.kind}:{self.topology}"


def parse(name: str) -> Target:
  """"v5p:2x2x1" / "h100:1x1x8" / "h100" -> Target; raises TargetError with the known kinds."""
  kind, _, topology = name.strip().lower().partition(":")
  if kind not in KINDS:
    raise TargetError(f"unknown compile target {name!r}; kinds are {sorted(KINDS)}, e.g. 'v5p:2x2x1' or "
                      "'h100:1x1x8'.")
  topology = topology or DEFAULT_TOPOLOGY[kind]
  sizes = topology.split("x")
  if not all(size.isdigit() and int(size) > 0 for size in sizes):
    raise TargetError(f"compile target {name!r}: topology {topology!r} must be positive sizes joined by 'x', e.g. "
                      f"{DEFAULT_TOPOLOGY[kind]!r}.")
  if KINDS[kind].platform == "cuda" and len(sizes) != 3:
    raise TargetError(f"compile target {name!r}: a GPU topology is slices x hosts per slice x GPUs per host, e.g. "
                      "'1x1x8'.")
  return Target(kind, topology)


def unavailable_reason(target: Target | str) -> str | None:
  """Why ``target`` cannot be compiled for here (its compiler is not installed), or None when it can."""
  target = parse(target) if isinstance(target, str) else target
  module = "libtpu" if target.platform == "tpu" else "jax_plugins.xla_cuda12"
  try:
    found = importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:  # jax_plugins itself missing
    found = False
  return None if found else f"compiling for {target.kind} needs {_INSTALL_HINT[target.platform]}"


def gpu_target_config(kind: str) -> str:
  """The GpuTargetConfig text proto shipped for an NVIDIA ``kind``."""
  spec = KINDS[kind].spec_file
  if spec is None:
    raise TargetError(f"{kind} is not a GPU target; GPU targets are "
                      f"{sorted(k for k, v in KINDS.items() if v.spec_file)}.")
  return (SPECS_DIR / spec).read_text()


def target_devices(target: Target | str) -> list:
  """Compile-only ``jax.Device``s for ``target``, in topology order.

  Call in a process started with :data:`SUBPROCESS_ENV` (``elastic_jax.aot.compile`` does): compiling for them runs
  the target's real compiler, whose aborts end the process.
  """
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

  target = parse(target) if isinstance(target, str) else target
  reason = unavailable_reason(target)
  if reason:
    raise TargetUnavailable(reason)
  if target.platform == "tpu":
    description = topologies.get_topology_desc(topology_name=f"{target.kind}:{target.topology}", platform="tpu")
  else:
    description = topologies.get_topology_desc(platform="cuda", topology=target.topology,
                                               target_config=gpu_target_config(target.kind))
  return list(description.devices)
