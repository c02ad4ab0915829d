"""Analytical FLOP model of the hybrid model's forward pass and of the elastic train step.

One implementation, shared by the planner (``elastic_jax.plan``), the benchmarks and anything that reports MFU.
Its totals agree with XLA's ``cost_analysis()["flops"]`` of the same programs within a few percent (the surplus on
XLA's side is the elementwise work the model leaves out; see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import math

from elastic_jax.model.config import ModelConfig

# A step runs the trained student forward and backward (the backward computes two operand gradients per matmul:
# 3 forwards' worth) and the frozen teacher forward once.
STUDENT_FORWARDS = 3
TEACHER_FORWARDS = 1


def forward_flops_per_token(config: ModelConfig, length: int) -> dict[str, float]:
  """Model FLOPs of one forward pass per token (2 per multiply-add), by kind of work.

  matmul: 2 x the matmul parameters: every projection kernel of every block (Mamba z, x, B, C, dt and out; attention
    q, k, v, o; MLP up and down; MoE router, the num_experts_per_tok routed experts a token runs, shared expert and
    latent projections) and the LM head [d, V]. The embedding lookup, norms, conv kernels/biases and the
    per-head SSM scalars (A_log, D, dt_bias) do no matmul and are not counted.
  attention: per attention block, scores Q K^T and outputs P V over all ``length`` keys (the core computes the full
    [l, l] square and masks it): 2 l hd Hq + 2 l hd Hq = 4 l hd Hq per token.
  ssd: per Mamba block, the four einsums of ``ops.ssd._ssd_chunked`` per chunk of q tokens (sequences are padded
    to whole chunks, so the per-token cost is scaled by padded / real length):
      C B^T scores, per group:               2 q^2 n  per chunk and group  ->  2 q g n  per token
      weights @ x, per head:                 2 q^2 p  per chunk and head   ->  2 q h p  per token
      chunk states x^T (decay dt B):         2 q p n  per chunk and head   ->  2 h p n  per token
      outputs from the chunk-start state:    2 q p n  per chunk and head   ->  2 h p n  per token
    The elementwise decays, the softmaxes, the KL and the state passing across chunks (O(h p n) per chunk) are not
    counted.

  A training step of a student costs 3x its forward (the backward computes two operand gradients per matmul), a
  frozen teacher 1x. A masked student computes at the parent's full size, so masks change no FLOP count here.
  """
  d, vocab = config.hidden_size, config.vocab_size
  matmul_params = d * vocab  # LM head
  attention = ssd = 0.0
  for spec in config.block_specs():
    if spec.kind == "mlp":
      matmul_params += 2 * d * spec.intermediate_size
    elif spec.kind == "attention":
      hq, hkv, hd = spec.num_attention_heads, config.num_key_value_heads, config.head_dim
      matmul_params += d * hq * hd + 2 * d * hkv * hd + hq * hd * d
      attention += 4 * length * hd * hq
    elif spec.kind == "moe":
      k, i, latent = config.num_experts_per_tok, spec.moe_intermediate_size, config.moe_latent_size
      matmul_params += (d * spec.n_routed_experts + k * 2 * config.expert_input_size * i
                        + 2 * d * spec.moe_shared_expert_intermediate_size
                        + (0 if latent is None else 2 * d * latent))
    else:
      h, p, g, n, q = (spec.mamba_num_heads, spec.mamba_head_dim, config.n_groups, config.ssm_state_size,
                       config.chunk_size)
      matmul_params += d * (2 * h * p + 2 * g * n + h) + h * p * d
      padded = math.ceil(length / q) * q
      ssd += 2 * (q * g * n + q * h * p + 2 * h * p * n) * padded / length
  return {"matmul": 2.0 * matmul_params, "attention": attention, "ssd": ssd}


def elastic_step_flops(config: ModelConfig, batch: int, length: int) -> float:
  """Model FLOPs of one elastic step over a global batch of ``batch`` sequences of ``length`` tokens.

  Student train pass (3 forwards) + frozen teacher forward (1). Rematerialisation recomputes forwards but is not
  model work, so it is not counted (MFU, not hardware FLOP utilisation); router, masks and the optimizer are
  negligible next to the model and are left out.
  """
  per_token = sum(forward_flops_per_token(config, length).values())
  return (STUDENT_FORWARDS + TEACHER_FORWARDS) * per_token * batch * length


def lm_step_flops(config: ModelConfig, batch: int, length: int) -> float:
  """Model FLOPs of one next-token train step (parent pretraining) over ``batch`` sequences of ``length`` tokens:
  one model's train pass (3 forwards), no teacher."""
  per_token = sum(forward_flops_per_token(config, length).values())
  return STUDENT_FORWARDS * per_token * batch * length
