"""Serving a family: members slicing the shared weights inside their programs vs persistent per-member slices.

For each member of a three-member family (100% / ~75% / ~50% widths, the 50% member one block shallower) and each
``elastic_jax.serve.Slicing``: the wall time of one generation call (batch x prompt width, ``--new`` tokens, greedy;
the fastest of reps, the machine being shared), XLA's temporary bytes for that program (in-program slices, decode
cache, activations), and the weight bytes the family holds. Also the time of slicing alone (the member's ``extract_params`` jitted), which
in-program slicing pays once per call.

Usage:
  python benchmarks/serve.py [--hidden 512] [--new 32] [--batch 4] [--reps 3]
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from timing import wall_seconds  # pylint: disable=wrong-import-order

from elastic_jax.elastic.extract import extract_params
from elastic_jax.elastic.space import Choice
from elastic_jax.model import ModelConfig, init_params
from elastic_jax.serve import Family, Row, ServedFamily, Slicing
from elastic_jax.serve.family import TokenizerSpec, member_specs


def family_config(hidden: int, vocab: int = 4096) -> ModelConfig:
  return ModelConfig(pattern="M-M*M-M-", vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden,
                     num_attention_heads=8, num_key_value_heads=2, head_dim=hidden // 8, mamba_num_heads=16,
                     mamba_head_dim=hidden // 8, n_groups=2, ssm_state_size=64, chunk_size=32)


def random_family(hidden: int, vocab: int = 4096) -> Family:
  """A three-member family over a random-weight parent (``family_config``): the parent, ~75% widths, and ~50% widths
  one block shallower; reversed depth order, byte tokenizer (whose 256 ids are all it decodes)."""
  config = family_config(hidden, vocab)
  params = init_params(config, jax.random.key(0))
  h = hidden
  choices = [Choice.full(config),
             Choice.homogeneous(config, hidden=3 * h // 4, mlp=9 * h // 4, mamba_heads=12),
             Choice.homogeneous(config, hidden=h // 2, mlp=3 * h // 2, mamba_heads=8, attention_heads=4, depth=7)]
  depth = tuple(range(config.num_layers))[::-1]
  records = [{"budget": b, "choice": c.to_dict()} for b, c in zip((1.0, 0.75, 0.5), choices)]
  return Family(config, params, member_specs(config, records, depth), depth, TokenizerSpec(), "benchmark")


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--hidden", type=int, default=512)
  parser.add_argument("--new", type=int, default=32)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--reps", type=int, default=3)
  args = parser.parse_args()
  family = random_family(args.hidden)
  config, params, depth, h = family.config, family.params, family.depth_order, args.hidden
  rng = np.random.default_rng(0)
  rows = [Row(tuple(int(t) for t in rng.integers(1, 256, 16)), args.new) for _ in range(args.batch)]
  print(f"jax {jax.__version__}, {jax.devices()[0].platform}; parent {config.pattern!r} hidden {h}, "
        f"batch {args.batch} x 16-token prompts, {args.new} new tokens, greedy")
  print("| slicing | member | call (ms) | slicing alone (ms) | program temp bytes | family weight bytes |")
  print("|---|---|---:|---:|---:|---:|")
  for slicing in Slicing:
    served = ServedFamily(family, slicing=slicing, max_batch=args.batch)
    held = served.memory()["held_param_bytes"]
    for name, member in served.members.items():
      call = wall_seconds(lambda: served.continue_rows(name, rows), args.reps, statistic=min)  # pylint: disable=cell-var-from-loop
      cut = jax.jit(lambda p, c=member.spec.choice: extract_params(config, p, c, np.asarray(depth)))
      alone = wall_seconds(lambda: cut(served.params), args.reps, statistic=min)  # pylint: disable=cell-var-from-loop
      temp = served.program_memory(name, args.batch, 16, max(16, 1 << (args.new - 1).bit_length()))["temp_bytes"]
      print(f"| {slicing.value} | {name} | {1e3 * call:.1f} | {1e3 * alone:.2f} | {temp:,} | {held:,} |")
  print(f"parent weight bytes {sum(leaf.nbytes for leaf in jax.tree.leaves(params)):,}")


if __name__ == "__main__":
  main()
