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
- ``MASKED``: no slices; the member runs the parent's full width with its choice's masks, as training does. The
  same tokens (up to rounding) at the parent's cost per token; kept for measuring what slicing saves.

Besides the deployed members, a family whose router is known (``Family.router``) serves any budget in the trained
range by name (``family-60pct``): the router fed the interpolation of the neighbouring trained budgets deploys a
choice within the dead zone (``elastic.deploy.interpolated_choice``), compiled on first use. And a pair of members
runs *budget control* (``family-50pct+100pct``): the first member writes the reasoning up to the answer marker (the
line that starts the final answer, ``####`` for our tasks), then the second prefills the whole context and writes
the answer (``budget_control``).

Requests are rows (one prompt, its own ``max_new_tokens``, sampling settings and seed); rows of one member run as one
batch, padded to a power-of-two batch size, prompt width and decode length so that a handful of compiles serve every
mix (greedy rows are unaffected by padding: ``ragged_continuations`` makes each row equal its prompt alone). Each row
ends at its own ``max_new_tokens`` (or stop sequence), and decoding stops once every row of the batch has ended, so
the padded decode length costs nothing.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
import secrets
import threading
from collections.abc import Callable, Generator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from elastic_jax.data.tasks import ANSWER_MARK
from elastic_jax.elastic.extract import child_config, extract_params
from elastic_jax.elastic.masks import choice_masks
from elastic_jax.eval.generate import ragged_continuations
from elastic_jax.model import ModelConfig
from elastic_jax.serve.family import Family, MemberSpec, member_specs

Params = Any
DEFAULT_PREFIX = "family"
DEFAULT_MAX_CONTEXT = 2048
DEFAULT_MAX_BATCH = 8
_MIN_WIDTH = 16  # the smallest padded prompt width and decode length (fewer compiles for short requests)
_STOP_WIDTH = 8  # the longest stop sequence a program checks (a longer one is found in the text afterwards)


class Slicing(enum.Enum):
  """Where a member's slices of the shared weights live (see the module docstring)."""
  IN_PROGRAM = "in_program"
  RESIDENT = "resident"
  MASKED = "masked"


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
  """One sequence to continue: prompt token ids, how many tokens at most, how to pick them, and optionally a token
  sequence that ends it early (the row ends right after it)."""
  prompt: tuple[int, ...]
  max_new_tokens: int
  sampling: Sampling = Sampling()
  stop_tokens: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Continuation:
  """A row's generated tokens, the end-of-document token excluded; ``eos`` says whether it ended on one. Under
  budget control, ``handoff`` is how many of the tokens the reasoning member wrote (None: one member wrote all)."""
  tokens: list[int]
  eos: bool
  handoff: int | None = None


@dataclasses.dataclass(frozen=True)
class Pair:
  """Budget control: ``reason`` writes up to and including the answer marker, ``answer`` the rest (member names)."""
  name: str
  reason: str
  answer: str


@dataclasses.dataclass(frozen=True)
class Member:
  """A served member: its name on the wire, its spec, its config and its compiled program."""
  name: str
  spec: MemberSpec
  config: ModelConfig
  program: Any
  params: Params  # what its program reads: the shared weights (IN_PROGRAM, MASKED) or its own slices (RESIDENT)
  interpolated: bool = False  # a budget between the trained ones, deployed on request


def _bucket(n: int, floor: int, cap: int | None = None) -> int:
  """The next power of two >= max(n, floor), at most ``cap``."""
  size = max(floor, 1 << max(0, (n - 1).bit_length()))
  return size if cap is None else min(size, cap)


def tree_bytes(tree: Params) -> int:
  """Bytes of a tree's arrays (abstract ``ShapeDtypeStruct`` leaves included)."""
  return sum(int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree))


def _member_program(parent: ModelConfig, child: ModelConfig, spec: MemberSpec, depth_order, slicing: Slicing):
  """The member's compiled generation: (weights, prompts [b, T], lengths [b], eos id, per-row temperature, top-k,
  top-p, keys [b], limits [b], stop sequences [b, S]) -> [b, max_new_tokens] new tokens."""
  masks = choice_masks(parent, spec.choice, depth_order) if slicing is Slicing.MASKED else None

  def run(params, prompts, lengths, eos_id, temperature, top_k, top_p, keys, limits, stop, max_new_tokens):
    config = child
    if slicing is Slicing.IN_PROGRAM:
      params = extract_params(parent, params, spec.choice, depth_order)
    elif slicing is Slicing.MASKED:
      config = parent
    return ragged_continuations(config, params, prompts, lengths, max_new_tokens=max_new_tokens, eos_id=eos_id,
                                temperature=temperature, top_k=top_k, top_p=top_p, rng=keys, limits=limits,
                                stop=stop, masks=masks)

  return jax.jit(run, static_argnames=("max_new_tokens",))


