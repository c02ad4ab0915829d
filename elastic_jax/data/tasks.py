"""Synthetic reasoning tasks: procedurally generated problems with worked solutions and checkable answers.

Every example reads ``Q: <problem>\\nA: <steps> #### <answer>\\n``; the prompt is the text up to and including
``A:``, so a model is evaluated by feeding the prompt, generating, and reading the number after ``####``
(:func:`extract_answer`). Three families:

- ``arithmetic``: multi-digit addition / subtraction, one column at a time with carries or borrows written out;
  distractors are filler notes before the problem.
- ``modular``: chained updates ``x=(x*a+b)%m``, each step evaluated; distractor updates of ``y`` interleaved.
- ``variables``: constants and copies between variables, filler lines in between, then "What is q?"; the solution
  follows the chain of copies backwards to a constant.

``TaskConfig.difficulty`` scales digits and chain lengths; ``TaskConfig.distractors`` adds irrelevant lines (the
long-context variants for stage 2). An example depends only on ``(config, seed, split, index)``.

Splits never overlap *by construction*: an example belongs to the evaluation split exactly when a stable hash of
its problem (``Example.problem``: the prompt's problem without its distractors) falls in one of ``EVAL_BUCKETS``
buckets, and the generator redraws (from a stream keyed by split and index) until the example lands in the requested
split. Distinct seed streams alone would not suffice: small problem spaces (two-digit sums) repeat. Hashing the
problem rather than the whole prompt keeps a held-out problem out of training at every distractor count: the
long-context set's problems are never trained on behind other notes.

Each family has a checker, :func:`verify`, that recomputes the answer from the prompt by another route than the
generator's (Python integer arithmetic instead of column steps; forward simulation instead of a backward chain).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Callable, Sequence

import numpy as np

FAMILIES = ("arithmetic", "modular", "variables")
SPLITS = ("train", "eval")
EVAL_BUCKETS = 1  # of HASH_BUCKETS: the share of the prompt space reserved for evaluation
HASH_BUCKETS = 16
ANSWER_MARK = "####"
_MAX_ATTEMPTS = 10_000

_MODULI = (7, 11, 13, 17, 19, 23, 29)
_CORE_NAMES = tuple("abcdefghijkm")  # variables the query can depend on
_DISTRACTOR_NAMES = tuple("npqrstuvwxyz")  # never read by the query's chain
_FILLER_WORDS = ("apple", "river", "stone", "cloud", "lamp", "orange", "tiger", "paper", "window", "garden",
                 "silver", "music", "bridge", "candle", "forest", "planet")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """What to generate: which families, how hard, and how many irrelevant lines per problem."""
  families: tuple[str, ...] = FAMILIES
  difficulty: int = 1  # >= 1: arithmetic has 2 + difficulty digits; chains grow by 2 per level
  distractors: int = 0  # irrelevant lines per problem, every family (long context)

  def __post_init__(self):
    unknown = sorted(set(self.families) - set(FAMILIES))
    if unknown or not self.families:
      raise ValueError(f"task families {list(self.families)} must be a non-empty subset of {list(FAMILIES)}.")
    if self.difficulty < 1 or self.distractors < 0:
      raise ValueError(f"difficulty={self.difficulty} must be >= 1 and distractors={self.distractors} >= 0.")


@dataclasses.dataclass(frozen=True)
class Example:
  """One problem: ``text == prompt + solution``, and ``answer`` is what follows ``####`` in it. ``problem`` is the
  problem alone, without the distractors, in a canonical text: what decides the split."""
  family: str
  prompt: str
  solution: str
  answer: str
  problem: str

  @property
  def text(self) -> str:
    return self.prompt + self.solution


def split_of_problem(problem: str) -> str:
  """The split a problem (``Example.problem``) belongs to, from a hash stable across runs and machines."""
  digest = hashlib.blake2b(problem.encode("utf-8"), digest_size=8).digest()
  return "eval" if int.from_bytes(digest, "little") % HASH_BUCKETS < EVAL_BUCKETS else "train"


def generate_example(config: TaskConfig, seed: int, split: str, index: int) -> Example:
  """Example ``index`` of ``split``; its family cycles through ``config.families``."""
  if split not in SPLITS:
    raise ValueError(f"split {split!r} must be one of {SPLITS}.")
  family = config.families[index % len(config.families)]
  make = _GENERATORS[family]
  for attempt in range(_MAX_ATTEMPTS):
    rng = np.random.default_rng([seed, SPLITS.index(split), FAMILIES.index(family), index, attempt])
    example = make(rng, config)
    if split_of_problem(example.problem) == split:
      return example
  raise RuntimeError(f"no {family} prompt of split {split!r} in {_MAX_ATTEMPTS} draws; the problem space is too "
                     "small for this difficulty.")


def generate_examples(config: TaskConfig, seed: int, split: str, count: int, start: int = 0) -> list[Example]:
  return [generate_example(config, seed, split, index) for index in range(start, start + count)]


def extract_answer(text: str) -> str | None:
  """The integer after the first ``####`` in generated text (the solution part), or None when absent."""
  match = re.search(ANSWER_MARK + r"\s*(-?\d+)", text)
  return match.group(1) if match else None


