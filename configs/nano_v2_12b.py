"""The paper's setting: elastify Nemotron Nano V2 12B into a nested 12B / 9B / 6B family (spec §2-§6).

    python -m elastic_jax.plan --config configs/nano_v2_12b.py            # will it fit? (no weights needed)
    python -m elastic_jax.train --config configs/nano_v2_12b.py \\
        --config.parent.hf_path=/data/NVIDIA-Nemotron-Nano-12B-v2-Base --config.data.paths=/data/corpus \\
        --config.data.tokenizer=/data/NVIDIA-Nemotron-Nano-12B-v2-Base/tokenizer.json

Parent: the NVIDIA Nemotron Nano V2 12B *base* checkpoint in Hugging Face format (``config.json``,
``model.safetensors.index.json`` and its shards, see spec/hf_nemotron_h.md), downloaded to a local directory (e.g.
``huggingface-cli download nvidia/NVIDIA-Nemotron-Nano-12B-v2-Base --local-dir DIR``) or copied there from a GCS
bucket (``gsutil -m cp -r gs://BUCKET/NVIDIA-Nemotron-Nano-12B-v2-Base DIR``). ``parent.hf_path`` names that
directory; the import reads the architecture from its ``config.json``. The ``model`` block below repeats that
architecture so that planning (``elastic_jax.plan``) needs no checkpoint; the two must agree.

Hardware: a TPU v5p-256 slice (128 chips, one JAX device per chip): FSDP over 4, tensor parallelism over 4 (heads,
MLP neurons, vocabulary) and context parallelism over 8 (stage 2's 49K-token sequences split over 8 chips, ring
attention); the planner gives 30 GB (stage 1) and 49 GB (stage 2) of the 95 GB per chip. GPUs, as planned:
32 x H200 with ``--config.plan.device=h200 --config.plan.num_devices=32 --config.mesh.shape="(1,4,2,4)"
--config.memory.grad_accum_steps=128`` (102 GB of 141 GB at stage 2); 80 GB H100s need 64 of them, e.g.
``--config.plan.device=h100 --config.plan.num_devices=64 --config.mesh.shape="(1,4,4,4)"
--config.memory.grad_accum_steps=128`` (60 GB at stage 2; 32 H100s fit stage 1 but need ~79 GB at stage 2).
"""

import ml_collections