def tokens_through(decode: Callable[[Sequence[int]], str], tokens: Sequence[int], strings: Sequence[str]) -> int | None:
  """The length of the shortest prefix of ``tokens`` whose text holds one of ``strings`` (None: the whole text holds
  none). Monotone in the prefix length, so a binary search."""
  if not any(s in decode(tokens) for s in strings):
    return None
  low, high = 1, len(tokens)
  while low < high:
    mid = (low + high) // 2
    if any(s in decode(tokens[:mid]) for s in strings):
      high = mid
    else:
      low = mid + 1
  return low


# A step of a generation plan: (member name, rows) to run; the plan is sent back their continuations.
Plan = Generator[tuple[str, list[Row]], list[Continuation], list[Continuation]]


def run_plan(plan: Plan, run: Callable[[str, list[Row]], list[Continuation]]) -> list[Continuation]:
  """Runs a generation plan (``ServedFamily.plan``) with ``run(member, rows)``; the server's batcher drives the same
  plans asynchronously."""
  try:
    member, rows = next(plan)
    while True:
      member, rows = plan.send(run(member, rows))
  except StopIteration as done:
    return done.value


_PAIR = re.compile(r"^(?P<reason>.+?-\d+pct)\+(?P<answer>\d+pct)$")
_BUDGET = re.compile(r"^(?P<prefix>.+)-(?P<percent>\d+)pct$")


