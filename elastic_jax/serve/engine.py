"""The family in memory: the student's weights held once on the device, and one compiled program per member.

Each member's program takes the *full* weights, slices its own sub-network out of them with the extraction code
(``elastic.extract.extract_params`` for the member's static choice and the family's depth order) and continues its
batch with ``eval.generate.ragged_continuations`` on the member's own config: it computes only its own FLOPs, and
its output is what ``generate`` gives on the child that ``elastic_jax.extract`` writes.

Where the slices live (``Slicing``):

- ``IN_PROGRAM`` (default): the slices are made inside the program, once per call, before the decode loop (XLA
  keeps them out of the loop body: the slicing ops run once per call, not per token). Resident weights: the parent's,
  once. Cost: every call copies the member's sliced tensors into temporary buffers (the member's size at most,
  freed when the call ends; tensors its choice keeps whole, e.g. everything of the 100% member, are not copied),
  which is the cost of one extra pass over the member's weights per batch, against the ``max_new_tokens`` passes
  its decode steps make anyway.
- ``RESIDENT``: each member's slices are made once at load time and kept; its program reads them directly. Resident
  weights: the parent plus every smaller member's sliced tensors (about 2.25x the parent for a 100/75/50 family),
  which a serving budget of 1.05x the parent rules out; kept for measuring the trade-off
  (``benchmarks/serve.py``).

Requests are rows (one prompt, its own ``max_new_tokens``, sampling settings and seed); rows of one member run as one
batch, padded to a power-of-two batch size, prompt width and decode length so that a handful of compiles serve every
mix (greedy rows are unaffected by padding: ``ragged_continuations`` makes each row equal its prompt alone).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import secrets
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from elastic_jax.elastic.extract import child_config, extract_params
from elastic_jax.eval.generate import ragged_continuations
from elastic_jax.model import ModelConfig
from elastic_jax.serve.family import Family, MemberSpec

Params = Any
DEFAULT_PREFIX = "family"
DEFAULT_MAX_CONTEXT = 2048
DEFAULT_MAX_BATCH = 8
_MIN_WIDTH = 16  # the smallest padded prompt width and decode length (fewer compiles for short requests)


class Slicing(enum.Enum):
  """Where a member's slices of the shared weights live (see the module docstring)."""
  IN_PROGRAM = "in_program"
  RESIDENT = "resident"


class RequestError(ValueError):
  """A request the family cannot serve; ``param`` names the offending field (OpenAI's error ``param``)."""

  def __init__(self, message: str, param: str | None = None):
    super().__init__(message)
    self.param = param


class UnknownMember(RequestError):
  """A member name the family does not have."""


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How a row picks its tokens: greedy when ``temperature`` is 0; else softmax(logits / temperature) over the
  ``top_k`` most likely tokens (0: all) within top-p mass ``top_p`` (1: all). ``seed`` fixes the draw (None:
  a fresh random seed)."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int | None = None

  def validate(self) -> None:
    if not (math.isfinite(self.temperature) and self.temperature >= 0):
      raise RequestError(f"temperature {self.temperature} must be a finite number >= 0 (0: greedy).", "temperature")
    if self.top_k < 0:
      raise RequestError(f"top_k {self.top_k} must be >= 0 (0: no limit).", "top_k")
    if not 0 < self.top_p <= 1:
      raise RequestError(f"top_p {self.top_p} must be in (0, 1] (1: no limit).", "top_p")


@dataclasses.dataclass(frozen=True)
class Row:
  """One sequence to continue: prompt token ids, how many tokens at most, and how to pick them."""
  prompt: tuple[int, ...]
  max_new_tokens: int
  sampling: Sampling = Sampling()


@dataclasses.dataclass(frozen=True)
class Continuation:
  """A row's generated tokens, the end-of-document token excluded; ``eos`` says whether it ended on one."""
  tokens: list[int]
  eos: bool


@dataclasses.dataclass(frozen=True)
class Member:
  """A served member: its name on the wire, its spec, its config and its compiled program."""
  name: str
  spec: MemberSpec
  config: ModelConfig
  program: Any
  params: Params  # what its program reads: the shared weights (IN_PROGRAM) or its own slices (RESIDENT)


def _bucket(n: int, floor: int, cap: int | None = None) -> int:
  """The next power of two >= max(n, floor), at most ``cap``."""
  size = max(floor, 1 << max(0, (n - 1).bit_length()))
  return size if cap is None else min(size, cap)


