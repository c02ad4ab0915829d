"""Tests of elastic_jax.ops.ssd: every implementation against the token-by-token oracle, values and gradients.

The oracle itself is checked once against a plain NumPy loop over heads and tokens.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elastic_jax.ops import kernel_registry
from elastic_jax.ops import ssd as ssd_lib
from elastic_jax.ops.ssd import register_kernel, ssd, ssd_step, unregister_kernel

CHUNK = 8
LENGTHS = (1, CHUNK - 1, CHUNK, 3 * CHUNK + 5)
INPUT_NAMES = ("x", "dt", "A", "B", "C", "D", "initial_state")


def make_inputs(seed: int, *, l: int, b: int = 2, h: int = 4, p: int = 3, g: int = 2, n: int = 5,
                dtype=jnp.float32, with_initial_state: bool = True) -> dict[str, jax.Array | None]:
  """Random SSD inputs with small magnitudes, so that a 1e-5 tolerance separates right from wrong.

  x, B and C are in ``dtype`` (the model's activation dtype); dt, A, D and the state are fp32 as in the model.
  """
  rng = np.random.default_rng(seed)
  normal = lambda *shape: 0.5 * rng.standard_normal(shape, np.float32)
  inputs = {
      "x": jnp.asarray(normal(b, l, h, p), dtype),
      "dt": jnp.asarray(rng.uniform(0.05, 0.5, (b, l, h)), jnp.float32),
      "A": jnp.asarray(-rng.uniform(0.5, 2.0, (h,)), jnp.float32),
      "B": jnp.asarray(normal(b, l, g, n), dtype),
      "C": jnp.asarray(normal(b, l, g, n), dtype),
      "D": jnp.asarray(2 * normal(h), jnp.float32),
      "initial_state": None,
  }
  if with_initial_state:
    inputs["initial_state"] = jnp.asarray(normal(b, h, p, n))
  return inputs


def random_cotangents(seed: int, inputs) -> tuple[jax.Array, jax.Array]:
  """Random cotangents for (y, final_state), so every output element contributes to the gradients."""
  x, B = inputs["x"], inputs["B"]
  b, _, h, p = x.shape
  n = B.shape[-1]
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.standard_normal(x.shape), x.dtype),
          jnp.asarray(rng.standard_normal((b, h, p, n)), jnp.float32))


# These functions are tiny: compiling them fast matters more than running them fast.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
run_ssd = jax.jit(ssd, static_argnames=("chunk_size", "impl", "inter_chunk"), compiler_options=FAST_COMPILE)


def outputs_and_grads(inputs, cotangents, *, impl: str, inter_chunk: str = "scan", chunk_size: int = CHUNK):
  """(y, final_state, {input name: gradient}) of one implementation, pulling back ``cotangents``."""
  run = lambda inputs: ssd(**inputs, chunk_size=chunk_size, impl=impl, inter_chunk=inter_chunk)
  (y, final_state), pullback = jax.vjp(run, inputs)
  (grads,) = pullback(cotangents)
  return y, final_state, grads


@functools.partial(jax.jit, static_argnames=("chunk_size",), compiler_options=FAST_COMPILE)
def outputs_and_grads_of_all(inputs, cotangents, *, chunk_size: int = CHUNK):
  """{name: (y, final_state, grads)} of the oracle and both chunked modes, compiled together to keep tests fast."""
  return {
      "oracle": outputs_and_grads(inputs, cotangents, impl="oracle", chunk_size=chunk_size),
      "chunked/scan": outputs_and_grads(inputs, cotangents, impl="chunked", inter_chunk="scan",
                                        chunk_size=chunk_size),
      "chunked/associative": outputs_and_grads(inputs, cotangents, impl="chunked", inter_chunk="associative",
                                               chunk_size=chunk_size),
  }


def relative_error(actual, expected, *, floor: float = 1e-3) -> float:
  """||actual - expected|| / ||expected||; the floor keeps an all-zero expectation (d/dA at l=1 from a zero state)
  from turning rounding noise into an infinite error."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), floor))


def assert_matches(actual, expected, *, dtype, name: str) -> None:
  if dtype == jnp.float32:
    np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32),
                               rtol=1e-5, atol=1e-5, err_msg=name)
  else:  # bf16 inputs: compare relative error norms
    error = relative_error(actual, expected)
    assert error < 1e-2, f"{name}: relative error {error:.2e}"


