"""Distillation and language-modelling losses, per sample so that losses can be reported per budget."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _token_mean(values: Array, token_mask: Array | None) -> Array:
  """[b, l] -> [b]: mean over the tokens that count."""
  if token_mask is None:
    return jnp.mean(values, axis=-1)
  token_mask = token_mask.astype(values.dtype)
  return jnp.sum(values * token_mask, axis=-1) / jnp.maximum(jnp.sum(token_mask, axis=-1), 1.0)


def forward_kl(student_logits: Array, teacher_logits: Array, *, temperature: float = 1.0,
               token_mask: Array | None = None) -> Array:
  """KL(teacher || student) over the vocabulary, per sample: [b, l, V] x2 -> [b].

  Computed in fp32 from log-softmaxes (no probabilities of the student are formed, so no log(0)). Scaled by T^2 so
  gradient magnitudes do not shrink with the temperature (Hinton et al.).
  """
  t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(t) * (t - s), axis=-1)  # [b, l]
  return _token_mean(kl, token_mask) * temperature ** 2


def token_nll(logits: Array, targets: Array) -> Array:
  """Next-token negative log-likelihood per token, in fp32: logits [b, l, V], targets [b, l] int -> [b, l].

  The target's logit is a one-hot contraction, not a gather: with the vocabulary split over devices it is a local
  product and a sum, where a gather would first reassemble every row's logits on one device.
  """
  logits = logits.astype(jnp.float32)
  target_logits = jnp.sum(logits * jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32), axis=-1)
  return jax.nn.logsumexp(logits, axis=-1) - target_logits


def cross_entropy(logits: Array, targets: Array, *, token_mask: Array | None = None) -> Array:
  """Next-token cross-entropy per sample: logits [b, l, V], targets [b, l] int -> [b]."""
  return _token_mean(token_nll(logits, targets), token_mask)


def kd_loss(student_logits: Array, teacher_logits: Array, targets: Array, *, temperature: float = 1.0,
            ce_weight: float = 0.0) -> Array:
  """The distillation objective per sample, for the elastic step and the distillation of one standalone student
  alike: forward KL(teacher || student) at ``temperature`` plus ``ce_weight`` x next-token cross-entropy on
  ``targets`` (left out when 0). [b, l, V] x2, [b, l] -> [b]."""
  loss = forward_kl(student_logits, teacher_logits, temperature=temperature)
  if ce_weight:
    loss = loss + ce_weight * cross_entropy(student_logits, targets)
  return loss


def mean_by_group(values: Array, groups: Array, num_groups: int) -> tuple[Array, Array]:
  """Per-group means of per-sample values (e.g. KD loss per budget): ([b], [b] int) -> ([num_groups], counts).

  Groups absent from the batch get mean 0 and count 0 (no NaN), so the result is safe to log every step.
  """
  one_hot = jax.nn.one_hot(groups, num_groups, dtype=jnp.float32)  # [b, k]
  counts = jnp.sum(one_hot, axis=0)
  sums = jnp.einsum("b,bk->k", values.astype(jnp.float32), one_hot)
  return sums / jnp.maximum(counts, 1.0), counts
