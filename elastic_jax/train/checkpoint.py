"""Checkpoints: one Orbax manager saving the train state (arrays) together with JSON metadata (step, data iterator
position, rankings, configs), atomically and asynchronously, plus a SIGTERM guard for preemption.

Orbax writes each step into a temporary directory and renames it only once complete, so a checkpoint interrupted
half-way is never listed and never restored.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

PyTree = Any


class ConfigMismatchError(ValueError):
  """The checkpoint was written under a different configuration than the one resuming it."""


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "") -> list[str]:
  """Dotted paths of fields whose values differ between two nested (JSON-like) configs, with both values."""
  diffs = []
  for key in sorted(set(saved) | set(current)):
    path = f"{prefix}{key}"
    if key not in saved or key not in current:
      where = "checkpoint" if key not in current else "current config"
      diffs.append(f"{path} (only in the {where})")
    elif isinstance(saved[key], Mapping) and isinstance(current[key], Mapping):
      diffs.extend(config_differences(saved[key], current[key], path + "."))
    elif saved[key] != current[key]:
      diffs.append(f"{path}: checkpoint has {saved[key]!r}, current config has {current[key]!r}")
  return diffs


class Checkpointer:
  """Saves and restores ``(state, metadata)`` pairs under ``directory``.

  state: any pytree of arrays (params, optimizer states, step, PRNG key data). metadata: JSON-serialisable dict; its
  ``"config"`` entry, when present, is compared on restore against the resuming run's (``check_config``).
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2, async_save: bool = True):
    directory = os.fspath(directory)
    # Object-store URLs (gs://bucket/run) go to Orbax as they are; abspath would turn them into local paths.
    self.directory = directory if "://" in directory else os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def save(self, step: int, state: PyTree, metadata: Mapping[str, Any]) -> None:
    """Starts saving (asynchronously when enabled); a later save or ``wait`` waits for it."""
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     metadata=ocp.args.JsonSave(dict(metadata))), force=True)

  def latest_step(self) -> int | None:
    self._manager.reload()
    return self._manager.latest_step()

  def restore(self, abstract_state: PyTree, step: int | None = None,
              expected_config: Mapping[str, Any] | None = None) -> tuple[PyTree, dict[str, Any]]:
    """Restores the state into the structure/shardings of ``abstract_state`` (``jax.ShapeDtypeStruct`` leaves).

    Raises ConfigMismatchError naming every differing field when ``expected_config`` differs from the saved one.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
    metadata = self._manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]
    if expected_config is not None:
      check_config(metadata.get("config", {}), expected_config, self.directory)
    restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"], metadata

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def check_config(saved: Mapping[str, Any], current: Mapping[str, Any], where: str = "checkpoint") -> None:
  diffs = config_differences(saved, current)
  if diffs:
    raise ConfigMismatchError(
        f"cannot resume from {where}: it was written under a different configuration ("
        + "; ".join(diffs) + "). Use a fresh workdir, or restore the original values.")


def abstract_like(tree: PyTree) -> PyTree:
  """``jax.ShapeDtypeStruct`` leaves (with shardings) matching ``tree``: the restore target."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class PreemptionGuard:
  """Turns SIGTERM (and optionally SIGINT) into a flag the training loop polls between steps.

  The loop then saves a checkpoint and exits cleanly instead of dying mid-step. Handlers are installed only on the
  main thread and restored on exit.
  """

  def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
    self._signals = signals
    self._previous: dict[int, Any] = {}
    self.requested = False

  def __enter__(self) -> "PreemptionGuard":
    if threading.current_thread() is threading.main_thread():
      for sig in self._signals:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame) -> None:
    del signum, frame
    self.requested = True

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      # None: the previous handler was installed outside Python (e.g. by the distributed runtime's preemption
      # notifier) and cannot be reinstated from here; fall back to the default action.
      signal.signal(sig, signal.SIG_DFL if handler is None else handler)
    self._previous.clear()


def save_model(directory: str | os.PathLike, config_dict: Mapping[str, Any], params: PyTree,
               metadata: Mapping[str, Any] | None = None) -> None:
  """A standalone model: its params as an Orbax checkpoint (step 0) with the model config in the metadata."""
  checkpointer = Checkpointer(directory, async_save=False)
  checkpointer.save(0, params, {**(metadata or {}), "config": dict(config_dict)})
  checkpointer.close()


def load_model(directory: str | os.PathLike, abstract_params: PyTree | None = None) -> tuple[dict[str, Any], PyTree]:
  """(metadata incl. the model ``config``, params) of a ``save_model`` directory.

  Without ``abstract_params`` the arrays are restored as saved (host/device default placement).
  """
  checkpointer = Checkpointer(directory, async_save=False)
  manager = checkpointer._manager  # pylint: disable=protected-access
  step = checkpointer.latest_step()
  if step is None:
    raise FileNotFoundError(f"no saved model in {os.fspath(directory)}")
  metadata = manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]
  restore = ocp.args.StandardRestore(abstract_params) if abstract_params is not None else ocp.args.StandardRestore()
  params = manager.restore(step, args=ocp.args.Composite(state=restore))["state"]
  checkpointer.close()
  return metadata, params