def assert_chunked_matches_oracle(inputs, *, dtype, seed: int = 1) -> None:
  """Both chunked modes == oracle in y, final state and the gradient w.r.t. every input, under random cotangents."""
  results = outputs_and_grads_of_all(inputs, random_cotangents(seed, inputs))
  y_ref, state_ref, grads_ref = results.pop("oracle")
  for mode, (y, state, grads) in results.items():
    assert y.dtype == inputs["x"].dtype and y.shape == inputs["x"].shape, mode
    assert state.dtype == jnp.float32, mode
    assert_matches(y, y_ref, dtype=dtype, name=f"{mode}: y")
    assert_matches(state, state_ref, dtype=dtype, name=f"{mode}: final_state")
    for name in INPUT_NAMES:
      if inputs[name] is None:
        continue
      assert grads[name].dtype == inputs[name].dtype, f"{mode}: d/d{name}"
      assert_matches(grads[name], grads_ref[name], dtype=dtype, name=f"{mode}: d/d{name}")


# ----------------------------------------------------------------------------------------------------------------------
# The oracle against an independent NumPy loop.


def numpy_reference(x, dt, A, B, C, D, initial_state):
  """The recurrence written out per batch row, head and token in float64."""
  x, dt, A, B, C, D, state = (np.asarray(t, np.float64) for t in (x, dt, A, B, C, D, initial_state))
  b, l, h, p = x.shape
  g = B.shape[2]
  heads_per_group = h // g
  y = np.zeros_like(x)
  state = state.copy()
  for i in range(b):
    for head in range(h):
      group = head // heads_per_group
      for t in range(l):
        state[i, head] = (np.exp(dt[i, t, head] * A[head]) * state[i, head]
                          + dt[i, t, head] * np.outer(x[i, t, head], B[i, t, group]))
        y[i, t, head] = state[i, head] @ C[i, t, group] + D[head] * x[i, t, head]
  return y, state


@pytest.mark.parametrize("h,g", [(4, 1), (4, 2), (6, 3)])
def test_oracle_matches_numpy_loop(h, g):
  inputs = make_inputs(0, l=11, h=h, g=g)
  y, state = run_ssd(**inputs, chunk_size=CHUNK, impl="oracle")
  y_ref, state_ref = numpy_reference(**inputs)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state, state_ref, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# Chunked == oracle: outputs, final state and gradients w.r.t. every input.


@pytest.mark.parametrize("with_initial_state", [False, True], ids=["zero_state", "initial_state"])
@pytest.mark.parametrize("l", LENGTHS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_chunked_matches_oracle(dtype, l, with_initial_state):
  inputs = make_inputs(l, l=l, dtype=dtype, with_initial_state=with_initial_state)
  assert_chunked_matches_oracle(inputs, dtype=dtype)


@pytest.mark.parametrize("h,g", [(4, 1), (8, 2), (6, 3)], ids=["g1_r4", "g2_r4", "g3_r2"])
def test_chunked_matches_oracle_across_groups(h, g):
  inputs = make_inputs(7, l=2 * CHUNK + 3, h=h, g=g)
  assert_chunked_matches_oracle(inputs, dtype=jnp.float32)


@pytest.mark.parametrize("chunk_size,l", [(1, 5), (4, 12), (16, 5)], ids=["chunk1", "exact", "chunk_gt_len"])
def test_chunked_any_chunk_size(chunk_size, l):
  inputs = make_inputs(3, l=l)
  y_ref, state_ref = run_ssd(**inputs, chunk_size=chunk_size, impl="oracle")
  for inter_chunk in ("scan", "associative"):
    y, state = run_ssd(**inputs, chunk_size=chunk_size, impl="chunked", inter_chunk=inter_chunk)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state, state_ref, rtol=1e-5, atol=1e-5)


def test_chunked_without_D_and_long_decay_is_finite():
  # Large dt * A drives decays to exp(-huge) = 0: values and gradients must stay finite (no inf * 0).
  inputs = make_inputs(5, l=2 * CHUNK + 1)
  inputs["D"] = None
  inputs["dt"] = inputs["dt"] * 200.0
  results = outputs_and_grads_of_all(inputs, random_cotangents(0, inputs))
  y_ref, state_ref, _ = results.pop("oracle")
  for mode, (y, state, grads) in results.items():
    for name, value in [("y", y), ("state", state)] + [(k, v) for k, v in grads.items() if v is not None]:
      assert np.all(np.isfinite(value)), f"{mode}: {name}"
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5, err_msg=mode)
    np.testing.assert_allclose(state, state_ref, rtol=1e-5, atol=1e-5, err_msg=mode)


