"""Tests of elastic_jax_kernels.ssd (the kernels/ folder): the fused SSD in Pallas interpret mode against the
token-by-token oracle (outputs, final state and the gradient w.r.t. every input), its lowering to Triton for CUDA,
and its place in ``ops.ssd``'s fail-closed dispatch.

Interpret mode runs the kernels' Python on CPU one grid step at a time, so the shapes are small.
"""

from __future__ import annotations

import functools
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_ssd import (FAST_COMPILE, INPUT_NAMES, assert_matches, make_inputs, random_cotangents, relative_error,
                      cpu_target)  # pylint: disable=unused-import  (a fixture)

from elastic_jax.ops import kernel_registry
from elastic_jax.ops import ssd as ssd_ops
from elastic_jax.ops.kernel_registry import Target
from elastic_jax.ops.ssd import ssd
from elastic_jax_kernels.ssd import BlockSizes, api, ssd_pallas

CHUNK = 16  # the smallest chunk that is a kernel tile as it is
LENGTHS = (1, CHUNK - 1, CHUNK, 3 * CHUNK + 5)
# Small tiles so that small inputs still span several blocks of every tiled axis.
SMALL_BLOCKS = BlockSizes(state_block_p=16, state_block_n=16, output_block_q=16, output_block_p=16,
                          output_block_n=16)


def outputs_and_grads(inputs, cotangents, run):
  (y, final_state), pullback = jax.vjp(run, inputs)
  (grads,) = pullback(cotangents)
  return y, final_state, grads


@functools.partial(jax.jit, static_argnames=("chunk_size", "block_sizes", "interpret"),
                   compiler_options=FAST_COMPILE)
def kernel_and_oracle(inputs, cotangents, *, chunk_size: int = CHUNK, block_sizes: BlockSizes | None = None,
                      interpret: bool = True):
  """(y, final_state, grads) of the kernel (interpreted unless told otherwise) and of the oracle, compiled together."""
  kernel = lambda inputs: ssd_pallas(**inputs, chunk_size=chunk_size, interpret=interpret, block_sizes=block_sizes)
  oracle = lambda inputs: ssd(**inputs, chunk_size=chunk_size, impl="oracle")
  return outputs_and_grads(inputs, cotangents, kernel), outputs_and_grads(inputs, cotangents, oracle)


def assert_close_in_norm(actual, expected, *, dtype, name: str) -> None:
  """Relative error of the whole array: for large shapes, where fp32 rounding of long sums moves single elements by
  more than 1e-5 while the array as a whole stays within it."""
  error = relative_error(actual, expected)
  assert error < (1e-5 if dtype == jnp.float32 else 1e-2), f"{name}: relative error {error:.2e}"


def assert_kernel_matches_oracle(inputs, *, dtype=jnp.float32, chunk_size: int = CHUNK,
                                 block_sizes: BlockSizes | None = None, interpret: bool = True,
                                 compare=assert_matches) -> None:
  (y, state, grads), (y_ref, state_ref, grads_ref) = kernel_and_oracle(
      inputs, random_cotangents(1, inputs), chunk_size=chunk_size, block_sizes=block_sizes, interpret=interpret)
  assert y.dtype == inputs["x"].dtype and y.shape == inputs["x"].shape
  assert state.dtype == jnp.float32
  compare(y, y_ref, dtype=dtype, name="y")
  compare(state, state_ref, dtype=dtype, name="final_state")
  for name in INPUT_NAMES:
    if inputs[name] is None:
      continue
    assert grads[name].dtype == inputs[name].dtype, f"d/d{name}"
    compare(grads[name], grads_ref[name], dtype=dtype, name=f"d/d{name}")


# ----------------------------------------------------------------------------------------------------------------------
# Interpreted kernel == oracle.


