"""Mamba-2 state-space duality (SSD): the selective scan inside a Mamba-2 mixer.

One recurrence per head, with state ``S`` of shape [p, n]:

    S_t = exp(dt_t * A) * S_{t-1} + dt_t * outer(x_t, B_t)
    y_t = S_t @ C_t + D * x_t

computed in one of three ways behind :func:`ssd`, chosen explicitly with ``impl``:

- ``"oracle"``: token by token with ``lax.scan`` in fp32. Slow and obviously correct: the reference of the tests.
- ``"chunked"``: the SSD algorithm (Dao & Gu, 2024). Inside a chunk of ``q`` tokens the recurrence is a masked
  [q, q] attention-like matmul; across chunks only one [p, n] state per head is passed on, either by ``lax.scan``
  (``inter_chunk="scan"``) or by ``lax.associative_scan`` (``inter_chunk="associative"``).
- ``"pallas"``: a fused kernel from ``kernel_registry`` (:func:`register_kernel`). ``"auto"`` uses a registered kernel
  when it supports the input on the target device and falls back to ``"chunked"`` otherwise (fail closed). The
  Pallas kernels of ``elastic_jax_kernels.ssd`` (the top-level ``kernels/`` folder) register themselves when the
  registry first imports them; see kernels/README.md.

The target device (``kernel_registry.compile_target``) is the one the program is compiled for: the devices of the mesh
active while :func:`ssd` traces (``jax.set_mesh``, as the training steps and ``elastic_jax.aot`` set it), else this
process's default device. So a program compiled on a CPU host for H100s (compile-only devices) gets the kernel an
H100 would get.

Decoding one token uses :func:`ssd_step`, which bypasses every scan.

Shape letters: b batch, l sequence, h heads, p head dim, g groups of B/C, n state size; head i reads group
i // (h // g), so heads are split as h = g * r. Inside the chunked algorithm: c chunks, q output position and k
source position within a chunk.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from elastic_jax.ops import kernel_registry

IMPLS = ("auto", "chunked", "oracle", "pallas")
INTER_CHUNK_MODES = ("scan", "associative")

_SHAPE_LEGEND = "x [b, l, h, p], dt [b, l, h], A [h], B/C [b, l, g, n], D [h], initial_state [b, h, p, n]"
_STEP_SHAPE_LEGEND = "state [b, h, p, n], x [b, h, p], dt [b, h], A [h], B/C [b, g, n], D [h]"


# ----------------------------------------------------------------------------------------------------------------------
# Fused kernels (kernel_registry holds them; the kernel packages register themselves there).

KERNEL_OP = "ssd"


def register_kernel(
    name: str,
    supports_fn: Callable[..., bool],
    fn: Callable[..., tuple[jax.Array, jax.Array]],
    *,
    unsupported_reason: Callable[..., str | None] | None = None,
) -> kernel_registry.Kernel:
  """Registers a fused SSD kernel for ``impl="pallas"`` and ``impl="auto"``; an existing ``name`` is replaced.

  Args:
    name: Unique name, shown in error messages.
    supports_fn: ``supports(x_shape, x_dtype, target, *, state_size, chunk_size) -> bool``: whether the kernel takes
      ``x`` of this shape and dtype with B/C of ``state_size`` in chunks of ``chunk_size`` on ``target`` (a
      ``kernel_registry.Target``). Must be cheap and must not raise.
    fn: ``fn(x, dt, A, B, C, D, *, chunk_size, initial_state) -> (y, final_state)`` with the contract of :func:`ssd`
      (``D`` and ``initial_state`` may be None).
    unsupported_reason: Optional, same arguments as ``supports_fn``: why the kernel refuses, for error messages.

  Dispatch happens when :func:`ssd` is traced, so register kernels before anything is jitted: a function already
  compiled keeps the implementation it was traced with.
  """
  return kernel_registry.register_kernel(KERNEL_OP, name, supports_fn, fn, unsupported_reason=unsupported_reason)


def unregister_kernel(name: str) -> None:
  """Removes a registered SSD kernel; unknown names are ignored."""
  kernel_registry.unregister_kernel(KERNEL_OP, name)


def registered_kernels() -> tuple[str, ...]:
  """Names of the registered SSD kernels, in the order they are tried."""
  return tuple(kernel.name for kernel in kernel_registry.kernels(KERNEL_OP))


# ----------------------------------------------------------------------------------------------------------------------
# Public API.


def ssd(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array | None = None,
    *,
    chunk_size: int,
    initial_state: jax.Array | None = None,
    impl: str = "auto",
    inter_chunk: str = "scan",
) -> tuple[jax.Array, jax.Array]:
  """Runs the Mamba-2 selective scan over a sequence.

  Args:
    x: [b, l, h, p] inputs.
    dt: [b, l, h] step sizes, already softplus'ed and clamped (> 0).
    A: [h] negative decay rates (fp32).
    B: [b, l, g, n] input projections of the state; head i reads group i // (h // g).
    C: [b, l, g, n] output projections of the state.
    D: [h] skip connection, or None.
    chunk_size: Tokens per chunk of the chunked algorithm (static). Any sequence length works.
    initial_state: [b, h, p, n] state before the first token, or None for zeros.
    impl: One of ``IMPLS`` (static); see the module docstring.
    inter_chunk: One of ``INTER_CHUNK_MODES`` (static): how the chunked algorithm passes states across chunks.

  Returns:
    (y [b, l, h, p] in x.dtype, final_state [b, h, p, n] fp32): the outputs and the state after the last token.

  Raises:
    ValueError: Unknown ``impl`` or ``inter_chunk``, inconsistent shapes, or ``impl="pallas"`` with no registered
      kernel supporting the input.
  """
  if impl not in IMPLS:
    raise ValueError(f"ssd: impl={impl!r} is not one of {IMPLS}.")
  if inter_chunk not in INTER_CHUNK_MODES:
    raise ValueError(f"ssd: inter_chunk={inter_chunk!r} is not one of {INTER_CHUNK_MODES}.")
  if not isinstance(chunk_size, int) or chunk_size <= 0:
    raise ValueError(f"ssd: chunk_size={chunk_size!r} must be a positive int.")
  _check_sequence_shapes(x, dt, A, B, C, D, initial_state)

  if impl in ("auto", "pallas"):
    target = kernel_registry.compile_target()
    query = dict(state_size=B.shape[-1], chunk_size=chunk_size)
    kernel = kernel_registry.find_kernel(KERNEL_OP, x.shape, x.dtype, target, **query)
    if kernel is not None:
      return kernel.fn(x, dt, A, B, C, D, chunk_size=chunk_size, initial_state=initial_state)
    if impl == "pallas":
      device = f" ({target.device_kind})" if target.platform != "cpu" and target.device_kind else ""
      refusals = kernel_registry.describe_refusals(KERNEL_OP, x.shape, x.dtype, target, **query)
      raise ValueError(
          f"ssd: impl='pallas' but no registered kernel supports x.shape={tuple(x.shape)}, "
          f"dtype={jnp.dtype(x.dtype).name}, state size {B.shape[-1]}, chunk_size={chunk_size}, "
          f"backend={target.platform!r}{device} ({refusals}). "
          "Use impl='auto' to fall back to the chunked XLA implementation.")

  b, _, h, p = x.shape
  n = B.shape[-1]
  if initial_state is None:
    initial_state = jnp.zeros((b, h, p, n), jnp.float32)
  if impl == "oracle":
    return _ssd_oracle(x, dt, A, B, C, D, initial_state)
  return _ssd_chunked(x, dt, A, B, C, D, initial_state, chunk_size=chunk_size, inter_chunk=inter_chunk)


def ssd_step(
    state: jax.Array,
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Advances the recurrence by one token (decoding): no scan, no chunking.

  Args:
    state: [b, h, p, n] fp32 state before the token.
    x: [b, h, p] input of the token.
    dt: [b, h] step size (softplus'ed, > 0).
    A: [h] negative decay rates.
    B: [b, g, n] and C: [b, g, n] projections; head i reads group i // (h // g).
    D: [h] skip connection, or None.

  Returns:
    (y [b, h, p] in x.dtype, new_state [b, h, p, n] fp32).
  """
  _check_step_shapes(state, x, dt, A, B, C, D)
  b, h, p = x.shape
  g, n = B.shape[1:]
  r = h // g
  dt = dt.astype(jnp.float32)
  decay = jnp.exp(dt * A.astype(jnp.float32))  # [b, h]
  x_by_group = x.astype(jnp.float32).reshape(b, g, r, p)
  dt_x = dt.reshape(b, g, r, 1) * x_by_group  # [b, g, r, p]
  update = dt_x[..., None] * B.astype(jnp.float32)[:, :, None, None, :]  # [b, g, r, p, n]
  new_state = decay[..., None, None] * state.astype(jnp.float32) + update.reshape(b, h, p, n)
  y = jnp.einsum("bgrpn,bgn->bgrp", new_state.reshape(b, g, r, p, n), C.astype(jnp.float32),
                 precision=lax.Precision.HIGHEST).reshape(b, h, p)
  if D is not None:
    y = y + D.astype(jnp.float32)[:, None] * x.astype(jnp.float32)
  return y.astype(x.dtype), new_state


