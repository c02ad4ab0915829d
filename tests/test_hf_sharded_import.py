"""Importing a NemotronH checkpoint straight into shards: ``hf.load(path, mesh=..., rules=...)``.

The reference is the single-host numpy ``hf.load`` (itself checked against transformers' logits in
test_hf_interop): the sharded import must give exactly its values, in ``param_shardings``, while each process reads
only the boxes its own devices hold (once per distinct box) and never holds the whole model on the host.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import random_params, small_config  # noqa: E402
from test_hf_interop import copy_checkpoint, edit_config, edit_tensors, make_hf_model, tree_leaves  # noqa: E402
from multihost import cpu_env, run_processes  # noqa: E402

from elastic_jax.interop import hf  # noqa: E402
from elastic_jax.train.sharding import make_mesh  # noqa: E402

TESTS = pathlib.Path(__file__).parent
TIMEOUT_S = 300  # per subprocess: a hang (one process waiting on a collective) fails instead of blocking CI

# Every block kind; widths divisible by every mesh axis they are split over (fsdp up to 4, tensor 2).
PATTERN = "M*-M"


# ---------------------------------------------------------------------------------------------------- region map
def random_box(rng: np.random.Generator, shape) -> list[tuple[int, int]]:
  """[start, stop) per axis; a third of the axes whole, as a sharding that leaves them unsplit would ask."""
  box = []
  for n in shape:
    start = 0 if rng.random() < 1 / 3 else int(rng.integers(n))
    box.append((start, n if start == 0 and rng.random() < 0.5 else int(rng.integers(start + 1, n + 1))))
  return box


@pytest.mark.parametrize("shape", [(7,), (4, 8), (3, 4, 5), (2, 3, 2, 4)])
def test_flat_runs_hold_exactly_the_box(shape):
  """The runs of flat indices, read in order, are the box of a row-major array (numpy indexing is the oracle)."""
  flat = np.arange(math.prod(shape)).reshape(shape)
  rng = np.random.default_rng(len(shape))
  for _ in range(60):
    box = random_box(rng, shape)
    runs = hf._flat_runs(box, shape)
    got = np.concatenate([np.arange(start, stop) for start, stop in runs])
    np.testing.assert_array_equal(got, flat[tuple(slice(a, b) for a, b in box)].ravel(), err_msg=str(box))
    # Whole trailing axes join the last partial one: the number of runs is the count of the leading indices.
    last = max([i for i, (a, b) in enumerate(box) if (a, b) != (0, shape[i])], default=0)
    assert len(runs) == math.prod(b - a for a, b in box[:last])


def test_every_entry_reads_only_its_box(tmp_path):
  """For every param and random boxes, ``_Entry.read`` asks the checkpoint for exactly the box's elements, and gets
  the box of the whole-tensor import."""
  path = tmp_path / "ckpt"
  make_hf_model("M-*", hybrid_override_pattern=PATTERN).save_pretrained(path)
  config, params = hf.load(path)
  raw = hf._read_tensors(path, np.dtype(np.float32))
  ours = dict(tree_leaves(params))
  rng = np.random.default_rng(0)
  checked = set()
  for e in hf._checkpoint_entries(config):
    tensor = raw[e.hf_key]
    for piece, (our_path, _) in enumerate(e.pieces):
      whole = ours[our_path]
      for _ in range(10):
        box = random_box(rng, whole.shape)
        read = []

        def reader(index, tensor=tensor, read=read):
          read.append(tensor[index].size)
          return tensor[index]

        got = e.read(reader, piece, box)
        np.testing.assert_array_equal(got, whole[tuple(slice(a, b) for a, b in box)], err_msg=f"{our_path} {box}")
        assert sum(read) == got.size, (our_path, box, read)
      checked.add(our_path)
  assert checked == set(ours)


# ---------------------------------------------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> pathlib.Path:
  path = tmp_path_factory.mktemp("hf") / "single"
  make_hf_model("M-*", seed=1, hybrid_override_pattern=PATTERN).save_pretrained(path)
  return path


def _missing_tensor(path):
  edit_tensors(path, lambda t: t.pop("backbone.layers.0.mixer.dt_bias"))


def _wrong_shape(path):
  def truncate(t):
    t["backbone.layers.0.mixer.in_proj.weight"] = t["backbone.layers.0.mixer.in_proj.weight"][:100]
  edit_tensors(path, truncate)


def _extra_tensor(path):
  edit_tensors(path, lambda t: t.update({"backbone.layers.2.mixer.up_proj.bias": np.zeros(48, np.float32)}))


@pytest.mark.parametrize("edit, error, match", [
    (_missing_tensor, hf.CheckpointError,
     r"missing tensor backbone\.layers\.0\.mixer\.dt_bias, expected shape \(4,\) for pattern index 0 \(Mamba\)"),
    (_wrong_shape, hf.CheckpointError,
     r"backbone\.layers\.0\.mixer\.in_proj\.weight has shape \(100, 32\), expected \(132, 32\) for pattern index 0"),
    (_extra_tensor, hf.CheckpointError, r"unexpected tensor backbone\.layers\.2\.mixer\.up_proj\.bias"),
    (lambda path: edit_config(path, intermediate_size=64), hf.CheckpointError,
     r"up_proj\.weight has shape \(48, 32\), expected \(64, 32\) for pattern index 2 \(MLP\)"),
    (lambda path: edit_config(path, tie_word_embeddings=True), hf.UnsupportedCheckpointError,
     r"tie_word_embeddings is True; only False is supported"),
    (lambda path: (path / "model.safetensors").rename(path / "pytorch_model.bin"), hf.CheckpointError,
     r"no model\.safetensors or model\.safetensors\.index\.json .*pickled ones \(pytorch_model\.bin\) are refused"),
])
def test_sharded_mode_refuses_like_the_host_load(checkpoint, tmp_path, edit, error, match):
  path = copy_checkpoint(checkpoint, tmp_path / "ckpt")
  edit(path)
  for mesh in (None, make_mesh()):
    with pytest.raises(error, match=match):
      hf.load(path, mesh=mesh)


def test_sharded_mode_refuses_a_missing_shard(tmp_path):
  path = tmp_path / "sharded"
  make_hf_model("M-*", seed=2).save_pretrained(path, max_shard_size="10KB")
  victim = sorted(path.glob("model-*.safetensors"))[1]
  victim.unlink()
  with pytest.raises(hf.CheckpointError, match=rf"shard {victim.name} named in model\.safetensors\.index\.json"):
    hf.load(path, mesh=make_mesh())


# ---------------------------------------------------------------------------------------------------- 8 devices
# Loads every checkpoint on every mesh, in fp32 and bf16, and compares with the host load of the same dtype. Counts
# what the sharded import reads: every element exactly once per process (replicas share one read), one read per
# distinct box.
_EIGHT_DEVICES = textwrap.dedent("""
    import json, sys, time
    import jax, numpy as np
    jax.config.update("jax_compilation_cache_dir", {cache!r})
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    from elastic_jax.interop import hf
    from elastic_jax.train.sharding import DEFAULT_RULES, make_mesh, param_shardings

    assert jax.device_count() == 8
    counts = {{"reads": 0, "runs": 0, "elements": 0}}
    read = hf._Entry.read

    def counting_read(self, read_hf, piece, box=None):
      def counted(index):
        block = read_hf(index)
        counts["runs"] += 1
        counts["elements"] += block.size
        return block
      counts["reads"] += 1
      return read(self, counted, piece, box)

    hf._Entry.read = counting_read

    # Inner feature axes split too (head_dim, mamba_head_dim, ssm_state over tensor, the conv taps over data), embed
    # and vocab swapped: boxes that are several runs of checkpoint rows, and partial ranges of the other axis.
    inner_rules = (("vocab", "fsdp"), ("embed", "tensor"), ("mlp", "fsdp"), ("heads", "fsdp"), ("kv_heads", "fsdp"),
                   ("ssm_heads", "fsdp"), ("ssm_groups", "fsdp"), ("head_dim", "tensor"),
                   ("mamba_head_dim", "tensor"), ("ssm_state", "tensor"), ("conv", "data"))
    cases = [(shape, "default", None) for shape in [(8, 1, 1), (2, 4, 1), (2, 2, 2)]]
    cases.append(((2, 2, 2), "inner", inner_rules))
    report = []
    for name, path in json.loads(sys.argv[1]).items():
      for dtype in (None, "bfloat16"):
        want_config, want = hf.load(path, dtype=dtype)
        want = dict(jax.tree_util.tree_leaves_with_path(want))
        for shape, rules_name, rules in cases:
          mesh = make_mesh(shape)
          counts.update(reads=0, runs=0, elements=0)
          start = time.perf_counter()
          config, params = hf.load(path, mesh=mesh, rules=rules, dtype=dtype)
          seconds = time.perf_counter() - start
          assert config == want_config, (name, shape)
          shardings = param_shardings(config, mesh, DEFAULT_RULES if rules is None else rules)
          leaves = jax.tree_util.tree_leaves_with_path(params)
          assert len(leaves) == len(want)
          split = boxes = 0
          for (key, leaf), sharding in zip(leaves, jax.tree.leaves(shardings)):
            label = f"{{name}} {{dtype}} {{shape}} {{rules_name}} {{jax.tree_util.keystr(key)}}"
            assert isinstance(leaf, jax.Array) and leaf.sharding == sharding, (label, leaf.sharding, sharding)
            assert leaf.dtype == want[key].dtype, (label, leaf.dtype, want[key].dtype)
            assert np.array_equal(np.asarray(leaf), want[key]), label
            for shard in leaf.addressable_shards:  # each device holds its box of the host load, nothing else
              assert np.array_equal(np.asarray(shard.data), want[key][shard.index]), label
            indices = sharding.addressable_devices_indices_map(leaf.shape).values()
            boxes += len({{tuple(s.indices(n) for s, n in zip(index, leaf.shape)) for index in indices}})
            split += leaf.addressable_shards[0].data.size < leaf.size
          total = sum(x.size for x in want.values())
          assert counts["elements"] == total, (name, dtype, shape, rules_name, counts["elements"], total)
          assert counts["reads"] == boxes, (name, dtype, shape, rules_name, counts["reads"], boxes)
          report.append(dict(checkpoint=name, dtype=dtype, mesh=shape, rules=rules_name, split_leaves=split,
                             leaves=len(leaves), reads=counts["reads"], runs=counts["runs"],
                             seconds=round(seconds, 3)))
    print("REPORT " + json.dumps(report))