# ----------------------------------------------------------------------------------------------------------------------
# Decoding one token at a time.


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_D", [True, False], ids=["D", "no_D"])
def test_ssd_step_iterated_matches_oracle(dtype, with_D):
  inputs = make_inputs(11, l=CHUNK + 3, h=6, g=3, dtype=dtype)
  if not with_D:
    inputs["D"] = None
  y_ref, state_ref = run_ssd(**inputs, chunk_size=CHUNK, impl="oracle")

  step = jax.jit(ssd_step)
  state = inputs["initial_state"]
  ys = []
  for t in range(inputs["x"].shape[1]):
    y_t, state = step(state, inputs["x"][:, t], inputs["dt"][:, t], inputs["A"], inputs["B"][:, t],
                      inputs["C"][:, t], inputs["D"])
    assert y_t.dtype == dtype and state.dtype == jnp.float32
    ys.append(y_t)
  y = jnp.stack(ys, axis=1)
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(state, state_ref, rtol=1e-5, atol=1e-5)


def test_ssd_step_shape_errors():
  inputs = make_inputs(0, l=1, h=4, g=2)
  x, dt, A, B, C = (inputs[k][:, 0] if k != "A" else inputs[k] for k in ("x", "dt", "A", "B", "C"))
  state = inputs["initial_state"]
  with pytest.raises(ValueError, match=r"ssd_step: state has shape \(2, 4, 3\), expected \(2, 4, 3, 5\)"):
    ssd_step(state[..., 0], x, dt, A, B, C)
  with pytest.raises(ValueError, match=r"ssd_step: the number of heads h=4 is not a multiple of .* g=3"):
    ssd_step(jnp.zeros((2, 4, 3, 5)), x, dt, A, jnp.zeros((2, 3, 5)), jnp.zeros((2, 3, 5)))


# ----------------------------------------------------------------------------------------------------------------------
# Dispatch.


@pytest.fixture
def own_registry(monkeypatch):
  """An SSD registry that holds only what the test registers (the kernel packages are not imported); yields
  ``register_kernel``. The registry as it was is restored afterwards."""
  monkeypatch.setattr(kernel_registry, "_KERNELS", {})
  monkeypatch.setattr(kernel_registry, "KERNEL_PACKAGES", {})
  yield register_kernel


@pytest.fixture
def cpu_target():
  """Targets this machine's CPU (a GPU machine's too): a mesh of one CPU device."""
  with jax.set_mesh(jax.sharding.Mesh(np.asarray(jax.devices("cpu")[:1]), ("data",))):
    yield


def traced_program(inputs, *, impl: str) -> str:
  """The jaxpr that ``ssd`` traces to: equal programs mean the same implementation was dispatched."""
  return str(jax.make_jaxpr(functools.partial(ssd, chunk_size=CHUNK, impl=impl))(**inputs))


def test_auto_falls_back_to_chunked_without_kernels(own_registry):
  assert ssd_lib.registered_kernels() == ()
  inputs = make_inputs(2, l=CHUNK + 3)
  assert traced_program(inputs, impl="auto") == traced_program(inputs, impl="chunked")
  assert traced_program(inputs, impl="auto") != traced_program(inputs, impl="oracle")


def fake_kernel(x, dt, A, B, C, D, *, chunk_size, initial_state):
  """Marks its outputs with 42 so that a test can tell it ran."""
  del dt, A, C, D, chunk_size, initial_state
  b, _, h, p = x.shape
  return jnp.full_like(x, 42), jnp.full((b, h, p, B.shape[-1]), 42.0)


def test_auto_and_pallas_pick_a_supporting_kernel(own_registry):
  seen = []

  def supports(shape, dtype, target, *, state_size, chunk_size):
    seen.append((shape, jnp.dtype(dtype), target, state_size, chunk_size))
    return True

  own_registry("never", lambda shape, dtype, target, **_: False, None)
  own_registry("fake", supports, fake_kernel)
  inputs = make_inputs(2, l=CHUNK + 3)
  for impl in ("auto", "pallas"):
    # Dispatch happens at trace time: a fresh partial gets a fresh trace that sees the registry as it is now.
    y, state = jax.jit(functools.partial(ssd, chunk_size=CHUNK, impl=impl))(**inputs)
    assert np.all(np.asarray(y) == 42) and np.all(np.asarray(state) == 42), impl
  assert seen[0] == (inputs["x"].shape, jnp.dtype(jnp.float32), kernel_registry.target_of(jax.devices()[0]),
                     inputs["B"].shape[-1], CHUNK)
  # An explicit XLA choice ignores the registry.
  assert "42" not in traced_program(inputs, impl="chunked")


