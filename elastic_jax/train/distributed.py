"""Multi-host runs: joining JAX's multi-controller runtime, and turning each process's rows into one global batch.

Every process of a multi-host run executes the same program; each reads its own share of the documents and holds
only the rows of the batch that its own devices compute on. :func:`global_batch` is the one place where those rows
become a device array: the elastic loop and the parent's pretraining loop both go through it.

:func:`initialize` must run before anything touches a JAX device. It reads the environment:

- ``ELASTIC_JAX_DISTRIBUTED``: ``auto`` (default), ``on`` (always call ``jax.distributed.initialize()`` and let JAX
  detect the cluster) or ``off`` (run as a single process whatever the environment says).
- ``ELASTIC_JAX_COORDINATOR`` (``host:port`` of process 0), ``ELASTIC_JAX_NUM_PROCESSES`` and
  ``ELASTIC_JAX_PROCESS_ID``: an explicit cluster, for launchers JAX does not detect (e.g. a GKE JobSet on GPUs).
  All three or none.
- ``ELASTIC_JAX_LOCAL_DEVICE_IDS`` (comma-separated, optional, any cluster): the devices this process drives. JAX
  gives each SLURM / Open MPI task a single GPU (one process per GPU); set it to e.g. ``0,1,2,3,4,5,6,7`` to run one
  process per node instead.
- Otherwise, in ``auto`` mode, the clusters JAX detects by itself: a SLURM step with more than one task, an Open MPI
  job with more than one rank, a Cloud TPU VM (single host or pod slice; JAX reads the worker list from the VM's
  metadata) and a GKE TPU node pool (``TPU_WORKER_HOSTNAMES``). Anything else is a single process: a no-op.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Sharding

ENV_MODE = "ELASTIC_JAX_DISTRIBUTED"
ENV_COORDINATOR = "ELASTIC_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "ELASTIC_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "ELASTIC_JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "ELASTIC_JAX_LOCAL_DEVICE_IDS"
_EXPLICIT_VARS = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
_MODES = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
  """How this process joins a run.

  Attributes:
    source: "single" (no cluster: nothing to initialize), "explicit" (the ``ELASTIC_JAX_*`` variables) or the name
      of the cluster JAX detects by itself ("slurm", "openmpi", "cloud_tpu", "gke_tpu", "forced").
    coordinator_address, num_processes, process_id, local_device_ids: passed to ``jax.distributed.initialize``;
      None lets JAX detect them from the cluster.
  """
  source: str
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None


def settings_from_env(env: Mapping[str, str] | None = None) -> DistributedSettings:
  """Reads the distributed settings from ``env`` (default ``os.environ``) without touching JAX."""
  env = os.environ if env is None else env
  mode = env.get(ENV_MODE, "auto").strip().lower() or "auto"
  if mode not in _MODES:
    raise ValueError(f"{ENV_MODE}={env[ENV_MODE]!r} must be one of {_MODES}: 'auto' detects the cluster, 'on' "
                     "always calls jax.distributed.initialize(), 'off' runs a single process.")
  if mode == "off":
    return DistributedSettings("single")
  present = [name for name in _EXPLICIT_VARS if env.get(name, "").strip()]
  if present:
    missing = [name for name in _EXPLICIT_VARS if name not in present]
    if missing:
      raise ValueError(f"{', '.join(present)} set but {', '.join(missing)} missing: an explicit cluster needs all of "
                       f"{', '.join(_EXPLICIT_VARS)} (or none of them, to let JAX detect the cluster).")
    return _explicit_settings(env)
  cluster = "forced" if mode == "on" else _detected_cluster(env)
  if cluster is None:
    return DistributedSettings("single")
  return DistributedSettings(cluster, local_device_ids=_local_device_ids(env))


def _explicit_settings(env: Mapping[str, str]) -> DistributedSettings:
  coordinator = env[ENV_COORDINATOR].strip()
  host, _, port = coordinator.rpartition(":")
  if not host or not port.isdigit():
    raise ValueError(f"{ENV_COORDINATOR}={coordinator!r} must be host:port of process 0, e.g. 10.0.0.2:8476.")
  num_processes = _int_var(env, ENV_NUM_PROCESSES)
  process_id = _int_var(env, ENV_PROCESS_ID)
  if num_processes < 1:
    raise ValueError(f"{ENV_NUM_PROCESSES}={num_processes} must be at least 1.")
  if not 0 <= process_id < num_processes:
    raise ValueError(f"{ENV_PROCESS_ID}={process_id} must lie in [0, {ENV_NUM_PROCESSES}={num_processes}); "
                     "number the processes 0, 1, ..., N - 1.")
  return DistributedSettings("explicit", coordinator, num_processes, process_id, _local_device_ids(env))


def _local_device_ids(env: Mapping[str, str]) -> tuple[int, ...] | None:
  device_ids = env.get(ENV_LOCAL_DEVICE_IDS, "").strip()
  if not device_ids:
    return None
  try:
    return tuple(int(part) for part in device_ids.split(","))
  except ValueError:
    raise ValueError(f"{ENV_LOCAL_DEVICE_IDS}={device_ids!r} must be comma-separated integers, e.g. 0,1.") from None


def _int_var(env: Mapping[str, str], name: str) -> int:
  value = env[name].strip()
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{name}={value!r} must be an integer.") from None


def _more_than_one(env: Mapping[str, str], name: str) -> bool:
  value = env.get(name, "").strip()
  return value.isdigit() and int(value) > 1


def _detected_cluster(env: Mapping[str, str]) -> str | None:
  """The clusters ``jax.distributed.initialize()`` configures itself from, when this process is one of several
  (a one-task SLURM allocation or a single process elsewhere stays a plain single-process run)."""
  if all(env.get(name) for name in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")) \
      and _more_than_one(env, "SLURM_NTASKS"):
    return "slurm"
  if env.get("OMPI_MCA_orte_hnp_uri") and _more_than_one(env, "OMPI_COMM_WORLD_SIZE"):
    return "openmpi"
  if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1:
    return "gke_tpu"
  # A Cloud TPU VM: libtpu installed and TPU chips attached. JAX then reads the slice's workers from the metadata
  # server (one worker is a valid single-process cluster).
  if importlib.util.find_spec("libtpu") is not None and (glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")):
    return "cloud_tpu"
  return None


def initialize(env: Mapping[str, str] | None = None, *, initialization_timeout: int = 300) -> DistributedSettings:
  """Joins the multi-controller runtime described by the environment (see the module docstring); a no-op for a
  single process or when already joined. Call it before any other JAX call.

  Returns the settings it acted on.
  """
  settings = settings_from_env(env)
  if settings.source == "single" or jax.distributed.is_initialized():
    return settings
  if settings.num_processes == 1:  # an explicit cluster of one: nothing to coordinate
    return settings
  # Cross-process collectives between CPU devices (a CPU-only cluster, or host-side reductions) need an
  # implementation; gloo ships with jaxlib. Accelerator collectives are unaffected.
  if jax.config.jax_cpu_collectives_implementation is None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=settings.coordinator_address,
                             num_processes=settings.num_processes, process_id=settings.process_id,
                             local_device_ids=(list(settings.local_device_ids)
                                               if settings.local_device_ids is not None else None),
                             initialization_timeout=initialization_timeout)
  # A first collective while every process is at the same point: it sets up the cross-process communicators (gloo
  # gives that setup a short deadline on CPU) and fails here, not mid-run, if the processes cannot reach each other.
  barrier("elastic_jax_distributed_initialized")
  return settings


def is_primary() -> bool:
  """Whether this process writes the run's shared files (metrics, reports, markers): process 0."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier ``name`` (e.g. after process 0 wrote a file the others read)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def agreed_stop(requested: bool, sync_now: bool) -> bool:
  """Whether to stop (and save) now, given this process's preemption flag.

  One process: ``requested`` itself, at any step. Several: processes can receive SIGTERM at different steps but must
  all stop at the same one, so at steps where ``sync_now`` holds they gather their flags (one small all-gather) and
  all stop if any was asked to; at other steps nobody stops. Call it on every process with the same ``sync_now``.
  """
  if jax.process_count() == 1:
    return bool(requested)
  if not sync_now:
    return False
  return bool(np.any(multihost_utils.process_allgather(np.asarray(bool(requested)))))


