"""The train state every step function takes and returns."""

from __future__ import annotations

from typing import Any

import flax
import jax

Array = jax.Array
Params = Any


@flax.struct.dataclass
class TrainState:
  """Everything a step changes. The PRNG key is stored as raw key data so checkpoints hold plain arrays."""

  step: Array
  params: Params
  opt_state: Any
  rng: Array
  router_params: Params = None
  router_opt_state: Any = None

  def key(self) -> Array:
    return jax.random.wrap_key_data(self.rng)