""")


@pytest.fixture(scope="module")
def eight_device_checkpoints(tmp_path_factory) -> dict[str, str]:
  """fp32 in one file and bf16 in several shards, both written by transformers."""
  root = tmp_path_factory.mktemp("hf8")
  model = make_hf_model("M-*", seed=4, hybrid_override_pattern=PATTERN)
  model.save_pretrained(root / "fp32_single")
  model.to(torch.bfloat16).save_pretrained(root / "bf16_sharded", max_shard_size="20KB")
  assert (root / "bf16_sharded" / "model.safetensors.index.json").is_file()
  assert len(list((root / "bf16_sharded").glob("model-*.safetensors"))) >= 3
  return {name: str(root / name) for name in ("fp32_single", "bf16_sharded")}


def test_sharded_load_on_eight_devices_equals_host_load(eight_device_checkpoints, tmp_path):
  script = tmp_path / "eight.py"
  cache = os.path.join(os.environ.get("TMPDIR", "/tmp"), "elastic_jax_test_xla_cache")
  script.write_text(_EIGHT_DEVICES.format(cache=cache))
  proc = subprocess.run([sys.executable, str(script), json.dumps(eight_device_checkpoints)], capture_output=True,
                        text=True, env=cpu_env(8), timeout=TIMEOUT_S)
  assert proc.returncode == 0, proc.stderr[-6000:]
  report = json.loads(proc.stdout.split("REPORT ", 1)[1])
  assert len(report) == 2 * 2 * 4
  for row in report:
    print(row)
    # (8, 1, 1) replicates everything (one read per param); the other meshes split params. The default rules split
    # only leading feature axes (one run of checkpoint rows per box); the inner rules need several runs per box.
    if row["mesh"] == [8, 1, 1]:
      assert row["split_leaves"] == 0 and row["reads"] == row["leaves"], row
    else:
      assert row["split_leaves"] > row["leaves"] // 2, row
    assert (row["runs"] > row["reads"]) == (row["rules"] == "inner"), row


# ---------------------------------------------------------------------------------------------------- 2 processes
# Process <id> of 2 (2 CPU devices each) imports the checkpoint on a (1, 4) mesh, in fp32 and cast to bf16, under
# tracemalloc (numpy's buffers, and safetensors' reads, are traced; XLA's own buffers are not). Then the single-host
# numpy load for reference, under tracemalloc too.
_WORKER = textwrap.dedent("""
    import faulthandler, json, os, sys, tracemalloc
    faulthandler.dump_traceback_later({timeout} - 20, exit=True)  # a hang prints where it hangs, then exits
    from elastic_jax.train import distributed
    distributed.initialize()
    import jax, numpy as np
    jax.config.update("jax_compilation_cache_dir", os.environ["TEST_XLA_CACHE"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    from jax.experimental import multihost_utils
    from elastic_jax.interop import hf
    from elastic_jax.train.sharding import make_mesh, param_shardings
    path, out = sys.argv[1], sys.argv[2].replace("{{process}}", str(jax.process_index()))
    assert (jax.process_count(), jax.local_device_count(), jax.device_count()) == (2, 2, 4)
    mesh = make_mesh((1, 4))

    def traced(load):
      # Peak bytes traced during load(), above what was allocated when it started.
      tracemalloc.start()
      base = tracemalloc.get_traced_memory()[0]
      result = load()
      peak = tracemalloc.get_traced_memory()[1] - base
      tracemalloc.stop()
      return result, peak

    report = {{"process": jax.process_index()}}
    for dtype in ("float32", "bfloat16"):
      multihost_utils.sync_global_devices(f"before {{dtype}}")
      (config, params), peak = traced(lambda: hf.load(path, mesh=mesh, dtype=dtype))
      jax.block_until_ready(params)
      shardings = param_shardings(config, mesh)
      share = 0  # bytes of the distinct boxes this process's devices hold
      for leaf, sharding in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)):
        assert leaf.sharding == sharding
        boxes = {{tuple(s.indices(n) for s, n in zip(shard.index, leaf.shape)): shard.data.nbytes
                 for shard in leaf.addressable_shards}}
        share += sum(boxes.values())
      report[dtype] = {{"peak": peak, "share_bytes": share, "params": params}}
    (_, reference), report["host_peak"] = traced(lambda: hf.load(path))
    reference = dict(jax.tree_util.tree_leaves_with_path(reference))
    report["model_bytes"] = sum(x.nbytes for x in reference.values())
    for dtype in ("float32", "bfloat16"):
      params = report[dtype].pop("params")
      for key, leaf in jax.tree_util.tree_leaves_with_path(params):
        gathered = multihost_utils.process_allgather(leaf, tiled=True)
        want = reference[key].astype(leaf.dtype)  # the host load's cast, for comparison only
        assert gathered.dtype == want.dtype and np.array_equal(gathered, want), (dtype, jax.tree_util.keystr(key))
    with open(out, "w") as f:
      json.dump(report, f)