# ----------------------------------------------------------------------------------------------------------------------
# Oracle: one token at a time.


def _ssd_oracle(x, dt, A, B, C, D, initial_state):
  """Token-by-token reference in fp32; every head gets its own copy of its group's B and C."""
  h, g = x.shape[2], B.shape[2]
  f32 = lambda t: t.astype(jnp.float32)
  B_per_head = jnp.repeat(f32(B), h // g, axis=2)  # [b, l, h, n]; repeat maps head i to group i // (h // g)
  C_per_head = jnp.repeat(f32(C), h // g, axis=2)  # [b, l, h, n]

  def step(state, token):  # state [b, h, p, n]
    x_t, dt_t, B_t, C_t = token  # [b, h, p], [b, h], [b, h, n], [b, h, n]
    decay = jnp.exp(dt_t * f32(A))[:, :, None, None]
    state = decay * state + dt_t[:, :, None, None] * x_t[:, :, :, None] * B_t[:, :, None, :]
    y_t = jnp.sum(state * C_t[:, :, None, :], axis=-1)  # [b, h, p]
    return state, y_t

  time_major = lambda t: jnp.swapaxes(t, 0, 1)
  tokens = (time_major(f32(x)), time_major(f32(dt)), time_major(B_per_head), time_major(C_per_head))
  final_state, y = lax.scan(step, f32(initial_state), tokens)
  y = time_major(y)  # [b, l, h, p]
  if D is not None:
    y = y + f32(D)[:, None] * f32(x)
  return y.astype(x.dtype), final_state


# ----------------------------------------------------------------------------------------------------------------------
# Chunked SSD.


def _matmul(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """einsum accumulating in fp32.

  Operands keep their dtype: C @ B runs on the bf16 inputs as they are, while the operands that carry decays stay
  fp32 (and promote the other side), because rounding decays to bf16 costs about 1% in the gradient of A.
  """
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _segment_decay(a_cum: jax.Array) -> jax.Array:
  """exp(a_cum[q] - a_cum[k]) for k <= q and 0 for k > q: the decay from token k to token q of a chunk.

  Args:
    a_cum: [..., q] cumulative log-decays within each chunk (fp32).

  Returns:
    [..., q, k] fp32.
  """
  chunk = a_cum.shape[-1]
  log_decay = a_cum[..., :, None] - a_cum[..., None, :]
  causal = jnp.tril(jnp.ones((chunk, chunk), dtype=bool))
  # Mask before exp: above the diagonal the difference is positive and could overflow, and inf * 0 is nan in
  # the gradient.
  return jnp.exp(jnp.where(causal, log_decay, -jnp.inf))


def _ssd_chunked(x, dt, A, B, C, D, initial_state, *, chunk_size: int, inter_chunk: str):
  """The SSD algorithm: quadratic within chunks, recurrent across them."""
  b, l, h, p = x.shape
  g, n = B.shape[2:]
  r = h // g
  q = chunk_size
  c = -(-l // q)  # ceil(l / q)

  # Pad to whole chunks. Padded steps have dt = 0 (and x = B = C = 0): they neither decay nor add to the state, so the
  # final state is the state after the last real token.
  def pad_and_chunk(t, *trailing):
    t = jnp.pad(t, [(0, 0), (0, c * q - l)] + [(0, 0)] * (t.ndim - 2))
    return t.reshape(b, c, q, *trailing)

  x_chunks = pad_and_chunk(x, g, r, p)  # [b, c, q, g, r, p]
  B_chunks = pad_and_chunk(B, g, n)  # [b, c, k, g, n]
  C_chunks = pad_and_chunk(C, g, n)  # [b, c, q, g, n]
  dt_chunks = jnp.moveaxis(pad_and_chunk(dt.astype(jnp.float32), g, r), 2, -1)  # [b, c, g, r, k]

  # Log-decays always in fp32: a_cum[..., i] = sum over t <= i of dt_t * A within the chunk.
  a_cum = jnp.cumsum(dt_chunks * A.astype(jnp.float32).reshape(g, r, 1), axis=-1)  # [b, c, g, r, q]

  # 1. Within each chunk (the "attention" form): y_q = sum over k <= q of (C_q . B_k) exp(a_cum_q - a_cum_k) dt_k x_k.
  scores = _matmul("bcqgn,bckgn->bcgqk", C_chunks, B_chunks)  # [b, c, g, q, k]
  weights = scores[:, :, :, None] * _segment_decay(a_cum) * dt_chunks[..., None, :]  # [b, c, g, r, q, k]
  y = _matmul("bcgrqk,bckgrp->bcqgrp", weights, x_chunks)  # [b, c, q, g, r, p]

  # 2. What each chunk adds to the state at its end: sum over k of exp(a_cum_end - a_cum_k) dt_k outer(x_k, B_k).
  decay_to_end = jnp.exp(a_cum[..., -1:] - a_cum) * dt_chunks  # [b, c, g, r, k]
  x_weighted = x_chunks * jnp.moveaxis(decay_to_end, -1, 2)[..., None]  # [b, c, k, g, r, p] fp32
  chunk_states = _matmul("bckgrp,bckgn->bcgrpn", x_weighted, B_chunks)  # [b, c, g, r, p, n]

  # 3. Pass states across chunks: start[c + 1] = exp(a_cum_end[c]) * start[c] + chunk_states[c].
  chunk_decay = jnp.exp(a_cum[..., -1])  # [b, c, g, r]
  pass_states = _pass_states_scan if inter_chunk == "scan" else _pass_states_associative
  start_states, final_state = pass_states(chunk_decay, chunk_states,
                                          initial_state.astype(jnp.float32).reshape(b, g, r, p, n))

  # 4. The chunk-start state's contribution: y_q += exp(a_cum_q) C_q . start.
  y_from_start = _matmul("bcqgn,bcgrpn->bcqgrp", C_chunks, start_states)  # [b, c, q, g, r, p]
  y = y + y_from_start * jnp.moveaxis(jnp.exp(a_cum), -1, 2)[..., None]

  y = y.reshape(b, c * q, h, p)[:, :l]
  if D is not None:
    y = y + D.astype(jnp.float32)[:, None] * x.astype(jnp.float32)
  return y.astype(x.dtype), final_state.reshape(b, h, p, n)


def _pass_states_scan(chunk_decay, chunk_states, initial_state):
  """Sequential state passing over chunks.

  Args:
    chunk_decay: [b, c, g, r] total decay of each chunk.
    chunk_states: [b, c, g, r, p, n] each chunk's own contribution to the state at its end.
    initial_state: [b, g, r, p, n].

  Returns:
    (start_states [b, c, g, r, p, n]: the state entering each chunk, final_state [b, g, r, p, n]).
  """

  def step(state, chunk):
    decay, added = chunk
    return decay[..., None, None] * state + added, state

  final_state, start_states = lax.scan(
      step, initial_state, (jnp.moveaxis(chunk_decay, 1, 0), jnp.moveaxis(chunk_states, 1, 0)))
  return jnp.moveaxis(start_states, 0, 1), final_state


def _pass_states_associative(chunk_decay, chunk_states, initial_state):
  """State passing as a parallel prefix over the monoid (a1, s1) * (a2, s2) = (a1 a2, a2 s1 + s2).

  Same arguments and returns as ``_pass_states_scan``; O(log c) depth instead of c sequential steps.
  """
  # Fold the initial state into the first chunk so that the inclusive prefix gives the state at each chunk's end.
  first = chunk_decay[:, 0, ..., None, None] * initial_state + chunk_states[:, 0]
  chunk_states = chunk_states.at[:, 0].set(first)

  def combine(earlier, later):
    decay_earlier, state_earlier = earlier
    decay_later, state_later = later
    return decay_earlier * decay_later, decay_later[..., None, None] * state_earlier + state_later

  _, end_states = lax.associative_scan(combine, (chunk_decay, chunk_states), axis=1)  # [b, c, g, r, p, n]
  start_states = jnp.concatenate([initial_state[:, None], end_states[:, :-1]], axis=1)
  return start_states, end_states[:, -1]


# ----------------------------------------------------------------------------------------------------------------------
# Shape validation (shapes are static, so this runs once at trace time).


def _expect_shape(where: str, name: str, array: jax.Array, expected: tuple[int, ...], legend: str) -> None:
  if tuple(array.shape) != tuple(expected):
    raise ValueError(f"{where}: {name} has shape {tuple(array.shape)}, expected {tuple(expected)} ({legend}).")


def _check_groups(where: str, h: int, g: int, legend: str) -> None:
  if g <= 0 or h % g:
    raise ValueError(f"{where}: the number of heads h={h} is not a multiple of the number of B/C groups g={g} "
                     f"({legend}).")


def _check_sequence_shapes(x, dt, A, B, C, D, initial_state) -> None:
  if x.ndim != 4:
    raise ValueError(f"ssd: x has shape {tuple(x.shape)}, expected 4 dims ({_SHAPE_LEGEND}).")
  if B.ndim != 4:
    raise ValueError(f"ssd: B has shape {tuple(B.shape)}, expected 4 dims ({_SHAPE_LEGEND}).")
  b, l, h, p = x.shape
  g, n = B.shape[2:]
  _expect_shape("ssd", "dt", dt, (b, l, h), _SHAPE_LEGEND)
  _expect_shape("ssd", "A", A, (h,), _SHAPE_LEGEND)
  _expect_shape("ssd", "B", B, (b, l, g, n), _SHAPE_LEGEND)
  _expect_shape("ssd", "C", C, (b, l, g, n), _SHAPE_LEGEND)
  _check_groups("ssd", h, g, _SHAPE_LEGEND)
  if D is not None:
    _expect_shape("ssd", "D", D, (h,), _SHAPE_LEGEND)
  if initial_state is not None:
    _expect_shape("ssd", "initial_state", initial_state, (b, h, p, n), _SHAPE_LEGEND)


def _check_step_shapes(state, x, dt, A, B, C, D) -> None:
  if x.ndim != 3:
    raise ValueError(f"ssd_step: x has shape {tuple(x.shape)}, expected 3 dims ({_STEP_SHAPE_LEGEND}).")
  if B.ndim != 3:
    raise ValueError(f"ssd_step: B has shape {tuple(B.shape)}, expected 3 dims ({_STEP_SHAPE_LEGEND}).")
  b, h, p = x.shape
  g, n = B.shape[1:]
  _expect_shape("ssd_step", "state", state, (b, h, p, n), _STEP_SHAPE_LEGEND)
  _expect_shape("ssd_step", "dt", dt, (b, h), _STEP_SHAPE_LEGEND)
  _expect_shape("ssd_step", "A", A, (h,), _STEP_SHAPE_LEGEND)
  _expect_shape("ssd_step", "C", C, (b, g, n), _STEP_SHAPE_LEGEND)
  _check_groups("ssd_step", h, g, _STEP_SHAPE_LEGEND)
  if D is not None:
    _expect_shape("ssd_step", "D", D, (h,), _STEP_SHAPE_LEGEND)
