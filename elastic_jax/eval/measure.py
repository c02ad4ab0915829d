"""Measuring one model: perplexity on token batches, generated-answer accuracy on task examples and, when asked,
decode speed.

The main job's report (``python -m elastic_jax.train``) and the ``python -m elastic_jax.evaluate`` CLI both measure
through :func:`measure_model`, so the two give the same number for the same model, data and settings: greedy cached
decoding with one compile for prompts of any length (``answer_accuracy(..., ragged=True)``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from elastic_jax.data import tasks
from elastic_jax.data.pipeline import PackedBatches
from elastic_jax.data.tokenizer import Tokenizer
from elastic_jax.eval.metrics import answer_accuracy, decode_speed, perplexity
from elastic_jax.model import ModelConfig


class EvalSplitDocuments:
  """The synthetic tasks' evaluation split as an endless document stream (``elastic_jax.data.pipeline``'s
  ``DocumentStream``): document ``i`` is the text of ``tasks.generate_example(config, seed, "eval", i)``.

  The evaluation split never shares a problem with the training split, at any distractor count
  (``tasks.split_of_problem``), so perplexity on these documents is held out whatever seed the training used.
  """

  def __init__(self, config: tasks.TaskConfig, seed: int):
    self.config, self.seed = config, seed

  def text(self, position: int) -> str:  # endless: every position is a fresh example
    return tasks.generate_example(self.config, self.seed, "eval", position).text


def eval_split_batches(config: tasks.TaskConfig, seed: int, tokenizer: Tokenizer, *, batches: int, batch_size: int,
                       seq_len: int) -> list[np.ndarray]:
  """``batches`` int32 [batch_size, seq_len + 1] batches packed from the evaluation split (documents joined by the
  tokenizer's end-of-document id, exactly as training batches are packed)."""
  packed = PackedBatches(EvalSplitDocuments(config, seed), tokenizer, batch_size, seq_len)
  return [next(packed) for _ in range(batches)]


def measure_model(config: ModelConfig, params: Any, ppl_batches: Sequence[np.ndarray],
                  example_sets: Mapping[str, Sequence[tasks.Example]], tokenizer: Tokenizer, *, max_new_tokens: int,
                  decode_batch: int, time_decode: bool = False, mesh: Any = None, rules: Any = None
                  ) -> dict[str, Any]:
  """Perplexity over ``ppl_batches``, answer accuracy on each set of examples and, with ``time_decode``, decode
  speed.

  Args:
    config: the model's config.
    params: its params.
    ppl_batches: token batches [b, l + 1]; none skips perplexity.
    example_sets: label -> task examples; each set is decoded and graded on its own.
    tokenizer: encodes prompts, decodes generations (its end-of-document id stops a generation).
    max_new_tokens: tokens generated per prompt.
    decode_batch: prompts decoded together.
    time_decode: also time greedy decoding (``metrics.decode_speed``) of the first ``decode_batch`` prompts of the
      first set, ``max_new_tokens`` tokens each, after its accuracy (whose compiled program it reuses): the same
      batch and lengths for every model measured on the same sets.
    mesh, rules: measure data-parallel under this mesh (every process passes the same batches and examples and gets
      the same result); None: one device.

  Returns:
    {"ppl": float or None, "accuracy": {label: {"accuracy", "n", "correct", "per_problem", "per_family": {family:
    {"accuracy", "n"}}}}}, and with ``time_decode`` "decode": ``metrics.decode_speed``'s result (None without
    examples, or with ``max_new_tokens`` 1); ``per_problem`` lists, in the set's order, whether each example was
    answered right (the report pairs a child's list with its baseline's: both are given the same examples).
  """
  ppl = perplexity(config, params, ppl_batches, mesh=mesh, rules=rules) if len(ppl_batches) else None
  accuracy = {label: answer_accuracy(config, params, examples, tokenizer, max_new_tokens=max_new_tokens,
                                     batch_size=decode_batch, ragged=True, mesh=mesh, rules=rules)
              for label, examples in example_sets.items()}
  if not time_decode:
    return {"ppl": ppl, "accuracy": accuracy}
  first = next((examples for examples in example_sets.values() if examples), None)
  speed = None
  if first is not None and max_new_tokens >= 2:
    speed = decode_speed(config, params, [tokenizer.encode(example.prompt) for example in first],
                         max_new_tokens=max_new_tokens, batch_size=decode_batch, mesh=mesh, rules=rules)
  return {"ppl": ppl, "accuracy": accuracy, "decode": speed}
