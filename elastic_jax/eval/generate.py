"""Cached autoregressive generation: one prefill pass over the prompt, then one-token decode steps in ``lax.scan``.

Decode steps bypass every scan inside the model (Mamba blocks take a single recurrence step, attention reads its KV
cache), so each new token costs O(1) in sequence length for Mamba and O(length) for attention.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from elastic_jax.model import HybridLM, ModelConfig, init_cache

Array = jax.Array


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
  model = HybridLM(config)
  batch, prompt_len = prompts.shape
  if rng is None:
    rng = jax.random.key(0)
  temperature = jnp.asarray(temperature, jnp.float32)
  cache = init_cache(config, batch, prompt_len + max_new_tokens)

  def pick(logits: Array, key: Array) -> Array:
    greedy = jnp.argmax(logits, axis=-1)
    sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6), axis=-1)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)

  logits, cache = model.apply({"params": params}, prompts, cache=cache)
  keys = jax.random.split(rng, max_new_tokens)
  first = pick(logits[:, -1], keys[0])
  done = first == eos_id

  def step(carry, key):
    token, done, cache = carry
    logits, cache = model.apply({"params": params}, token[:, None], cache=cache)
    nxt = jnp.where(done, token, pick(logits[:, -1], key))
    return (nxt, done | (nxt == eos_id), cache), nxt

  _, rest = jax.lax.scan(step, (first, done, cache), keys[1:])
  return jnp.concatenate([prompts.astype(jnp.int32), first[:, None], rest.T], axis=1)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens"))
def generate_ragged(config: ModelConfig, params, prompts: Array, lengths: Array, *, max_new_tokens: int,
                    eos_id: int | Array = -1) -> Array:
  """Greedy continuation of prompts of different lengths in one batch, with one compile for every length mix.

  Padding a prompt would feed pad tokens into the Mamba state, so instead every step is a one-token decode step:
  row i reads its own prompt token while ``t < lengths[i]`` and its previous output afterwards. Each row thus sees
  exactly its prompt, then its own greedy tokens — what ``generate`` would give it alone.

  Args:
    prompts: [b, T] int32, row i's prompt in its first ``lengths[i]`` positions (the rest is ignored).
    lengths: [b] int32 prompt lengths, 1 <= lengths[i] <= T.
    max_new_tokens: tokens generated per row.
    eos_id: a row's tokens after it emits ``eos_id`` are ``eos_id``; -1 disables.

  Returns:
    [b, max_new_tokens] int32: each row's generated tokens (its prompt excluded).
  """
  model = HybridLM(config)
  batch, width = prompts.shape
  total = width + max_new_tokens
  cache = init_cache(config, batch, total)
  lengths = jnp.asarray(lengths, jnp.int32)
  padded = jnp.pad(prompts.astype(jnp.int32), ((0, 0), (0, max_new_tokens)))

  def step(carry, t):
    token, done, cache = carry  # token: what row i feeds at step t
    logits, cache = model.apply({"params": params}, token[:, None], cache=cache)
    predicted = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    generating = t + 1 >= lengths  # the output at step t is a new token once the whole prompt has been read
    out = jnp.where(done, token, predicted)
    new_done = done | (generating & (out == eos_id))
    next_token = jnp.where(generating, out, padded[:, jnp.minimum(t + 1, total - 1)])
    return (next_token, jnp.where(generating, new_done, done), cache), jnp.where(generating, out, -1)

  first = padded[:, 0]
  _, outs = jax.lax.scan(step, (first, jnp.zeros((batch,), bool), cache), jnp.arange(total - 1))
  outs = outs.T  # [b, total - 1]; row i's generated tokens start at column lengths[i] - 1
  columns = (lengths - 1)[:, None] + jnp.arange(max_new_tokens)[None, :]
  return jnp.take_along_axis(outs, jnp.minimum(columns, total - 2), axis=1)