@pytest.mark.parametrize("with_initial_state", [False, True], ids=["zero_state", "initial_state"])
@pytest.mark.parametrize("l", LENGTHS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_kernel_matches_oracle(dtype, l, with_initial_state):
  inputs = make_inputs(l, l=l, dtype=dtype, with_initial_state=with_initial_state)
  assert_kernel_matches_oracle(inputs, dtype=dtype)


@pytest.mark.parametrize("shape,chunk_size", [
    (dict(l=2 * CHUNK + 3, h=6, g=3, p=20, n=40), CHUNK),  # several blocks of heads-per-group, p and n
    (dict(l=2 * CHUNK + 3, h=8, g=2, p=16, n=16), 2 * CHUNK),  # exact tiles, two output row blocks per chunk
    (dict(l=29, h=4, g=1, p=5, n=7), 12),  # a chunk padded to a 16-token tile
    (dict(l=300, b=1, h=2, g=1, p=4, n=4), 280),  # a chunk above the largest tile, processed as 256-token chunks
], ids=["multi_block", "row_blocks", "padded_chunk", "split_chunk"])
def test_kernel_tiling_matches_oracle(shape, chunk_size):
  assert_kernel_matches_oracle(make_inputs(5, **shape), chunk_size=chunk_size, block_sizes=SMALL_BLOCKS)


def test_kernel_without_D_and_long_decay_is_finite():
  # Large dt * A drives decays to exp(-huge) = 0: values and gradients must stay finite (no inf * 0).
  inputs = make_inputs(5, l=2 * CHUNK + 1)
  inputs["D"] = None
  inputs["dt"] = inputs["dt"] * 200.0
  (y, state, grads), (y_ref, state_ref, _) = kernel_and_oracle(inputs, random_cotangents(0, inputs))
  for name, value in [("y", y), ("state", state)] + [(k, v) for k, v in grads.items() if v is not None]:
    assert np.all(np.isfinite(value)), name
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(state, state_ref, rtol=1e-5, atol=1e-5)


def test_ssd_pallas_rejects_what_it_cannot_run():
  inputs = make_inputs(0, l=5, dtype=jnp.float16)
  with pytest.raises(ValueError, match=r"ssd_pallas: x has shape \(2, 5, 4, 3\) and dtype float16; the kernel takes "
                                       r"x \[b, l, h, p\] with p <= 128 in \['float32', 'bfloat16'\]"):
    ssd_pallas(**inputs, chunk_size=CHUNK, interpret=True)


def test_block_sizes_must_be_powers_of_two():
  with pytest.raises(ValueError, match=r"BlockSizes.output_block_p=24 must be a power of two >= 16"):
    BlockSizes(state_block_p=16, state_block_n=16, output_block_q=16, output_block_p=24, output_block_n=16)


# ----------------------------------------------------------------------------------------------------------------------
# Compiled for the GPU (skipped elsewhere).

on_gpu = pytest.mark.skipif(
    jax.default_backend() != "gpu"
    or not api.supports((1, 1, 1, 64), jnp.float32, kernel_registry.target_of(jax.devices()[0]), state_size=64,
                        chunk_size=16),
    reason="needs an NVIDIA GPU with compute capability >= 8.0")


@on_gpu
@pytest.mark.parametrize("with_initial_state", [False, True], ids=["zero_state", "initial_state"])
@pytest.mark.parametrize("l", LENGTHS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_compiled_kernel_matches_oracle(dtype, l, with_initial_state):
  # XLA's fp32 matmuls default to TF32 on GPUs; the 1e-5 tolerance needs full fp32 in the XLA backward too.
  with jax.default_matmul_precision("highest"):
    inputs = make_inputs(l, l=l, dtype=dtype, with_initial_state=with_initial_state)
    assert_kernel_matches_oracle(inputs, dtype=dtype, interpret=False)


@on_gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_compiled_kernel_matches_oracle_at_nano_v2_layer_shape(dtype):
  with jax.default_matmul_precision("highest"):
    inputs = make_inputs(0, l=1000, b=1, h=128, p=80, g=8, n=128, dtype=dtype)
    assert_kernel_matches_oracle(inputs, dtype=dtype, chunk_size=128, interpret=False,
                                 compare=assert_close_in_norm)


# ----------------------------------------------------------------------------------------------------------------------
# The Triton lowering: what CPU CI can check of the GPU path without a GPU.


def abstract_inputs(b, l, h, p, g, n, dtype):
  f32 = jnp.float32
  return {"x": jax.ShapeDtypeStruct((b, l, h, p), dtype), "dt": jax.ShapeDtypeStruct((b, l, h), f32),
          "A": jax.ShapeDtypeStruct((h,), f32), "B": jax.ShapeDtypeStruct((b, l, g, n), dtype),
          "C": jax.ShapeDtypeStruct((b, l, g, n), dtype), "D": jax.ShapeDtypeStruct((h,), f32),
          "initial_state": jax.ShapeDtypeStruct((b, h, p, n), f32)}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape,chunk_size", [
    ((2, 1024, 128, 80, 8, 128), 128),  # the Nemotron Nano V2 Mamba layer
    ((1, 100, 4, 3, 2, 5), 8),  # odd sizes everywhere
], ids=["nano_v2", "odd"])
def test_forward_and_backward_lower_to_triton_for_cuda(shape, chunk_size, dtype):
  """Both kernels pass every Triton lowering rule (power-of-two tiles, dot shapes, supported ops) for CUDA."""

  def loss(inputs):
    y, final_state = ssd_pallas(**inputs, chunk_size=chunk_size)
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(final_state)

  lowered = jax.jit(jax.grad(loss)).trace(abstract_inputs(*shape, dtype)).lower(lowering_platforms=("cuda",))
  kernel_names = re.findall(r'name = "(ssd_[a-z_]+)"', lowered.as_text())
  assert sorted(kernel_names) == ["ssd_chunk_output", "ssd_state_passing"]


