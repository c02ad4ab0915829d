"""Serving a family: prefill and decode speed per member, the family against its children as separate models, and
sliced against masked compute, measured side by side in one run.

A three-member family (100% / ~75% / ~50% widths, the 50% member one block shallower) is built from a random-weight
parent (or read with ``--family DIR``: an export or a main-job workdir) and served three ways, one after the other:

- ``family``: one ``ServedFamily`` (``Slicing.IN_PROGRAM``): the parent's weights held once, each member's program
  slicing its sub-network out of them.
- ``masked``: one ``ServedFamily`` with ``Slicing.MASKED``: each member runs the parent's full width under its masks
  (training's form: the same tokens at the parent's cost).
- ``separate``: each member's child as ``elastic.extract.extract`` writes it, served as its own one-member family
  (the children loaded as separate models).

Per member and way, every call through ``ServedFamily.continue_rows`` with ``--prompt``-token prompts (random ids),
greedy, the fastest of ``--reps`` calls after a warm-up call that compiles; the calls with 1 and with n new tokens
are timed in turn (``timing.interleaved_seconds``), so that both see the same load of a shared machine:

- time to first token: a call with ``max_new_tokens=1`` (T(1): the prefill pass and the first token), at batch 1
  and at batch ``--batch``; prefill tokens/s = batch x prompt / T(1) at batch ``--batch``;
- decode tokens/s at batch 1 and at batch ``--batch``: batch x (n - 1) / (T(n) - T(1)), n = ``--new``;
- resident bytes: the weights held (the family: the parent's, shared by its members; a separate child: its own)
  plus the member's program temporaries at the batch-``--batch`` decode shape (``ServedFamily.program_memory``:
  in-program slices, decode cache, activations).

Decoding must not stop early, or T(n) would time fewer steps: a row ends on the end-of-document token, so the
benchmark zeroes that token's column of the LM head (its logit is then 0, below the top logit of any row whose
logits are not all negative: speed does not depend on which tokens come out) and checks that every row of every
call generated exactly its ``max_new_tokens`` tokens.

Usage:
  python benchmarks/serve.py [--hidden 512] [--prompt 64] [--new 64] [--batch 16] [--reps 5] [--family DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import subprocess

import jax
import numpy as np

from timing import interleaved_seconds  # pylint: disable=wrong-import-order

from elastic_jax.elastic.extract import extract
from elastic_jax.elastic.space import Choice
from elastic_jax.model import ModelConfig, init_params
from elastic_jax.serve import Family, Row, ServedFamily, Slicing, read_family
from elastic_jax.serve.engine import tree_bytes
from elastic_jax.serve.family import TokenizerSpec, member_specs

WAYS = ("family", "masked", "separate")


def family_config(hidden: int, vocab: int = 4096) -> ModelConfig:
  return ModelConfig(pattern="M-M*M-M-", vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden,
                     num_attention_heads=8, num_key_value_heads=2, head_dim=hidden // 8, mamba_num_heads=16,
                     mamba_head_dim=hidden // 8, n_groups=2, ssm_state_size=64, chunk_size=32)


def random_family(hidden: int, vocab: int = 4096) -> Family:
  """The parent of ``family_config(hidden, vocab)`` with random weights and three members: itself, ~75% widths, ~50%
  widths one block shallower (the last block dropped first); byte tokenizer (whose 256 ids are all it decodes)."""
  config = family_config(hidden, vocab)
  params = init_params(config, jax.random.key(0))
  h = hidden
  choices = [Choice.full(config),
             Choice.homogeneous(config, hidden=3 * h // 4, mlp=9 * h // 4, mamba_heads=12),
             Choice.homogeneous(config, hidden=h // 2, mlp=3 * h // 2, mamba_heads=8, attention_heads=4, depth=7)]
  depth = tuple(range(config.num_layers))[::-1]
  records = [{"budget": b, "choice": c.to_dict()} for b, c in zip((1.0, 0.75, 0.5), choices)]
  return Family(config, params, member_specs(config, records, depth), depth, TokenizerSpec(), "benchmark")


def without_end_token(family: Family) -> Family:
  """The family with its end-of-document token's LM-head column zeroed, so that greedy rows run to their limit."""
  eos = family.tokenizer.load(family.config.vocab_size).eos_id
  params = jax.tree.map(lambda x: x, family.params)  # a new tree; only the LM head's kernel is replaced
  kernel = np.array(params["lm_head"]["kernel"])  # [d, V]
  kernel[:, eos] = 0
  params["lm_head"] = {**params["lm_head"], "kernel": kernel}
  return dataclasses.replace(family, params=params)