def verify(example: Example) -> bool:
  """Recomputes the answer from the prompt alone and compares it with the example's answer and text."""
  expected = _CHECKERS[example.family](example.prompt)
  return expected == example.answer and extract_answer(example.solution) == expected


def score(examples: Sequence[Example], generations: Sequence[str]) -> float:
  """Fraction of generations (text after each prompt) whose extracted answer is the correct one."""
  if len(examples) != len(generations):
    raise ValueError(f"{len(examples)} examples but {len(generations)} generations.")
  correct = sum(extract_answer(text) == example.answer for example, text in zip(examples, generations))
  return correct / max(len(examples), 1)


# ---------------------------------------------------------------------------------------------------------------
# arithmetic


def _arithmetic(rng: np.random.Generator, config: TaskConfig) -> Example:
  digits = 2 + config.difficulty
  first = int(rng.integers(10 ** (digits - 1), 10 ** digits))
  second = int(rng.integers(1, 10 ** int(rng.integers(1, digits + 1))))
  subtract = bool(rng.integers(2))
  if subtract and second > first:
    first, second = second, first
  operator = "-" if subtract else "+"
  # Distractors: filler notes (with numbers of their own) before the problem, which the answer must look past.
  notes = [_filler_note(rng) + "\n" for _ in range(config.distractors)]
  prompt = f"Q: {''.join(notes)}{first}{operator}{second}=?\nA:"
  # Column steps right to left on the decimal strings, as written by hand.
  top, bottom = str(first)[::-1], str(second)[::-1]
  steps, written, carry = [], [], 0
  for column in range(len(top)):
    upper, lower = int(top[column]), int(bottom[column]) if column < len(bottom) else 0
    if subtract:
      value = upper - lower - carry
      if value < 0:
        steps.append(f"{upper}-{lower}-{carry}<0 so 1{upper}-{lower}-{carry}={value + 10} b1")
        written.append(value + 10)
        carry = 1
      else:
        steps.append(f"{upper}-{lower}-{carry}={value} b0")
        written.append(value)
        carry = 0
    else:
      value = upper + lower + carry
      steps.append(f"{upper}+{lower}+{carry}={value} c{value // 10}")
      written.append(value % 10)
      carry = value // 10
  if carry and not subtract:
    written.append(carry)
  answer = "".join(str(d) for d in reversed(written)).lstrip("0") or "0"
  return Example("arithmetic", prompt, f" {', '.join(steps)}; so {answer} {ANSWER_MARK} {answer}\n", answer,
                 problem=f"{first}{operator}{second}")


def _filler_note(rng: np.random.Generator) -> str:
  words = rng.choice(_FILLER_WORDS, 2)
  return f"note: {words[0]} {words[1]} {int(rng.integers(100))}"


def _check_arithmetic(prompt: str) -> str:
  match = re.fullmatch(r"Q: (?:note: [a-z]+ [a-z]+ \d+\n)*(\d+)([+-])(\d+)=\?\nA:", prompt)
  if match is None:
    raise ValueError(f"not an arithmetic prompt: {prompt!r}")
  first, operator, second = int(match.group(1)), match.group(2), int(match.group(3))
  return str(first + second if operator == "+" else first - second)


# ---------------------------------------------------------------------------------------------------------------
# modular


def _modular(rng: np.random.Generator, config: TaskConfig) -> Example:
  modulus = int(rng.choice(_MODULI))
  x, y = int(rng.integers(modulus)), int(rng.integers(modulus))
  updates = 2 + 2 * config.difficulty
  # The order of the x updates and the irrelevant y updates (which read only y).
  order = ["x"] * updates + ["y"] * config.distractors
  rng.shuffle(order)
  statements, steps = [f"x={x}", f"y={y}"], []
  for name in order:
    multiplier, offset = int(rng.integers(2, modulus)), int(rng.integers(modulus))
    statements.append(f"{name}=({name}*{multiplier}+{offset})%{modulus}")
    if name == "x":
      raw = x * multiplier + offset
      steps.append(f"({x}*{multiplier}+{offset})%{modulus}={raw}%{modulus}={raw % modulus}")
      x = raw % modulus
  prompt = "Q: " + "; ".join(statements) + ". What is x?\nA:"
  solution = f" x={statements[0][2:]}; " + "; ".join(steps) + f" {ANSWER_MARK} {x}\n"
  # The problem: x's start and updates in order (the y lines are the distractors).
  problem = "; ".join(statement for statement in statements if statement.startswith("x"))
  return Example("modular", prompt, solution, str(x), problem=problem)