def process_states(state: Any) -> list[Any]:
  """Every process's JSON-able ``state`` (e.g. its data iterator's position), in process order: what a checkpoint
  stores, so that each process resumes from its own. All processes must call it together (two small all-gathers).
  """
  if jax.process_count() == 1:
    return [state]
  encoded = np.frombuffer(json.dumps(state).encode("utf-8"), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.asarray(len(encoded), np.int64))).reshape(-1)
  padded = np.zeros((int(sizes.max()),), np.uint8)
  padded[:len(encoded)] = encoded
  rows = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(bytes(row[:size]).decode("utf-8")) for row, size in zip(rows, sizes)]


def own_state(states: list[Any], where: str = "checkpoint") -> Any:
  """This process's entry of a ``process_states`` list restored from a checkpoint."""
  if not isinstance(states, list) or len(states) != jax.process_count():
    count = len(states) if isinstance(states, list) else 1
    raise ValueError(f"the {where} holds the data positions of {count} process(es) but this run has "
                     f"{jax.process_count()}: resume with the same number of processes, or start a fresh workdir.")
  return states[jax.process_index()]


def local_batch_size(global_batch_size: int, where: str = "batch_size") -> int:
  """This process's rows of a global batch: ``global_batch_size / process_count``, which must divide evenly."""
  count = jax.process_count()
  if global_batch_size % count:
    raise ValueError(f"{where}={global_batch_size} is the global batch, split evenly over {count} processes: make it "
                     f"a multiple of {count} (e.g. {max(count, global_batch_size // count * count)}).")
  return global_batch_size // count


def global_batch(local_tokens: Any, sharding: Sharding) -> jax.Array:
  """Assembles every process's rows ``local_tokens`` [local_batch, ...] into one global int32 array.

  The global batch is the processes' rows stacked in process order, ``local_batch * process_count`` rows; the
  sharding must give each process exactly its own contiguous block of rows (a mesh whose batch axes span the
  processes, as ``make_mesh`` builds from ``jax.devices()``). With one process this is a plain ``device_put``.
  """
  local = np.asarray(local_tokens, dtype=np.int32)
  if local.ndim < 1:
    raise ValueError(f"a batch needs a leading batch axis; got an array of shape {local.shape}.")
  count, index = jax.process_count(), jax.process_index()
  global_shape = (local.shape[0] * count,) + local.shape[1:]
  if count > 1:
    rows = set()
    for slices in sharding.addressable_devices_indices_map(global_shape).values():
      rows.update(range(*slices[0].indices(global_shape[0])) if slices else range(global_shape[0]))
    expected = set(range(index * local.shape[0], (index + 1) * local.shape[0]))
    if rows != expected:
      raise ValueError(
          f"process {index} reads rows {min(expected)}..{max(expected)} of the global batch of {global_shape[0]}, "
          f"but the sharding {sharding} places rows {min(rows)}..{max(rows)} on its devices: put the batch's mesh "
          "axes (data, fsdp) across processes and keep axes that replicate the batch (tensor) within a host.")
  return jax.make_array_from_process_local_data(sharding, local, global_shape)