def separate_child(family: Family, member: int) -> Family:
  """Member ``member`` of ``family`` extracted as its own model and wrapped as a one-member family."""
  spec = family.members[member]
  config, params = extract(family.config, family.params, spec.choice,
                           None if family.depth_order is None else np.asarray(family.depth_order))
  records = [{"budget": 1.0, "choice": Choice.full(config).to_dict()}]
  return Family(config, params, member_specs(config, records, None), None, family.tokenizer, f"child {spec.name}")


def padded(n: int) -> int:
  return max(16, 1 << (n - 1).bit_length())


@dataclasses.dataclass
class Measured:
  """One member served one way."""
  way: str
  member: str  # the family's member name (e.g. "75pct")
  weights: int  # weight bytes held for it
  temp: int  # its program's temporary bytes at the batch decode shape
  first_1: float  # T(1) at batch 1 (s)
  first_b: float  # T(1) at the big batch (s)
  decode_1: float  # decode tokens/s at batch 1
  decode_b: float  # decode tokens/s at the big batch
  prefill: float  # prefill tokens/s at the big batch


class Bench:
  """Times one served member's calls (see the module docstring)."""

  def __init__(self, args: argparse.Namespace, prompts: list[tuple[int, ...]]):
    self.args, self.prompts = args, prompts

  def seconds(self, served: ServedFamily, name: str, batch: int) -> tuple[float, float]:
    """(T(1), T(n)) at ``batch``: calls with 1 and with n new tokens per row, timed in turn."""
    calls = []
    for new in (1, self.args.new):
      rows = [Row(prompt, new) for prompt in self.prompts[:batch]]
      out = served.continue_rows(name, rows)  # compiles; its tokens are checked, then the calls are timed
      short = [len(c.tokens) for c in out if len(c.tokens) != new or c.eos]
      if short:
        raise SystemExit(f"{name} at batch {batch}: rows ended before {new} tokens ({short} tokens): decode would "
                         "be timed over fewer steps.")
      calls.append(lambda rows=rows: served.continue_rows(name, rows))
    first, full = interleaved_seconds(calls, self.args.reps, warmup=False, statistic=min)
    return first, full

  def member(self, served: ServedFamily, name: str, way: str, member: str, weights: int) -> Measured:
    a = self.args
    first_1, full_1 = self.seconds(served, name, 1)
    first_b, full_b = self.seconds(served, name, a.batch)
    # The shape its batch calls ran at: ServedFamily pads the prompt width and decode length to powers of two >= 16.
    temp = served.program_memory(name, a.batch, padded(a.prompt), padded(a.new))["temp_bytes"]

    def rate(tokens: int, seconds: float) -> float:
      return tokens / seconds if seconds > 0 else math.nan

    return Measured(way, member, weights, temp, first_1, first_b, rate(a.new - 1, full_1 - first_1),
                    rate(a.batch * (a.new - 1), full_b - first_b), rate(a.batch * a.prompt, first_b))


def measure(family: Family, args: argparse.Namespace, prompts: list[tuple[int, ...]]) -> tuple[list[Measured], dict]:
  bench = Bench(args, prompts)
  results, memory = [], {}
  for way, slicing in (("family", Slicing.IN_PROGRAM), ("masked", Slicing.MASKED)):
    served = ServedFamily(family, slicing=slicing, max_batch=args.batch, max_context=args.prompt + args.new)
    held = served.memory()
    memory[way] = held
    for spec, name in zip(family.members, served.members):
      print(f"  {way} {spec.name} ...", flush=True)
      results.append(bench.member(served, name, way, spec.name, held["held_param_bytes"]))
    del served
    gc.collect()
  resident = ServedFamily(family, slicing=Slicing.RESIDENT, max_batch=args.batch)  # its weights only: no call
  memory["resident"] = resident.memory()
  del resident
  for index, spec in enumerate(family.members):
    print(f"  separate {spec.name} ...", flush=True)
    served = ServedFamily(separate_child(family, index), max_batch=args.batch, max_context=args.prompt + args.new)
    [name] = served.members
    results.append(bench.member(served, name, "separate", spec.name, served.memory()["held_param_bytes"]))
    del served
    gc.collect()
  return results, memory


def uptime() -> str:
  """The machine's load (other jobs may share it)."""
  return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def _ratio(x: float, y: float) -> str:
  return f"{x / y:.2f}x" if y and math.isfinite(x) and math.isfinite(y) else "—"


