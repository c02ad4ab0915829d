"""The embedded default: the whole method on a tiny hybrid model, end to end on a 2-core CPU.

    python -m elastic_jax.train --config configs/tiny.py [--workdir DIR] [--config.parent.pretrain_steps=300 ...]

Parent: pretrained here on the synthetic reasoning corpus (set ``parent.hf_path`` to elastify a Nemotron-H
checkpoint instead). Family: 100% / 75% / 50% of the parent's parameters.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  # The parent: every block kind, several Mamba groups, chunk smaller than the sequence.
  config.model = ml_collections.ConfigDict(dict(
      pattern="M-M*M-",
      vocab_size=256,  # byte-level
      hidden_size=128,
      intermediate_size=384,
      num_attention_heads=4,
      num_key_value_heads=2,
      head_dim=32,
      mamba_num_heads=8,
      mamba_head_dim=32,
      n_groups=2,
      ssm_state_size=32,
      conv_kernel=4,
      chunk_size=32,
      dtype="float32",
      param_dtype="float32",
  ))
  # Data: the synthetic reasoning tasks (kind="files", paths=[...] for your own text/JSONL). tokenizer: an HF
  # tokenizer.json (or a folder holding one) whose ids fit model.vocab_size; "" reads UTF-8 bytes.
  # stage_tasks[i]: the task settings of stage i (the last one also serves later stages; a stage's own `tasks`
  # index picks another entry); the evaluation's "short" and "long" sets are the first and the last. Multi-digit arithmetic, and for the long-context stage the same
  # problems after 8 filler notes. The other families need more than a few CPU minutes at this size: after 1500
  # pretraining steps on "variables" alone this parent answers 5% of them ("modular" needs memorised products).
  config.data = ml_collections.ConfigDict(dict(
      kind="tasks", paths="", tokenizer="", eos_token="",
      stage_tasks=[dict(families=["arithmetic"], difficulty=1, distractors=0),
                   dict(families=["arithmetic"], difficulty=1, distractors=8)]))
  # Parent: hf_path="" -> pretrain on the data above; every long_every-th batch has the long-context settings.
  config.parent = ml_collections.ConfigDict(dict(hf_path="", pretrain_steps=1500, batch_size=16, seq_len=128,
                                                 learning_rate=3e-3, warmup_steps=50, long_every=4))
  config.importance = ml_collections.ConfigDict(dict(batches=8, batch_size=8, seq_len=256, depth_batches=2))
  config.elastic = ml_collections.ConfigDict(dict(
      budgets=[1.0, 0.75, 0.5],
      space=dict(hidden=[64, 80, 96, 112, 128], mlp=[96, 192, 288, 384], attention_heads=[2, 4],
                 mamba_heads=[4, 6, 8], mamba_head_dim=[16, 24, 32], depth=[5, 6]),
      router=dict(width=64, estimator="softmax", tau_start=1.0, tau_end=0.05, scale_start=1.0, scale_end=10.0),
      dead_zone=0.02,
      argmax_loss_weight=1.0,
      stratified=True,
  ))
  # Stage 1: uniform over budgets, short context. Stage 2: longer context (long-distractor tasks), skewed to 100%;
  # its last steps pinned: the router frozen, each budget trains the choice it deploys with.
  # 800 stage-1 steps at the parent's own learning rate (3e-3): with 400 steps at 1e-3, seed 1's children recovered
  # 27% and 29% of the parent's accuracy (its 50% member 32% even with no 75% budget beside it, so not interference),
  # 800 steps alone gave 66% / 73%, 3e-3 alone 103% / 46%, both 100% / 94% (README, "What the report says").
  config.stages = [
      dict(name="stage1", steps=800, batch_size=12, seq_len=128, budget_probs=[1 / 3, 1 / 3, 1 / 3]),
      dict(name="stage2", steps=80, batch_size=6, seq_len=256, budget_probs=[0.5, 0.3, 0.2]),
      dict(name="stage2_pinned", steps=60, batch_size=6, seq_len=256, budget_probs=[0.5, 0.3, 0.2], pinned=True),
  ]
  config.optimizer = ml_collections.ConfigDict(dict(learning_rate=3e-3, warmup_steps=20, schedule="cosine"))
  config.router_optimizer = ml_collections.ConfigDict(dict(learning_rate=1e-2, warmup_steps=20))
  config.checkpoint_every = 100
  # Mesh over (data, fsdp, tensor, context, expert): shape=() puts every device on data; shorter shapes pad with 1
  # (override: --config.mesh.shape="(2,2,2)"; context > 1 splits each sequence, e.g. "(1,2,1,4)"; expert > 1
  # splits MoE blocks' routed experts, for patterns with E blocks).
  # rules=() uses the default logical-axis table (elastic_jax.train.sharding.DEFAULT_RULES); give
  # ((logical_name, mesh_axis_or_axes_or_None), ...) to change it.
  config.mesh = ml_collections.ConfigDict(dict(shape=(), rules=()))
  # Memory levers (none needed at this size): remat per block kind (none | full | dots), micro-batches per step,
  # and the frozen teacher's dtype ("bfloat16" halves its memory).
  config.memory = ml_collections.ConfigDict(dict(
      remat=dict(mamba="none", attention="none", mlp="none"),
      grad_accum_steps=1,
      teacher_dtype="float32",
  ))
  config.eval = ml_collections.ConfigDict(dict(ppl_batches=4, batch_size=8, seq_len=256, examples=256,
                                               max_new_tokens=96, decode_batch=32))
  return config
