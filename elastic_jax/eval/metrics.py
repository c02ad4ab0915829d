"""Evaluation metrics: held-out perplexity and generated-answer accuracy on the synthetic reasoning tasks, and how
fast a model decodes.

All run the one ``HybridLM`` class, so a parent, a masked parent (``masks``) and an extracted child are measured by
the same code.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import time
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from elastic_jax.data.tasks import Example, extract_answer
from elastic_jax.data.tokenizer import Tokenizer
from elastic_jax.eval.generate import generate, generate_ragged
from elastic_jax.model import HybridLM, ModelConfig
from elastic_jax.train.losses import token_nll
from elastic_jax.train.sharding import (DEFAULT_RULES, LogicalRules, batch_sharding, host_to_global, param_shardings,
                                        replicated, shard_params, sharded_jit)

Array = jax.Array


@functools.partial(jax.jit, static_argnames=("config",))
def _summed_nll(config: ModelConfig, params, tokens: Array, masks: dict[str, Any] | None) -> tuple[Array, Array]:
  """tokens [b, l+1] -> (sum of next-token NLL over the b*l targets, number of targets); fp32 log-softmax."""
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  logits = HybridLM(config).apply({"params": params}, inputs, masks=masks)
  nll = token_nll(logits, targets)
  return jnp.sum(nll), jnp.asarray(nll.size, jnp.float32)


@dataclasses.dataclass(frozen=True)
class EvaluationPrograms:
  """The evaluation programs compiled for one model and mesh: params in their shardings, each batch split over the
  data-parallel devices, and results (sums, generated tokens) gathered to every process."""

  params: Any  # the params' shardings
  rows: NamedSharding  # [b, ...] batches
  lengths: NamedSharding  # [b] per-row prompt lengths
  summed_nll: Any
  ragged: Any  # (params, prompts, lengths, eos id, limits) -> new tokens [b, max_new_tokens]


@functools.lru_cache(maxsize=16)
def evaluation_programs(config: ModelConfig, mesh: Mesh, rules: LogicalRules | None, max_new_tokens: int
                        ) -> EvaluationPrograms:
  rules = DEFAULT_RULES if rules is None else rules
  params, rows, everywhere = param_shardings(config, mesh, rules), batch_sharding(mesh, rules), replicated(mesh)
  lengths = rows.update(spec=rows.spec[:1])
  summed_nll = sharded_jit(lambda p, tokens: _summed_nll(config, p, tokens, None), mesh, rules, (params, rows),
                           everywhere)
  ragged = sharded_jit(lambda p, prompts, n, eos, limits: generate_ragged(config, p, prompts, n, eos_id=eos,
                                                                          max_new_tokens=max_new_tokens, limits=limits),
                       mesh, rules, (params, rows, lengths, everywhere, lengths), everywhere)
  return EvaluationPrograms(params, rows, lengths, summed_nll, ragged)


def perplexity(config: ModelConfig, params, batches: Iterable[Array | np.ndarray],
               masks: dict[str, Any] | None = None, *, mesh: Mesh | None = None,
               rules: LogicalRules | None = None) -> float:
  """exp(mean next-token NLL) over every target token of every batch.

  Args:
    config: the model's config.
    params: its params.
    batches: token batches [b, l+1] (inputs are ``[:, :-1]``, targets ``[:, 1:]``), e.g. held-out packed batches.
      Every target counts, document separators included, as in training.
    masks: optional sub-network masks passed to the model (``elastic_jax.elastic.masks``), to evaluate a nested
      child inside its parent; their batch axis must match the batches'.
    mesh, rules: evaluate data-parallel under this mesh (every process passes the same batches; each batch size
      must divide over the data-parallel devices). Not combined with ``masks``.

  Returns:
    The perplexity (a Python float), the same on every process.
  """
  if mesh is not None and masks is not None:
    raise ValueError("perplexity under a mesh takes a model, not masks: extract the child first.")
  programs = None if mesh is None else evaluation_programs(config, mesh, rules, 1)
  if programs is not None:
    params = shard_params(params, programs.params)
  # Sums accumulate on the host in float64: a long evaluation must not lose precision in a float32 running sum.
  total_nll, total_count = 0.0, 0.0
  for tokens in batches:
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
      raise ValueError(f"perplexity batches must be [b, l+1] with l >= 1, got shape {tuple(tokens.shape)}.")
    if programs is None:
      nll, count = _summed_nll(config, params, jnp.asarray(tokens), masks)
    else:
      nll, count = programs.summed_nll(params, host_to_global(tokens, programs.rows))
    total_nll += float(nll)
    total_count += float(count)
  if total_count == 0:
    raise ValueError("perplexity needs at least one batch.")
  return math.exp(total_nll / total_count)


def generated_texts(prompt_len: int, rows: np.ndarray, tokenizer: Tokenizer) -> list[str]:
  """[b, prompt_len + n] generated rows -> the text after each prompt, up to the first end-of-document id."""
  return [tokenizer.decode([int(t) for t in row[prompt_len:]]) for row in np.asarray(rows)]


def grade(examples: Sequence[Example], generations: Sequence[str]) -> dict[str, Any]:
  """Exact match of each generation's extracted answer: {"accuracy", "n", "correct", "per_problem": [bool per
  example, in order], "per_family": {family: {"accuracy", "n"}}}.

  ``per_problem`` lets two models graded on the same examples be compared problem by problem (a paired bootstrap,
  ``eval.stats.paired_bootstrap``)."""
  if len(examples) != len(generations):
    raise ValueError(f"{len(examples)} examples but {len(generations)} generations.")
  per_problem = [extract_answer(text) == example.answer for example, text in zip(examples, generations)]
  correct: dict[str, int] = collections.Counter()
  count: dict[str, int] = collections.Counter()
  for example, right in zip(examples, per_problem):
    count[example.family] += 1
    correct[example.family] += int(right)
  n = len(per_problem)
  return {"accuracy": sum(per_problem) / n if n else 0.0, "n": n, "correct": sum(per_problem),
          "per_problem": per_problem,
          "per_family": {family: {"accuracy": correct[family] / count[family], "n": count[family]}
                         for family in sorted(count)}}


def answer_accuracy(config: ModelConfig, params, examples: Sequence[Example], tokenizer: Tokenizer, *,
                    max_new_tokens: int, batch_size: int, ragged: bool = False,
                    return_generations: bool = False, mesh: Mesh | None = None,
                    rules: LogicalRules | None = None) -> dict[str, Any]:
  """Greedy cached decoding of each example's prompt, graded by exact match of the answer after ``####``.

  By default prompts are grouped by exact token length: one compile of ``generate`` per length. With ``ragged=True``
  every batch goes through ``generate_ragged`` instead, which prefills prompts of mixed lengths in one pass (left
  padded, the pad positions masked out of attention and of the Mamba state, so each row continues exactly as it would
  alone): a single compile for the whole set. A last, partial batch is filled up by repeating one of its prompts
  (rows decode independently) and the copies are dropped, so no extra batch size compiles.

  Args:
    config: the model's config.
    params: its params.
    examples: task examples (``prompt`` and ``answer`` are used).
    tokenizer: encodes prompts and decodes generations; its ``eos_id`` ends a generation.
    max_new_tokens: tokens generated per prompt (an answer not reached by then counts as wrong).
    batch_size: prompts decoded together.
    ragged: decode batches of mixed lengths with ``generate_ragged`` (one compile) instead of length buckets.
    return_generations: also return the generated texts, in the order of ``examples``.
    mesh, rules: decode data-parallel under this mesh, each batch's rows split over the data-parallel devices
      (``batch_size`` must divide over them) and the tokens gathered to every process; ragged decoding only.

  Returns:
    {"accuracy": float, "n": int, "correct": int, "per_problem": [bool per example, in order], "per_family":
    {family: {"accuracy", "n"}}} and, when asked, "generations": list[str].
  """
  if batch_size < 1 or max_new_tokens < 1:
    raise ValueError(f"batch_size={batch_size} and max_new_tokens={max_new_tokens} must be >= 1.")
  if mesh is not None and not ragged:
    raise ValueError("answer_accuracy under a mesh decodes with ragged=True (one compile for every length mix).")
  encoded = [tokenizer.encode(example.prompt) for example in examples]
  generations: list[str | None] = [None] * len(examples)
  programs = None if mesh is None else evaluation_programs(config, mesh, rules, max_new_tokens)
  if programs is not None:
    params = shard_params(params, programs.params)
  if ragged and encoded:
    for start in range(0, len(examples), batch_size):
      chunk, batch = _ragged_batch(encoded, start, batch_size, programs is not None)
      inputs = _ragged_inputs(programs, batch, tokenizer.eos_id, max_new_tokens)
      new_tokens = _call_ragged(config, params, programs, inputs, max_new_tokens)
      for index, text in zip(chunk, generated_texts(0, np.asarray(new_tokens), tokenizer)):
        generations[index] = text
    return _result(examples, generations, return_generations)
  by_length: dict[int, list[int]] = collections.defaultdict(list)
  for index, ids in enumerate(encoded):
    by_length[len(ids)].append(index)
  for length in sorted(by_length):
    indices = by_length[length]
    for start in range(0, len(indices), batch_size):
      chunk = indices[start:start + batch_size]
      filled = chunk + [chunk[0]] * (min(batch_size, len(indices)) - len(chunk))
      prompts = jnp.asarray([encoded[i] for i in filled], jnp.int32)
      rows = generate(config, params, prompts, max_new_tokens=max_new_tokens, temperature=0.0,
                      eos_id=tokenizer.eos_id)
      for index, text in zip(chunk, generated_texts(length, np.asarray(rows), tokenizer)):
        generations[index] = text
  return _result(examples, generations, return_generations)


def _ragged_batch(encoded: Sequence[Sequence[int]], start: int, batch_size: int, on_mesh: bool
                  ) -> tuple[list[int], tuple[np.ndarray, np.ndarray]]:
  """The ragged batch of the prompts from ``start`` on: (the prompt indices it holds, (prompts [rows, width],
  lengths [rows])), padded to the longest of all ``encoded`` (one width, so one compile, for the whole set). A last,
  partial batch repeats its first prompt up to ``batch_size`` rows under a mesh (they divide over the data-parallel
  devices), else up to ``min(batch_size, len(encoded))``."""
  width = max(len(ids) for ids in encoded)
  chunk = list(range(start, min(start + batch_size, len(encoded))))
  rows = batch_size if on_mesh else min(batch_size, len(encoded))
  filled = chunk + [chunk[0]] * (rows - len(chunk))
  prompts = np.zeros((len(filled), width), np.int32)  # the tail past each length is never read
  for row, index in enumerate(filled):
    prompts[row, :len(encoded[index])] = encoded[index]
  return chunk, (prompts, np.asarray([len(encoded[i]) for i in filled], np.int32))


def _ragged_inputs(programs: EvaluationPrograms | None, batch: tuple[np.ndarray, np.ndarray], eos_id: int,
                   limit: int) -> tuple:
  """The arguments after the params of the ragged program (``programs.ragged`` under a mesh, else
  ``generate_ragged``): prompts, lengths, the end-of-document id and each row's new-token limit, on the devices."""
  prompts, lengths = batch
  limits = np.full(len(lengths), limit, np.int32)
  if programs is None:
    return jnp.asarray(prompts), jnp.asarray(lengths), eos_id, jnp.asarray(limits)
  return (host_to_global(prompts, programs.rows), host_to_global(lengths, programs.lengths), np.int32(eos_id),
          host_to_global(limits, programs.lengths))


