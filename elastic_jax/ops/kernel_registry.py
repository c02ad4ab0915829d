"""Where fused kernels plug into the ops: one registry per op, the device a program is compiled for, and dispatch.

A kernel package registers its kernels when it is imported (``register_kernel`` at module level); an op's dispatch
only consults the registry (:func:`find_kernel`). The registry imports the kernel packages named for an op in
:data:`KERNEL_PACKAGES` the first time that op's kernels are looked up, so importing ``elastic_jax`` imports no
kernel code and the ops never import the kernels (nor the kernels the ops: they import only this module). A package
that cannot be imported is reported once, in a warning, and its op falls back to XLA under ``impl="auto"``.

The target (:func:`compile_target`) is the device the program is compiled for: the devices of the mesh active while
the op traces (``jax.set_mesh``, as the training steps and ``elastic_jax.aot`` set it), else this process's default
device. So a program compiled on a CPU host for H100s (compile-only devices) gets the kernel an H100 would get.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import threading
import warnings
from collections.abc import Callable

import jax

# The kernel packages that register kernels for each op, imported on the op's first lookup. They ship with
# elastic_jax: the top-level ``kernels/`` folder installs as ``elastic_jax_kernels`` (pyproject.toml).
KERNEL_PACKAGES: dict[str, tuple[str, ...]] = {"ssd": ("elastic_jax_kernels.ssd",)}


# ----------------------------------------------------------------------------------------------------------------------
# The target device.


@dataclasses.dataclass(frozen=True)
class Target:
  """The device a program is compiled for, as kernel dispatch sees it.

  Attributes:
    platform: "cpu", "gpu" or "tpu" (``jax.Device.platform``).
    device_kind: ``jax.Device.device_kind``, e.g. "NVIDIA H100 80GB HBM3".
    compute_capability: (major, minor) of an NVIDIA GPU, e.g. (9, 0); None for any other device.
  """

  platform: str
  device_kind: str = ""
  compute_capability: tuple[int, int] | None = None


def _nvidia_compute_capability(device) -> tuple[int, int] | None:
  """(major, minor) of an NVIDIA device (real or compile-only); None for anything else (ROCm reports "gfx...")."""
  if device.platform != "gpu":
    return None
  try:
    platform_version = device.client.platform_version.lower()
  except AttributeError:
    platform_version = ""
  match = re.fullmatch(r"(\d+)\.(\d+)", str(getattr(device, "compute_capability", "")))
  if match is None or "rocm" in platform_version:
    return None
  return int(match.group(1)), int(match.group(2))


def target_of(device) -> Target:
  """The :class:`Target` of a ``jax.Device`` (real or compile-only)."""
  return Target(device.platform, device.device_kind, _nvidia_compute_capability(device))


def _active_mesh_device():
  """A device of the concrete mesh set by ``jax.set_mesh`` (also while tracing under it), or None."""
  try:
    from jax._src import mesh as mesh_lib  # pylint: disable=import-outside-toplevel  (no public getter inside jit)

    mesh = mesh_lib.get_concrete_mesh()
  except (ImportError, AttributeError):
    return None
  if mesh is None or getattr(mesh, "empty", True):
    return None
  return mesh.devices.flat[0]


def compile_target() -> Target:
  """The target of the program being traced: the active mesh's devices, else this process's default device.

  An abstract mesh alone (``jax.sharding.use_abstract_mesh``, ``shard_map`` without ``jax.set_mesh``) names the
  platform and device kind: this process's device when they match it, else a target without a compute capability,
  for which no NVIDIA-only kernel is chosen.
  """
  device = _active_mesh_device()
  if device is not None:
    return target_of(device)
  default = target_of(jax.devices()[0])
  abstract_device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  if abstract_device is not None and (abstract_device.platform, abstract_device.device_kind) != (
      default.platform, default.device_kind):
    return Target(abstract_device.platform, abstract_device.device_kind)
  return default


# ----------------------------------------------------------------------------------------------------------------------
# The registry.


@dataclasses.dataclass(frozen=True)
class Kernel:
  """A fused implementation of one op.

  Attributes:
    name: Unique name within its op, shown in error messages.
    supports: ``supports(x_shape, x_dtype, target, **query) -> bool``: whether the kernel takes this input on
      ``target`` (a :class:`Target`); the op defines ``query`` (``ops.ssd``: ``state_size``, ``chunk_size``). Must be
      cheap and must not raise.
    fn: The implementation, with the op's contract; it runs in the trace that dispatched it, so it may read
      :func:`compile_target` too.
    unsupported_reason: Optional ``unsupported_reason(x_shape, x_dtype, target, **query) -> str | None``: why the
      kernel refuses an input, for error messages.
  """

  name: str
  supports: Callable[..., bool]
  fn: Callable
  unsupported_reason: Callable[..., str | None] | None = None


# op -> kernel name -> kernel, insertion-ordered: the first registered kernel that supports an input wins.
_KERNELS: dict[str, dict[str, Kernel]] = {}
# Kernel packages whose import was attempted, and why each failed one failed (reported once, then kept for messages).
_IMPORTED_PACKAGES: set[str] = set()
_IMPORT_ERRORS: dict[str, str] = {}
_LOCK = threading.RLock()


def register_kernel(op: str, name: str, supports: Callable[..., bool], fn: Callable, *,
                    unsupported_reason: Callable[..., str | None] | None = None) -> Kernel:
  """Registers a kernel for ``op`` (replacing one of the same name); kernel packages call it when imported.

  Dispatch happens when the op is traced: a function already compiled keeps the implementation it was traced with.
  """
  kernel = Kernel(name, supports, fn, unsupported_reason)
  with _LOCK:
    _KERNELS.setdefault(op, {})[name] = kernel
  return kernel


def _import_kernel_packages(op: str) -> None:
  """Imports the kernel packages of ``op`` once (they register themselves); warns once for each that fails."""
  with _LOCK:
    for package in KERNEL_PACKAGES.get(op, ()):
      if package in _IMPORTED_PACKAGES:
        continue
      _IMPORTED_PACKAGES.add(package)
      try:
        importlib.import_module(package)
      except ImportError as error:
        _IMPORT_ERRORS[package] = f"{type(error).__name__}: {error}"
        warnings.warn(
            f"{op}: the kernel package {package} could not be imported ({_IMPORT_ERRORS[package]}); its kernels are "
            f"not registered, so impl='auto' runs XLA and impl='pallas' fails. Reinstall elastic_jax "
            "(`pip install -e .` in the repository) to restore them.", RuntimeWarning, stacklevel=4)


def kernels(op: str) -> tuple[Kernel, ...]:
  """The kernels registered for ``op``, in the order dispatch tries them (its kernel packages imported first)."""
  _import_kernel_packages(op)
  with _LOCK:
    return tuple(_KERNELS.get(op, {}).values())


def unregister_kernel(op: str, name: str) -> None:
  """Removes a registered kernel; unknown names are ignored. It stays removed: packages are imported only once."""
  _import_kernel_packages(op)
  with _LOCK:
    _KERNELS.get(op, {}).pop(name, None)


def find_kernel(op: str, x_shape: tuple[int, ...], x_dtype, target: Target, **query) -> Kernel | None:
  """The first kernel registered for ``op`` that supports this input on ``target``, or None."""
  for kernel in kernels(op):
    if kernel.supports(x_shape, x_dtype, target, **query):
      return kernel
  return None


def describe_refusals(op: str, x_shape: tuple[int, ...], x_dtype, target: Target, **query) -> str:
  """For an error message: each registered kernel of ``op`` with why it refuses this input (where it can say), and
  each kernel package that could not be imported."""
  parts = []
  for kernel in kernels(op):
    reason = None
    if kernel.unsupported_reason is not None:
      try:
        reason = kernel.unsupported_reason(x_shape, x_dtype, target, **query)
      except Exception:  # pylint: disable=broad-except  (an error message must not fail in turn)
        reason = None
    parts.append(f"{kernel.name!r}: {reason}" if reason else repr(kernel.name))
  text = f"registered: {', '.join(parts) or 'none'}"
  failed = [f"{package} ({_IMPORT_ERRORS[package]})" for package in KERNEL_PACKAGES.get(op, ())
            if package in _IMPORT_ERRORS]
  if failed:
    text += f"; not importable: {', '.join(failed)}"
  return text