# ----------------------------------------------------------------------------------------------------------------------
# Dispatch through ops.ssd.


def traced_program(inputs, *, impl: str) -> str:
  return str(jax.make_jaxpr(functools.partial(ssd, chunk_size=CHUNK, impl=impl))(**inputs))


H100 = Target("gpu", "NVIDIA H100 80GB HBM3", (9, 0))
A100 = Target("gpu", "NVIDIA A100-SXM4-80GB", (8, 0))
RTX_4090 = Target("gpu", "NVIDIA GeForce RTX 4090", (8, 9))


@pytest.fixture
def forced_interpret(monkeypatch):
  """Lets the registered kernel take CPU targets (interpret mode); registers it again afterwards, in case the test
  unregistered it."""
  monkeypatch.setenv(api.INTERPRET_ENV_VAR, "1")
  yield
  api.register()


def test_an_abstract_mesh_of_another_device_names_a_target_without_compute_capability(monkeypatch):
  # Only an abstract mesh is known (no jax.set_mesh): its device kind, without the compute capability that NVIDIA
  # kernels need, so dispatch stays on XLA; the same kind as this process's device means this process's device.
  def abstract_mesh_of(platform, kind):
    device = types.SimpleNamespace(platform=platform, device_kind=kind, num_cores=None)
    return lambda: types.SimpleNamespace(abstract_device=device)

  monkeypatch.setattr(jax.sharding, "get_abstract_mesh", abstract_mesh_of("gpu", "NVIDIA H100 80GB HBM3"))
  assert kernel_registry.compile_target() == Target("gpu", "NVIDIA H100 80GB HBM3", None)
  assert not api.supports((2, 64, 8, 64), jnp.bfloat16, kernel_registry.compile_target(), state_size=64, chunk_size=64)
  here = jax.devices()[0]
  monkeypatch.setattr(jax.sharding, "get_abstract_mesh", abstract_mesh_of(here.platform, here.device_kind))
  assert kernel_registry.compile_target() == kernel_registry.target_of(here)

@pytest.mark.parametrize("shape,dtype,target,expected", [
    ((2, 64, 8, 64), jnp.bfloat16, H100, True),
    ((2, 64, 8, 128), jnp.float32, H100, True),
    ((2, 64, 8, 80), jnp.bfloat16, A100, True),
    ((2, 64, 8, 129), jnp.bfloat16, H100, False),  # head dim above MAX_HEAD_DIM
    ((2, 64, 8, 64), jnp.float16, H100, False),
    ((2, 64, 8), jnp.bfloat16, H100, False),
    ((2, 64, 8, 64), jnp.bfloat16, Target("gpu", "Tesla V100-SXM2-16GB", (7, 0)), False),  # before Ampere
    ((2, 64, 8, 64), jnp.bfloat16, Target("gpu", "AMD Instinct MI300X"), False),
    ((2, 64, 8, 64), jnp.bfloat16, Target("tpu", "TPU v5"), False),
    ((2, 64, 8, 64), jnp.bfloat16, Target("cpu", "cpu"), False),  # CPU only with interpret mode forced
], ids=["bf16", "fp32_p128", "p80_a100", "p129", "fp16", "3d", "v100", "rocm", "tpu", "cpu"])
def test_supports(shape, dtype, target, expected):
  assert api.supports(shape, dtype, target, state_size=128, chunk_size=128) is expected


