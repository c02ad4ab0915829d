"""Multi-host training for real: two JAX processes (one CPU device each, gloo collectives) joined through
``distributed.initialize`` run the elastic loop on a 2-device data mesh, checkpoint, resume, and match an unsharded
single-process, single-device run fed the same global batches."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from elastic_jax.train import distributed
from multihost import cpu_env, run_processes

TESTS = pathlib.Path(__file__).parent
ROOT = TESTS.parent
TIMEOUT_S = 240  # per subprocess: a hang (e.g. one process waiting on a collective) fails instead of blocking CI

# Runs the tiny config's model through train_elastic: "single" in one process on one device (the reference), "multi"
# as process <id> of 2, with the same data factory. The multi-process run stops
# after 3 steps and resumes from its (multi-host Orbax) checkpoint; the reference runs the 5 steps in one go.
_WORKER = textwrap.dedent("""
    import importlib.util, json, os, sys
    mode, workdir, out = sys.argv[1], sys.argv[2], sys.argv[3]  # out may hold "{{process}}"
    import faulthandler
    faulthandler.dump_traceback_later({timeout} - 20, exit=True)  # a hang prints where it hangs, then exits
    from elastic_jax.train import distributed
    settings = distributed.initialize()  # reads the ELASTIC_JAX_* variables; a no-op in the single process
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_compilation_cache_dir", os.environ["TEST_XLA_CACHE"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    sys.path.insert(0, {tests!r})
    from conftest import random_params
    from elastic_jax.data.pipeline import SourceConfig, data_factory
    from elastic_jax.model import ModelConfig
    from elastic_jax.train.config import elastic_setup_from_config
    from elastic_jax.train.loop import Stage, train_elastic
    from elastic_jax.train.optim import OptimizerConfig

    spec = importlib.util.spec_from_file_location("tiny", {tiny!r})
    tiny = importlib.util.module_from_spec(spec); spec.loader.exec_module(tiny)
    cfg = tiny.get_config()
    config = ModelConfig.from_dict(cfg.model)
    stages = (Stage("stage1", 3, 4, 32, (1 / 3, 1 / 3, 1 / 3)), Stage("stage2", 2, 4, 32, (0.5, 0.3, 0.2)))
    setup = elastic_setup_from_config(cfg, config, list(range(len(config.pattern)))[::-1], 5)
    teacher = random_params(config, seed=0)
    source = SourceConfig()

    # The global batch does not depend on the process count: one process packs all rows, each of two packs its half.
    make_data = data_factory(source, seed=0)
    run = lambda **kw: train_elastic(setup, stages, teacher, jax.tree.map(jnp.copy, teacher), make_data, workdir,
                                     optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=2), log_every=1,
                                     progress=False, **kw)
    history = run(max_steps=3).history + run().history if mode == "multi" else run().history
    with open(out.replace("{{process}}", str(jax.process_index())), "w") as f:
      json.dump({{"source": settings.source, "process": jax.process_index(), "processes": jax.process_count(),
                  "devices": jax.device_count(), "steps": [h["step"] for h in history],
                  "losses": [h["loss"] for h in history], "kd": [h["kd_per_budget"] for h in history]}}, f)