def test_auto_falls_back_when_no_kernel_supports(own_registry, cpu_target):
  own_registry("bf16_only", lambda shape, dtype, target, **_: jnp.dtype(dtype) == jnp.bfloat16, fake_kernel)
  inputs = make_inputs(2, l=CHUNK + 3)
  assert traced_program(inputs, impl="auto") == traced_program(inputs, impl="chunked")
  with pytest.raises(ValueError, match=r"no registered kernel supports x.shape=\(2, 11, 4, 3\), dtype=float32, "
                                       r"state size 5, chunk_size=\d+, backend='cpu' \(registered: 'bf16_only'\)"):
    ssd(**inputs, chunk_size=CHUNK, impl="pallas")


def test_pallas_without_kernels_raises(own_registry, cpu_target):
  inputs = make_inputs(2, l=5)
  with pytest.raises(ValueError, match=r"impl='pallas' but no registered kernel supports x.shape=\(2, 5, 4, 3\), "
                                       r"dtype=float32, state size 5, chunk_size=\d+, backend='cpu' "
                                       r"\(registered: none\)"):
    ssd(**inputs, chunk_size=CHUNK, impl="pallas")


def test_an_unregistered_kernel_is_not_dispatched(own_registry):
  own_registry("fake", lambda shape, dtype, target, **_: True, fake_kernel)
  inputs = make_inputs(2, l=5)
  assert "42" in traced_program(inputs, impl="auto")
  unregister_kernel("fake")
  assert ssd_lib.registered_kernels() == ()
  assert traced_program(inputs, impl="auto") == traced_program(inputs, impl="chunked")


def test_a_kernel_package_that_cannot_be_imported_is_reported_once(monkeypatch):
  monkeypatch.setattr(kernel_registry, "_KERNELS", {})
  monkeypatch.setattr(kernel_registry, "KERNEL_PACKAGES", {"ssd": ("elastic_jax_no_such_kernels",)})
  monkeypatch.setattr(kernel_registry, "_IMPORTED_PACKAGES", set())
  monkeypatch.setattr(kernel_registry, "_IMPORT_ERRORS", {})
  inputs = make_inputs(2, l=5)
  error = r"ModuleNotFoundError: No module named 'elastic_jax_no_such_kernels'"
  with pytest.warns(RuntimeWarning, match=rf"ssd: the kernel package elastic_jax_no_such_kernels could not be "
                                          rf"imported \({error}\); its kernels are not registered"):
    program = traced_program(inputs, impl="auto")
  assert program == traced_program(inputs, impl="chunked")
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # once: the next dispatch is silent
    traced_program(inputs, impl="auto")
  with pytest.raises(ValueError, match=rf"\(registered: none; not importable: elastic_jax_no_such_kernels "
                                       rf"\({error}\)\)\. Use impl='auto'"):
    ssd(**inputs, chunk_size=CHUNK, impl="pallas")


@pytest.mark.parametrize("override,message", [
    ({"impl": "triton"}, r"impl='triton' is not one of \('auto', 'chunked', 'oracle', 'pallas'\)"),
    ({"inter_chunk": "parallel"}, r"inter_chunk='parallel' is not one of \('scan', 'associative'\)"),
    ({"chunk_size": 0}, r"chunk_size=0 must be a positive int"),
])
def test_bad_options_raise(override, message):
  inputs = make_inputs(0, l=5)
  options = {"chunk_size": CHUNK, "impl": "chunked", "inter_chunk": "scan"} | override
  with pytest.raises(ValueError, match=message):
    ssd(**inputs, **options)


@pytest.mark.parametrize("name,shape,message", [
    ("B", (2, 5, 3, 5), r"h=4 is not a multiple of the number of B/C groups g=3"),
    ("dt", (2, 5), r"dt has shape \(2, 5\), expected \(2, 5, 4\)"),
    ("A", (3,), r"A has shape \(3,\), expected \(4,\)"),
    ("C", (2, 5, 2, 6), r"C has shape \(2, 5, 2, 6\), expected \(2, 5, 2, 5\)"),
    ("D", (2,), r"D has shape \(2,\), expected \(4,\)"),
    ("initial_state", (2, 4, 3, 6), r"initial_state has shape \(2, 4, 3, 6\), expected \(2, 4, 3, 5\)"),
    ("x", (2, 5, 4), r"x has shape \(2, 5, 4\), expected 4 dims"),
])
def test_bad_shapes_raise(name, shape, message):
  inputs = make_inputs(0, l=5)
  inputs[name] = jnp.zeros(shape)
  if name == "B":
    inputs["C"] = jnp.zeros(shape)
  with pytest.raises(ValueError, match=message):
    ssd(**inputs, chunk_size=CHUNK, impl="chunked")