@pytest.mark.parametrize("dtype,head_dim,state_size,chunk_size,accepted", [
    # (dtype, p, n, chunk) -> accepted on (sm80 A100, sm89, sm90 H100). The needs (bytes per block) at the limits
    # are Triton's own figures for these shapes (read from compiles for A100 and H100; tests/test_aot_compile.py).
    ("float32", 80, 128, 256, (False, False, False)),  # ssd_chunk_output: 245,760 > 232,448 on H100
    ("float32", 64, 128, 256, (False, False, True)),  # ssd_state_passing: 198,656 > 166,912 on A100
    ("float32", 64, 64, 256, (True, False, True)),  # ssd_chunk_output: 163,840 <= 166,912 on A100
    ("float32", 80, 128, 128, (True, False, True)),  # ssd_chunk_output: 147,456 > 101,376 on sm89
    ("bfloat16", 80, 128, 256, (True, False, True)),  # ssd_chunk_output: 106,496 (Triton), 131,072 (ours) > 101,376
    ("bfloat16", 80, 128, 128, (True, True, True)),  # the Nemotron Nano V2 layer
    ("bfloat16", 64, 128, 512, (True, True, True)),  # a chunk above the largest tile runs as chunks of 256
], ids=["fp32_p80_c256", "fp32_p64_n128_c256", "fp32_p64_n64_c256", "fp32_p80_c128", "bf16_p80_c256", "nano_v2",
        "bf16_c512"])
def test_supports_refuses_what_exceeds_shared_memory(dtype, head_dim, state_size, chunk_size, accepted):
  shape = (1, 1024, 8, head_dim)
  got = tuple(api.supports(shape, dtype, target, state_size=state_size, chunk_size=chunk_size)
              for target in (A100, RTX_4090, H100))
  assert got == accepted


@pytest.mark.parametrize("dtype,head_dim,state_size,chunk_size,kernel,needed", [
    ("float32", 80, 128, 256, "ssd_chunk_output", 245_760),
    ("float32", 64, 128, 256, "ssd_state_passing", 198_656),
    ("float32", 64, 64, 256, "ssd_chunk_output", 163_840),
    ("float32", 80, 128, 256, "ssd_state_passing", 165_888),
])
def test_shared_memory_model_equals_tritons_figures_where_limits_bind(dtype, head_dim, state_size, chunk_size, kernel,
                                                                        needed):
  # Triton's allocation for these shapes on sm80 and sm90 (identical on both), read from its compile errors against
  # a 1 KiB limit: the compile tests re-read them (tests/test_aot_compile.py::test_shared_memory_model_bounds_triton).
  assert api.shared_memory_bytes(head_dim, state_size, chunk_size, dtype)[kernel] == needed


def test_unsupported_reason_names_the_kernel_and_the_limit():
  reason = api.unsupported_reason((1, 512, 8, 80), jnp.float32, H100, state_size=128, chunk_size=256)
  assert reason == "ssd_chunk_output needs 245,760 bytes of shared memory per block, sm90 has 232,448"
  assert api.unsupported_reason((1, 512, 8, 80), jnp.bfloat16, H100, state_size=128, chunk_size=256) is None


def test_supports_never_raises():
  assert not api.supports((1, 1, 1, 64), "not a dtype", H100, state_size=64, chunk_size=64)
  assert not api.supports((1, 1, 1, 64), jnp.float32, None, state_size=64, chunk_size=64)


def test_supports_needs_the_triton_backend(monkeypatch):
  monkeypatch.setattr(api, "_has_triton_backend", lambda: False)
  assert not api.supports((2, 64, 8, 64), jnp.bfloat16, H100, state_size=128, chunk_size=128)
  assert api.unsupported_reason((2, 64, 8, 64), jnp.bfloat16, H100, state_size=128,
                                chunk_size=128) == "this JAX has no Pallas Triton backend"