def tree_bytes(tree: Params) -> int:
  """Bytes of a tree's arrays (abstract ``ShapeDtypeStruct`` leaves included)."""
  return sum(int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree))


def _member_program(parent: ModelConfig, child: ModelConfig, spec: MemberSpec, depth_order, slicing: Slicing):
  """The member's compiled generation: (weights, prompts [b, T], lengths [b], eos id, per-row temperature, top-k,
  top-p, keys [b]) -> [b, max_new_tokens] new tokens."""

  def run(params, prompts, lengths, eos_id, temperature, top_k, top_p, keys, max_new_tokens):
    if slicing is Slicing.IN_PROGRAM:
      params = extract_params(parent, params, spec.choice, depth_order)
    return ragged_continuations(child, params, prompts, lengths, max_new_tokens=max_new_tokens, eos_id=eos_id,
                                temperature=temperature, top_k=top_k, top_p=top_p, rng=keys)

  return jax.jit(run, static_argnames=("max_new_tokens",))


class ServedFamily:
  """A family loaded for serving: the weights once, a program per member, token and text generation by name.

  Args:
    family: what ``family.read_family`` read.
    prefix: member names on the wire are ``{prefix}-{budget name}`` (``family-75pct``).
    max_context: the longest prompt + completion (tokens) a row may ask for.
    max_batch: the most rows one program call runs (more are run in several calls).
    slicing: where members' slices live (``Slicing``).
  """

  def __init__(self, family: Family, *, prefix: str = DEFAULT_PREFIX, max_context: int = DEFAULT_MAX_CONTEXT,
               max_batch: int = DEFAULT_MAX_BATCH, slicing: Slicing = Slicing.IN_PROGRAM):
    if max_context < 2:
      raise ValueError(f"max_context {max_context} must be >= 2 (one prompt token and one new token).")
    if max_batch < 1:
      raise ValueError(f"max_batch {max_batch} must be >= 1.")
    self.config = family.config
    self.max_context, self.max_batch, self.slicing = max_context, max_batch, slicing
    self.tokenizer = family.tokenizer.load(family.config.vocab_size)
    # The shared weights: one device copy, whatever the checkpoint was restored as (restored host arrays are not
    # kept: ``self.family`` refers to the device copy).
    self.params = jax.device_put(family.params)
    self.family = dataclasses.replace(family, params=self.params)
    self.members: dict[str, Member] = {}
    depth = None if family.depth_order is None else np.asarray(family.depth_order)
    for spec in family.members:
      config = child_config(family.config, spec.choice, depth)
      if slicing is Slicing.RESIDENT:  # eagerly: tensors the choice keeps whole stay the shared arrays
        own = extract_params(family.config, self.params, spec.choice, depth)
      else:
        own = self.params
      program = _member_program(family.config, config, spec, depth, slicing)
      self.members[f"{prefix}-{spec.name}"] = Member(f"{prefix}-{spec.name}", spec, config, program, own)

  # ------------------------------------------------------------------------------------------------ lookup
  def member(self, name: str) -> Member:
    if name not in self.members:
      raise UnknownMember(f"model {name!r} is not a member of this family; its members are "
                          f"{sorted(self.members)} (GET /v1/models lists them).", "model")
    return self.members[name]

  def check_row(self, member: str, row: Row) -> None:
    """Raises ``RequestError`` naming the field when ``row`` cannot be served by ``member``."""
    self.member(member)
    if not row.prompt:
      raise RequestError("prompt is empty; give at least one token (a non-empty string).", "prompt")
    if row.max_new_tokens < 1:
      raise RequestError(f"max_tokens {row.max_new_tokens} must be >= 1.", "max_tokens")
    if len(row.prompt) + row.max_new_tokens > self.max_context:
      raise RequestError(f"prompt is {len(row.prompt)} tokens and max_tokens is {row.max_new_tokens}: "
                         f"{len(row.prompt) + row.max_new_tokens} tokens exceed this server's context of "
                         f"{self.max_context}; shorten the prompt or lower max_tokens.", "prompt")
    bad = [t for t in row.prompt if not 0 <= t < self.config.vocab_size]
    if bad:
      raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size}).",
                         "prompt")
    row.sampling.validate()

  # ------------------------------------------------------------------------------------------------ tokens
  def continue_rows(self, member: str, rows: Sequence[Row]) -> list[Continuation]:
    """Continues every row with ``member``'s program, ``max_batch`` rows per call; each row stops at the tokenizer's
    end-of-document token (excluded) or after its ``max_new_tokens``."""
    for row in rows:
      self.check_row(member, row)
    out: list[Continuation] = []
    for first in range(0, len(rows), self.max_batch):
      out += self._run(self.members[member], rows[first:first + self.max_batch])
    return out

  def _run(self, member: Member, rows: Sequence[Row]) -> list[Continuation]:
    batch = _bucket(len(rows), 1, self.max_batch)
    width = _bucket(max(len(row.prompt) for row in rows), _MIN_WIDTH)
    steps = _bucket(max(row.max_new_tokens for row in rows), _MIN_WIDTH)
    prompts = np.zeros((batch, width), np.int32)
    lengths = np.ones(batch, np.int32)  # padding rows: a one-token prompt, greedy, discarded
    temperature, top_k, top_p = np.zeros(batch, np.float32), np.zeros(batch, np.int32), np.ones(batch, np.float32)
    seeds = np.zeros(batch, np.uint32)
    for i, row in enumerate(rows):
      prompts[i, :len(row.prompt)] = row.prompt
      lengths[i] = len(row.prompt)
      temperature[i], top_k[i], top_p[i] = row.sampling.temperature, row.sampling.top_k, row.sampling.top_p
      seeds[i] = secrets.randbits(32) if row.sampling.seed is None else row.sampling.seed % (1 << 32)
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
    eos = self.tokenizer.eos_id
    new = np.asarray(member.program(member.params, prompts, lengths, eos, temperature, top_k, top_p, keys,
                                    max_new_tokens=steps))
    out = []
    for i, row in enumerate(rows):
      tokens = new[i, :row.max_new_tokens].tolist()
      ended = eos in tokens
      out.append(Continuation(tokens[:tokens.index(eos)] if ended else tokens, ended))
    return out

  # ------------------------------------------------------------------------------------------------ memory
  def memory(self) -> dict[str, int]:
    """Bytes of weights: the parent's, what this family holds (the parent + persistent slices), and what every
    member extracted as its own child would hold together."""
    parent = tree_bytes(self.params)
    held_leaves = {id(leaf): leaf for tree in [self.params] + [m.params for m in self.members.values()]
                   for leaf in jax.tree.leaves(tree)}  # each buffer once (members share the tensors they keep whole)
    held = tree_bytes(list(held_leaves.values()))
    depth = None if self.family.depth_order is None else np.asarray(self.family.depth_order)
    children = sum(tree_bytes(jax.eval_shape(lambda p, c=m.spec.choice: extract_params(self.config, p, c, depth),
                                             self.params)) for m in self.members.values())
    return {"parent_param_bytes": parent, "held_param_bytes": held, "children_param_bytes": children}

  def program_memory(self, member: str, batch: int = 1, width: int = _MIN_WIDTH,
                     max_new_tokens: int = _MIN_WIDTH) -> dict[str, int]:
    """XLA's memory analysis of ``member``'s compiled program at one shape: argument, output and temporary bytes
    (the temporaries hold the in-program slices, the decode cache and activations)."""
    m = self.member(member)
    f32, i32 = np.zeros(batch, np.float32), np.zeros(batch, np.int32)
    keys = jax.vmap(jax.random.key)(jnp.zeros(batch, jnp.uint32))
    compiled = m.program.lower(m.params, np.zeros((batch, width), np.int32), np.ones(batch, np.int32), 0, f32, i32,
                               f32 + 1, keys, max_new_tokens=max_new_tokens).compile()
    analysis = compiled.memory_analysis()
    return {"argument_bytes": int(analysis.argument_size_in_bytes), "output_bytes": int(analysis.output_size_in_bytes),
            "temp_bytes": int(analysis.temp_size_in_bytes)}

  def program_hlo(self, member: str, batch: int = 1, width: int = _MIN_WIDTH,
                  max_new_tokens: int = _MIN_WIDTH) -> str:
    """The optimized HLO of ``member``'s program at one shape (to see where the slicing runs)."""
    m = self.member(member)
    f32, i32 = np.zeros(batch, np.float32), np.zeros(batch, np.int32)
    keys = jax.vmap(jax.random.key)(jnp.zeros(batch, jnp.uint32))
    return m.program.lower(m.params, np.zeros((batch, width), np.int32), np.ones(batch, np.int32), 0, f32, i32,
                           f32 + 1, keys, max_new_tokens=max_new_tokens).compile().as_text()