""")


def _read(path: pathlib.Path) -> dict:
  return json.loads(path.read_text())


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  worker = tmp_path / "worker.py"
  worker.write_text(_WORKER.format(tests=str(TESTS), tiny=str(ROOT / "configs" / "tiny.py"), timeout=TIMEOUT_S))

  command = [sys.executable, str(worker), "multi", str(tmp_path / "multi"), str(tmp_path / "multi{process}.json")]
  run_processes(command, tmp_path / "multi", devices=1, timeout=TIMEOUT_S)

  single = subprocess.run([sys.executable, str(worker), "single", str(tmp_path / "single"),
                           str(tmp_path / "single.json")], env=cpu_env(1), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
  assert single.returncode == 0, single.stdout[-2000:] + single.stderr[-3000:]

  reference = _read(tmp_path / "single.json")
  assert (reference["source"], reference["processes"], reference["devices"]) == ("single", 1, 1)
  assert reference["steps"] == [1, 2, 3, 4, 5]
  for process_id in (0, 1):
    run = _read(tmp_path / f"multi{process_id}.json")
    assert (run["source"], run["process"], run["processes"], run["devices"]) == ("explicit", process_id, 2, 2)
    assert run["steps"] == reference["steps"]  # steps 1-3, then resumed from the step-3 checkpoint: 4-5
    np.testing.assert_allclose(run["losses"], reference["losses"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run["kd"], reference["kd"], rtol=1e-5, atol=1e-5)
  # Shared files come from process 0 alone: one metrics line per step, the deployed choices, both checkpoints.
  lines = (tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5]
  assert (tmp_path / "multi" / "deployed_choices.json").exists()
  assert sorted(p for p in os.listdir(tmp_path / "multi" / "checkpoints") if p.isdigit()) == ["3", "5"]


# ------------------------------------------------------------------------------ settings from the environment
def test_settings_from_env_single_explicit_and_detected():
  assert distributed.settings_from_env({}).source == "single"
  explicit = distributed.settings_from_env({"ELASTIC_JAX_COORDINATOR": "10.0.0.2:8476",
                                            "ELASTIC_JAX_NUM_PROCESSES": "4", "ELASTIC_JAX_PROCESS_ID": "3",
                                            "ELASTIC_JAX_LOCAL_DEVICE_IDS": "0,1"})
  assert explicit == distributed.DistributedSettings("explicit", "10.0.0.2:8476", 4, 3, (0, 1))
  slurm = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "8", "SLURM_PROCID": "5",
           "SLURM_LOCALID": "1"}
  assert distributed.settings_from_env(slurm) == distributed.DistributedSettings("slurm")
  per_node = distributed.settings_from_env({**slurm, "ELASTIC_JAX_LOCAL_DEVICE_IDS": "0,1,2,3"})
  assert per_node == distributed.DistributedSettings("slurm", local_device_ids=(0, 1, 2, 3))
  assert distributed.settings_from_env({**slurm, "SLURM_NTASKS": "1"}).source == "single"  # one task: no cluster
  assert distributed.settings_from_env({**slurm, "ELASTIC_JAX_DISTRIBUTED": "off"}).source == "single"
  assert distributed.settings_from_env({"TPU_WORKER_HOSTNAMES": "w-0,w-1"}).source == "gke_tpu"
  assert distributed.settings_from_env({"ELASTIC_JAX_DISTRIBUTED": "on"}).source == "forced"


@pytest.mark.parametrize("env, message", [
    ({"ELASTIC_JAX_COORDINATOR": "h:1", "ELASTIC_JAX_PROCESS_ID": "0"},
     "ELASTIC_JAX_COORDINATOR, ELASTIC_JAX_PROCESS_ID set but ELASTIC_JAX_NUM_PROCESSES missing"),
    ({"ELASTIC_JAX_NUM_PROCESSES": "2"}, "ELASTIC_JAX_NUM_PROCESSES set but ELASTIC_JAX_COORDINATOR, "
                                         "ELASTIC_JAX_PROCESS_ID missing"),
    ({"ELASTIC_JAX_COORDINATOR": "h", "ELASTIC_JAX_NUM_PROCESSES": "2", "ELASTIC_JAX_PROCESS_ID": "0"},
     "ELASTIC_JAX_COORDINATOR='h' must be host:port"),
    ({"ELASTIC_JAX_COORDINATOR": "h:1", "ELASTIC_JAX_NUM_PROCESSES": "2", "ELASTIC_JAX_PROCESS_ID": "2"},
     r"ELASTIC_JAX_PROCESS_ID=2 must lie in \[0, ELASTIC_JAX_NUM_PROCESSES=2\)"),
    ({"ELASTIC_JAX_COORDINATOR": "h:1", "ELASTIC_JAX_NUM_PROCESSES": "two", "ELASTIC_JAX_PROCESS_ID": "0"},
     "ELASTIC_JAX_NUM_PROCESSES='two' must be an integer"),
    ({"ELASTIC_JAX_DISTRIBUTED": "yes"}, "ELASTIC_JAX_DISTRIBUTED='yes' must be one of"),
])
def test_half_set_or_bad_env_fails_naming_the_variable(env, message):
  with pytest.raises(ValueError, match=message):
    distributed.settings_from_env(env)


def test_single_process_helpers():
  assert distributed.initialize({}).source == "single"  # no cluster: a no-op, jax keeps running one process
  assert distributed.is_primary() and distributed.agreed_stop(True, sync_now=False)
  assert distributed.local_batch_size(12) == 12
  tokens = np.arange(12, dtype=np.int64).reshape(3, 4)
  import jax  # pylint: disable=import-outside-toplevel
  from elastic_jax.train.sharding import batch_sharding, make_mesh  # pylint: disable=import-outside-toplevel
  batch = distributed.global_batch(tokens, batch_sharding(make_mesh()))
  assert batch.dtype == np.int32 and isinstance(batch, jax.Array)
  np.testing.assert_array_equal(np.asarray(batch), tokens)
