"""Context parallelism: the sequence-mixing ops over a sequence split across the ``"context"`` mesh axis.

Long sequences (the paper's stage 2 trains at 49K tokens) only fit when every activation is split along the
sequence. Pointwise layers (norms, MLPs, projections) need nothing for that; the three ops that mix tokens do, and
each has a per-shard function here, meant to run inside ``jax.shard_map`` with the sequence split over ``axis_name``
into ``C`` contiguous shards of ``l`` tokens (shard ``s`` holds tokens ``s*l ... s*l + l - 1``):

**Causal depthwise conv** (Mamba-2's conv over x, B, C; kernel size ``K``). Output ``t`` reads inputs
``t-K+1 ... t``, so the first ``K-1`` outputs of a shard need the last ``K-1`` inputs of its left neighbour: one
``lax.ppermute`` to the right (the halo exchange); shard 0 receives zeros, the conv's usual left padding. Then the
ordinary conv runs on ``[halo | local inputs]``.

**SSD scan** (per head: ``S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T``, ``y_t = S_t C_t + D x_t``). The recurrence
is linear in the state, so the state after token ``t`` of shard ``s`` splits into what the shard's own tokens add
(starting from zero) plus the decayed state the shard receives:

    S_t = S^local_t + exp(a_t) S^in_s,    a_t = sum of dt_u A over the shard's tokens u <= t,
    y_t = y^local_t + exp(a_t) C_t . S^in_s.

1. Each shard runs the ordinary chunked SSD from a zero state: ``y^local``, its end state ``E_s = S^local_end``, and
   its total log-decay ``a_s = sum over its tokens of dt A`` (per sample and head).
2. The shards all-gather ``(a_j, E_j)``: ``C`` states of [b, h, p, n] and ``C`` decays. The incoming state is the
   sum of the earlier shards' end states, each decayed through the shards between:
   ``S^in_s = sum_{j<s} exp(a_{j+1} + ... + a_{s-1}) E_j``. The exponents are summed over exactly the shards in
   between (never as a difference of two long prefix sums, which would cancel catastrophically at 49K tokens).
3. Each shard adds ``exp(a_t) C_t . S^in_s`` to its outputs: one [l, n] x [n, p] product per head, the same cost as
   the chunked algorithm's own chunk-start term, far cheaper than rerunning the scan from ``S^in``. The true end
   state of shard ``s`` is ``exp(a_s) S^in_s + E_s``; the last shard's is the final state of the sequence.

All-gathering the states costs ``C`` states per device, small next to the activations of ``l`` tokens at the
sequence lengths this is for (a sequential or log-depth ppermute prefix would save that memory at the price of
``C - 1`` or ``log C`` latency-bound rounds).

**Causal attention** (ring attention). Each shard keeps its queries and passes its K/V block around the ring with
``lax.ppermute``: after ``i`` hops shard ``s`` holds the block of shard ``(s - i) mod C``. The diagonal block (its
own) is masked causally; earlier shards' blocks are entirely visible and later shards' blocks entirely in the
future, so the latter are skipped (``lax.cond``) and never computed. Blocks are folded in with the online softmax
in fp32: a running row max ``m``, denominator ``d`` and accumulator ``o``; a new block with scores ``z`` updates
``m' = max(m, max z)``, ``d' = d exp(m - m') + sum exp(z - m')``, ``o' = o exp(m - m') + exp(z - m') V``, and the
output is ``o / d``. The forward pass holds one [l, l] score block at a time, never the [l, C*l] row of scores;
the block steps are rematerialised in the backward pass (``jax.checkpoint``), which keeps only the K/V blocks it
received (the sequence's K/V, small next to the scores) and the softmax state per hop. The work is unbalanced
(shard ``s`` computes ``s + 1`` blocks); a zigzag token order would balance it and is not done.

Gradients need nothing special: ``ppermute`` transposes to the reverse permutation and ``all_gather`` to a
reduce-scatter, so ``jax.grad`` of the sharded ops is the sharded gradient.

The model reaches these through the wrappers at the bottom (``causal_conv``, ``ssd``, ``causal_attention``), which
apply ``jax.shard_map`` over the mesh of the current ``jax.set_mesh`` context: the batch over its data-parallel
axes, the sequence over ``"context"``; other mesh axes (e.g. ``"tensor"`` on heads) stay automatic.
:func:`active_context` says whether that applies (a mesh whose context axis has more than one device).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from elastic_jax.ops import ssd as ssd_ops

Array = jax.Array

# The mesh axis the sequence is split over; every other module reads the name from here.
CONTEXT_AXIS = "context"
# Where the batch goes when no logical-axis rules are active (the rules' "batch" entry wins when they are).
DEFAULT_BATCH_AXES = ("data", "fsdp", "expert")

LocalConv = Callable[[Array, Array, Array, Array], tuple[Array, Array]]


# ----------------------------------------------------------------------------------------------------------------------
# Per-shard functions: run inside ``jax.shard_map`` with the sequence (axis 1) split over ``axis_name``.


def exchange_halo(x: Array, width: int, axis_name: str = CONTEXT_AXIS) -> Array:
  """The ``width`` inputs that precede this shard: the left neighbour's last ``width`` rows, zeros on shard 0.

  Args:
    x: [b, l, *c] this shard's part of the sequence, with ``l >= width``.
    width: Rows to receive (``K - 1`` for a causal conv of kernel size ``K``).
    axis_name: The mesh axis the sequence is split over.

  Returns:
    [b, width, *c], in x.dtype.
  """
  if x.shape[1] < width:
    raise ValueError(f"exchange_halo: each shard holds {x.shape[1]} tokens but the halo needs {width} from the "
                     "left neighbour alone; use fewer context shards or a longer sequence.")
  size = lax.axis_size(axis_name)
  # Shard i sends to i + 1; the last shard sends nothing and shard 0 receives nothing, which ppermute fills with zeros.
  return lax.ppermute(x[:, x.shape[1] - width:], axis_name, [(i, i + 1) for i in range(size - 1)])


def causal_conv_shard(x: Array, kernel: Array, bias: Array, local_conv: LocalConv,
                      axis_name: str = CONTEXT_AXIS) -> Array:
  """Causal depthwise conv of this shard's tokens, reading the left neighbour's last ``K - 1`` inputs.

  Args:
    x: [b, l, *c] this shard's inputs.
    kernel: [K, *c]; bias: [*c].
    local_conv: ``local_conv(x, kernel, bias, history) -> (out, tail)``, the single-device causal conv with
      ``history`` [b, K-1, *c] the inputs preceding ``x`` (``elastic_jax.model.layers.causal_depthwise_conv``).
    axis_name: The mesh axis the sequence is split over.

  Returns:
    [b, l, *c]: the same rows the unsplit conv gives for these tokens.
  """
  history = exchange_halo(x, kernel.shape[0] - 1, axis_name)
  out, _ = local_conv(x, kernel, bias, history)
  return out


def ssd_shard(x: Array, dt: Array, A: Array, B: Array, C: Array, D: Array | None = None, *, chunk_size: int,
              impl: str = "auto", inter_chunk: str = "scan", axis_name: str = CONTEXT_AXIS,
              shard_index: Array | None = None) -> tuple[Array, Array]:
  """The Mamba-2 scan of this shard's tokens, given that the earlier tokens live on the shards to the left.

  Runs the single-device scan from a zero state, exchanges end states and decays with every shard, and adds the
  contribution of the incoming state (see the module docstring for the math).

  Args:
    x: [b, l, h, p]; dt: [b, l, h] (softplus'ed, > 0); A: [h]; B, C: [b, l, g, n]; D: [h] or None — the arguments
      of ``elastic_jax.ops.ssd.ssd`` restricted to this shard's tokens.
    chunk_size, impl, inter_chunk: Passed to ``elastic_jax.ops.ssd.ssd`` for the local scan.
    axis_name: The mesh axis the sequence is split over.
    shard_index: This shard's position on ``axis_name`` ([1] int32, see ``shard_positions``); default
      ``lax.axis_index``.

  Returns:
    (y [b, l, h, p] in x.dtype, end_state [b, h, p, n] fp32): the outputs of these tokens and the true state after
    this shard's last token; on the last shard, the final state of the whole sequence.
  """
  b, l, h, p = x.shape
  g, n = B.shape[2:]
  r = h // g
  # zeros_like(x): the zero start state must vary over the manual mesh axes like the inputs, or shard_map's type
  # check rejects the scan whose carry it starts.
  zero_state = jnp.zeros_like(x, shape=(b, h, p, n), dtype=jnp.float32)
  y_local, end_local = ssd_ops.ssd(x, dt, A, B, C, D, chunk_size=chunk_size, initial_state=zero_state, impl=impl,
                                   inter_chunk=inter_chunk)

  log_decay = dt.astype(jnp.float32) * A.astype(jnp.float32)  # [b, l, h]
  log_decay_to = jnp.cumsum(log_decay, axis=1)  # [b, l, h]: a_t, from the shard's start through token t
  shard_log_decay = log_decay_to[:, -1]  # [b, h]: a_s

  all_log_decays = lax.all_gather(shard_log_decay, axis_name)  # [C, b, h]
  all_end_states = lax.all_gather(end_local, axis_name)  # [C, b, h, p, n]
  size = all_log_decays.shape[0]
  shard = _position(axis_name, shard_index)
  source = jnp.arange(size)[:, None]  # j: the shard whose end state is carried
  between = jnp.arange(size)[None, :]  # i: a shard it is carried through
  in_between = (between > source) & (between < shard)  # [C(j), C(i)]
  carried_log_decay = jnp.einsum("ji,ibh->jbh", in_between.astype(jnp.float32), all_log_decays,
                                 precision=lax.Precision.HIGHEST)
  # Mask before exp, as in the chunked SSD: for j >= s there is no state to carry.
  weights = jnp.exp(jnp.where((source < shard)[:, :, None], carried_log_decay, -jnp.inf))  # [C, b, h]
  # A weighted sum over C states, elementwise in fp32 (no reduced-precision matmul on accelerators).
  incoming = jnp.sum(weights[..., None, None] * all_end_states, axis=0)  # [b, h, p, n]

  incoming_by_group = incoming.reshape(b, g, r, p, n)
  y_incoming = jnp.einsum("blgn,bgrpn->blgrp", C.astype(jnp.float32), incoming_by_group,
                          precision=lax.Precision.HIGHEST).reshape(b, l, h, p)
  y = y_local.astype(jnp.float32) + jnp.exp(log_decay_to)[..., None] * y_incoming
  end_state = jnp.exp(shard_log_decay)[..., None, None] * incoming + end_local
  return y.astype(x.dtype), end_state


def _position(axis_name: str, shard_index: Array | None) -> Array:
  """This shard's position on ``axis_name``: the given [1] index, else ``lax.axis_index``."""
  return lax.axis_index(axis_name) if shard_index is None else shard_index[0]


def shard_positions(size: int) -> Array:
  """[size] int32 positions 0 ... size-1, to pass into a shard_map split over the context axis: each shard reads its
  own position as data. ``lax.axis_index`` compiles to a PartitionId instruction, which XLA's SPMD partitioner
  refuses (TPU) when the shard_map leaves other mesh axes to the compiler, as ours do."""
  return jnp.arange(size, dtype=jnp.int32)


def ring_attention_shard(q: Array, k: Array, v: Array, axis_name: str = CONTEXT_AXIS,
                         shard_index: Array | None = None) -> Array:
  """Causal GQA attention of this shard's queries over the whole sequence, K/V blocks passed around a ring.

  Same semantics as ``elastic_jax.ops.attention.causal_gqa`` with positions ``0 ... C*l - 1`` (NoPE: only causality
  depends on positions). See the module docstring for the online softmax.

  Args:
    q: [b, l, Hq, hd] this shard's queries; k, v: [b, l, Hkv, hd] this shard's keys and values, Hq a multiple of
      Hkv (query head h reads KV head h // (Hq/Hkv)).
    axis_name: The mesh axis the sequence is split over.

  Returns:
    [b, l, Hq, hd] in q.dtype.
  """
  b, l, hq, hd = q.shape
  hkv = k.shape[2]
  queries = q.reshape(b, l, hkv, hq // hkv, hd)
  size = lax.axis_size(axis_name)
  shard = _position(axis_name, shard_index)

  def block_scores(keys):  # [b, Hkv, r, l(query), l(key)] fp32
    return jnp.einsum("blkrd,bskd->bkrls", queries, keys, preferred_element_type=jnp.float32) * (hd ** -0.5)

  def weighted_values(probs, values):  # [b, Hkv, r, l, hd] fp32
    return jnp.einsum("bkrls,bskd->bkrld", probs.astype(values.dtype), values, preferred_element_type=jnp.float32)

  # Both block steps are rematerialised in the backward pass: autodiff would otherwise keep every block's [l, l]
  # probabilities, i.e. the whole [l, C*l] score matrix per device, the memory that splitting the sequence saves.
  @jax.checkpoint
  def diagonal_block(keys, values):
    causal = jnp.tril(jnp.ones((l, l), dtype=bool))
    scores = jnp.where(causal, block_scores(keys), jnp.finfo(jnp.float32).min)
    row_max = jnp.max(scores, axis=-1)
    probs = jnp.exp(scores - row_max[..., None])
    return row_max, jnp.sum(probs, axis=-1), weighted_values(probs, values)

  @jax.checkpoint
  def fold_in(keys, values, row_max, denominator, accumulator):
    scores = block_scores(keys)
    new_max = jnp.maximum(row_max, jnp.max(scores, axis=-1))
    rescale = jnp.exp(row_max - new_max)
    probs = jnp.exp(scores - new_max[..., None])
    return (new_max, denominator * rescale + jnp.sum(probs, axis=-1),
            accumulator * rescale[..., None] + weighted_values(probs, values))

  # The diagonal block first: every query sees at least itself, so the running max is finite from here on.
  row_max, denominator, accumulator = diagonal_block(k, v)
  ring = [(i, (i + 1) % size) for i in range(size)]

  def hop(carry, hops):
    keys, values, *softmax_state = carry
    keys, values = lax.ppermute(keys, axis_name, ring), lax.ppermute(values, axis_name, ring)
    source = (shard - hops) % size
    # A block from a later shard lies entirely in the future of every local query: skip it. The collectives stay
    # outside the cond, so every device takes part in every hop.
    softmax_state = lax.cond(source < shard, lambda state: fold_in(keys, values, *state), lambda state: state,
                             tuple(softmax_state))
    return (keys, values, *softmax_state), None

  (_, _, row_max, denominator, accumulator), _ = lax.scan(
      hop, (k, v, row_max, denominator, accumulator), jnp.arange(1, size))
  out = accumulator / denominator[..., None]  # [b, Hkv, r, l, hd]
  return jnp.moveaxis(out, 3, 1).reshape(b, l, hq, hd).astype(q.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Wrappers on global arrays: shard_map over the active mesh.


@dataclasses.dataclass(frozen=True)
class ContextParallelism:
  """How sequence-mixing ops split their inputs: the mesh, the axes the batch is split over, and the context axis.

  Attributes:
    mesh: The active (abstract) mesh.
    batch_axes: Mesh axes the batch dimension is split over (the data-parallel axes; may be empty).
    size: Devices on the context axis (> 1; 1 in a ``active_token_split`` that keeps each sequence whole).
  """

  mesh: jax.sharding.AbstractMesh
  batch_axes: tuple[str, ...]
  size: int

  @property
  def axes(self) -> tuple[str, ...]:
    """The mesh axes the shards run over: the batch axes, then the context axis where it splits."""
    return (*self.batch_axes, CONTEXT_AXIS) if self.size > 1 else self.batch_axes

  def sequence_spec(self, ndim: int) -> PartitionSpec:
    """[b, l, ...] arrays: batch over the data-parallel axes, sequence over the context axis."""
    return PartitionSpec(self.batch_axes or None, CONTEXT_AXIS if self.size > 1 else None, *([None] * (ndim - 2)))

  def shard_map(self, fn: Callable, in_specs, out_specs) -> Callable:
    """``jax.shard_map(fn)`` over the batch and context axes only.

    The other mesh axes (e.g. "tensor" on heads) stay with the compiler, so the per-shard functions see every head
    whatever the tensor-parallel layout, and parameters split over them need no gathering first.
    """
    return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, axis_names=frozenset(self.axes))


def active_context(batch: int, length: int, min_shard_length: int = 1) -> ContextParallelism | None:
  """The context parallelism of the current ``jax.set_mesh`` mesh for a [batch, length] sequence, or None.

  None (the caller runs its single-device path, with the same result) when there is no mesh, its context axis is
  absent or of size 1, or the sequence does not split into equal shards of at least ``min_shard_length`` tokens. The
  last case includes the one-token sequences that parameter init traces under the training mesh; a sequence long
  enough to split but not a multiple of the context size also warns, since it then takes the memory of the whole
  sequence on every device.

  The batch goes over the mesh axes the active logical-axis rules give ``"batch"`` (``DEFAULT_BATCH_AXES`` without
  rules), keeping those of size > 1; a batch that does not divide over them is kept whole on each device.

  Args:
    batch: The batch size of the sequences about to be mixed.
    length: Their length.
    min_shard_length: Fewest tokens a shard may hold (a causal conv's halo comes from one neighbour: K - 1).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or CONTEXT_AXIS not in mesh.axis_names or mesh.shape[CONTEXT_AXIS] <= 1:
    return None
  if CONTEXT_AXIS in mesh.manual_axes:  # already inside a shard_map over the context axis: the caller splits
    return None
  size = mesh.shape[CONTEXT_AXIS]
  if length % size or length // size < min_shard_length:
    if length >= size * min_shard_length:
      warnings.warn(f"context parallelism: sequence length {length} is not a multiple of the mesh's "
                    f"{CONTEXT_AXIS!r} axis size {size}, so every device mixes the whole sequence; pad the sequence "
                    "to a multiple to split it.", stacklevel=2)
    return None
  return ContextParallelism(mesh, _batch_axes(mesh, batch), size)


def _batch_axes(mesh: jax.sharding.AbstractMesh, batch: int) -> tuple[str, ...]:
  """The mesh axes of size > 1 the active rules give ``"batch"`` (not the context axis, none already manual), or ()
  when a batch of ``batch`` rows does not divide over them."""
  rule = nn.logical_to_mesh_axes(("batch",))[0]
  if rule is None:
    rule = DEFAULT_BATCH_AXES
  rule = (rule,) if isinstance(rule, str) else tuple(rule)
  batch_axes = tuple(axis for axis in rule if axis in mesh.axis_names and axis != CONTEXT_AXIS
                     and axis not in mesh.manual_axes and mesh.shape[axis] > 1)
  return () if batch % math.prod(mesh.shape[axis] for axis in batch_axes) else batch_axes


def active_token_split(batch: int, length: int) -> ContextParallelism | None:
  """How per-token work whose inner shapes follow the number of tokens (an MoE block's sort of its tokens by expert)
  splits a [batch, length] sequence batch over the current ``jax.set_mesh`` mesh: the batch over its data-parallel
  axes (as ``active_context``), each sequence over the context axis where that splits it evenly (``size`` 1
  otherwise). None without a mesh or when neither splits: the caller's single-device path.

  Each shard then works on its own tokens only; left to the compiler, such data-dependent work (a global sort, a
  gather by sorted position) would run whole on every device.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  context = CONTEXT_AXIS in mesh.axis_names and CONTEXT_AXIS not in mesh.manual_axes
  size = mesh.shape[CONTEXT_AXIS] if context else 1
  size = size if length % size == 0 else 1
  split = ContextParallelism(mesh, _batch_axes(mesh, batch), size)
  return split if split.axes else None


def causal_conv(x: Array, kernel: Array, bias: Array, local_conv: LocalConv, context: ContextParallelism) -> Array:
  """``causal_conv_shard`` on a global [b, L, *c] array split by ``context``; kernel and bias whole."""
  spec = context.sequence_spec(x.ndim)
  fn = lambda x, kernel, bias: causal_conv_shard(x, kernel, bias, local_conv)
  return context.shard_map(fn, in_specs=(spec, PartitionSpec(), PartitionSpec()), out_specs=spec)(x, kernel, bias)


def ssd(x: Array, dt: Array, A: Array, B: Array, C: Array, D: Array | None, *, context: ContextParallelism,
        chunk_size: int, impl: str = "auto", inter_chunk: str = "scan") -> tuple[Array, Array]:
  """``elastic_jax.ops.ssd.ssd`` (zero initial state) with the sequence split by ``context``.

  Returns:
    (y [b, L, h, p], final_state [b, h, p, n] fp32), as the single-device call.
  """
  seq = context.sequence_spec
  whole = PartitionSpec()

  def shard_fn(position, x, dt, A, B, C, *maybe_D):
    y, end_state = ssd_shard(x, dt, A, B, C, *maybe_D, chunk_size=chunk_size, impl=impl, inter_chunk=inter_chunk,
                             shard_index=position)
    return y, end_state[None]  # stacked over shards: [C, b, h, p, n] globally, the last one the final state

  args = (shard_positions(context.size), x, dt, A, B, C)
  in_specs = (PartitionSpec(CONTEXT_AXIS), seq(4), seq(3), whole, seq(4), seq(4))
  if D is not None:
    args, in_specs = (*args, D), (*in_specs, whole)
  end_states_spec = PartitionSpec(CONTEXT_AXIS, context.batch_axes or None)
  y, end_states = context.shard_map(shard_fn, in_specs=in_specs, out_specs=(seq(4), end_states_spec))(*args)
  return y, end_states[-1]


def causal_attention(q: Array, k: Array, v: Array, context: ContextParallelism) -> Array:
  """``elastic_jax.ops.attention.causal_gqa`` over a whole sequence (positions 0 ... L-1), split by ``context``."""
  spec = context.sequence_spec(4)
  fn = lambda position, q, k, v: ring_attention_shard(q, k, v, shard_index=position)
  return context.shard_map(fn, in_specs=(PartitionSpec(CONTEXT_AXIS), spec, spec, spec), out_specs=spec)(
      shard_positions(context.size), q, k, v)
