"""Cached autoregressive generation: one prefill pass over the prompts, then one-token decode steps in a
``lax.while_loop`` that stops once every row has ended (end-of-document token, its own length limit, or its stop
sequence).

Decode steps bypass every scan inside the model (Mamba blocks take a single recurrence step, attention reads its KV
cache), so each new token costs O(1) in sequence length for Mamba and O(length) for attention. Prompts of different
lengths are left-padded to one length and prefilled together: the cache's per-row ``start`` makes every block ignore
the pad prefix exactly (``init_cache``). Tokens are picked by ``sample_tokens``: greedy, or temperature sampling
restricted by top-k and top-p, with settings and PRNG streams per row (so rows of different requests can share a
batch, as ``elastic_jax.serve`` batches them).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from elastic_jax.model import HybridLM, ModelConfig, init_cache

Array = jax.Array


def _prefill_and_decode(config: ModelConfig, params, prompts: Array, cache, keys: Array,
                        pick: Callable[[Array, Array], Array], eos_id: int | Array, *, masks: dict | None = None,
                        limits: Array | None = None, stop: Array | None = None) -> Array:
  """Prefills ``prompts`` [b, t] into ``cache`` in one pass, then decodes one token per step in a ``lax.while_loop``
  that ends as soon as every row is done.

  ``pick(logits [b, V], keys [b]) -> [b] int32`` chooses each token; ``keys`` [n, b] gives each row one key per new
  token. A row is done once it emits ``eos_id``, once it has ``limits[i]`` new tokens (default: n), or once its last
  new tokens equal its stop sequence ``stop[i]`` ([b, S], right-aligned, -1 pads on the left; a row of -1 has
  none). After a row is done its later tokens are ``eos_id``. ``masks`` (``elastic.masks``) run a sub-network of
  the full-width model. Returns [b, n] int32: the new tokens.
  """
  model = HybridLM(config)
  steps, batch = keys.shape[0], prompts.shape[0]
  eos_id = jnp.asarray(eos_id, jnp.int32)
  limits = jnp.full((batch,), steps, jnp.int32) if limits is None else jnp.asarray(limits, jnp.int32)
  stop = jnp.full((batch, 1), -1, jnp.int32) if stop is None else jnp.asarray(stop, jnp.int32)
  has_stop = jnp.any(stop >= 0, axis=1)

  def finished(token: Array, window: Array, count: Array) -> Array:
    stopped = has_stop & jnp.all((stop < 0) | (window == stop), axis=1)
    return (token == eos_id) | (count >= limits) | stopped

  logits, cache = model.apply({"params": params}, prompts, cache=cache, masks=masks)
  first = pick(logits[:, -1], keys[0])
  window = jnp.concatenate([jnp.full((batch, stop.shape[1] - 1), -1, jnp.int32), first[:, None]], axis=1)
  out = jnp.full((batch, steps), eos_id, jnp.int32).at[:, 0].set(first)

  def cond(carry):
    i, _, done, _, _, _ = carry
    return (i < steps) & ~jnp.all(done)

  def body(carry):
    i, token, done, cache, out, window = carry
    logits, cache = model.apply({"params": params}, token[:, None], cache=cache, masks=masks)
    nxt = jnp.where(done, eos_id, pick(logits[:, -1], keys[i]))
    out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
    window = jnp.concatenate([window[:, 1:], nxt[:, None]], axis=1)
    return i + 1, nxt, done | finished(nxt, window, i + 1), cache, out, window

  carry = (jnp.ones((), jnp.int32), first, finished(first, window, jnp.ones((), jnp.int32)), cache, out, window)
  return jax.lax.while_loop(cond, body, carry)[4]


def sample_tokens(logits: Array, keys: Array, temperature: Array, top_k: Array, top_p: Array) -> Array:
  """One token per row: greedy where ``temperature <= 0``, else a draw from softmax(logits / temperature) restricted
  to the ``top_k`` most likely tokens (0: no limit) and then to the smallest set of them whose probability reaches
  ``top_p`` (1: no limit; the most likely token always stays).

  Args:
    logits: [b, V] float.
    keys: [b] PRNG keys, one per row (a row's draw does not depend on the other rows).
    temperature, top_k, top_p: [b] per-row settings (float, int, float).

  Returns:
    [b] int32. Tokens tied with the last kept logit are kept too (the cut is a threshold on the logit value).
  """
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def sample() -> Array:
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    ranked = -jnp.sort(-scaled, axis=-1)  # [b, V], most likely first
    rank = jnp.arange(vocab)[None, :]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)[:, None]
    in_top_k = rank < k
    probs = jax.nn.softmax(jnp.where(in_top_k, ranked, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = in_top_k & ((mass_before < top_p[:, None]) | (rank == 0))
    last = jnp.maximum(jnp.sum(kept, axis=-1), 1) - 1
    threshold = jnp.take_along_axis(ranked, last[:, None], axis=-1)
    filtered = jnp.where(scaled >= threshold, scaled, -jnp.inf)
    sampled = jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)

  # A batch of greedy rows (every evaluation) skips the vocabulary sort at run time.
  return jax.lax.cond(jnp.any(temperature > 0), sample, lambda: greedy)


def _per_row(value: float | Array, batch: int, dtype) -> Array:
  """A scalar or [b] setting as a [b] array."""
  return jnp.broadcast_to(jnp.asarray(value, dtype), (batch,))


def _step_keys(rng: Array | None, batch: int, steps: int) -> Array:
  """[steps, b] keys: from one key (split per row) or from [b] per-row keys (each row's own stream)."""
  if rng is None:
    rng = jax.random.key(0)
  row_keys = jax.random.split(rng, batch) if rng.ndim == 0 else rng
  return jax.vmap(lambda key: jax.random.split(key, steps))(row_keys).swapaxes(0, 1)


def _picker(batch: int, temperature, top_k, top_p) -> Callable[[Array, Array], Array]:
  temperature = _per_row(temperature, batch, jnp.float32)
  top_k, top_p = _per_row(top_k, batch, jnp.int32), _per_row(top_p, batch, jnp.float32)
  return lambda logits, keys: sample_tokens(logits, keys, temperature, top_k, top_p)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens"))
def generate(config: ModelConfig, params, prompts: Array, *, max_new_tokens: int, temperature: float | Array = 0.0,
             rng: Array | None = None, eos_id: int | Array = -1, top_k: int | Array = 0,
             top_p: float | Array = 1.0) -> Array:
  """Continues each prompt by ``max_new_tokens`` tokens.

  Args:
    config: the model's config (static: one compile per config and length).
    params: the model's params.
    prompts: [b, t] int32, all of length t (any batch size b).
    max_new_tokens: tokens to generate per row.
    temperature: 0 for greedy decoding, > 0 to sample from softmax(logits / temperature). Traced: changing it does
      not recompile. A scalar or one value per row, as are ``top_k`` and ``top_p``.
    rng: PRNG key for sampling (split into one stream per row), or [b] keys, one per row; ignored when greedy.
    eos_id: once a row emits it, the row's later tokens are ``eos_id`` too; -1 disables.
    top_k: sample among the k most likely tokens only; 0 disables.
    top_p: nucleus sampling: among the most likely tokens whose probability reaches top_p; 1 disables.

  Returns:
    [b, t + max_new_tokens] int32: the prompts followed by the generated tokens.
  """
  batch, prompt_len = prompts.shape
  cache = init_cache(config, batch, prompt_len + max_new_tokens)
  new = _prefill_and_decode(config, params, prompts, cache, _step_keys(rng, batch, max_new_tokens),
                            _picker(batch, temperature, top_k, top_p), eos_id)
  return jnp.concatenate([prompts.astype(jnp.int32), new], axis=1)


def ragged_continuations(config: ModelConfig, params, prompts: Array, lengths: Array, *, max_new_tokens: int,
                         eos_id: int | Array = -1, temperature: float | Array = 0.0, top_k: int | Array = 0,
                         top_p: float | Array = 1.0, rng: Array | None = None, limits: Array | None = None,
                         stop: Array | None = None, masks: dict | None = None) -> Array:
  """Continuation of prompts of different lengths in one batch, with one compile for every length mix.

  The prompts are left-aligned into a left-padded batch (row i's prompt in its last ``lengths[i]`` columns) and
  prefilled in one pass; the cache's ``start = T - lengths`` makes every block ignore each row's pad prefix exactly
  (masked keys in attention; zero conv inputs and dt = 0 in Mamba), so each row gets what ``generate`` would give
  its prompt alone. Decoding then continues one token per step for the whole batch. Not jitted: ``generate_ragged``
  is this function compiled; callers that build the params inside their own program (``elastic_jax.serve`` slices
  a family member out of the parent's weights) call it under their own ``jax.jit``.

  Args:
    prompts: [b, T] int32, row i's prompt in its first ``lengths[i]`` positions (the rest is ignored).
    lengths: [b] int32 prompt lengths, 1 <= lengths[i] <= T.
    max_new_tokens: tokens generated per row.
    eos_id: a row's tokens after it emits ``eos_id`` are ``eos_id``; -1 disables.
    temperature, top_k, top_p: sampling settings, scalars or one per row (see ``sample_tokens``); the default is
      greedy decoding.
    rng: one key (split per row) or [b] per-row keys for sampling; greedy rows ignore it.
    limits: [b] int32, row i ends after ``limits[i]`` new tokens (default: ``max_new_tokens``).
    stop: [b, S] int32, row i ends once its last new tokens equal ``stop[i]`` (right-aligned, -1 pads on the left;
      a row of -1 has no stop sequence).
    masks: run a sub-network of ``config``'s full-width model (``elastic.masks.choice_masks``), as training does.

  Returns:
    [b, max_new_tokens] int32: each row's generated tokens (its prompt excluded); after a row has ended, ``eos_id``.
    Decoding stops early once every row has ended.
  """
  batch, width = prompts.shape
  start = width - jnp.asarray(lengths, jnp.int32)
  source = jnp.arange(width)[None, :] - start[:, None]  # column j of row i holds prompt token j - start[i]
  # Pad columns get token 0: any real token keeps the pad activations finite (they are masked, never read).
  left_padded = jnp.where(source >= 0, jnp.take_along_axis(prompts.astype(jnp.int32), jnp.maximum(source, 0), 1), 0)
  cache = init_cache(config, batch, width + max_new_tokens, start=start)
  return _prefill_and_decode(config, params, left_padded, cache, _step_keys(rng, batch, max_new_tokens),
                             _picker(batch, temperature, top_k, top_p), eos_id, masks=masks, limits=limits, stop=stop)


generate_ragged = jax.jit(ragged_continuations, static_argnames=("config", "max_new_tokens"))
generate_ragged.__doc__ = "``ragged_continuations`` compiled (one compile per config, width, batch and length).\n\n" + (
    ragged_continuations.__doc__ or "")
