"""Wall time of ragged-batch generation: one-pass prefill of left-padded prompts against token-by-token prompt reading.

``generate_ragged`` prefills prompts of different lengths in one forward pass (left-padded; the cache's per-row
``start`` masks the pad prefix), then decodes one token per step. Its earlier form, kept here as the baseline, fed
every prompt token through a one-token decode step. Both are one compile for every length mix and give the same
tokens; the ratio is baseline time / one-pass time (higher is faster), timed back to back in each round.

Usage:
  python benchmarks/generate.py [--batch 8] [--width 256] [--min-length 192] [--new-tokens 32] [--reps 7]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from elastic_jax.eval.generate import generate_ragged
from elastic_jax.model import HybridLM, ModelConfig, init_cache, init_params
from timing import tiny_config  # pylint: disable=wrong-import-order

Array = jax.Array


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens"))
def token_by_token_ragged(config: ModelConfig, params, prompts: Array, lengths: Array, *, max_new_tokens: int,
                          eos_id: int | Array = -1) -> Array:
  """The baseline: every step is a one-token decode step; row i reads its own prompt token while
  ``t < lengths[i]`` and its previous output afterwards (same arguments and result as ``generate_ragged``)."""
  model = HybridLM(config)
  batch, width = prompts.shape
  total = width + max_new_tokens
  cache = init_cache(config, batch, total)
  lengths = jnp.asarray(lengths, jnp.int32)
  padded = jnp.pad(prompts.astype(jnp.int32), ((0, 0), (0, max_new_tokens)))

  def step(carry, t):
    token, done, cache = carry
    logits, cache = model.apply({"params": params}, token[:, None], cache=cache)
    predicted = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    generating = t + 1 >= lengths
    out = jnp.where(done, token, predicted)
    new_done = done | (generating & (out == eos_id))
    next_token = jnp.where(generating, out, padded[:, jnp.minimum(t + 1, total - 1)])
    return (next_token, jnp.where(generating, new_done, done), cache), jnp.where(generating, out, -1)

  _, outs = jax.lax.scan(step, (padded[:, 0], jnp.zeros((batch,), bool), cache), jnp.arange(total - 1))
  columns = (lengths - 1)[:, None] + jnp.arange(max_new_tokens)[None, :]
  return jnp.take_along_axis(outs.T, jnp.minimum(columns, total - 2), axis=1)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--width", type=int, default=256, help="T: the longest prompt (the padded width)")
  parser.add_argument("--min-length", type=int, default=192, help="prompt lengths are uniform in [this, width]")
  parser.add_argument("--new-tokens", type=int, default=32)
  parser.add_argument("--reps", type=int, default=7)
  args = parser.parse_args()
  # Other processes sharing the CPU slow both columns alike; the load average says how much to trust the times.
  print(f"jax {jax.__version__}, devices {jax.devices()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f} at start")

  config = tiny_config()
  params = init_params(config, jax.random.key(0))
  rng = np.random.default_rng(0)
  lengths = rng.integers(args.min_length, args.width + 1, args.batch)
  lengths[0] = args.width
  prompts = jnp.asarray(rng.integers(0, config.vocab_size, (args.batch, args.width)), jnp.int32)
  lengths = jnp.asarray(lengths, jnp.int32)
  tokens = int(lengths.sum()) + args.batch * args.new_tokens  # prompt tokens read + tokens generated
  print(f"tiny parent ({config.pattern}, d={config.hidden_size}, V={config.vocab_size}, chunk {config.chunk_size}), "
        f"fp32; batch {args.batch}, prompt lengths {int(lengths.min())}..{int(lengths.max())} (T={args.width}), "
        f"{args.new_tokens} new tokens per row; tokens/s counts prompt + generated tokens ({tokens} per call)")

  runs = {"token-by-token prompts": token_by_token_ragged, "one-pass prefill": generate_ragged}
  calls = {name: functools.partial(fn, config, params, prompts, lengths, max_new_tokens=args.new_tokens)
           for name, fn in runs.items()}
  outputs = {name: np.asarray(call()) for name, call in calls.items()}  # also compiles
  agree = float(np.mean(outputs["token-by-token prompts"] == outputs["one-pass prefill"]))
  times: dict[str, list[float]] = {name: [] for name in calls}
  for _ in range(args.reps):  # back to back in each round: load changes hit both alike
    for name, call in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(call())
      times[name].append(time.perf_counter() - start)
  ratios = [old / new for old, new in zip(times["token-by-token prompts"], times["one-pass prefill"])]
  for name, seconds in times.items():
    median = statistics.median(seconds)
    print(f"{name:>24}: {1e3 * median:9.1f} ms per call  {tokens / median:10,.0f} tokens/s")
  print(f"one-pass prefill vs token-by-token: {statistics.median(ratios):.2f}x faster (median of {args.reps} paired "
        f"rounds); same tokens: {100 * agree:.1f}%")


if __name__ == "__main__":
  main()
