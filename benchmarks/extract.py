"""Extraction time and memory, and importance-estimation throughput against plain forward throughput.

1. Extraction (``elastic_jax.elastic.extract``) of a sub-network from numpy parameters (what ``hf.load`` returns):
   wall time (median of reps) and peak of new host allocations during the call (``tracemalloc``, which numpy
   reports to), next to the child's own size; and the same extraction traced abstractly on ``jax.ShapeDtypeStruct``
   leaves with ``jax.eval_shape`` (no arrays at all). Two parents: the tiny model of ``configs/tiny.py`` and a
   ~1.2B-parameter Nemotron-H-shaped config (real fp32 arrays, ~4.8 GB, unless ``--abstract-only``).
2. Importance statistics (``estimate_importance(..., depth=False)``: one forward per batch with the activation
   statistics sown and accumulated) vs the plain jitted forward, tokens/s on the same batches, tiny parent.
   The iterative depth ranking is timed separately: it costs L + L(L+1)/2 forwards per batch by construction.

Usage:
  python benchmarks/extract.py [--reps 3] [--abstract-only] [--batch 8] [--length 256] [--batches 4]
"""

from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np

from timing import tiny_config, wall_seconds  # pylint: disable=wrong-import-order

from elastic_jax.elastic.extract import extract, extract_params
from elastic_jax.elastic.param_count import param_count
from elastic_jax.elastic.space import Choice
from elastic_jax.model import HybridLM, ModelConfig, param_shapes

# ~1.2B parameters with Nemotron-H's proportions: 22 blocks (10 Mamba, 10 MLP, 2 attention), vocab 131072.
ONE_B = ModelConfig(pattern="M-M-M-M*-M-M-M-M*-M-M-", vocab_size=131072, hidden_size=2048, intermediate_size=8192,
                    num_attention_heads=16, num_key_value_heads=4, head_dim=128, mamba_num_heads=64,
                    mamba_head_dim=64, n_groups=8, ssm_state_size=128, conv_kernel=4, chunk_size=128)


def random_numpy_params(config: ModelConfig, seed: int = 0) -> dict:
  """fp32 numpy arrays of the parameter tree's shapes (values do not matter for timing slices)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape, dtype=np.float32), param_shapes(config))


def half_choice(config: ModelConfig) -> tuple[Choice, list[int]]:
  """About half of every width axis and 3/4 of the blocks (grouped axes rounded to whole groups)."""
  def half(value: int, step: int = 1) -> int:
    return max(step, value // 2 // step * step)
  choice = Choice.homogeneous(config, hidden=half(config.hidden_size), mlp=half(config.intermediate_size),
                              attention_heads=half(config.num_attention_heads, config.num_key_value_heads),
                              mamba_heads=half(config.mamba_num_heads, config.n_groups),
                              mamba_head_dim=half(config.mamba_head_dim), depth=max(1, 3 * config.num_layers // 4))
  order = [int(i) for i in np.random.default_rng(0).permutation(config.num_layers)]
  return choice, order


def gigabytes(n_bytes: float) -> str:
  return f"{n_bytes / 1e9:.3f} GB" if n_bytes >= 1e8 else f"{n_bytes / 1e6:.2f} MB"


def benchmark_extraction(name: str, config: ModelConfig, reps: int, real: bool) -> None:
  choice, order = half_choice(config)
  shapes = param_shapes(config)
  abstract_fn = lambda: jax.eval_shape(lambda p: extract_params(config, p, choice, order), shapes)
  start = time.perf_counter()
  abstract = abstract_fn()
  cold_s = time.perf_counter() - start
  warm_s = wall_seconds(abstract_fn, reps, warmup=False)
  child_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(abstract))
  parent_n = param_count(config)
  child_n = sum(leaf.size for leaf in jax.tree.leaves(abstract))
  print(f"\n{name}: parent {parent_n:,} params ({gigabytes(4 * parent_n)} fp32), child {child_n:,} params "
        f"({100 * child_n / parent_n:.1f}%, {gigabytes(child_bytes)}); choice {choice.to_dict()}")
  print(f"  abstract (jax.eval_shape on ShapeDtypeStruct): {warm_s * 1e3:.1f} ms (median of {reps}); first call "
        f"{cold_s * 1e3:.0f} ms (includes reading the model's logical axes once per config)")
  if not real:
    return
  start = time.perf_counter()
  params = random_numpy_params(config)
  print(f"  parent arrays allocated in {time.perf_counter() - start:.1f} s")
  times, peaks = [], []
  for _ in range(reps):
    tracemalloc.start()
    start = time.perf_counter()
    _, child = extract(config, params, choice, order)
    times.append(time.perf_counter() - start)
    peaks.append(tracemalloc.get_traced_memory()[1])
    tracemalloc.stop()
    del child
  print(f"  real numpy arrays: median {statistics.median(times) * 1e3:.1f} ms over {reps} reps "
        f"(all: {', '.join(f'{t * 1e3:.1f}' for t in times)} ms); peak new host memory "
        f"{gigabytes(max(peaks))} = {max(peaks) / child_bytes:.2f}x the child")


def benchmark_importance(batch: int, length: int, n_batches: int, reps: int) -> None:
  from elastic_jax.elastic.importance import estimate_importance

  config = tiny_config()
  params = jax.tree.map(jnp.asarray, random_numpy_params(config))
  rng = np.random.default_rng(0)
  batches = [rng.integers(0, config.vocab_size, (batch, length)).astype(np.int32) for _ in range(n_batches)]
  device_batches = [jnp.asarray(t) for t in batches]
  tokens = batch * length * n_batches
  forward = jax.jit(lambda p, t: HybridLM(config).apply({"params": p}, t))

  def plain():
    return [forward(params, t) for t in device_batches]

  def statistics_pass():
    return estimate_importance(config, params, batches, depth=False, progress=False).hidden

  forward_s = wall_seconds(plain, reps)
  importance_s = wall_seconds(statistics_pass, reps)
  print(f"\nimportance vs forward, tiny parent ({config.pattern}, d={config.hidden_size}), {n_batches} batches of "
        f"{batch} x {length} tokens, median of {reps}:")
  print(f"  plain forward:            {tokens / forward_s:,.0f} tokens/s ({forward_s * 1e3:.1f} ms)")
  print(f"  importance statistics:    {tokens / importance_s:,.0f} tokens/s ({importance_s * 1e3:.1f} ms); "
        f"ratio {forward_s / importance_s:.2f} (target >= 0.5)")
  one = batches[:1]
  depth_s = wall_seconds(lambda: estimate_importance(config, params, one, depth=True, progress=False).depth_order,
                         1)
  stats_one = wall_seconds(lambda: estimate_importance(config, params, one, depth=False, progress=False).hidden, 1)
  num_layers = config.num_layers
  forwards = num_layers + num_layers * (num_layers + 1) // 2
  print(f"  depth ranking (1 batch):  {(depth_s - stats_one) * 1e3:.0f} ms for {forwards} forwards "
        f"(L + L(L+1)/2, L={num_layers})")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--abstract-only", action="store_true", help="skip the real ~4.8 GB arrays of the 1.2B parent")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=256)
  parser.add_argument("--batches", type=int, default=4)
  args = parser.parse_args()
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
  benchmark_extraction("tiny (configs/tiny.py)", tiny_config(), args.reps, real=True)
  benchmark_extraction("1.2B Nemotron-H-shaped", ONE_B, args.reps, real=not args.abstract_only)
  benchmark_importance(args.batch, args.length, args.batches, args.reps)


if __name__ == "__main__":
  main()
