"""Checkpoints: one Orbax manager saving the train state (arrays) together with JSON metadata (step, data iterator
position, rankings, configs), atomically and asynchronously, plus a SIGTERM guard for preemption.

Orbax writes each step into a temporary directory and renames it only once complete, so a checkpoint interrupted
half-way is never listed and never restored; such leftovers are removed when a manager opens the directory. A listed
checkpoint that still fails to restore (a file truncated or lost afterwards) is set aside, renamed
``<step>.unrestorable``, never deleted, and the previous complete step is used (``restore_latest``).
"""

from __future__ import annotations

import os
import signal
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

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

  The latest ``max_to_keep`` steps are kept, and every step in ``keep_steps`` (e.g. the end of each curriculum
  stage, the point a run restarts from when a later stage's settings change). With ``clean_up`` (the writer of the
  directory) the temporary folders of saves that never completed (``*.orbax-checkpoint-tmp*``) are removed when it
  opens the directory; a reader leaves them (they may belong to a save in progress).
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2, keep_steps: Sequence[int] = (),
               async_save: bool = True, clean_up: bool = True):
    directory = os.fspath(directory)
    # Object-store URLs (gs://bucket/run) go to Orbax as they are; abspath would turn them into local paths.
    self.directory = directory if "://" in directory else os.path.abspath(directory)
    policies = [ocp.checkpoint_managers.LatestN(max_to_keep)]
    if keep_steps:
      policies.append(ocp.checkpoint_managers.CustomSteps(sorted(int(step) for step in keep_steps)))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=clean_up)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def save(self, step: int, state: PyTree, metadata: Mapping[str, Any]) -> None:
    """Starts saving (asynchronously when enabled); a later save or ``wait`` waits for it."""
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     metadata=ocp.args.JsonSave(dict(metadata))), force=True)

  def latest_step(self) -> int | None:
    self._manager.reload()
    return self._manager.latest_step()

  def restore_latest(self, abstract_state: PyTree,
                     accept: Callable[[int, dict[str, Any]], str | None] | None = None
                     ) -> tuple[PyTree, dict[str, Any]] | None:
    """The newest checkpoint that restores and that ``accept`` takes, as ``(state, metadata)``; None when there is
    none (a fresh start).

    ``accept(step, metadata)`` returns None to take the checkpoint, or the reason it no longer fits the run (e.g.
    written under other settings of a curriculum stage it had started): it is then set aside as ``<step>.stale``
    and the previous one is tried; ``accept`` raises to refuse the resume altogether (``ConfigMismatchError``).

    The newest candidate failing to restore (a truncated or missing file) is set aside as ``<step>.unrestorable``
    with a warning naming it, and the previous complete step is used. A second failure in a row is raised: one torn
    checkpoint is an accident, two point to a cause (a changed model, a wrong mesh) that falling back further would
    only hide.
    """
    failure = None
    for step in sorted(self._steps(), reverse=True):
      try:
        metadata = self._restore_metadata(step)
        reason = None if accept is None else accept(step, metadata)
        state = None if reason else self._restore_state(step, abstract_state)
        error = None
      except ConfigMismatchError:
        raise
      except Exception as caught:  # pylint: disable=broad-exception-caught
        error = caught
      if _any_process(error is not None):  # every process falls back together (each reads its own shards)
        if failure is not None:
          raise RuntimeError(f"checkpoint {step} in {self.directory} does not restore either, after checkpoint "
                             f"{failure} was set aside: {error!r}") from error
        failure = step
        where = self.set_aside(step, "unrestorable")
        warnings.warn(f"checkpoint {step} in {self.directory} does not restore ({type(error).__name__}: "
                      f"{_first_line(error)}); set aside as {where}, trying the previous complete step.",
                      stacklevel=2)
        continue
      if reason:
        where = self.set_aside(step, "stale")
        print(f"[elastic_jax] checkpoint {step} set aside as {where}: {reason}", flush=True)
        continue
      return state, metadata
    return None

  def set_aside(self, step: int, why: str) -> str:
    """Renames checkpoint ``step`` to ``<step>.<why>`` (``.<why>-2`` ... when taken), out of Orbax's sight; never
    deletes it. Returns the new path."""
    source = os.path.join(self.directory, str(step))
    target, n = f"{source}.{why}", 1
    while os.path.exists(target):
      n += 1
      target = f"{source}.{why}-{n}"
    _barrier(f"elastic_jax_set_aside_chosen:{source}")  # every process named the target before it exists
    if jax.process_index() == 0:
      os.rename(source, target)
    _barrier(f"elastic_jax_set_aside_done:{source}")
    self._manager.reload()
    return target

  def _steps(self) -> list[int]:
    self._manager.reload()
    return list(self._manager.all_steps())

  def _restore_metadata(self, step: int) -> dict[str, Any]:
    return self._manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]

  def _restore_state(self, step: int, abstract_state: PyTree) -> PyTree:
    return self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))[
        "state"]

  def restore(self, abstract_state: PyTree, step: int | None = None,
              expected_config: Mapping[str, Any] | None = None) -> tuple[PyTree, dict[str, Any]]:
    """Restores the state into the structure/shardings of ``abstract_state`` (``jax.ShapeDtypeStruct`` leaves).

    Raises ConfigMismatchError naming every differing field when ``expected_config`` differs from the saved one.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
    metadata = self._restore_metadata(step)
    if expected_config is not None:
      check_config(metadata.get("config", {}), expected_config, self.directory)
    return self._restore_state(step, abstract_state), metadata

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


def _any_process(flag: bool) -> bool:
  """Whether ``flag`` holds on any process (one small all-gather when there are several)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return text[0][:300] if text else ""


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
  checkpointer = Checkpointer(directory, async_save=False, clean_up=False)
  manager = checkpointer._manager  # pylint: disable=protected-access
  step = checkpointer.latest_step()
  if step is None:
    raise FileNotFoundError(f"no saved model in {os.fspath(directory)}")
  metadata = manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]
  restore = ocp.args.StandardRestore(abstract_params) if abstract_params is not None else ocp.args.StandardRestore()
  params = manager.restore(step, args=ocp.args.Composite(state=restore))["state"]
  checkpointer.close()
  return metadata, params
