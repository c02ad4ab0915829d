"""Serving a whole family from one loaded checkpoint.

A family (a main-job workdir, or an export written by ``python -m elastic_jax.extract --workdir W --family --out
DIR``) is loaded once: the trained student's weights are held on the device once, and every deployed budget runs as
its own compiled program that slices its sub-network out of those weights, so it computes only its own FLOPs.

Python::

  from elastic_jax import serve
  family = serve.load("workdir/tiny")                      # or a family export; serve.ServedFamily(...) for options
  print(list(family.members))                              # ['family-100pct', 'family-75pct', 'family-50pct']
  [c] = serve.complete(family, "family-50pct", ["12+7="], max_tokens=8)   # greedy; Sampling(temperature=...) else
  print(c.text, c.finish_reason)
  serve.complete(family, "family-60pct", ...)        # a budget between the trained ones (interpolated router)
  serve.complete(family, "family-50pct+100pct", ...) # budget control: 50% reasons up to "####", 100% answers

HTTP (OpenAI's ``/v1/completions``, ``/v1/models``, ``/health``)::

  python -m elastic_jax.serve --family workdir/tiny --port 8000

Modules, in the order data flows: ``family`` (what is on disk: read a workdir or an export, write an export),
``engine`` (the weights on the device, one program per member, token generation in batches), ``text`` (prompts and
completions as text, stop strings), ``batching`` (per-member queues that batch concurrent requests), ``server`` (the
FastAPI app), ``__main__`` (the command line). The server's modules import FastAPI; the others do not.
"""

from __future__ import annotations

from elastic_jax.serve.engine import (Continuation, Pair, RequestError, Row, Sampling, ServedFamily, Slicing,
                                      UnknownMember)
from elastic_jax.serve.family import Family, FamilyError, FamilyRouter, MemberSpec, read_family, write_family
from elastic_jax.serve.text import Completion, complete


def load(path: str, *, step: int | None = None, **options) -> ServedFamily:
  """The family at ``path`` (an export or a main-job workdir; ``step``: a workdir's elastic checkpoint) loaded for
  serving; ``options`` go to ``ServedFamily`` (prefix, max_context, max_batch, slicing, answer_marker)."""
  return ServedFamily(read_family(path, step), **options)


__all__ = ["Completion", "Continuation", "Family", "FamilyError", "FamilyRouter", "MemberSpec", "Pair", "RequestError",
           "Row", "Sampling", "ServedFamily", "Slicing", "UnknownMember", "complete", "load", "read_family",
           "write_family"]
