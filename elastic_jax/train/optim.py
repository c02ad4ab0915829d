"""Optimizers: AdamW for the model, a separate one (own state, own learning rate) for the router.

Defaults follow the paper where it speaks (model LR 9e-5, router LR 1e-2, 60 warmup steps) and decision D-9 where it
is silent (AdamW betas (0.9, 0.95), weight decay 0.1, global-norm clipping 1.0, cosine or constant after warmup).
"""

from __future__ import annotations

import dataclasses

import jax
import optax

SCHEDULES = ("cosine", "constant")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  learning_rate: float = 9e-5
  warmup_steps: int = 60
  schedule: str = "cosine"  # after warmup: "cosine" (to final_lr_ratio * lr) or "constant"
  final_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  weight_decay: float = 0.1
  grad_clip: float | None = 1.0

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ValueError(f"optimizer schedule={self.schedule!r} is not one of {SCHEDULES}.")
    if self.learning_rate <= 0:
      raise ValueError(f"optimizer learning_rate={self.learning_rate} must be > 0.")
    if self.warmup_steps < 0:
      raise ValueError(f"optimizer warmup_steps={self.warmup_steps} must be >= 0.")
    if not 0 <= self.final_lr_ratio <= 1:
      raise ValueError(f"optimizer final_lr_ratio={self.final_lr_ratio} must be in [0, 1].")


def learning_rate_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0, then cosine decay to ``final_lr_ratio`` x peak at ``total_steps``, or constant."""
  warmup = optax.linear_schedule(0.0, config.learning_rate, max(config.warmup_steps, 1))
  if config.schedule == "constant":
    after = optax.constant_schedule(config.learning_rate)
  else:
    after = optax.cosine_decay_schedule(config.learning_rate, max(total_steps - config.warmup_steps, 1),
                                        alpha=config.final_lr_ratio)
  return optax.join_schedules([warmup, after], [config.warmup_steps])


def _decay_mask(params):
  """Weight decay on matrices only: norms, biases and per-head SSM scalars (A_log, D, dt_bias) are not decayed."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
  parts = []
  if config.grad_clip is not None:
    parts.append(optax.clip_by_global_norm(config.grad_clip))
  parts.append(optax.adamw(learning_rate_schedule(config, total_steps), b1=config.b1, b2=config.b2,
                           weight_decay=config.weight_decay, mask=_decay_mask))
  return optax.chain(*parts)


def default_router_optimizer_config() -> OptimizerConfig:
  """The router's: LR 1e-2 (paper), same warmup, no weight decay, constant after warmup."""
  return OptimizerConfig(learning_rate=1e-2, schedule="constant", weight_decay=0.0)
