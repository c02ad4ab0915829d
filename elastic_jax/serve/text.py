"""Text in, text out: prompts through the family's tokenizer, continuations cut at stop strings.

The end-of-document token ends a completion inside the program (``ServedFamily.continue_rows``); a stop string is
found in the decoded text afterwards, the completion cut before it, and its token count is that of the shortest
prefix of tokens whose text contains it. Either way the finish reason is ``"stop"``; a completion that used all of
its ``max_tokens`` ends with ``"length"`` (OpenAI's names).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from elastic_jax.serve.engine import Continuation, RequestError, Row, Sampling, ServedFamily, tokens_through


@dataclasses.dataclass(frozen=True)
class Completion:
  """One completion: its text, its tokens, why it ended ("stop" or "length"), the prompt's length in tokens; under
  budget control, how many of its tokens the reasoning member wrote (``handoff``)."""
  text: str
  tokens: list[int]
  finish_reason: str
  prompt_tokens: int
  handoff: int | None = None


def encode_prompt(family: ServedFamily, prompt: str | Sequence[int]) -> tuple[int, ...]:
  """A prompt as token ids: text through the family's tokenizer, or token ids as given."""
  if isinstance(prompt, str):
    try:
      return tuple(family.tokenizer.encode(prompt))
    except ValueError as error:  # e.g. a NUL byte, which the byte tokenizer reserves
      raise RequestError(f"prompt cannot be tokenized: {error}", "prompt") from error
  return tuple(int(t) for t in prompt)


def _first_stop(text: str, stop: Sequence[str]) -> int | None:
  """Where the earliest stop string starts in ``text``, or None."""
  found = [i for i in (text.find(s) for s in stop) if i >= 0]
  return min(found) if found else None


def finish(family: ServedFamily, row: Row, continuation: Continuation, stop: Sequence[str]) -> Completion:
  """The completion of ``row`` from its generated tokens: cut at the first stop string, with its finish reason."""
  decode = family.tokenizer.decode
  tokens = continuation.tokens
  text = decode(tokens)
  cut = _first_stop(text, stop)
  handoff = continuation.handoff
  if cut is not None:
    kept = tokens[:tokens_through(decode, tokens, stop)]
    return Completion(text[:cut], kept, "stop", len(row.prompt), None if handoff is None else min(handoff, len(kept)))
  return Completion(text, tokens, "stop" if continuation.eos else "length", len(row.prompt), handoff)


def check_stop(stop: str | Sequence[str] | None) -> tuple[str, ...]:
  """The stop strings of a request as a tuple (at most 4, none empty, as OpenAI allows)."""
  if stop is None:
    return ()
  strings = (stop,) if isinstance(stop, str) else tuple(stop)
  if len(strings) > 4 or any(not s for s in strings):
    raise RequestError(f"stop {list(strings)!r} must be up to 4 non-empty strings.", "stop")
  return strings


def complete(family: ServedFamily, member: str, prompts: Sequence[str | Sequence[int]], *, max_tokens: int = 16,
             sampling: Sampling = Sampling(), stop: str | Sequence[str] | None = None,
             answer_marker: str | None = None) -> list[Completion]:
  """Completes every prompt with ``member`` (the Python API behind ``/v1/completions``): greedy by default. A
  budget-control pair (``family-50pct+100pct``) hands over at ``answer_marker`` (default: the family's)."""
  stop = check_stop(stop)
  rows = [Row(encode_prompt(family, prompt), max_tokens, sampling) for prompt in prompts]
  continuations = family.continue_rows(member, rows, answer_marker=answer_marker)
  return [finish(family, row, c, stop) for row, c in zip(rows, continuations)]
