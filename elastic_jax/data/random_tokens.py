"""Uniform random token batches with a checkpointable position: the smallest data source the training loop accepts.

Batch ``i`` depends only on ``(seed, i)``, so the iterator state is one integer and a resumed run sees exactly the
batches an uninterrupted run would. Real corpora come through the grain pipelines with the same
``get_state`` / ``set_state`` contract.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class RandomTokenBatches:
  """Iterator of int32 [batch_size, length] token batches, uniform over [0, vocab_size)."""

  def __init__(self, seed: int, batch_size: int, length: int, vocab_size: int):
    self.seed, self.batch_size, self.length, self.vocab_size = seed, batch_size, length, vocab_size
    self.position = 0

  def __iter__(self) -> "RandomTokenBatches":
    return self

  def __next__(self) -> np.ndarray:
    rng = np.random.default_rng([self.seed, self.position])
    self.position += 1
    return rng.integers(0, self.vocab_size, (self.batch_size, self.length), dtype=np.int32)

  def get_state(self) -> dict[str, Any]:
    return {"position": self.position}

  def set_state(self, state: dict[str, Any]) -> None:
    self.position = int(state["position"])
