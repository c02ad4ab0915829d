"""The embedded MoE default: the whole method on a tiny hybrid Mamba-2 / attention / MoE model (the block kinds of
Nemotron 3), end to end on a 2-core CPU.

    python -m elastic_jax.train --config configs/tiny_moe.py [--workdir DIR] [--config.parent.pretrain_steps=300 ...]

Everything not about the MoE blocks is ``configs/tiny.py`` (read its comments for the data, stages and schedules);
its two MLP blocks are E blocks here. Family: 100% / 75% / 50% of the parent's parameters (all of them: see
``elastic.budget_metric`` below).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  # The parent (766k parameters): Mamba-2, attention and MoE blocks, as in Nemotron 3 (no dense MLP block). Each E
  # block: 8 routed experts of width 64, a token uses 2 of them (one expert group), plus a shared expert of width 64;
  # relu^2 MLPs as in transformers. Experts of width 128 (1.06M parameters) made the 75% comparison empty: halving
  # every routed expert's width alone reaches 75% of that parent, and the zero-shot pruned baseline doing so still
  # answered 99% / 95% (short / long; the child 99% / 98%). At width 64 no budget is reached through the experts
  # alone, and the baseline has to cut blocks, hidden channels or Mamba heads, as in configs/tiny.py.
  config.model = ml_collections.ConfigDict(dict(
      pattern="MEM*ME",
      vocab_size=256,  # byte-level
      hidden_size=128,
      num_attention_heads=4,
      num_key_value_heads=2,
      head_dim=32,
      mamba_num_heads=8,
      mamba_head_dim=32,
      n_groups=2,
      ssm_state_size=32,
      conv_kernel=4,
      chunk_size=32,
      n_routed_experts=8,
      num_experts_per_tok=2,
      n_group=1,
      topk_group=1,
      moe_intermediate_size=64,
      moe_shared_expert_intermediate_size=64,
      n_shared_experts=1,
      dtype="float32",
      param_dtype="float32",
  ))
  # Data as in configs/tiny.py: multi-digit arithmetic; the long-context set has the same problems after 8 notes.
  config.data = ml_collections.ConfigDict(dict(
      kind="tasks", paths="", tokenizer="", eos_token="",
      stage_tasks=[dict(families=["arithmetic"], difficulty=1, distractors=0),
                   dict(families=["arithmetic"], difficulty=1, distractors=8)]))
  # 1200 steps (tiny.py: 1500): with 1500 the 1.06M-parameter parent's loss was flat from step 1200 on; this one
  # answers 99.6% / 98.0% on seed 0 (README, "The MoE default").
  config.parent = ml_collections.ConfigDict(dict(hf_path="", pretrain_steps=1200, batch_size=16, seq_len=128,
                                                 learning_rate=3e-3, warmup_steps=50, long_every=4))
  config.importance = ml_collections.ConfigDict(dict(batches=8, batch_size=8, seq_len=256, depth_batches=2))
  # budget_metric="params": a budget is a fraction of all the parent's parameters, the memory a child needs. With
  # "active_params" (the parameters a token computes with, which counts only the num_experts_per_tok routed experts
  # a token uses), dropping routed experts would shrink a child by the router's columns alone, so the router would
  # keep every expert and the moe_experts axis would do nothing. Here the routed experts hold a third of the
  # parameters, and fewer or narrower experts are priced at what they hold (on seed 0 the router kept all 8 experts
  # of every block and narrowed them instead: 48 and 32 of 64 neurons at 75% and 50%).
  # moe_mode (like every *_mode) is "homogeneous": every E block keeps the same experts count and widths, so each
  # child exports to a transformers NemotronH checkpoint (extract --format hf).
  config.elastic = ml_collections.ConfigDict(dict(
      budgets=[1.0, 0.75, 0.5],
      budget_metric="params",
      space=dict(hidden=[64, 80, 96, 112, 128], attention_heads=[2, 4], mamba_heads=[4, 6, 8],
                 mamba_head_dim=[16, 24, 32], moe_experts=[4, 6, 8], moe_expert_dim=[32, 48, 64],
                 moe_shared_dim=[32, 64], depth=[5, 6]),
      router=dict(width=64, estimator="softmax", tau_start=1.0, tau_end=0.05, scale_start=1.0, scale_end=10.0),
      dead_zone=0.02,
      argmax_loss_weight=1.0,
      stratified=True,
  ))
  # As in configs/tiny.py, with 600 stage-1 steps (not 800): the KD loss of every budget was down to 0.005 by step
  # 600 when the wider parent trained 800, and the run stays within a few CPU minutes.
  config.stages = [
      dict(name="stage1", steps=600, batch_size=12, seq_len=128, budget_probs=[1 / 3, 1 / 3, 1 / 3]),
      dict(name="stage2", steps=80, batch_size=6, seq_len=256, budget_probs=[0.5, 0.3, 0.2]),
      dict(name="stage2_pinned", steps=60, batch_size=6, seq_len=256, budget_probs=[0.5, 0.3, 0.2], pinned=True),
  ]
  config.optimizer = ml_collections.ConfigDict(dict(learning_rate=3e-3, warmup_steps=20, schedule="cosine"))
  config.router_optimizer = ml_collections.ConfigDict(dict(learning_rate=1e-2, warmup_steps=20))
  config.checkpoint_every = 100
  config.mesh = ml_collections.ConfigDict(dict(shape=(), rules=()))
  config.memory = ml_collections.ConfigDict(dict(
      remat=dict(mamba="none", attention="none", mlp="none"),
      grad_accum_steps=1,
      teacher_dtype="float32",
  ))
  config.eval = ml_collections.ConfigDict(dict(ppl_batches=4, batch_size=8, seq_len=256, examples=256,
                                               max_new_tokens=96, decode_batch=32))
  return config
