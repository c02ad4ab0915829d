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
