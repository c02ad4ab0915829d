"""Forward + backward wall time of the SSD implementations on the default JAX backend.

Compares ``ssd(impl="chunked")`` with either inter-chunk state passing to the token-by-token oracle, as ratios
(oracle time / implementation time; higher is faster). With ``--model``, also prints the hybrid LM's forward
throughput. With ``--gpu`` (GPU backend only), times the fused Pallas kernel (``impl="pallas"``) against the chunked
XLA path in bf16 at a Mamba-2 reference shape and at the Nemotron Nano V2 layer shape, with achieved TFLOP/s.

Usage:
  python benchmarks/ssd.py [--lengths 512 2048 8192] [--reps 5] [--model]
  python benchmarks/ssd.py --gpu [--peak-tflops 989] [--gpu-batch 4] [--gpu-length 8192]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from timing import wall_seconds  # pylint: disable=wrong-import-order

from elastic_jax.ops.ssd import ssd

IMPLEMENTATIONS = {  # name -> ssd keyword arguments
    "chunked(scan)": {"impl": "chunked", "inter_chunk": "scan"},
    "chunked(associative)": {"impl": "chunked", "inter_chunk": "associative"},
    "oracle": {"impl": "oracle"},
}


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
    seconds = {name: wall_seconds(functools.partial(forward_backward(chunk_size, options), inputs), reps)
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
      seconds = wall_seconds(functools.partial(forward, params, tokens), reps)
      cells.append(f"{batch * l / seconds:12,.0f} tokens/s")
    print(f"{f'{batch} x {l}':>12}  " + "  ".join(f"{cell:>24}" for cell in cells), flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# --gpu: the fused kernel against the chunked XLA path.

# name -> (heads h, head dim p, groups g, state n, chunk); batch and length come from the flags.
GPU_SHAPES = {
    "mamba2 (h64 p64 g1 n128)": (64, 64, 1, 128, 128),
    "nano-v2 (h128 p80 g8 n128)": (128, 80, 8, 128, 128),
}


def ssd_forward_flops(b: int, l: int, h: int, p: int, g: int, n: int, chunk: int) -> float:
  """Matmul FLOPs of one chunked-SSD forward pass (2 per multiply-add), the work any chunked implementation does.

  Per chunk of q = chunk tokens (c = ceil(l / q) chunks per row):
    C . B scores, once per group:           2 q^2 n   per (b, c, g)
    intra-chunk outputs, weights @ x:       2 q^2 p   per (b, c, h)
    each chunk's own state, x^T (dt B):     2 q p n   per (b, c, h)
    outputs from the chunk-start state:     2 q p n   per (b, c, h)
  The full q x q products are counted (both implementations compute them before masking). Not counted: the
  elementwise decays, the state recurrence across chunks (O(b c h p n)), and the kernel's recomputation of C . B per
  head and per block of head dims. The backward is counted as twice the forward (each matmul has two operand
  gradients), so forward + backward = 3x forward.
  """
  c = -(-l // chunk)
  return 2.0 * b * c * (g * chunk * chunk * n + h * chunk * chunk * p + 2 * h * chunk * p * n)


def _bf16_inputs(b: int, l: int, h: int, p: int, g: int, n: int) -> dict[str, jax.Array]:
  inputs = ssd_inputs(b, l, h, p, g, n)
  return {name: value.astype(jnp.bfloat16) if name in ("x", "B", "C") else value for name, value in inputs.items()}


def _forward(chunk_size: int, impl: str) -> Callable:
  return jax.jit(lambda inputs: ssd(**inputs, chunk_size=chunk_size, impl=impl))


def _relative_difference(actual, expected) -> float:
  actual, expected = (np.asarray(jnp.asarray(t, jnp.float32), np.float64) for t in (actual, expected))
  return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


def benchmark_kernel_vs_chunked(b: int, l: int, reps: int, peak_tflops: float) -> None:
  """Forward and forward+backward time of impl="pallas" vs impl="chunked" in bf16, with TFLOP/s against a peak."""
  print(f"\nSSD bf16, fused kernel (impl='pallas') vs chunked XLA (impl='chunked'), b={b} L={l}, median of {reps} "
        f"reps; TFLOP/s from the matmul FLOP model of ssd_forward_flops, % of a {peak_tflops:g} TFLOP/s bf16 peak")
  print(f"{'shape':>28}  {'pass':>8}  {'kernel':>26}  {'chunked':>26}  {'speed-up':>8}  {'max rel. diff':>13}")
  for name, (h, p, g, n, chunk) in GPU_SHAPES.items():
    inputs = _bf16_inputs(b, l, h, p, g, n)
    forward_flops = ssd_forward_flops(b, l, h, p, g, n, chunk)
    passes = {
        "fwd": (lambda impl: _forward(chunk, impl), forward_flops),
        "fwd+bwd": (lambda impl: forward_backward(chunk, {"impl": impl}), 3 * forward_flops),
    }
    for pass_name, (make_fn, flops) in passes.items():
      fns = {impl: make_fn(impl) for impl in ("pallas", "chunked")}
      # How far apart the two are at this shape: outputs and final state, or every gradient.
      difference = max(jax.tree.leaves(jax.tree.map(_relative_difference, fns["pallas"](inputs),
                                                    fns["chunked"](inputs))))
      seconds = {impl: wall_seconds(functools.partial(fn, inputs), reps) for impl, fn in fns.items()}
      cells = []
      for impl in ("pallas", "chunked"):
        tflops = flops / seconds[impl] / 1e12
        cells.append(f"{1e3 * seconds[impl]:8.2f} ms {tflops:6.1f} TF/s {100 * tflops / peak_tflops:4.1f}%")
      print(f"{name:>28}  {pass_name:>8}  {cells[0]:>26}  {cells[1]:>26}  "
            f"{seconds['chunked'] / seconds['pallas']:7.2f}x  {difference:13.1e}", flush=True)
    del inputs


def check_gpu_kernel_available() -> None:
  """Exits with a message unless ``impl="pallas"`` will run the fused kernel on this machine."""
  backend = jax.default_backend()
  if backend != "gpu":
    sys.exit(f"--gpu times the fused Pallas SSD kernel, which runs on NVIDIA GPUs only; this machine's JAX backend is "
             f"{backend!r} ({jax.devices()[0].device_kind}). Run it on a GPU machine with a CUDA build of jaxlib.")
  from elastic_jax.ops.kernel_registry import target_of  # pylint: disable=import-outside-toplevel
  from elastic_jax_kernels.ssd import api  # pylint: disable=import-outside-toplevel

  reason = api.unsupported_reason((1, 1, 1, 64), jnp.bfloat16, target_of(jax.devices()[0]), state_size=64,
                                  chunk_size=64)
  if reason:
    sys.exit(f"--gpu: the fused kernel does not run on {jax.devices()[0].device_kind}: {reason}.")


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
  parser.add_argument("--gpu", action="store_true",
                      help="only time the fused kernel against the chunked XLA path (needs a GPU)")
  parser.add_argument("--peak-tflops", type=float, default=989.0,
                      help="bf16 dense peak for the %% column (default: H100 SXM, 989 TFLOP/s)")
  parser.add_argument("--gpu-batch", type=int, default=4)
  parser.add_argument("--gpu-length", type=int, default=8192)
  args = parser.parse_args()
  if args.gpu:
    check_gpu_kernel_available()
  # Other processes sharing the CPU slow every column alike; the load average says how much to trust the numbers.
  print(f"jax {jax.__version__}, devices {jax.devices()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f} at start")
  if args.gpu:
    benchmark_kernel_vs_chunked(args.gpu_batch, args.gpu_length, args.reps, args.peak_tflops)
    return
  benchmark_ssd(args.lengths, args.reps, args.batch, args.heads, args.head_dim, args.groups, args.state, args.chunk)
  if args.model:
    benchmark_model(args.model_batch, args.model_lengths, args.reps)


if __name__ == "__main__":
  main()
