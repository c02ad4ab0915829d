"""Every program we ship compiles for the targets we name (TPU v5p, H100, A100), without the hardware.

JAX's compile-only devices (libtpu for TPU slices, the CUDA plugin for NVIDIA GPUs; the ``tpu-aot``/``gpu-aot``
extras) run the real compilers: libtpu's passes on TPU, Triton to cubin with its shared-memory check on GPU. Each
compile runs in a worker process (``elastic_jax.aot.compile_in_subprocess``), so a compiler abort fails one test with
the compiler's message instead of killing the run. Tests skip, saying which extra to install, where a compiler is
missing. Compiles for compile-only devices cannot be read back from the persistent cache: each test compiles (ptxas
unoptimised, see ``XLA_FLAGS``).

What they check: the tiny elastic step compiles for v5p (libtpu aborted on it before ``depth_ranks`` stopped
scattering) and for H100, the LM step and generation for v5p, with positive per-device bytes from XLA's memory
analysis; ``impl="auto"`` on a compile-only H100 picks the Pallas SSD kernel where it fits and XLA where it does not;
the SSD kernel compiles on H100 and A100 at every config's Mamba shape and at the largest shape ``supports`` accepts
per architecture; and our shared-memory model never falls below what Triton allocates.
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

from elastic_jax import aot
from elastic_jax.aot import programs
from elastic_jax.aot.targets import SUBPROCESS_ENV, gpu_target_config
from elastic_jax.ops.kernel_registry import Target
from elastic_jax_kernels.ssd import api

TESTS = pathlib.Path(__file__).resolve().parent
TPU_MISSING = aot.unavailable_reason("v5p")
CUDA_MISSING = aot.unavailable_reason("h100")
needs_tpu = pytest.mark.skipif(TPU_MISSING is not None, reason=str(TPU_MISSING))
needs_cuda = pytest.mark.skipif(CUDA_MISSING is not None, reason=str(CUDA_MISSING))
GPU_TARGETS = {"h100": Target("gpu", "NVIDIA H100 80GB HBM3", (9, 0)), "a100": Target("gpu", "NVIDIA A100", (8, 0))}
TINY = "configs/tiny.py"


# ptxas without optimisation: seconds instead of minutes for the fp32 kernels. Shared memory is what Triton allocated
# before ptxas runs, so the check is the same; unoptimised registers spill rather than fail.
XLA_FLAGS = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_disable_gpuasm_optimizations=true").strip()


def compile_for(program: str, target: str, **kwargs) -> aot.CompileResult:
  env = {"PYTHONPATH": str(TESTS), "XLA_FLAGS": XLA_FLAGS}
  return aot.compile_in_subprocess(program, target, timeout=1200, env=env, **kwargs)


def assert_planned_within_25_percent(result: aot.CompileResult, device: str, overrides=None, stage: int = 0) -> None:
  """The planner (``elastic_jax.plan``, nothing compiled) puts the per-device total of the tiny run's stage within
  0.8-1.25x of XLA's for the target just compiled for: the acceptance band of the planner's activation model."""
  from elastic_jax import plan as plan_lib  # pylint: disable=import-outside-toplevel

  overrides = {"mesh.shape": [result.num_devices], **(overrides or {})}
  planned = plan_lib.make_plan(programs.load_config(TINY, overrides), device=device).stages[stage].memory["total"]
  ratio = planned / result.memory["total"]
  assert 0.8 <= ratio <= 1.25, (f"{result.target} stage {stage + 1}: planned {planned / 1e6:.2f} MB per device, XLA "
                                f"{result.memory['total'] / 1e6:.2f} MB: ratio {ratio:.2f}")


def assert_positive_memory(result: aot.CompileResult) -> None:
  memory = result.memory
  assert memory["argument_size_in_bytes"] > 0 and memory["output_size_in_bytes"] > 0, memory
  assert memory["total"] >= memory["argument_size_in_bytes"] > 0, memory


# ---------------------------------------------------------------------------------------------------- targets
def test_target_names():
  assert aot.parse("v5p:2x2x1") == aot.Target("v5p", "2x2x1")
  assert aot.parse("H100").name == "h100:1x1x8"  # the default topology: one host of 8 GPUs
  assert aot.parse("a100:2x1x8").platform == "cuda"
  with pytest.raises(aot.TargetError, match=r"unknown compile target 'b300:1x1x8'; kinds are \['a100', 'h100'"):
    aot.parse("b300:1x1x8")
  with pytest.raises(aot.TargetError, match=r"topology '2x0' must be positive sizes joined by 'x'"):
    aot.parse("v5e:2x0")
  with pytest.raises(aot.TargetError, match=r"a GPU topology is slices x hosts per slice x GPUs per host"):
    aot.parse("h100:8")


@pytest.mark.parametrize("kind", ["h100", "h200", "a100"])
def test_gpu_specs_agree_with_the_kernels_shared_memory_table(kind):
  """The limit ``supports`` checks is the one the compiler checks against for the GPU targets we ship."""
  spec = gpu_target_config(kind)
  capability = re.search(r"cuda_compute_capability \{\s*major: (\d+)(?:\s*minor: (\d+))?\s*\}", spec)
  limit = int(re.search(r"shared_memory_per_block_optin: (\d+)", spec).group(1))
  assert api.shared_memory_limit((int(capability.group(1)), int(capability.group(2) or 0))) == limit


def aborting_program(devices):
  """A builder whose process dies as a compiler abort does (SIGABRT)."""
  del devices
  print("F0101 00:00:00.000000 1 emitter.cc:1] Check failed: operands.size() == 1 (2 vs. 1)", file=sys.stderr,
        flush=True)
  os.abort()


def failing_program(devices):
  del devices
  raise ValueError("mesh shape (3,) needs 3 devices")


@needs_tpu
def test_a_compiler_abort_is_a_clear_error():
  with pytest.raises(aot.CompileFailed, match=r"the compiler killed the process \(SIGABRT\):\nF0101 .*Check failed: "
                                              r"operands.size\(\) == 1 \(2 vs. 1\)$") as failure:
    compile_for("test_aot_compile:aborting_program", "v5p:2x2x1")
  assert failure.value.reason == "abort"
  with pytest.raises(aot.CompileFailed, match=r"for v5p:2x2x1: ValueError: mesh shape \(3,\) needs 3 devices") as error:
    compile_for("test_aot_compile:failing_program", "v5p:2x2x1")
  assert error.value.reason == "error"


# ---------------------------------------------------------------------------------------------------- TPU
@needs_tpu
@pytest.mark.slow
def test_tiny_elastic_step_compiles_for_v5p():
  # The config travels as a dict, as a caller holding a ConfigDict (e.g. with command-line overrides) passes it.
  config = programs.load_config(TINY).to_dict()
  result = compile_for("elastic_step", "v5p:2x2x1", config=json.loads(json.dumps(config)))
  assert result.device_kind.startswith("TPU v5") and result.num_devices == 4
  assert_positive_memory(result)
  assert_planned_within_25_percent(result, "v5p")


@needs_tpu
@pytest.mark.slow
def test_context_parallel_elastic_step_compiles_for_v5p():
  # The context-parallel mixers (ring attention, the sharded SSD) on 2 chips, heads over the other 2 left to the
  # compiler: libtpu compiles them (each shard reads its position as data; see context_parallel.shard_positions).
  result = compile_for("elastic_step", "v5p:2x2x1", config=TINY, overrides={"mesh.shape": [1, 1, 2, 2]})
  assert result.num_devices == 4
  assert_positive_memory(result)
  assert_planned_within_25_percent(result, "v5p", {"mesh.shape": [1, 1, 2, 2]})


@needs_tpu
@pytest.mark.slow
def test_tiny_lm_step_and_generation_compile_for_v5p():
  assert_positive_memory(compile_for("lm_step", "v5p:2x2x1", config=TINY))
  assert_positive_memory(compile_for("generate", "v5p:2x2x1", config=TINY, batch_size=4, prompt_len=32,
                                     max_new_tokens=8))


# ---------------------------------------------------------------------------------------------------- H100 / A100
@needs_cuda
@pytest.mark.slow
def test_tiny_elastic_step_compiles_for_h100_with_the_pallas_kernel():
  result = compile_for("elastic_step", "h100:1x1x2", config=TINY)
  assert result.device_kind == "NVIDIA H100 80GB HBM3"
  assert result.pallas_kernels == ("ssd_chunk_output", "ssd_state_passing")  # impl="auto" saw the H100s
  assert_positive_memory(result)
  assert_planned_within_25_percent(result, "h100")


@needs_cuda
@pytest.mark.parametrize("dtype,head_dim,state_size,chunk_size,picks_kernel", [
    ("bfloat16", 64, 64, 64, True),
    ("float32", 80, 128, 256, False),  # ssd_chunk_output would need 245,760 bytes of shared memory; H100 has 232,448
], ids=["fits", "exceeds_shared_memory"])
def test_auto_on_a_compile_only_h100_picks_the_kernel_where_it_fits(dtype, head_dim, state_size, chunk_size,
                                                                     picks_kernel):
  result = compile_for("ssd", "h100:1x1x1", dtype=dtype, head_dim=head_dim, state_size=state_size,
                       chunk_size=chunk_size, impl="auto")
  assert result.pallas_kernels == (("ssd_chunk_output", "ssd_state_passing") if picks_kernel else ())


def config_ssd_shapes() -> dict[str, dict]:
  """The Mamba layer shape of every config: (dtype, head dim, state size, chunk, heads, groups)."""
  shapes = {}
  for path in sorted((TESTS.parent / "configs").glob("*.py")):
    model = programs.load_config(str(path)).model
    shapes[path.stem] = dict(dtype=model.dtype, head_dim=model.mamba_head_dim, state_size=model.ssm_state_size,
                             chunk_size=model.chunk_size, heads=model.mamba_num_heads, groups=model.n_groups)
  return shapes


CONFIG_SHAPES = config_ssd_shapes()


@needs_cuda
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["h100", "a100"])
@pytest.mark.parametrize("config", sorted(CONFIG_SHAPES))
def test_ssd_kernel_compiles_at_every_configs_shape(kind, config):
  shape = CONFIG_SHAPES[config]
  result = compile_for("ssd", f"{kind}:1x1x1", **shape, impl="pallas")  # forward kernels and the XLA backward
  assert result.pallas_kernels == ("ssd_chunk_output", "ssd_state_passing")


def largest_accepted_shape(kind: str) -> dict:
  """Of the compile grid (dtype x p {64, 80, 128} x n {64, 128} x chunk {64, 128, 256}), the shape ``supports``
  accepts on ``kind`` whose kernels need the most shared memory."""
  accepted = []
  for dtype, p, n, chunk in itertools.product(["float32", "bfloat16"], [64, 80, 128], [64, 128], [64, 128, 256]):
    if api.supports((1, 2 * chunk, 2, p), dtype, GPU_TARGETS[kind], state_size=n, chunk_size=chunk):
      accepted.append((max(api.shared_memory_bytes(p, n, chunk, dtype).values()), dtype, p, n, chunk))
  _, dtype, p, n, chunk = max(accepted)
  return dict(dtype=dtype, head_dim=p, state_size=n, chunk_size=chunk)


@needs_cuda
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["h100", "a100"])
def test_ssd_kernel_compiles_at_the_largest_shape_supports_accepts(kind):
  shape = largest_accepted_shape(kind)
  result = compile_for("ssd", f"{kind}:1x1x1", **shape, impl="pallas", backward=False)
  assert result.pallas_kernels == ("ssd_chunk_output", "ssd_state_passing")


# Compiles each kernel alone for a copy of a GPU's target config whose shared memory per block is 1 KiB: Triton then
# refuses every kernel, and its message says how many bytes the kernel requested.
_MEASURE_SCRIPT = textwrap.dedent("""
    import json, re, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.experimental import topologies
    from elastic_jax.aot.targets import gpu_target_config
    from elastic_jax_kernels.ssd import api, pallas_triton

    def requested(device, kernel, dtype, p, n, chunk):
      sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray([device]), ("d",)),
                                            jax.sharding.PartitionSpec())
      spec = lambda shape, dt=jnp.float32: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
      tile = api.chunk_tiling(chunk)[0]
      blocks, lp, dtype = api.block_sizes(p, n), 2 * tile, jnp.dtype(dtype)
      common = (spec((1, lp, 2, p), dtype), spec((1, 2, lp)), spec((1, 2, lp)), spec((1, lp, 1, n), dtype))
      options = dict(chunk=tile, blocks=blocks, interpret=False)
      if kernel == "ssd_state_passing":
        fn = lambda *a: pallas_triton.state_passing(*a, **options)
        args = common + (spec((1, 2, p, n)),)
      else:
        fn = lambda *a: pallas_triton.chunk_output(*a, **options)
        args = common + (spec((1, lp, 1, n), dtype), spec((2,)), spec((1, 2, 2, p, n)))
      try:
        jax.jit(fn).lower(*args).compile()
      except Exception as error:  # Triton's RESOURCE_EXHAUSTED
        return int(re.search(r"requested (\\d+)", str(error)).group(1))
      raise AssertionError("compiled within 1 KiB of shared memory")

    out = {}
    for kind, shapes in json.loads(sys.argv[1]).items():
      config = re.sub(r"shared_memory_per_block_optin: \\d+", "shared_memory_per_block_optin: 1024",
                      gpu_target_config(kind))
      device = topologies.get_topology_desc(platform="cuda", topology="1x1x1", target_config=config).devices[0]
      out[kind] = [{k: requested(device, k, *shape) for k in ("ssd_state_passing", "ssd_chunk_output")}
                   for shape in shapes]
    print("RESULT " + json.dumps(out))
