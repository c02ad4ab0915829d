"""Forward + backward wall time of the SSD implementations on the default JAX backend.

Compares ``ssd(impl="chunked")`` with either inter-chunk state passing to the token-by-token oracle, as ratios
(oracle time / implementation time; higher is faster). With ``--model``, also prints the hybrid LM's forward
throughput.

Usage:
  python benchmarks/ssd.py [--lengths 512 2048 8192] [--reps 5] [--model]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from elastic_jax.ops.ssd import ssd

IMPLEMENTATIONS = {  # name -> ssd keyword arguments
    "chunked(scan)": {"impl": "chunked", "inter_chunk": "scan"},
    "chunked(associative)": {"impl": "chunked", "inter_chunk": "associative"},
    "oracle": {"impl": "oracle"},
}


def median_seconds(fn: Callable[[], object], reps: int) -> float:
  """Median wall time of ``fn()`` over ``reps`` runs, after one warm-up run that also compiles."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def ssd_inputs(b: int, l: int, h: int, p: int, g: int, n: int, seed: int = 0) -> dict[str, jax.Array]:
  """Inputs with the magnitudes of a trained Mamba-2 layer (dt in [1e-3, 0.1], A in [-16, -1])."""
  rng = np.random.default_rng(seed)
  return {
      "x": jnp.asarray(rng.standard_normal((b, l, h, p)), jnp.float32),
      "dt": jnp.asarray(np.exp(rng.uniform(np.log(1e-3), np.log(0.1), (b, l, h))), jnp.float32),
      "A": jnp.asarray(-rng.uniform(1.0, 16.0, (h,)), jnp.float32),
      "B": jnp.asarray(rng.standard_normal((b, l, g, n)), jnp.float32),
      "C": jnp.asarray(rng.standard_normal((b, l, g, n)), jnp.float32),
      "D": jnp.asarray(rng.standard_normal((h,)), jnp.float32),
      "initial_state": jnp.zeros((b, h, p, n), jnp.float32),
  }


def forward_backward(chunk_size: int, options: dict[str, str]) -> Callable:
  """A jitted function returning the gradients of sum(y) + sum(final_state) w.r.t. every input."""

  def loss(inputs):
    y, final_state = ssd(**inputs, chunk_size=chunk_size, **options)
    return jnp.sum(y) + jnp.sum(final_state)

  return jax.jit(jax.grad(loss))


def benchmark_ssd(lengths: list[int], reps: int, b: int, h: int, p: int, g: int, n: int, chunk_size: int) -> None:
  print(f"SSD forward+backward, {jax.default_backend()} backend, fp32, b={b} h={h} p={p} g={g} n={n} "
        f"chunk={chunk_size}, median of {reps} reps")
  header = f"{'L':>6}  " + "  ".join(f"{name:>24}" for name in IMPLEMENTATIONS)
  print(header)
  for l in lengths:
    inputs = ssd_inputs(b, l, h, p, g, n)
    seconds = {name: median_seconds(functools.partial(forward_backward(chunk_size, options), inputs), reps)
               for name, options in IMPLEMENTATIONS.items()}
    cells = [f"{1e3 * seconds[name]:9.1f} ms ({seconds['oracle'] / seconds[name]:5.1f}x)" for name in IMPLEMENTATIONS]
    print(f"{l:>6}  " + "  ".join(f"{cell:>24}" for cell in cells), flush=True)


# The tiny parent of configs/tiny.py: every block kind, two Mamba groups, chunk smaller than the sequence.
TINY_MODEL = dict(pattern="M-M*M-", vocab_size=256, hidden_size=128, intermediate_size=384, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, mamba_num_heads=8, mamba_head_dim=32, n_groups=2,
                  ssm_state_size=32, conv_kernel=4, chunk_size=32, dtype="float32", param_dtype="float32")


def benchmark_model(batch: int, lengths: list[int], reps: int) -> None:
  """Forward tokens/s of the hybrid LM with the chunked and the oracle SSD."""
  # Imported here so that the SSD benchmark runs on its own.
  from elastic_jax.model import HybridLM, ModelConfig

  print(f"\nHybridLM forward (logits), {jax.default_backend()} backend, median of {reps} reps: "
        + ", ".join(f"{key}={value}" for key, value in TINY_MODEL.items()))
  print(f"{'batch x L':>12}  " + "  ".join(f"{'ssd_impl=' + impl:>24}" for impl in ("chunked", "oracle")))
  for l in lengths:
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, TINY_MODEL["vocab_size"], (batch, l)), jnp.int32)
    cells = []
    for ssd_impl in ("chunked", "oracle"):
      model = HybridLM(ModelConfig(**TINY_MODEL, ssd_impl=ssd_impl))
      params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
      forward = jax.jit(lambda params, tokens, model=model: model.apply({"params": params}, tokens))
      seconds = median_seconds(functools.partial(forward, params, tokens), reps)
      cells.append(f"{batch * l / seconds:12,.0f} tokens/s")
    print(f"{f'{batch} x {l}':>12}  " + "  ".join(f"{cell:>24}" for cell in cells), flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--head-dim", type=int, default=64)
  parser.add_argument("--groups", type=int, default=1)
  parser.add_argument("--state", type=int, default=64)
  parser.add_argument("--chunk", type=int, default=128)
  parser.add_argument("--model", action="store_true", help="also time the hybrid LM's forward pass")
  parser.add_argument("--model-batch", type=int, default=8)
  parser.add_argument("--model-lengths", type=int, nargs="+", default=[256, 1024])
  args = parser.parse_args()
  # Other processes sharing the CPU slow every column alike; the load average says how much to trust the numbers.
  print(f"jax {jax.__version__}, devices {jax.devices()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f} at start")
  benchmark_ssd(args.lengths, args.reps, args.batch, args.heads, args.head_dim, args.groups, args.state, args.chunk)
  if args.model:
    benchmark_model(args.model_batch, args.model_lengths, args.reps)


if __name__ == "__main__":
  main()
