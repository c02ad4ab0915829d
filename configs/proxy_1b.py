"""A 1.2B hybrid for one 80 GB GPU: the paper's recipe (configs/nano_v2_12b.py) scaled down to try on one device.

    python -m elastic_jax.plan --config configs/proxy_1b.py                  # per-device memory on one H100
    python -m elastic_jax.train --config configs/proxy_1b.py --config.data.paths=/data/corpus \\
        --config.data.tokenizer=/data/NVIDIA-Nemotron-Nano-12B-v2-Base/tokenizer.json
    python benchmarks/mfu.py --config configs/proxy_1b.py                    # elastic step time and MFU

Same block pattern style as Nano V2 (Mamba-2 / MLP pairs with an attention block every fifth pair), same
vocabulary size (131072: the Nemotron tokenizer), smaller widths: d=2048, 26 blocks (12 Mamba-2, 12 MLP, 2
attention). Parent: pretrained here on ``data`` (no public Nemotron-H of this size), or any NemotronH checkpoint
via ``parent.hf_path``. Elastic setup as in the 12B config: budgets 100% / 73% / 49% (12B / 9B / 6B of Nano V2),
candidates at the same fractions of the parent's widths, same router and learning rates; stage 1 at 4096 tokens,
stage 2 at twice that (the paper's stage 2 is 6x longer; one GPU's memory bounds ours), both 131K tokens per step.
"""

import ml_collections

NANO_BUDGETS = [1.0, 9e9 / 12_310_001_152, 6e9 / 12_310_001_152]  # 12B / 9B / 6B of Nano V2 12B (spec §2)


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = ml_collections.ConfigDict(dict(
      pattern="M-M-M-M*-M-M-M-M*-M-M-M-M-",
      vocab_size=131072,
      hidden_size=2048,
      intermediate_size=6144,
      num_attention_heads=16,
      num_key_value_heads=4,
      head_dim=128,
      mamba_num_heads=64,
      mamba_head_dim=64,
      n_groups=8,
      ssm_state_size=128,
      conv_kernel=4,
      chunk_size=128,
      layer_norm_epsilon=1e-5,
      dtype="bfloat16",
      param_dtype="float32",
  ))
  # Your corpus and the Nemotron tokenizer (tokenizer="" is UTF-8 bytes, which also fits the vocabulary).
  config.data = ml_collections.ConfigDict(dict(kind="files", paths="", tokenizer=""))
  config.parent = ml_collections.ConfigDict(dict(hf_path="", pretrain_steps=20000, batch_size=32, seq_len=4096,
                                                 learning_rate=3e-4, warmup_steps=500))
  config.importance = ml_collections.ConfigDict(dict(batches=64, batch_size=4, seq_len=4096, depth_batches=4))
  config.elastic = ml_collections.ConfigDict(dict(
      budgets=NANO_BUDGETS,
      # Spec §3 granularity: Mamba heads in multiples of n_groups=8, query heads in multiples of the 4 KV heads.
      space=dict(hidden=[1280, 1536, 1792, 2048],
                 mlp=[3072, 3584, 4096, 4608, 5120, 5632, 6144],
                 attention_heads=[8, 12, 16],
                 mamba_heads=[32, 40, 48, 56, 64],
                 mamba_head_dim=[40, 48, 56, 64],
                 depth=[22, 24, 26],
                 mlp_mode="heterogeneous"),
      router=dict(width=256, tau_start=1.0, tau_end=0.05, scale_start=1.0, scale_end=10.0),  # spec §5, D-4
      dead_zone=0.02,  # D-6
      router_loss_weight=1.0,
      kd_temperature=1.0,
      ce_weight=0.0,
      stratified=True,
  ))
  # Spec §6 shape: stage 1 uniform over budgets, stage 2 longer context weighted toward the full model.
  config.stages = [
      dict(name="stage1", steps=2000, batch_size=32, seq_len=4096, budget_probs=[1 / 3, 1 / 3, 1 / 3]),
      dict(name="stage2", steps=800, batch_size=16, seq_len=8192, budget_probs=[0.5, 0.3, 0.2]),
  ]
  config.optimizer = ml_collections.ConfigDict(dict(learning_rate=9e-5, warmup_steps=60, schedule="cosine"))
  config.router_optimizer = ml_collections.ConfigDict(dict(learning_rate=1e-2, warmup_steps=60,
                                                           schedule="constant", weight_decay=0.0))
  config.checkpoint_every = 200
  config.mesh = ml_collections.ConfigDict(dict(shape=(1,), rules=()))
  # One GPU: 16 micro-batches per step (stage 1: 2 sequences each, stage 2: 1), every block rematerialised, bf16
  # teacher. The logits ([tokens, 131072] fp32, five of them at the loss) dominate the activations.
  config.memory = ml_collections.ConfigDict(dict(
      remat=dict(mamba="full", attention="full", mlp="full"), grad_accum_steps=16, teacher_dtype="bfloat16"))
  config.plan = ml_collections.ConfigDict(dict(device="h100", num_devices=1, mfu=0.4))
  config.eval = ml_collections.ConfigDict(dict(ppl_batches=8, batch_size=4, seq_len=4096, examples=128,
                                               max_new_tokens=1024, decode_batch=16))
  return config