def _call_ragged(config: ModelConfig, params, programs: EvaluationPrograms | None, inputs: tuple,
                 max_new_tokens: int) -> Array:
  """[rows, max_new_tokens] new tokens of one ragged batch (``_ragged_inputs``)."""
  if programs is None:
    prompts, lengths, eos_id, limits = inputs
    return generate_ragged(config, params, prompts, lengths, max_new_tokens=max_new_tokens, eos_id=eos_id,
                           limits=limits)
  return programs.ragged(params, *inputs)


def decode_speed(config: ModelConfig, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 batch_size: int, reps: int = 5, mesh: Mesh | None = None,
                 rules: LogicalRules | None = None) -> dict[str, Any]:
  """Greedy decode tokens per second of one batch: the first batch of ``prompts`` (token ids), built as
  ``answer_accuracy(..., ragged=True)`` builds it, so after an evaluation of the same prompts its compiled program
  is reused.

  The batch is decoded with the end-of-document id off (no row ends early) by the same program twice: with every
  row stopping after 1 new token (T(1): the prefill and the first token) and after ``max_new_tokens`` (T(n)). Each
  call is timed around the whole program (one dispatch: the decode loop runs on the devices, nothing comes back to
  the host inside it), the fastest of ``reps`` timed calls of each after one untimed call of each (which compiles
  when needed). The tokens are counted in the programs' outputs.

  Args:
    config, params: the model.
    prompts: token ids, as many as ``answer_accuracy`` would decode (their longest sets the batch's width).
    max_new_tokens: n >= 2.
    batch_size: rows per batch (under a mesh, they divide over the data-parallel devices).
    reps: timed calls of each length.
    mesh, rules: decode data-parallel under this mesh (every process calls this with the same arguments).

  Returns:
    {"tokens_per_s": decode tokens / seconds (None unless seconds > 0), "tokens": the tokens the n-token calls
    generated beyond the 1-token calls' (batch x (n - 1)), "seconds": T(n) - T(1), "batch", "prompt_width",
    "new_tokens": n, "reps"}.
  """
  if max_new_tokens < 2 or reps < 1 or not prompts:
    raise ValueError(f"decode_speed needs max_new_tokens >= 2 (got {max_new_tokens}), reps >= 1 (got {reps}) and "
                     "at least one prompt.")
  programs = None if mesh is None else evaluation_programs(config, mesh, rules, max_new_tokens)
  if programs is not None:
    params = shard_params(params, programs.params)
  _, batch = _ragged_batch(prompts, 0, batch_size, programs is not None)
  inputs = {limit: _ragged_inputs(programs, batch, -1, limit) for limit in (1, max_new_tokens)}
  times: dict[int, list[float]] = {1: [], max_new_tokens: []}
  counted = {}
  for rep in range(reps + 1):  # the first round is not timed
    for limit, args in inputs.items():
      start = time.perf_counter()
      out = jax.block_until_ready(_call_ragged(config, params, programs, args, max_new_tokens))
      seconds = time.perf_counter() - start
      counted[limit] = int(np.sum(np.asarray(out) >= 0))  # with eos off, only positions past the limit are -1
      if rep:
        times[limit].append(seconds)
  seconds = min(times[max_new_tokens]) - min(times[1])
  tokens = counted[max_new_tokens] - counted[1]
  return {"tokens_per_s": tokens / seconds if seconds > 0 else None, "tokens": tokens, "seconds": seconds,
          "batch": int(batch[0].shape[0]), "prompt_width": int(batch[0].shape[1]), "new_tokens": max_new_tokens,
          "reps": reps}


def _result(examples: Sequence[Example], generations: list, return_generations: bool) -> dict[str, Any]:
  result = grade(examples, generations)
  if return_generations:
    result["generations"] = generations
  return result