class ServedFamily:
  """A family loaded for serving: the weights once, a program per member, token and text generation by name.

  Args:
    family: what ``family.read_family`` read.
    prefix: member names on the wire are ``{prefix}-{budget name}`` (``family-75pct``).
    max_context: the longest prompt + completion (tokens) a row may ask for.
    max_batch: the most rows one program call runs (more are run in several calls).
    slicing: where members' slices live (``Slicing``).
    answer_marker: the text that starts the final answer, where budget control hands over (default ``####``, our
      tasks'); a request may give its own.
  """

  def __init__(self, family: Family, *, prefix: str = DEFAULT_PREFIX, max_context: int = DEFAULT_MAX_CONTEXT,
               max_batch: int = DEFAULT_MAX_BATCH, slicing: Slicing = Slicing.IN_PROGRAM,
               answer_marker: str = ANSWER_MARK):
    if max_context < 2:
      raise ValueError(f"max_context {max_context} must be >= 2 (one prompt token and one new token).")
    if max_batch < 1:
      raise ValueError(f"max_batch {max_batch} must be >= 1.")
    if not answer_marker:
      raise ValueError("answer_marker must be a non-empty string (where budget control hands over).")
    self.config, self.prefix = family.config, prefix
    self.max_context, self.max_batch, self.slicing, self.answer_marker = max_context, max_batch, slicing, answer_marker
    self.tokenizer = family.tokenizer.load(family.config.vocab_size)
    # The shared weights: one device copy, whatever the checkpoint was restored as (restored host arrays are not
    # kept: ``self.family`` refers to the device copy).
    self.params = jax.device_put(family.params)
    self.family = dataclasses.replace(family, params=self.params)
    self._depth = None if family.depth_order is None else np.asarray(family.depth_order)
    self._setup = None if family.router is None else family.router.setup(family.config)
    self._lock = threading.Lock()  # members deployed on request are added from the server's threads
    self.members: dict[str, Member] = {}
    for spec in family.members:
      self._add(spec)

  def _add(self, spec: MemberSpec, interpolated: bool = False) -> Member:
    name = f"{self.prefix}-{spec.name}"
    config = child_config(self.config, spec.choice, self._depth)
    own = self.params
    if self.slicing is Slicing.RESIDENT:  # eagerly: tensors the choice keeps whole stay the shared arrays
      own = extract_params(self.config, self.params, spec.choice, self._depth)
    program = _member_program(self.config, config, spec, self._depth, self.slicing)
    self.members[name] = Member(name, spec, config, program, own, interpolated)
    return self.members[name]

  # ------------------------------------------------------------------------------------------------ lookup
  @property
  def budget_range(self) -> tuple[float, float] | None:
    """The trained budgets' range, within which any budget is served (None: the family's router is unknown)."""
    if self._setup is None:
      return None
    return min(self._setup.budgets), max(self._setup.budgets)

  def member(self, name: str) -> Member:
    """The member called ``name``: deployed, or for a budget the family did not deploy (``family-60pct``) deployed
    now from the interpolated router (compiled on first use)."""
    with self._lock:
      if name in self.members:
        return self.members[name]
      found = _BUDGET.match(name)
      if found is None or found["prefix"] != self.prefix:
        raise UnknownMember(f"model {name!r} is not a member of this family; its members are {sorted(self.members)}"
                            f" (GET /v1/models lists them), or {self.prefix}-<N>pct for a budget in the trained range"
                            f", or a budget-control pair such as {self.prefix}-50pct+100pct.", "model")
      budget = int(found["percent"]) / 100
      if self._setup is None:
        raise UnknownMember(f"model {name!r} is not a member of this family, which serves only its deployed members "
                            f"{sorted(self.members)}: a budget between them needs the trained router, which this "
                            "family does not carry (export it again with python -m elastic_jax.extract --family).",
                            "model")
      from elastic_jax.elastic.deploy import interpolated_choice  # pylint: disable=import-outside-toplevel
      try:
        choice = interpolated_choice(self._setup, self.family.router.params, budget)
      except ValueError as error:
        raise UnknownMember(f"model {name!r} is not a member of this family: {error}", "model") from None
      [spec] = member_specs(self.config, [{"budget": budget, "choice": choice.to_dict()}], self._depth)
      return self._add(spec, interpolated=True)

  def resolve(self, name: str) -> Member | Pair:
    """A member, or a budget-control pair ``{reason member}+{answer budget}`` (``family-50pct+100pct``)."""
    pair = _PAIR.match(name)
    if pair is None:
      return self.member(name)
    reason = self.member(pair["reason"])
    answer = self.member(f"{self.prefix}-{pair['answer']}")
    return Pair(name, reason.name, answer.name)

  def check_row(self, member: str, row: Row) -> None:
    """Raises ``RequestError`` naming the field when ``row`` cannot be served by ``member`` (or a pair)."""
    self.resolve(member)
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
  def continue_rows(self, member: str, rows: Sequence[Row], *, answer_marker: str | None = None
                    ) -> list[Continuation]:
    """Continues every row with ``member`` (or a budget-control pair, handing over at ``answer_marker``), at most
    ``max_batch`` rows per program call; each row stops at the tokenizer's end-of-document token (excluded), after
    its stop sequence, or after its ``max_new_tokens``."""
    for row in rows:
      self.check_row(member, row)
    return run_plan(self.plan(member, list(rows), answer_marker), self.run_member)

  def run_member(self, member: str, rows: Sequence[Row]) -> list[Continuation]:
    """One member's rows, ``max_batch`` per program call (the rows already checked)."""
    out: list[Continuation] = []
    for first in range(0, len(rows), self.max_batch):
      out += self._run(self.member(member), rows[first:first + self.max_batch])
    return out

  def plan(self, name: str, rows: list[Row], answer_marker: str | None = None) -> Plan:
    """The generation plan of ``rows`` for a member (one step) or a budget-control pair (two steps): a generator
    that yields (member, rows) and is sent their continuations (``run_plan``; the server's batcher)."""
    target = self.resolve(name)
    if isinstance(target, Member):
      return (yield target.name, rows)
    marker = answer_marker or self.answer_marker
    stop = tuple(self.tokenizer.encode(marker))
    first = yield target.reason, [dataclasses.replace(row, stop_tokens=stop) for row in rows]
    cuts = [tokens_through(self.tokenizer.decode, c.tokens, [marker]) for c in first]
    handed = [i for i, (row, cut) in enumerate(zip(rows, cuts)) if cut is not None and cut < row.max_new_tokens]
    second = []
    if handed:
      second = yield target.answer, [self._answer_row(rows[i], first[i].tokens[:cuts[i]]) for i in handed]
    out = [Continuation(c.tokens[:cut] if cut is not None else c.tokens, c.eos and cut is None, cut)
           for c, cut in zip(first, cuts)]
    for i, c in zip(handed, second):
      out[i] = Continuation(out[i].tokens + c.tokens, c.eos, cuts[i])
    return out

  @staticmethod
  def _answer_row(row: Row, reasoning: list[int]) -> Row:
    """The answer member's row: the whole context so far (prompt and reasoning up to the marker), the tokens left."""
    seed = row.sampling.seed
    sampling = row.sampling if seed is None else dataclasses.replace(row.sampling, seed=(seed + 1) % (1 << 32))
    return Row(row.prompt + tuple(reasoning), row.max_new_tokens - len(reasoning), sampling)

  def _run(self, member: Member, rows: Sequence[Row]) -> list[Continuation]:
    batch = _bucket(len(rows), 1, self.max_batch)
    width = _bucket(max(len(row.prompt) for row in rows), _MIN_WIDTH)
    steps = _bucket(max(row.max_new_tokens for row in rows), _MIN_WIDTH)
    prompts = np.zeros((batch, width), np.int32)
    lengths = np.ones(batch, np.int32)  # padding rows: a one-token prompt, greedy, one token, discarded
    limits = np.ones(batch, np.int32)
    stop = np.full((batch, _STOP_WIDTH), -1, np.int32)
    temperature, top_k, top_p = np.zeros(batch, np.float32), np.zeros(batch, np.int32), np.ones(batch, np.float32)
    seeds = np.zeros(batch, np.uint32)
    for i, row in enumerate(rows):
      prompts[i, :len(row.prompt)] = row.prompt
      lengths[i], limits[i] = len(row.prompt), row.max_new_tokens
      if 0 < len(row.stop_tokens) <= _STOP_WIDTH:  # right-aligned; a longer one is found in the text afterwards
        stop[i, _STOP_WIDTH - len(row.stop_tokens):] = row.stop_tokens
      temperature[i], top_k[i], top_p[i] = row.sampling.temperature, row.sampling.top_k, row.sampling.top_p
      seeds[i] = secrets.randbits(32) if row.sampling.seed is None else row.sampling.seed % (1 << 32)
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
    eos = self.tokenizer.eos_id
    new = np.asarray(member.program(member.params, prompts, lengths, eos, temperature, top_k, top_p, keys, limits,
                                    stop, max_new_tokens=steps))
    out = []
    for i, row in enumerate(rows):
      tokens = new[i, :row.max_new_tokens].tolist()
      end = tokens.index(eos) if eos in tokens else len(tokens)
      # After a row's stop sequence its tokens are eos too: the row ended there, not on an end-of-document token.
      stopped = 0 < len(row.stop_tokens) <= _STOP_WIDTH and tuple(tokens[max(0, end - len(row.stop_tokens)):end]) == row.stop_tokens
      out.append(Continuation(tokens[:end], end < len(tokens) and not stopped))
    return out

  # ------------------------------------------------------------------------------------------------ memory
  def memory(self) -> dict[str, int]:
    """Bytes of weights: the parent's, what this family holds (the parent + persistent slices), and what every
    member extracted as its own child would hold together."""
    parent = tree_bytes(self.params)
    held_leaves = {id(leaf): leaf for tree in [self.params] + [m.params for m in self.members.values()]
                   for leaf in jax.tree.leaves(tree)}  # each buffer once (members share the tensors they keep whole)
    held = tree_bytes(list(held_leaves.values()))
    children = sum(tree_bytes(jax.eval_shape(lambda p, c=m.spec.choice: extract_params(self.config, p, c, self._depth),
                                             self.params)) for m in self.members.values() if not m.interpolated)
    return {"parent_param_bytes": parent, "held_param_bytes": held, "children_param_bytes": children}

  def _compiled(self, member: str, batch: int, width: int, max_new_tokens: int):
    m = self.member(member)
    f32, i32 = np.zeros(batch, np.float32), np.zeros(batch, np.int32)
    keys = jax.vmap(jax.random.key)(jnp.zeros(batch, jnp.uint32))
    return m.program.lower(m.params, np.zeros((batch, width), np.int32), np.ones(batch, np.int32), 0, f32, i32,
                           f32 + 1, keys, i32 + max_new_tokens, np.full((batch, _STOP_WIDTH), -1, np.int32),
                           max_new_tokens=max_new_tokens).compile()

  def program_memory(self, member: str, batch: int = 1, width: int = _MIN_WIDTH,
                     max_new_tokens: int = _MIN_WIDTH) -> dict[str, int]:
    """XLA's memory analysis of ``member``'s compiled program at one shape: argument, output and temporary bytes
    (the temporaries hold the in-program slices, the decode cache and activations)."""
    analysis = self._compiled(member, batch, width, max_new_tokens).memory_analysis()
    return {"argument_bytes": int(analysis.argument_size_in_bytes), "output_bytes": int(analysis.output_size_in_bytes),
            "temp_bytes": int(analysis.temp_size_in_bytes)}

  def program_hlo(self, member: str, batch: int = 1, width: int = _MIN_WIDTH,
                  max_new_tokens: int = _MIN_WIDTH) -> str:
    """The optimized HLO of ``member``'s program at one shape (to see where the slicing runs)."""
    return self._compiled(member, batch, width, max_new_tokens).as_text()
