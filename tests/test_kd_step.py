"""Distillation of one standalone student (train.kd_step): its loss against a numpy KL of the two models' logits,
zero at student == teacher, gradient accumulation, and a pruned student learning its teacher."""

from __future__ import annotations

import jax
import numpy as np

from elastic_jax.elastic.extract import extract
from elastic_jax.elastic.space import Choice
from elastic_jax.model import HybridLM, ModelConfig, init_params
from elastic_jax.train.kd_step import compiled_kd_step
from elastic_jax.train.optim import OptimizerConfig
from elastic_jax.train.sharding import make_mesh, param_shardings, shard_params

CONFIG = ModelConfig(pattern="M-*-", vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=16, mamba_num_heads=4, mamba_head_dim=8, n_groups=2,
                     ssm_state_size=8, chunk_size=8)
OPTIMIZER = OptimizerConfig(learning_rate=3e-3, warmup_steps=0, schedule="constant")


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _tokens(seed: int = 0, batch: int = 4, length: int = 16) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, CONFIG.vocab_size, (batch, length + 1)).astype(np.int32)


def _run(student_config, student, teacher, tokens, steps=1, grad_accum_steps=1, temperature=1.0):
  mesh = make_mesh()
  training = compiled_kd_step(student_config, CONFIG, OPTIMIZER, 100, mesh, temperature=temperature,
                              grad_accum_steps=grad_accum_steps)
  state = training.init(shard_params(student, training.state_shardings.params))
  teacher = shard_params(teacher, param_shardings(CONFIG, mesh))
  losses, grad_norms = [], []
  for _ in range(steps):
    state, metrics = training.step(state, teacher, tokens)
    losses.append(float(metrics["loss"]))
    grad_norms.append(float(metrics["grad_norm"]))
  return state, losses, grad_norms


def _pruned(teacher):
  choice = Choice.homogeneous(CONFIG, hidden=16, mlp=32, mamba_heads=2)
  return extract(CONFIG, teacher, choice, list(range(CONFIG.num_layers)))


def test_the_loss_is_the_kl_of_the_two_models_logits_computed_in_numpy():
  teacher = init_params(CONFIG, jax.random.key(0))
  child_config, student = _pruned(init_params(CONFIG, jax.random.key(1)))
  tokens = _tokens()
  _, (loss,), _ = _run(child_config, student, teacher, tokens, temperature=2.0)
  inputs = tokens[:, :-1]
  t = _np_log_softmax(np.asarray(HybridLM(CONFIG).apply({"params": teacher}, inputs), np.float64) / 2.0)
  s = _np_log_softmax(np.asarray(HybridLM(child_config).apply({"params": student}, inputs), np.float64) / 2.0)
  want = (np.exp(t) * (t - s)).sum(-1).mean() * 4.0
  np.testing.assert_allclose(loss, want, rtol=1e-4)


def test_kd_is_zero_and_gradients_vanish_when_the_student_is_the_teacher():
  teacher = init_params(CONFIG, jax.random.key(0))
  _, (loss,), (grad_norm,) = _run(CONFIG, teacher, teacher, _tokens())
  assert abs(loss) < 1e-6 and grad_norm < 1e-6


def test_two_micro_batches_compute_the_same_step_as_one_batch():
  teacher = init_params(CONFIG, jax.random.key(0))
  child_config, student = _pruned(teacher)
  tokens = _tokens(batch=4)
  one, loss_one, _ = _run(child_config, student, teacher, tokens, steps=2)
  two, loss_two, _ = _run(child_config, student, teacher, tokens, steps=2, grad_accum_steps=2)
  np.testing.assert_allclose(loss_two, loss_one, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), two.params, one.params)


def test_a_pruned_student_learns_its_teacher():
  teacher = init_params(CONFIG, jax.random.key(0))
  child_config, student = _pruned(teacher)
  _, losses, _ = _run(child_config, student, teacher, _tokens(), steps=12)
  assert losses[-1] < 0.5 * losses[0], losses
