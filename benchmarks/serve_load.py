"""The family server under load: many concurrent requests mixed over the members, through HTTP.

Starts the server in this process (uvicorn in a thread over ``elastic_jax.serve.server.create_app``) on a family: by
default a random-weight three-member family built here (``serve.random_family`` at ``--hidden``, byte vocabulary: the
parent, ~75% widths, ~50% widths one block shallower), or ``--family DIR`` (an export or a main-job workdir). It first
runs every program shape the requests can reach (batch sizes up to ``--max-batch`` or ``--concurrency``, the prompt
and completion lengths' buckets) so that the timed part compiles nothing, then sends ``--requests`` requests with at
most ``--concurrency`` in flight, the members taken in turn, each with a prompt length and ``max_tokens`` drawn from
the given ranges, greedy or (a ``--sampled`` fraction) seeded sampling at temperature 0.8. ``--concurrency 1`` sends
them one at a time: the same work without batching.

Prints the wall time, requests/s, completion tokens/s and errors, and a markdown table per member: requests, mean /
p50 / p95 latency, batches run and their mean size in rows. The client runs in the same process as the server (one
Python interpreter; the model's computation runs outside the interpreter lock, the HTTP handling on both sides does
not), so the HTTP overhead it measures is an upper bound.

Usage:
  python benchmarks/serve_load.py [--requests 200] [--concurrency 200] [--hidden 256] [--family DIR]
      [--max-batch 8] [--batch-window-ms 5] [--prompt-len 4,16] [--max-tokens 8,32] [--sampled 0.3]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import time

import httpx
import jax
import numpy as np

from serve import random_family  # pylint: disable=wrong-import-order

from elastic_jax import serve
from elastic_jax.serve.server import create_app, running_in_thread


def _span(text: str) -> tuple[int, int]:
  low, high = (int(part) for part in text.split(","))
  if not 1 <= low <= high:
    raise argparse.ArgumentTypeError(f"{text!r}: give LOW,HIGH with 1 <= LOW <= HIGH")
  return low, high


def _representatives(low: int, high: int) -> list[int]:
  """Values in [low, high] that reach every power-of-two bucket any value in it reaches: the ends and the powers of
  two between them."""
  powers = [1 << k for k in range(low.bit_length(), high.bit_length()) if low < 1 << k < high]
  return sorted({low, *powers, high})


def _warm_up(family: serve.ServedFamily, rows: int, prompt_len: tuple[int, int], max_tokens: tuple[int, int]) -> int:
  """Runs each member at every batch size (up to ``rows``), prompt width and decode length the load can reach; the
  calls made."""
  calls = 0
  for name in family.members:
    for batch in _representatives(1, rows):
      for length in _representatives(*prompt_len):
        for new in _representatives(*max_tokens):
          family.continue_rows(name, [serve.Row((1,) * length, new)] * batch)
          calls += 1
  return calls


def _requests(family: serve.ServedFamily, count: int, prompt_len: tuple[int, int], max_tokens: tuple[int, int],
              sampled: float, seed: int = 0) -> list[dict]:
  rng = np.random.default_rng(seed)
  members = list(family.members)
  bodies = []
  for i in range(count):
    length = int(rng.integers(prompt_len[0], prompt_len[1] + 1))
    body = {"model": members[i % len(members)], "prompt": rng.integers(1, family.config.vocab_size, length).tolist(),
            "max_tokens": int(rng.integers(max_tokens[0], max_tokens[1] + 1)), "temperature": 0}
    if rng.random() < sampled:
      body.update(temperature=0.8, seed=i)
    bodies.append(body)
  return bodies


async def _send(url: str, bodies: list[dict], concurrency: int) -> list[tuple[float, int, int, str]]:
  """Each request's (latency s, HTTP status or 0, completion tokens, error text), at most ``concurrency`` at once."""
  slots = asyncio.Semaphore(concurrency)
  async with httpx.AsyncClient(base_url=url, timeout=3600,
                               limits=httpx.Limits(max_connections=concurrency)) as client:
    async def one(body):
      async with slots:
        start = time.perf_counter()
        try:
          response = await client.post("/v1/completions", json=body)
        except httpx.HTTPError as error:
          return time.perf_counter() - start, 0, 0, f"{type(error).__name__}: {error}"
        latency = time.perf_counter() - start
        if response.status_code != 200:
          return latency, response.status_code, 0, response.text[:200]
        return latency, 200, response.json()["usage"]["completion_tokens"], ""

    return await asyncio.gather(*(one(body) for body in bodies))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--family", default=None, metavar="DIR", help="an export or a main-job workdir (default: a "
                      "random-weight family built here)")
  parser.add_argument("--hidden", type=int, default=256, help="the built family's parent width (default 256)")
  parser.add_argument("--requests", type=int, default=200)
  parser.add_argument("--concurrency", type=int, default=200, help="most requests in flight at once")
  parser.add_argument("--max-batch", type=int, default=8)
  parser.add_argument("--batch-window-ms", type=float, default=5.0)
  parser.add_argument("--prompt-len", type=_span, default=(4, 16), metavar="LOW,HIGH")
  parser.add_argument("--max-tokens", type=_span, default=(8, 32), metavar="LOW,HIGH")
  parser.add_argument("--sampled", type=float, default=0.3, help="fraction of requests sampled (seeded), else greedy")
  args = parser.parse_args()

  if args.family:
    family = serve.load(args.family, max_batch=args.max_batch)
  else:
    # Vocabulary 256: the byte tokenizer's, so that every id the model emits decodes to text.
    family = serve.ServedFamily(random_family(args.hidden, vocab=256), max_batch=args.max_batch)
  config = family.config
  start = time.perf_counter()
  # A batch holds at most one row per request in flight.
  calls = _warm_up(family, min(family.max_batch, args.concurrency), args.prompt_len, args.max_tokens)
  warm_up = time.perf_counter() - start

  app = create_app(family, batch_window_ms=args.batch_window_ms)
  bodies = _requests(family, args.requests, args.prompt_len, args.max_tokens, args.sampled)
  with running_in_thread(app) as (url, _):
    batcher = app.state.batcher
    before = len(batcher.batches)
    start = time.perf_counter()
    results = asyncio.run(_send(url, bodies, args.concurrency))
    wall = time.perf_counter() - start
    batches = batcher.batches[before:]

  print(f"jax {jax.__version__}, {jax.devices()[0].platform}; family {family.family.source!r}: parent "
        f"{config.pattern!r}, hidden {config.hidden_size}, vocab {config.vocab_size}; members "
        f"{', '.join(family.members)}")
  print(f"{args.requests} requests, at most {args.concurrency} in flight; prompts {args.prompt_len[0]}-"
        f"{args.prompt_len[1]} tokens, max_tokens {args.max_tokens[0]}-{args.max_tokens[1]}, {args.sampled:.0%} "
        f"sampled; max batch {args.max_batch} rows, batch window {args.batch_window_ms:g} ms; warm-up {calls} calls in "
        f"{warm_up:.1f} s")
  print("| member | requests | completion tokens | mean latency (s) | p50 (s) | p95 (s) | batches "
        "| mean rows per batch |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|")
  by_member = collections.defaultdict(list)
  for body, result in zip(bodies, results):
    by_member[body["model"]].append(result)
  for name in list(family.members) + ["all"]:
    rows = results if name == "all" else by_member[name]
    sizes = [size for member, size in batches if name in ("all", member)]
    latencies = [latency for latency, *_ in rows]
    print(f"| {name} | {len(rows)} | {sum(tokens for _, _, tokens, _ in rows):,} | {np.mean(latencies):.2f} | "
          f"{np.percentile(latencies, 50):.2f} | {np.percentile(latencies, 95):.2f} | {len(sizes)} | "
          f"{np.mean(sizes) if sizes else 0:.1f} |")
  errors = [(status, text) for _, status, _, text in results if status != 200]
  tokens = sum(tokens for _, _, tokens, _ in results)
  print(f"wall {wall:.2f} s: {len(bodies) / wall:.1f} requests/s, {tokens / wall:.1f} completion tokens/s; "
        f"{len(errors)} errors" + (f" (first: {errors[0]})" if errors else ""))


if __name__ == "__main__":
  main()
