"""``python -m elastic_jax.train --config configs/<name>.py [--config.key=value ...]``

The pipeline driver. Today it builds the configured parent model, checks its forward pass and cached generation
end to end, and reports size and throughput; the elastic phases (importance, training stages, extraction,
evaluation) plug in behind the same command line.
"""

from __future__ import annotations

import time

from absl import app
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a Python config file (get_config()).",
                                          lock_config=True)


def main(argv) -> None:
  del argv
  import jax
  import numpy as np

  from elastic_jax.eval.generate import generate
  from elastic_jax.model import HybridLM, ModelConfig

  cfg = _CONFIG.value
  if cfg is None:
    raise app.UsageError("--config is required, e.g. --config configs/tiny.py")
  model_config = ModelConfig.from_dict(cfg.model)
  model = HybridLM(model_config)
  key = jax.random.key(cfg.seed)
  tokens = jax.random.randint(key, (cfg.batch_size, cfg.seq_len), 0, model_config.vocab_size)
  params = jax.jit(model.init)(key, tokens)["params"]
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  print(f"model: pattern={model_config.pattern!r} d={model_config.hidden_size} params={n_params:,}")

  forward = jax.jit(model.apply)
  logits = forward({"params": params}, tokens).block_until_ready()
  start = time.perf_counter()
  reps = 3
  for _ in range(reps):
    logits = forward({"params": params}, tokens).block_until_ready()
  elapsed = (time.perf_counter() - start) / reps
  print(f"forward: logits {tuple(logits.shape)} finite={bool(np.isfinite(np.asarray(logits)).all())} "
        f"{cfg.batch_size * cfg.seq_len / elapsed:,.0f} tokens/s")

  prompt = np.frombuffer(cfg.prompt.encode(), np.uint8).astype(np.int32)[None] % model_config.vocab_size
  out = generate(model_config, params, prompt, max_new_tokens=cfg.max_new_tokens)
  print(f"generate: {np.asarray(out)[0, prompt.shape[1]:].tolist()} (untrained parent: arbitrary tokens)")


if __name__ == "__main__":
  app.run(main)