def report(results: list[Measured], memory: dict, args: argparse.Namespace, members: list[str]) -> None:
  b = args.batch
  at = {(r.way, r.member): r for r in results}
  print(f"\n| way | member | weights held | program temp | resident | TTFT b=1 (ms) | TTFT b={b} (ms) "
        f"| prefill tok/s b={b} | decode tok/s b=1 | decode tok/s b={b} | decode vs 100% b=1 / b={b} |")
  print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  for r in results:
    top = at[(r.way, members[0])]
    print(f"| {r.way} | {r.member} | {r.weights:,} | {r.temp:,} | {r.weights + r.temp:,} | {1e3 * r.first_1:.1f} "
          f"| {1e3 * r.first_b:.1f} | {r.prefill:,.0f} | {r.decode_1:,.0f} | {r.decode_b:,.0f} "
          f"| {_ratio(r.decode_1, top.decode_1)} / {_ratio(r.decode_b, top.decode_b)} |")

  print(f"\n| member | sliced / masked: decode b=1 | decode b={b} | prefill b={b} "
        f"| family / separate: decode b=1 | decode b={b} | prefill b={b} |")
  print("|---|---:|---:|---:|---:|---:|---:|")
  for m in members:
    sliced, masked, alone = at[("family", m)], at[("masked", m)], at[("separate", m)]
    print(f"| {m} | {_ratio(sliced.decode_1, masked.decode_1)} | {_ratio(sliced.decode_b, masked.decode_b)} "
          f"| {_ratio(sliced.prefill, masked.prefill)} | {_ratio(sliced.decode_1, alone.decode_1)} "
          f"| {_ratio(sliced.decode_b, alone.decode_b)} | {_ratio(sliced.prefill, alone.prefill)} |")

  parent = memory["family"]["parent_param_bytes"]
  separate = sum(r.weights for r in results if r.way == "separate")
  family_temp = max(r.temp for r in results if r.way == "family")
  separate_temp = max(r.temp for r in results if r.way == "separate")
  print(f"\nweights held: the family {memory['family']['held_param_bytes']:,} bytes "
        f"({memory['family']['held_param_bytes'] / parent:.2f}x the parent's {parent:,}); the children as separate "
        f"models {separate:,} ({separate / parent:.2f}x); the family with resident slices "
        f"{memory['resident']['held_param_bytes']:,} ({memory['resident']['held_param_bytes'] / parent:.2f}x). "
        f"Serving every member, one call at a time: the family {memory['family']['held_param_bytes'] + family_temp:,}"
        f" bytes (weights + the largest program temporaries), separate models {separate + separate_temp:,}.")


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--hidden", type=int, default=512, help="the random parent's width (ignored with --family)")
  parser.add_argument("--family", default=None, help="a family export or a main-job workdir instead")
  parser.add_argument("--prompt", type=int, default=64, help="prompt tokens per row")
  parser.add_argument("--new", type=int, default=64, help="new tokens per row for the decode timing (n)")
  parser.add_argument("--batch", type=int, default=16, help="the large batch (the small one is 1)")
  parser.add_argument("--reps", type=int, default=5, help="timed calls per measurement (the fastest is kept)")
  args = parser.parse_args()
  if args.new < 2:
    parser.error("--new must be >= 2 (decode is timed as T(n) - T(1)).")
  family = random_family(args.hidden) if args.family is None else read_family(args.family)
  family = without_end_token(family)
  eos = family.tokenizer.load(family.config.vocab_size).eos_id
  rng = np.random.default_rng(0)
  ids = np.setdiff1d(np.arange(1, min(family.config.vocab_size, 256)), [eos])
  prompts = [tuple(int(t) for t in rng.choice(ids, args.prompt)) for _ in range(args.batch)]
  config = family.config
  print(f"jax {jax.__version__}, {jax.devices()[0].platform}; {uptime()}")
  print(f"parent {config.pattern!r} hidden {config.hidden_size}, vocab {config.vocab_size}, "
        f"{tree_bytes(family.params):,} weight bytes ({family.source}); members "
        + ", ".join(f"{m.name} ({m.fraction:.1%} of the parameters)" for m in family.members)
        + f"; {args.prompt}-token prompts, n = {args.new} new tokens, greedy, fastest of {args.reps} calls")
  results, memory = measure(family, args, prompts)
  report(results, memory, args, [m.name for m in family.members])
  print(uptime())


if __name__ == "__main__":
  main()