def _check_modular(prompt: str) -> str:
  match = re.fullmatch(r"Q: (.*)\. What is x\?\nA:", prompt)
  if match is None:
    raise ValueError(f"not a modular prompt: {prompt!r}")
  values: dict[str, int] = {}
  for statement in match.group(1).split("; "):
    name, expression = statement.split("=", 1)
    if not re.fullmatch(r"[xy]", name) or not re.fullmatch(r"[xy0-9*+%()]+", expression):
      raise ValueError(f"unexpected statement {statement!r}")
    # The expression is validated to digits, x, y and * + % ( ): Python evaluates it.
    values[name] = eval(expression, {"__builtins__": {}}, dict(values))  # pylint: disable=eval-used
  return str(values["x"])


# ---------------------------------------------------------------------------------------------------------------
# variables


def _variables(rng: np.random.Generator, config: TaskConfig) -> Example:
  num_names = min(3 + config.difficulty, len(_CORE_NAMES))
  names = list(rng.choice(_CORE_NAMES, num_names, replace=False))
  num_operations = 4 + 2 * config.difficulty
  operations: list[tuple[str, str]] = []  # (destination, constant or source name)
  defined: list[str] = []
  for step in range(num_operations):
    last = step == num_operations - 1
    if len(defined) < 2 or (not last and rng.random() < 0.4):
      destination, source = str(rng.choice(names)), str(int(rng.integers(100)))
    else:  # a copy; the final operation is always one, so the query needs a chain
      source = str(rng.choice(defined))
      destination = str(rng.choice([n for n in names if n != source]))
    operations.append((destination, source))
    if destination not in defined:
      defined.append(destination)
  query = operations[-1][0]
  lines = [f"{destination}={source}" for destination, source in operations]
  problem = "\n".join(lines) + f"\n{query}?"
  # Distractors go between the operations: filler sentences and writes to names the chain never reads.
  for _ in range(config.distractors):
    if rng.random() < 0.5:
      line = _filler_note(rng)
    else:
      reads = [str(rng.choice(_DISTRACTOR_NAMES)), str(int(rng.integers(100)))]
      line = f"{rng.choice(_DISTRACTOR_NAMES)}={reads[int(rng.integers(2))]}"
    lines.insert(int(rng.integers(len(lines))), line)  # never after the last operation
  # Distractor copies may read a not-yet-written distractor name; give every one a value first.
  lines = [f"{name}=0" for name in _DISTRACTOR_NAMES if config.distractors] + lines
  prompt = "Q: Track the variables.\n" + "\n".join(lines) + f"\nWhat is {query}?\nA:"
  # Worked solution: follow the copies backwards from the query to the constant that reached it.
  steps, name, position = [], query, len(operations)
  while True:
    position = max(i for i in range(position) if operations[i][0] == name)
    source = operations[position][1]
    steps.append(f"{name}={source}")
    if source.isdigit():
      break
    name = source
  return Example("variables", prompt, " " + ", ".join(steps) + f" {ANSWER_MARK} {source}\n", source,
                 problem=problem)


def _check_variables(prompt: str) -> str:
  match = re.fullmatch(r"Q: Track the variables\.\n(.*)\nWhat is (\w+)\?\nA:", prompt, flags=re.DOTALL)
  if match is None:
    raise ValueError(f"not a variables prompt: {prompt!r}")
  values: dict[str, int] = {}
  for line in match.group(1).split("\n"):
    if line.startswith("note: "):
      continue
    destination, source = line.split("=")
    values[destination] = int(source) if source.isdigit() else values[source]
  return str(values[match.group(2)])


_GENERATORS: dict[str, Callable[[np.random.Generator, TaskConfig], Example]] = {
    "arithmetic": _arithmetic, "modular": _modular, "variables": _variables}
_CHECKERS: dict[str, Callable[[str], str]] = {
    "arithmetic": _check_arithmetic, "modular": _check_modular, "variables": _check_variables}