""")


@needs_cuda
def test_shared_memory_model_bounds_triton():
  # Where the limits bind (fp32, chunk 256), tiles of every size the block table uses, small and odd shapes.
  shapes = [("float32", 80, 128, 256), ("float32", 64, 128, 256), ("float32", 64, 64, 256), ("float32", 80, 128, 64),
            ("bfloat16", 80, 128, 128), ("bfloat16", 64, 128, 256), ("float32", 32, 32, 32), ("bfloat16", 20, 40, 12)]
  env = dict(os.environ, **SUBPROCESS_ENV)
  proc = subprocess.run([sys.executable, "-c", _MEASURE_SCRIPT, json.dumps({"h100": shapes, "a100": shapes})],
                        capture_output=True, text=True, timeout=600, env=env, cwd=TESTS.parent, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  measured = json.loads(proc.stdout.split("RESULT ", 1)[1])
  for kind, rows in measured.items():
    for (dtype, p, n, chunk), triton in zip(shapes, rows):
      ours = api.shared_memory_bytes(p, n, chunk, dtype)
      for kernel, need in triton.items():
        assert ours[kernel] >= need, (kind, dtype, p, n, chunk, kernel, ours[kernel], need)
        if dtype == "float32" and chunk == 256 and min(p, n) >= 64:  # where the limits bind: exact
          assert ours[kernel] == need, (kind, dtype, p, n, chunk, kernel, ours[kernel], need)
  assert measured["h100"][0]["ssd_chunk_output"] == 245_760 and measured["a100"][1]["ssd_state_passing"] == 198_656


def test_largest_accepted_shapes():
  """What the compile tests above compile as each architecture's largest accepted shape."""
  assert largest_accepted_shape("h100") == dict(dtype="float32", head_dim=128, state_size=128, chunk_size=256)
  assert largest_accepted_shape("a100") == dict(dtype="float32", head_dim=128, state_size=64, chunk_size=256)
