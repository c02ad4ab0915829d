"""Shared test helpers: small configs and parameters drawn so that every path carries signal."""

from __future__ import annotations

import os
import tempfile

# Tests run many small programs once each, so XLA's compile time dominates: compile without backend optimisation
# (about 2x faster suites; numerics are unchanged, only the generated code is slower). Set before JAX starts.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position

from elastic_jax.model import ModelConfig, param_shapes
from elastic_jax.train.loop import release_compiled_programs

# Many tests compile the same programs (same model, same step) in different closures: a persistent compilation
# cache shared by the whole run turns those recompiles into cache hits. Opt-in (ELASTIC_JAX_TEST_XLA_CACHE=1): with
# jax 0.10.2 on CPU, writing one elastic step's executable into it crashed the whole run (SIGSEGV / SIGABRT inside
# the cache write, in test_stale_phases, late in a full run), twice out of three full runs.
# Each pytest-xdist worker has a folder of its own: JAX writes an entry without a lock, and two workers writing one
# folder could leave an entry that another reads half-written.
if os.environ.get("ELASTIC_JAX_TEST_XLA_CACHE") == "1":
  jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "elastic_jax_test_xla_cache",
                                                              os.environ.get("PYTEST_XDIST_WORKER", "main")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


# pyproject.toml runs the suite on pytest-xdist workers (-n auto), a test file per worker at a time (--dist loadfile:
# module-scoped fixtures, some of them whole pipeline runs, are made once). Most of a test's time is single-threaded
# (XLA compiling, Python), so workers scale with CPUs; each also holds its own compiled programs and starts its own
# subprocesses (multi-process runs, the main job): in a full run on 2 workers, one worker with its subprocesses peaked
# at 6.9 GB, both together at 12.3 GB.
WORKER_MEMORY_BYTES = 6 * 2**30
MAX_WORKERS = 4


def pytest_xdist_auto_num_workers(config):  # pylint: disable=unused-argument
  """``-n auto``: one worker per CPU and per 6 GiB of memory, at most 4, at least 1; ``PYTEST_XDIST_AUTO_NUM_WORKERS``
  (xdist's own setting) overrides it."""
  if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
    return None  # xdist's own hook reads it
  cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
  memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  return max(1, min(cpus, memory // WORKER_MEMORY_BYTES, MAX_WORKERS))


# A worker takes the next file in collection order as it finishes one, so a long file collected late ends the run
# alone. These files (1 to 7.5 minutes each in a 2-worker run, longest first) start first and the rest keep their
# order (--no-loadscope-reorder in pyproject.toml keeps it); a file that takes over a minute belongs here. xdist's own
# order (most tests first) puts the long files of a few tests last. Scheduled on the measured time of each file, a run
# takes longer than the summed time over the workers by 2.5% on 2 workers and 28% on 4 in xdist's order, by 0.3% and
# 1% in this one.
LONGEST_FILES = ("test_main_job_multihost.py", "test_aot_compile.py", "test_tiny_moe.py", "test_plan.py",
                 "test_fault_injection.py", "test_study.py", "test_moe.py", "test_stale_phases.py",
                 "test_elastic_step.py", "test_model.py", "test_train_loop.py", "test_moe_elastic.py", "test_serve.py")


def pytest_collection_modifyitems(config, items):  # pylint: disable=unused-argument
  rank = {name: i for i, name in enumerate(LONGEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops every compiled program after each test module (``loop.release_compiled_programs``): a whole run kept
  about 90,000 memory mappings' worth of executables (summed growth per test), past the kernel's limit of 65,530 per
  process, and XLA's compiler crashed (SIGSEGV) late in the run while unrelated tests failed. Programs shared within
  a module (module-scoped fixtures) are kept; across modules they are compiled again."""
  yield
  release_compiled_programs()


def small_config(pattern: str = "M-*M", **overrides) -> ModelConfig:
  base = dict(pattern=pattern, vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, mamba_num_heads=4, mamba_head_dim=8, n_groups=2,
              ssm_state_size=16, chunk_size=4)
  base.update(overrides)
  return ModelConfig(**base)


def random_params(config: ModelConfig, seed: int = 0):
  """Params far from their init values: O(1) activations, varied decays, non-trivial norms and conv biases.

  Fresh init gives near-constant logits (tiny out-projections, unit norms), which would let many bugs pass.
  """
  leaves, treedef = jax.tree.flatten_with_path(param_shapes(config))
  rng = np.random.default_rng(seed)
  out = []
  for path, leaf in leaves:
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    shape = leaf.shape
    if name.endswith("A_log"):
      value = np.log(rng.uniform(0.5, 8.0, shape))
    elif name.endswith("dt_bias"):
      value = rng.uniform(-4.0, 1.0, shape)
    elif name.endswith("/D"):
      value = rng.normal(1.0, 0.5, shape)
    elif name.endswith("scale"):
      value = rng.normal(1.0, 0.2, shape)
    elif "conv" in name:
      value = rng.normal(0.0, 0.4, shape)
    elif name.endswith("embedding"):
      value = rng.normal(0.0, 1.0, shape)
    elif name.endswith("e_score_correction_bias"):  # MoE router: the size of score gaps, so it changes choices
      value = rng.normal(0.0, 0.15, shape)
    elif "/experts/" in name:  # stacked expert kernels [E, in, out]
      value = rng.normal(0.0, shape[1] ** -0.5, shape)
    else:  # projection kernels [in..., out...]: unit-variance outputs for unit-variance inputs
      fan_in = {"out_proj": shape[0] * shape[1], "o_proj": shape[0] * shape[1]}.get(name.split("/")[-2], shape[0])
      value = rng.normal(0.0, fan_in ** -0.5, shape)
    out.append(jnp.asarray(value, leaf.dtype))
  return jax.tree.unflatten(treedef, out)


@pytest.fixture
def rng():
  return np.random.default_rng(0)
