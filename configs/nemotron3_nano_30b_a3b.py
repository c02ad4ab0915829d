"""Nemotron 3 Nano 30B-A3B (hybrid Mamba-2 / MoE / attention) elastified into a nested 30B / 23B / 12B family.

    python -m elastic_jax.plan --config configs/nemotron3_nano_30b_a3b.py      # will it fit? (no weights needed)
    python -m elastic_jax.train --config configs/nemotron3_nano_30b_a3b.py \\
        --config.parent.hf_path=/data/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16 --config.data.paths=/data/corpus \\
        --config.data.tokenizer=/data/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16/tokenizer.json

Parent: the ``nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16`` checkpoint in Hugging Face format (``config.json``,
``model.safetensors.index.json`` and its shards; per-expert tensors as transformers saves them), in a local directory
(``huggingface-cli download nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16 --local-dir DIR``). The ``model`` block repeats
its architecture so that planning needs no checkpoint; the two must agree. 52 blocks: 23 Mamba-2, 23 MoE (128 routed
experts, 6 per token, plus one shared expert), 6 attention; 31,577,940,288 parameters, 3,580,076,352 active per
token (``elastic_jax.elastic.param_count``).

Family: 30B / 23B / 12B of the *total* parameters, the sizes of NVIDIA's elastic release of this model. Every axis is
width (the release found depth compression weaker for reasoning): hidden channels, attention heads, Mamba heads,
routed experts kept and the experts' and shared expert's widths. MoE widths are homogeneous across blocks, so each
child exports as a stock NemotronH checkpoint (``extract --format hf``).

Hardware: a TPU v5p-1024 slice (512 chips): FSDP over 8, context parallelism over 16 (stage 2's 49K-token sequences,
3,072 tokens per chip) and the routed experts over 4 (expert axis; the batch also splits over it). Compiled for that
slice (``--compile-for v5p:8x8x8``), libtpu needs 54.5 GB (stage 1) and 61.8 GB (stage 2) of the 95 GB per chip;
smaller slices did not fit (README, "MoE parents": 128 chips needed 96 / 110 GB, 256 chips 84-89 GB at stage 2).
"""

import importlib.util
import pathlib

import ml_collections

# The parent's exact parameter count; budgets are fractions of it.
NEMOTRON3_NANO_PARAMS = 31_577_940_288


def _nano_v2_config() -> ml_collections.ConfigDict:
  """configs/nano_v2_12b.py's config (the file beside this one)."""
  spec = importlib.util.spec_from_file_location("nano_v2_config", pathlib.Path(__file__).with_name("nano_v2_12b.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config() -> ml_collections.ConfigDict:
  config = _nano_v2_config()
  config.model = ml_collections.ConfigDict(dict(
      pattern="MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
      vocab_size=131072,
      hidden_size=2688,
      intermediate_size=1856,  # the checkpoint's value; no MLP (-) block uses it
      num_attention_heads=32,
      num_key_value_heads=2,
      head_dim=128,
      mamba_num_heads=64,
      mamba_head_dim=64,
      n_groups=8,
      ssm_state_size=128,
      conv_kernel=4,
      chunk_size=128,
      layer_norm_epsilon=1e-5,
      n_routed_experts=128,
      num_experts_per_tok=6,
      moe_intermediate_size=1856,
      moe_shared_expert_intermediate_size=3712,
      n_shared_experts=1,
      n_group=1,
      topk_group=1,
      norm_topk_prob=True,
      routed_scaling_factor=2.5,
      dtype="bfloat16",  # compute; params and optimizer state stay fp32, router and norms fp32
      param_dtype="float32",
  ))
  config.elastic.budgets = [1.0, 23e9 / NEMOTRON3_NANO_PARAMS, 12e9 / NEMOTRON3_NANO_PARAMS]
  config.elastic.budget_metric = "params"  # total parameters (the checkpoint); "active_params" for per-token compute
  # Mamba head counts are multiples of n_groups=8, query heads multiples of the 2 KV heads (D-1); groups, state,
  # KV heads, head dims and the router's top-k never elastic. No depth axis (width only).
  config.elastic.space = dict(hidden=[1792, 2048, 2304, 2560, 2688],
                              attention_heads=[16, 24, 32],
                              mamba_heads=[40, 48, 56, 64],
                              moe_experts=[64, 80, 96, 112, 128],
                              moe_expert_dim=[1024, 1280, 1536, 1856],
                              moe_shared_dim=[1856, 2560, 3712])
  # Data, parent, calibration, router schedule, losses, the curriculum (spec §6) at the 12B run's batch shapes and
  # token counts, and both optimizers: configs/nano_v2_12b.py's.

  # (data, fsdp, tensor, context, expert) over 512 v5p chips: non-expert params and optimizer state over fsdp (8),
  # routed experts over fsdp x expert (32), each sequence over context (16: ring attention's [l/C, l/C] score blocks
  # dominate stage 2 at 8). The global micro-batch (batch / grad_accum_steps: 96, then 32) divides over
  # data x fsdp x expert (32).
  config.mesh = ml_collections.ConfigDict(dict(shape=(1, 8, 1, 16, 4), rules=()))
  config.memory = ml_collections.ConfigDict(dict(
      remat=dict(mamba="full", attention="full", moe="full"), grad_accum_steps=16, teacher_dtype="bfloat16"))
  config.plan = ml_collections.ConfigDict(dict(device="v5p", num_devices=512, mfu=0.4))
  config.eval.batch_size = 16  # perplexity batches of 16 (the 12B run's: 8), split over 32 data-parallel chips
  return config