def test_the_default_target_is_this_machine():
  # No mesh is active: dispatch targets this process's default device.
  assert kernel_registry.compile_target() == kernel_registry.target_of(jax.devices()[0])
  assert kernel_registry.compile_target().platform == jax.default_backend()


def test_the_target_is_the_active_meshs_device():
  cpu = jax.devices("cpu")[0]
  with jax.set_mesh(jax.sharding.Mesh(np.asarray([cpu]), ("data",))):
    assert kernel_registry.compile_target() == Target("cpu", cpu.device_kind, None)
    seen = []
    jax.jit(lambda x: seen.append(kernel_registry.compile_target()) or x).lower(jnp.zeros(2))
    assert seen == [Target("cpu", cpu.device_kind, None)]


def test_cpu_dispatch_keeps_xla_and_says_why_not_the_kernel(cpu_target):
  # The kernel is registered whatever the device (importing the package registers it); on CPU it refuses.
  inputs = make_inputs(2, l=CHUNK + 3)
  assert api.KERNEL_NAME in ssd_ops.registered_kernels()
  assert traced_program(inputs, impl="auto") == traced_program(inputs, impl="chunked")
  with pytest.raises(ValueError, match=r"impl='pallas' but no registered kernel supports x.shape=\(2, 19, 4, 3\), "
                                       r"dtype=float32, state size 5, chunk_size=16, backend='cpu' "
                                       r"\(registered: 'pallas_triton': on CPU only in interpret mode "
                                       r"\(ELASTIC_JAX_PALLAS_INTERPRET=1\)\)\. Use impl='auto'"):
    ssd(**inputs, chunk_size=CHUNK, impl="pallas")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_forced_dispatch_runs_the_kernel(forced_interpret, dtype):
  inputs = make_inputs(3, l=CHUNK + 3, dtype=dtype)
  for impl in ("pallas", "auto"):
    assert "pallas_call" in traced_program(inputs, impl=impl), impl
  assert ssd_ops.registered_kernels() == (api.KERNEL_NAME,)

  run = jax.jit(lambda inputs: ssd(**inputs, chunk_size=CHUNK, impl="pallas"), compiler_options=FAST_COMPILE)
  y, state = run(inputs)
  y_ref, state_ref = ssd(**inputs, chunk_size=CHUNK, impl="oracle")
  assert_matches(y, y_ref, dtype=dtype, name="y")
  assert_matches(state, state_ref, dtype=dtype, name="final_state")


@pytest.mark.parametrize("override,shape_text,dtype_text,reason", [
    ({"dtype": jnp.float16}, r"\(2, 19, 4, 3\)", "float16", r"dtype float16 is not one of \['float32', 'bfloat16'\]"),
    ({"p": 2 * api.MAX_HEAD_DIM}, r"\(2, 19, 4, 256\)", "float32",
     r"x must be \[b, l, h, p\] with p <= 128, got shape \(2, 19, 4, 256\)"),
], ids=["fp16", "p256"])
def test_forced_dispatch_falls_back_where_unsupported(forced_interpret, cpu_target, override, shape_text,
                                                    dtype_text, reason):
  inputs = make_inputs(2, l=CHUNK + 3, **override)
  assert traced_program(inputs, impl="auto") == traced_program(inputs, impl="chunked")
  with pytest.raises(ValueError, match=rf"impl='pallas' but no registered kernel supports x.shape={shape_text}, "
                                       rf"dtype={dtype_text}, state size 5, chunk_size=16, backend='cpu' "
                                       rf"\(registered: 'pallas_triton': {reason}\)"):
    ssd(**inputs, chunk_size=CHUNK, impl="pallas")


def test_unregistering_the_kernel_sticks(forced_interpret):
  inputs = make_inputs(2, l=5)
  assert "pallas_call" in traced_program(inputs, impl="auto")
  ssd_ops.unregister_kernel(api.KERNEL_NAME)
  assert traced_program(inputs, impl="auto") == traced_program(inputs, impl="chunked")
  assert ssd_ops.registered_kernels() == ()