# Nano V2 12B's exact parameter count (spec §2): 12,310,001,152. Budgets are fractions of it.
NANO_V2_12B_PARAMS = 12_310_001_152


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Spec §2: 62 blocks (28 Mamba-2, 28 MLP, 6 attention), d=5120, untied 131072-token vocabulary.
  config.model = ml_collections.ConfigDict(dict(
      pattern="M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-",
      vocab_size=131072,
      hidden_size=5120,
      intermediate_size=20480,
      num_attention_heads=40,
      num_key_value_heads=8,
      head_dim=128,
      mamba_num_heads=128,
      mamba_head_dim=80,
      n_groups=8,
      ssm_state_size=128,
      conv_kernel=4,
      chunk_size=128,
      layer_norm_epsilon=1e-5,
      dtype="bfloat16",  # compute; params and optimizer state stay fp32, norms/softmax/SSD decays fp32
      param_dtype="float32",
  ))
  # Your own corpus (JSONL files with a "text" field, text files, or directories of them), tokenized with the
  # checkpoint's own tokenizer: tokenizer="<hf_path>/tokenizer.json".
  config.data = ml_collections.ConfigDict(dict(kind="files", paths="", tokenizer=""))
  config.parent = ml_collections.ConfigDict(dict(hf_path="", pretrain_steps=0, batch_size=1, seq_len=8192,
                                                 learning_rate=1e-4, warmup_steps=0))
  # Spec §4: calibration on 1024 samples x 8192 tokens (128 batches of 8).
  config.importance = ml_collections.ConfigDict(dict(batches=128, batch_size=8, seq_len=8192, depth_batches=4))
  config.elastic = ml_collections.ConfigDict(dict(
      # Spec §1, §6: 12B / 9B / 6B, as fractions of the parent's parameter count.
      budgets=[1.0, 9e9 / NANO_V2_12B_PARAMS, 6e9 / NANO_V2_12B_PARAMS],
      # Spec §3: Mamba head counts multiples of n_groups=8, query head counts multiples of the 8 KV heads (D-1);
      # groups, state, B/C, KV heads and head dim never elastic. MLP widths per layer (heterogeneous, spec §5).
      space=dict(hidden=[3584, 4096, 4608, 5120],
                 mlp=[10240, 12288, 14336, 16384, 18432, 20480],
                 attention_heads=[24, 32, 40],
                 mamba_heads=[64, 80, 96, 112, 128],
                 mamba_head_dim=[56, 64, 72, 80],
                 depth=[54, 58, 62],
                 mlp_mode="heterogeneous"),
      # Spec §5: router width 256, Gumbel temperature 1.0 -> 0.05, logit scale 1 -> 10 over the whole run (D-4).
      router=dict(width=256, tau_start=1.0, tau_end=0.05, scale_start=1.0, scale_end=10.0),
      dead_zone=0.02,  # D-6
      router_loss_weight=1.0,  # D-6: lambda = 1
      kd_temperature=1.0,  # D-7
      ce_weight=0.0,  # D-7
      stratified=True,  # D-8
  ))
  # Spec §6: stage 1 ~65B tokens at 8192 x 1536 (5166 steps), uniform budgets; stage 2 ~45B tokens at 49152 x 512
  # (1788 steps), weighted toward the full model (0.5 / 0.3 / 0.2 for 12B / 9B / 6B).
  config.stages = [
      dict(name="stage1", steps=5166, batch_size=1536, seq_len=8192, budget_probs=[1 / 3, 1 / 3, 1 / 3]),
      dict(name="stage2", steps=1788, batch_size=512, seq_len=49152, budget_probs=[0.5, 0.3, 0.2]),
  ]
  # Spec §5: model LR 9e-5, router LR 1e-2, both with 60 warmup steps; D-9: AdamW (0.9, 0.95), wd 0.1, clip 1.0.
  config.optimizer = ml_collections.ConfigDict(dict(learning_rate=9e-5, warmup_steps=60, schedule="cosine",
                                                    b1=0.9, b2=0.95, weight_decay=0.1, grad_clip=1.0))
  config.router_optimizer = ml_collections.ConfigDict(dict(learning_rate=1e-2, warmup_steps=60,
                                                           schedule="constant", weight_decay=0.0))
  config.checkpoint_every = 200
  # (data, fsdp, tensor, context, expert) over 128 v5p chips: params and optimizer state sharded over fsdp x tensor
  # (16 ways), each sequence over 8 chips (no MoE blocks: expert 1). The global micro-batch (batch /
  # grad_accum_steps) divides over data x fsdp.
  config.mesh = ml_collections.ConfigDict(dict(shape=(1, 4, 4, 8), rules=()))
  # Memory levers (see ``python -m elastic_jax.plan``): every block rematerialised, 64 micro-batches per step
  # (stage 1: 24 sequences each, 6 per FSDP rank; stage 2: 8, two per rank), teacher stored and run in bf16.
  config.memory = ml_collections.ConfigDict(dict(
      remat=dict(mamba="full", attention="full", mlp="full"), grad_accum_steps=64, teacher_dtype="bfloat16"))
  # What the planner assumes when no --device is given.
  config.plan = ml_collections.ConfigDict(dict(device="v5p", num_devices=128, mfu=0.4))
  config.eval = ml_collections.ConfigDict(dict(ppl_batches=16, batch_size=8, seq_len=8192, examples=256,
                                               max_new_tokens=4096, decode_batch=32))
  return config