""")


@pytest.mark.slow
def test_two_processes_import_only_their_share(tmp_path):
  """Mesh (1, 4) over 2 processes x 2 CPU devices: each process holds half of every embed-split param."""
  config = small_config("M*-M-", vocab_size=2048, hidden_size=512, intermediate_size=1024, num_attention_heads=8,
                        num_key_value_heads=2, head_dim=64, mamba_num_heads=16, mamba_head_dim=64, n_groups=2,
                        ssm_state_size=64, chunk_size=64)
  params = jax.tree.map(np.asarray, random_params(config, seed=5))
  hf.save(tmp_path / "ckpt", config, params)
  model_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
  del params
  assert model_bytes > 30e6

  worker = tmp_path / "worker.py"
  worker.write_text(_WORKER.format(timeout=TIMEOUT_S))
  start = time.perf_counter()
  run_processes([sys.executable, str(worker), str(tmp_path / "ckpt"), str(tmp_path / "worker{process}.json")],
                tmp_path / "worker", devices=2, timeout=TIMEOUT_S)
  print(f"two processes: {time.perf_counter() - start:.1f} s")

  for process_id in (0, 1):
    report = json.loads((tmp_path / f"worker{process_id}.json").read_text())
    print(process_id, report)
    assert report["process"] == process_id and report["model_bytes"] == model_bytes
    # The host load holds the whole model: tracemalloc sees numpy's buffers.
    assert report["host_peak"] >= model_bytes
    fp32, bf16 = report["float32"], report["bfloat16"]
    # Embed-split params are halved, the rest (conv, per-head vectors) replicated: a little over half the model.
    assert 0.5 * model_bytes <= fp32["share_bytes"] < 0.55 * model_bytes
    assert bf16["share_bytes"] == pytest.approx(fp32["share_bytes"] / 2, rel=1e-6)
    # fp32: a CPU device may keep the host buffer it was given (zero copy), so at most the share stays traced, plus
    # the box in flight.
    assert fp32["peak"] < 0.6 * model_bytes
    # Cast on the devices: the fp32 boxes are released once cast, so the host peak is about one param's share.
    assert bf16["peak"] < 0.25 * model_bytes
