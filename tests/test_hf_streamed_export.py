"""Streamed HF export: ``hf.save`` writes the safetensors file one checkpoint tensor at a time, from numpy params or
from global arrays sharded over several processes.

References: the safetensors library itself (``safetensors.numpy.save_file`` of ``params_to_hf``, the whole-model
conversion) for the bytes on disk, and transformers' NemotronH for what the file means (equal logits). The sharded
export must write exactly the single-process file, while process 0 holds about one tensor on the host.
"""

from __future__ import annotations

import hashlib
import json
import math
import pathlib
import struct
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

from conftest import random_params, small_config  # noqa: E402
from test_hf_interop import assert_logits_close, hf_logits, our_logits, random_tokens  # noqa: E402
from multihost import run_processes  # noqa: E402

from elastic_jax.interop import hf  # noqa: E402

TIMEOUT_S = 240  # per subprocess: a hang (one process waiting on a collective) fails instead of blocking CI


def _cast(params, dtype, keep_float32=()):
  """The tree in ``dtype``, except leaves whose name is in ``keep_float32`` (mixed dtypes in one file)."""
  def cast(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    return np.asarray(leaf, np.float32 if name in keep_float32 else dtype)
  return jax.tree_util.tree_map_with_path(cast, params)


def _library_file(params, config, path: pathlib.Path) -> bytes:
  """What the whole-model conversion written by the safetensors library gives: the reference bytes."""
  path.mkdir(parents=True)
  save_file(hf.params_to_hf(params, config), str(path / hf.SINGLE_FILE), metadata={"format": "pt"})
  return (path / hf.SINGLE_FILE).read_bytes()


# ---------------------------------------------------------------------------------------------------- one process
@pytest.mark.parametrize("dtype, keep_float32", [
    (np.float32, ()),
    (ml_dtypes.bfloat16, ()),
    # bf16 weights with fp32 SSM parameters: the file orders tensors by dtype first, then by name.
    (ml_dtypes.bfloat16, ("A_log", "D", "dt_bias")),
], ids=["fp32", "bf16", "bf16+fp32"])
def test_streamed_file_is_the_safetensors_library_file(tmp_path, dtype, keep_float32):
  config = small_config("M*-M", n_groups=2)
  params = _cast(random_params(config, seed=1), dtype, keep_float32)
  want = _library_file(params, config, tmp_path / "library")
  hf.save(tmp_path / "numpy", config, params)
  assert (tmp_path / "numpy" / hf.SINGLE_FILE).read_bytes() == want
  # Device arrays (fully addressable) stream the same bytes.
  hf.save(tmp_path / "device", config, jax.tree.map(jnp.asarray, params))
  assert (tmp_path / "device" / hf.SINGLE_FILE).read_bytes() == want
  assert not list((tmp_path / "numpy").glob("*.partial"))
  # The header, read by hand: space padding to a multiple of 8 bytes, data right after it.
  length = struct.unpack("<Q", want[:8])[0]
  assert length % 8 == 0 and want[8:8 + length].decode().rstrip(" ").endswith("}")
  header = json.loads(want[8:8 + length])
  assert header.pop("__metadata__") == {"format": "pt"}
  assert max(info["data_offsets"][1] for info in header.values()) == len(want) - 8 - length
  tensors = load_file(str(tmp_path / "numpy" / hf.SINGLE_FILE))
  for key, tensor in hf.params_to_hf(params, config).items():
    assert tensors[key].dtype == tensor.dtype and np.array_equal(tensors[key], tensor), key


def test_streamed_export_loads_in_transformers_with_our_logits(tmp_path):
  # A positive lower dt limit is exported as time_step_min, so stock transformers clamps exactly as we do.
  config = small_config("*-M-M*", vocab_size=80, hidden_size=40, intermediate_size=24, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=12, mamba_num_heads=8, mamba_head_dim=4, n_groups=4,
                        ssm_state_size=6, conv_kernel=3, chunk_size=4, time_step_limit=(0.02, math.inf))
  params = jax.tree.map(np.asarray, random_params(config, seed=2))
  hf.save(tmp_path / "export", config, params)
  model = transformers.NemotronHForCausalLM.from_pretrained(tmp_path / "export").eval()
  tokens = random_tokens(config.vocab_size, seed=4)
  assert_logits_close(our_logits(config, params, tokens), hf_logits(model, tokens), "streamed export *-M-M*")


def test_streamed_export_refuses_a_bad_tree_before_writing(tmp_path):
  config = small_config("M*-M")
  params = jax.tree.map(np.asarray, random_params(config))
  params["layers_2"]["mixer"]["up_proj"]["kernel"] = np.zeros((32, 47), np.float32)
  with pytest.raises(hf.CheckpointError, match=r"layers_2/mixer/up_proj/kernel has shape \(32, 47\)"):
    hf.save(tmp_path / "bad", config, params)
  assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------------------------------- 2 processes
# Process <id> of 2 (2 CPU devices each) imports the reference checkpoint into a (1, 4) mesh (every param a global
# array over both processes; fp32, and cast to bf16 on the devices), then both export it with hf.save under
# tracemalloc (numpy's buffers are traced; XLA's own are not). Process 1 records every file it opens for writing.
_WORKER = textwrap.dedent("""
    import builtins, faulthandler, hashlib, json, os, sys, tracemalloc
    faulthandler.dump_traceback_later({timeout} - 20, exit=True)  # a hang prints where it hangs, then exits
    from elastic_jax.train import distributed
    distributed.initialize()
    import jax, numpy as np
    jax.config.update("jax_compilation_cache_dir", os.environ["TEST_XLA_CACHE"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    from elastic_jax.interop import hf
    from elastic_jax.train.sharding import make_mesh
    reference, out, report_file = sys.argv[1:4]
    report_file = report_file.replace("{{process}}", str(jax.process_index()))
    assert (jax.process_count(), jax.local_device_count(), jax.device_count()) == (2, 2, 4)
    mesh = make_mesh((1, 4))

    writes = []
    if jax.process_index() == 1:
      real_open = builtins.open

      def watched_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and os.path.abspath(str(file)).startswith(out):
          writes.append(str(file))
        return real_open(file, mode, *args, **kwargs)

      builtins.open = watched_open

    def digest(path):
      with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()

    report = {{"process": jax.process_index()}}
    for dtype in ("float32", "bfloat16"):
      config, params = hf.load(os.path.join(reference, "float32"), mesh=mesh, dtype=dtype)
      jax.block_until_ready(params)
      leaves = jax.tree.leaves(params)
      assert all(not leaf.is_fully_addressable for leaf in leaves)
      split = sum(leaf.addressable_shards[0].data.size < leaf.size for leaf in leaves)
      distributed.barrier(f"before save {{dtype}}")
      tracemalloc.start()
      base = tracemalloc.get_traced_memory()[0]
      hf.save(os.path.join(out, dtype), config, params)
      peak = tracemalloc.get_traced_memory()[1] - base
      tracemalloc.stop()
      # save returns on every process only once the checkpoint is complete.
      files = {{name: digest(os.path.join(out, dtype, name)) for name in (hf.SINGLE_FILE, hf.CONFIG_FILE)}}
      report[dtype] = {{"peak": peak, "split_leaves": split, "leaves": len(leaves), "files": files}}
    report["writes"] = writes
    with open(report_file, "w") as f:
      json.dump(report, f)
""")


def _digest(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_two_processes_stream_the_single_process_file(tmp_path):
  """Mesh (1, 4) over 2 processes x 2 CPU devices: the export equals the single-process one byte for byte, and
  process 0's traced host peak is about one tensor, not the model."""
  # Twelve tensors of 0.25-2 MiB (fp32) and a few small ones: the largest is a sixth of the model.
  config = small_config("M*-M-", vocab_size=2048, hidden_size=256, intermediate_size=1024, num_attention_heads=8,
                        num_key_value_heads=2, head_dim=32, mamba_num_heads=16, mamba_head_dim=32, n_groups=2,
                        ssm_state_size=32, chunk_size=32)
  params = jax.tree.map(np.asarray, random_params(config, seed=5))
  reference = tmp_path / "reference"
  hf.save(reference / "float32", config, params)
  bf16_config, bf16_params = hf.load(reference / "float32", dtype="bfloat16")  # the host cast
  hf.save(reference / "bfloat16", bf16_config, bf16_params)
  sizes = {dtype: [t.nbytes for t in hf.params_to_hf(tree, config).values()]
           for dtype, tree in (("float32", params), ("bfloat16", bf16_params))}
  del params, bf16_params
  for dtype in sizes:
    assert sum(s > max(sizes[dtype]) / 8 for s in sizes[dtype]) >= 8
    assert max(sizes[dtype]) < 0.2 * sum(sizes[dtype])

  out = tmp_path / "out"
  worker = tmp_path / "worker.py"
  worker.write_text(_WORKER.format(timeout=TIMEOUT_S))
  start = time.perf_counter()
  run_processes([sys.executable, str(worker), str(reference), str(out), str(tmp_path / "worker{process}.json")],
                tmp_path / "worker", devices=2, timeout=TIMEOUT_S)
  print(f"two processes: {time.perf_counter() - start:.1f} s")

  reports = [json.loads((tmp_path / f"worker{i}.json").read_text()) for i in (0, 1)]
  for dtype, tensor_sizes in sizes.items():
    want = {name: _digest(reference / dtype / name) for name in (hf.SINGLE_FILE, hf.CONFIG_FILE)}
    assert {name: _digest(out / dtype / name) for name in want} == want, dtype
    model_bytes = sum(tensor_sizes)
    for report in reports:
      row = report[dtype]
      print(report["process"], dtype, f"peak {row['peak']:,} B, largest tensor {max(tensor_sizes):,} B, "
            f"model {model_bytes:,} B, {row['split_leaves']}/{row['leaves']} leaves split")
      assert row["split_leaves"] > row["leaves"] // 2, row
      # What each process saw when save returned is the finished file.
      assert row["files"] == want, (report["process"], dtype)
    # Process 0 converts one tensor at a time: its traced peak is about the largest tensor, far from the model.
    peak = reports[0][dtype]["peak"]
    assert peak < 0.5 * model_bytes and peak < 2 * max(tensor_sizes), (dtype, peak, max(tensor_sizes), model_bytes)
  assert reports[1]["writes"] == []
  assert not list(out.rglob("*.partial"))


# ---------------------------------------------------------------------------------------------------- extract CLI
@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> str:
  """A finished micro main-job run (budgets 100% and 60%, homogeneous: both children export to HF)."""
  from elastic_jax.train.pipeline import run_pipeline  # pylint: disable=import-outside-toplevel
  from test_pipeline import _micro_config  # pylint: disable=import-outside-toplevel
  path = str(tmp_path_factory.mktemp("extract") / "run")
  run_pipeline(_micro_config(), path)
  return path


def _child_files(out: pathlib.Path) -> dict[str, bytes]:
  return {name: (out / name).read_bytes() for name in (hf.SINGLE_FILE, hf.CONFIG_FILE, "extract.json")}


def test_extract_on_a_mesh_writes_the_host_extraction(workdir, tmp_path):
  """``--mesh``: the student restored into shards (the finished run's, and a checkpoint's params alone), the child
  sliced on the devices and streamed to HF: the same files as the host path."""
  from elastic_jax import extract as extract_cli  # pylint: disable=import-outside-toplevel
  from elastic_jax.train.checkpoint import load_model  # pylint: disable=import-outside-toplevel
  first_step = extract_cli.checkpoint_steps(str(pathlib.Path(workdir) / "elastic" / "checkpoints"))[0]
  for budget, step in (("60pct", []), ("100pct", ["--step", str(first_step)])):
    outs = {}
    for mode, mesh in (("host", []), ("mesh", ["--mesh", "1"])):
      outs[mode] = tmp_path / f"{budget}_{mode}"
      args = ["--workdir", workdir, "--budget", budget, "--out", str(outs[mode]), "--format", "hf"]
      assert extract_cli.main(args + step + mesh) == 0
    assert _child_files(outs["mesh"]) == _child_files(outs["host"]), budget
  # The Orbax format from the shards holds the same arrays.
  for mode, mesh in (("host", []), ("mesh", ["--mesh", "1"])):
    assert extract_cli.main(["--workdir", workdir, "--budget", "60pct", "--out", str(tmp_path / f"orbax_{mode}")]
                            + mesh) == 0
  host, sharded = (load_model(tmp_path / f"orbax_{mode}" / "model")[1] for mode in ("host", "mesh"))
  jax.tree.map(np.testing.assert_array_equal, host, sharded)


@pytest.mark.slow
def test_extract_cli_on_two_processes_writes_the_single_process_checkpoint(workdir, tmp_path):
  """``python -m elastic_jax.extract --format hf`` launched as 2 processes x 2 CPU devices (default mesh: fsdp over
  all 4): the same HF checkpoint and extract.json as one process on the host."""
  from elastic_jax import extract as extract_cli  # pylint: disable=import-outside-toplevel
  args = ["--workdir", workdir, "--budget", "60pct", "--format", "hf"]
  assert extract_cli.main(args + ["--out", str(tmp_path / "single")]) == 0
  logs = run_processes([sys.executable, "-m", "elastic_jax.extract", *args, "--out", str(tmp_path / "multi")],
                       tmp_path / "extract", devices=2, timeout=TIMEOUT_S)
  assert _child_files(tmp_path / "multi") == _child_files(tmp_path / "single")
  # Only process 0 reports what it wrote.
  assert "extracted 60pct" in logs[0] and "extracted 60pct" not in logs[1]
