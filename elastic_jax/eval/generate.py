"""Cached autoregressive generation: one prefill pass over the prompts, then one-token decode steps in ``lax.scan``.

Decode steps bypass every scan inside the model (Mamba blocks take a single recurrence step, attention reads its KV
cache), so each new token costs O(1) in sequence length for Mamba and O(length) for attention. Prompts of different
lengths are left-padded to one length and prefilled together: the cache's per-row ``start`` makes every block ignore
the pad prefix exactly (``init_cache``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from elastic_jax.model import HybridLM, ModelConfig, init_cache

Array = jax.Array


def _prefill_and_decode(config: ModelConfig, params, prompts: Array, cache, keys: Array,
                        pick: Callable[[Array, Array], Array], eos_id: int | Array) -> Array:
  """Prefills ``prompts`` [b, t] into ``cache`` in one pass, then decodes one token per step in ``lax.scan``.

  ``pick(logits [b, V], key) -> [b] int32`` chooses each token; ``keys`` [n] gives one key per new token. Once a row
  emits ``eos_id`` its later tokens are ``eos_id`` too. Returns [b, n] int32: the new tokens.
  """
  model = HybridLM(config)
  logits, cache = model.apply({"params": params}, prompts, cache=cache)
  first = pick(logits[:, -1], keys[0])

  def step(carry, key):
    token, done, cache = carry
    logits, cache = model.apply({"params": params}, token[:, None], cache=cache)
    nxt = jnp.where(done, token, pick(logits[:, -1], key))
    return (nxt, done | (nxt == eos_id), cache), nxt

  _, rest = jax.lax.scan(step, (first, first == eos_id, cache), keys[1:])
  return jnp.concatenate([first[:, None], rest.T], axis=1)


def _greedy(logits: Array, key: Array) -> Array:
  del key
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens"))
def generate(config: ModelConfig, params, prompts: Array, *, max_new_tokens: int, temperature: float | Array = 0.0,
             rng: Array | None = None, eos_id: int | Array = -1) -> Array:
  """Continues each prompt by ``max_new_tokens`` tokens.

  Args:
    config: the model's config (static: one compile per config and length).
    params: the model's params.
    prompts: [b, t] int32, all of length t (any batch size b).
    max_new_tokens: tokens to generate per row.
    temperature: 0 for greedy decoding, > 0 to sample from softmax(logits / temperature). Traced: changing it does
      not recompile.
    rng: PRNG key for sampling (required when temperature > 0; ignored when greedy).
    eos_id: once a row emits it, the row's later tokens are ``eos_id`` too; -1 disables.

  Returns:
    [b, t + max_new_tokens] int32: the prompts followed by the generated tokens.
  """
  batch, prompt_len = prompts.shape
  if rng is None:
    rng = jax.random.key(0)
  temperature = jnp.asarray(temperature, jnp.float32)

  def pick(logits: Array, key: Array) -> Array:
    sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6), axis=-1)
    return jnp.where(temperature > 0, sampled, _greedy(logits, key)).astype(jnp.int32)

  cache = init_cache(config, batch, prompt_len + max_new_tokens)
  new = _prefill_and_decode(config, params, prompts, cache, jax.random.split(rng, max_new_tokens), pick, eos_id)
  return jnp.concatenate([prompts.astype(jnp.int32), new], axis=1)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens"))
def generate_ragged(config: ModelConfig, params, prompts: Array, lengths: Array, *, max_new_tokens: int,
                    eos_id: int | Array = -1) -> Array:
  """Greedy continuation of prompts of different lengths in one batch, with one compile for every length mix.

  The prompts are left-aligned into a left-padded batch (row i's prompt in its last ``lengths[i]`` columns) and
  prefilled in one pass; the cache's ``start = T - lengths`` makes every block ignore each row's pad prefix exactly
  (masked keys in attention; zero conv inputs and dt = 0 in Mamba), so each row gets what ``generate`` would give
  its prompt alone. Decoding then continues one token per step for the whole batch.

  Args:
    prompts: [b, T] int32, row i's prompt in its first ``lengths[i]`` positions (the rest is ignored).
    lengths: [b] int32 prompt lengths, 1 <= lengths[i] <= T.
    max_new_tokens: tokens generated per row.
    eos_id: a row's tokens after it emits ``eos_id`` are ``eos_id``; -1 disables.

  Returns:
    [b, max_new_tokens] int32: each row's generated tokens (its prompt excluded).
  """
  batch, width = prompts.shape
  start = width - jnp.asarray(lengths, jnp.int32)
  source = jnp.arange(width)[None, :] - start[:, None]  # column j of row i holds prompt token j - start[i]
  # Pad columns get token 0: any real token keeps the pad activations finite (they are masked, never read).
  left_padded = jnp.where(source >= 0, jnp.take_along_axis(prompts.astype(jnp.int32), jnp.maximum(source, 0), 1), 0)
  cache = init_cache(config, batch, width + max_new_tokens, start=start)
  keys = jax.random.split(jax.random.key(0), max_new_tokens)  # unused by greedy picks; one per step for the scan
  return _prefill_and_decode(config, params, left_padded, cache, keys, _greedy, eos_id)
