"""Wall time of an MoE block's forward on CPU: our sorted-expert path against a dense evaluation of every expert.

Ours (``elastic_jax.model.moe.MoE``, ``moe_impl="auto"``, which is the tiled grouped matmul on CPU) runs the T·k
(token, expert) assignments sorted by expert through two grouped matmuls: its expert work is T·k·2·c·I multiply-adds,
whatever the number of experts E. The dense reference (``moe.dense_experts``) runs every expert on every token and
weights the outputs by the routing (T·E·2·c·I). Both share the router and the shared expert, so the rows compare
whole blocks. The third column is ``jax.lax.ragged_dot`` on CPU, where XLA has no grouped matmul and JAX expands the
rows into one masked copy per expert (T·k·E·2·c·I): the reason the CPU path is tiled (timed for k <= 2 only).

Every row times its implementations back to back on the same params and tokens, each the fastest of --reps runs after
a compile-and-warm-up run (the run least disturbed by other jobs on a shared machine); ratio = dense / ours (higher:
ours faster). Read the "ours" column down a k to see the cost stay
flat in E, and across a row group to see it grow with k.

Usage:
  python benchmarks/moe_forward.py [--tokens 4096] [--hidden 256] [--width 256] [--experts 8 16 32 64]
                                   [--top-k 1 2 4 8] [--reps 7]
"""

from __future__ import annotations

import argparse
import os
import platform

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from timing import wall_seconds  # pylint: disable=wrong-import-order

from elastic_jax.model.config import ModelConfig
from elastic_jax.model.moe import MoE, dense_experts, route


def block_config(experts: int, top_k: int, hidden: int, width: int, impl: str = "auto") -> ModelConfig:
  return ModelConfig(pattern="E", vocab_size=8, hidden_size=hidden, n_routed_experts=experts,
                     num_experts_per_tok=top_k, moe_intermediate_size=width, moe_shared_expert_intermediate_size=width,
                     n_shared_experts=1, moe_impl=impl)


def dense_block(config: ModelConfig, params, u: jax.Array) -> jax.Array:
  """The MoE block with every expert computed for every token (same router and shared expert as ours)."""
  b, l, d = u.shape
  tokens = u.reshape(b * l, d)
  gate, experts, shared = params["gate"], params["experts"], params["shared_experts"]
  weights, indices = route(config, tokens, gate["kernel"], gate["e_score_correction_bias"])
  routed = dense_experts(tokens, experts["up_proj"], experts["down_proj"], weights, indices)
  hidden = jnp.square(jax.nn.relu(u @ shared["up_proj"]["kernel"]))
  return routed.reshape(b, l, d) + hidden @ shared["down_proj"]["kernel"]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tokens", type=int, default=4096, help="tokens per forward (batch 4 x tokens/4)")
  parser.add_argument("--hidden", type=int, default=256)
  parser.add_argument("--width", type=int, default=256, help="moe_intermediate_size (and the shared expert's)")
  parser.add_argument("--experts", type=int, nargs="+", default=[8, 16, 32, 64])
  parser.add_argument("--top-k", type=int, nargs="+", default=[1, 2, 4, 8])
  parser.add_argument("--ragged-dot-max-k", type=int, default=1, help="time ragged_dot for k up to this")
  parser.add_argument("--reps", type=int, default=7)
  args = parser.parse_args()

  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs ({platform.processor() or '?'})"
        f"; T={args.tokens} tokens, d={args.hidden}, I={args.width}, shared expert of width {args.width}, fp32")
  print(f"{'E':>4} {'k':>3} {'ours ms':>9} {'dense ms':>9} {'dense/ours':>10} {'ragged_dot ms':>14}")
  rng = np.random.default_rng(0)
  u = jnp.asarray(rng.normal(size=(4, args.tokens // 4, args.hidden)), jnp.float32)
  rows = []
  for experts in args.experts:
    for top_k in args.top_k:
      if top_k > experts:
        continue
      config = block_config(experts, top_k, args.hidden, args.width)
      spec = config.block_specs()[0]
      params = nn.meta.unbox(MoE(config, spec).init(jax.random.key(experts), u)["params"])
      # Unit-variance weights (fan-in scaled), so that outputs are O(1) and the check below is meaningful.
      params = jax.tree.map(lambda p: p / jnp.std(p) / np.sqrt(p.shape[-2]) if p.ndim >= 2 else p, params)
      ours = jax.jit(lambda p, x, c=config: MoE(c, spec).apply({"params": p}, x))
      dense = jax.jit(lambda p, x, c=config: dense_block(c, p, x))
      np.testing.assert_allclose(ours(params, u), dense(params, u), atol=1e-4, rtol=1e-4)  # the same block
      ours_s = wall_seconds(lambda: ours(params, u), args.reps, statistic=min)
      dense_s = wall_seconds(lambda: dense(params, u), args.reps, statistic=min)
      ragged_s = None
      if top_k <= args.ragged_dot_max_k:
        ragged_cfg = block_config(experts, top_k, args.hidden, args.width, impl="ragged_dot")
        ragged = jax.jit(lambda p, x, c=ragged_cfg: MoE(c, spec).apply({"params": p}, x))
        ragged_s = wall_seconds(lambda: ragged(params, u), args.reps, statistic=min)
      rows.append((experts, top_k, ours_s, dense_s))
      print(f"{experts:>4} {top_k:>3} {ours_s * 1e3:>9.2f} {dense_s * 1e3:>9.2f} {dense_s / ours_s:>9.2f}x "
            f"{'-' if ragged_s is None else f'{ragged_s * 1e3:.2f}':>14}", flush=True)

  # Scaling summary: ours against E at the smallest k, and against k at the largest E.
  k0, e1 = min(args.top_k), max(args.experts)
  by_e = [(e, s) for e, k, s, _ in rows if k == k0]
  by_k = [(k, s) for e, k, s, _ in rows if e == e1]
  if len(by_e) > 1:
    print(f"ours at k={k0}: x{by_e[-1][1] / by_e[0][1]:.2f} from E={by_e[0][0]} to E={by_e[-1][0]} "
          f"(dense: x{[d for e, k, _, d in rows if k == k0][-1] / [d for e, k, _, d in rows if k == k0][0]:.2f})")
  if len(by_k) > 1:
    print(f"ours at E={e1}: x{by_k[-1][1] / by_k[0][1]:.2f} from k={by_k[0][0]} to k={by_k[-1][0]}")


if __name__ == "__main__":
  main()
