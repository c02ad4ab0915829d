"""The embedded default: a tiny hybrid model that runs end to end on a 2-core CPU in minutes.

    python -m elastic_jax.train --config configs/tiny.py [--config.model.hidden_size=96 ...]
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
  config.batch_size = 8
  config.seq_len = 256
  config.prompt = "12+34="
  config.max_new_tokens = 32
  return config
