"""Elastic train-step time and MFU of a run config on the devices at hand (meant for the 1B proxy on one GPU).

    python benchmarks/mfu.py --config configs/proxy_1b.py [--stage 0] [--steps 10] [--device h100]
    python benchmarks/mfu.py --config configs/proxy_1b.py --smoke        # shrunken model: a CPU check of the script

The step is the training loop's (``elastic_jax.plan.jit_elastic_step``: the config's elastic setup, memory levers,
mesh and shardings), on freshly initialised params, a bf16/fp32 teacher copy as ``memory.teacher_dtype`` says, and
random tokens of the stage's batch shape. After a compile and two warm-up steps, ``--steps`` steps are timed one
by one; MFU = model FLOPs of a step (``elastic_jax.train.flops.elastic_step_flops``: student 3 forwards + teacher 1,
remat recomputation not counted) / median step time / (devices x the device's bf16 peak from
``elastic_jax.plan.DEVICES``). XLA's own FLOP count of the compiled step is printed beside the model's, and the
planner's memory estimate beside XLA's memory analysis.

``--smoke`` swaps in a tiny model with the first period of the config's block pattern (up to the first attention
block and its MLP), fraction-based candidates (0.5 / 0.75 / 1 of every width, depth L-2 and L), two sequences of 64
tokens, one micro-batch and one device, so the script runs in a minute or two on a CPU; its MFU means nothing.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from elastic_jax import plan as plan_lib
from elastic_jax.elastic.param_count import param_count
from elastic_jax.elastic.space import ElasticSpace
from elastic_jax.model import ModelConfig, init_params
from elastic_jax.train.config import memory_from_config, stages_from_config
from elastic_jax.train.flops import elastic_step_flops

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a Python run config (get_config()).",
                                          lock_config=True)
_STAGE = flags.DEFINE_integer("stage", 0, "Index of the stage whose batch shape is timed.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after the compile and 2 warm-up steps).")
_DEVICE = flags.DEFINE_string("device", None, "Peak FLOP/s of which device kind (default: detected).")
_SMOKE = flags.DEFINE_bool("smoke", False, "Shrink the model and batch to a CPU-sized smoke check.")


def smoke_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config with a tiny model of the pattern's first period, fraction candidates, a 2 x 64 batch, one device."""
  config = ml_collections.ConfigDict(config.to_dict())
  pattern = config.model.pattern
  end = pattern.find("*")
  pattern = pattern if end < 0 else pattern[:end + 2]  # through the first attention block and the block after it
  model = dict(config.model.to_dict(), pattern=pattern, hidden_size=64, intermediate_size=128, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, mamba_num_heads=8, mamba_head_dim=16, n_groups=2,
               ssm_state_size=16, chunk_size=32, vocab_size=512, dtype="float32")
  config.model = model
  model_config = ModelConfig.from_dict(model)
  space = ElasticSpace.from_fractions(model_config, (0.5, 0.75, 1.0)).to_dict()
  space["depth"] = [model_config.num_layers - 2, model_config.num_layers]
  config.elastic.space = space
  config.elastic.router.width = 16
  config.stages = [dict(stage, batch_size=2, seq_len=64) for stage in config.stages]
  config.mesh = dict(shape=(1,), rules=())
  if "memory" in config:
    config.memory.grad_accum_steps = 1
  config.plan = dict(device="cpu", num_devices=1, mfu=0.4)
  return config


def main(argv) -> None:
  del argv
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config configs/proxy_1b.py")
  if _SMOKE.value:
    config = smoke_config(config)
  device_name = _DEVICE.value or plan_lib.detect_device()
  device = plan_lib.device_spec(device_name)
  stage = stages_from_config(config)[_STAGE.value]
  model_config = ModelConfig.from_dict(config.model)
  levers = memory_from_config(config)
  print(f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind} (peak {device.peak_flops:.3g} "
        f"FLOP/s each as {device_name}); {param_count(model_config):,} params, pattern {model_config.pattern}; "
        f"stage {stage.name!r}: {stage.batch_size} x {stage.seq_len} tokens; remat "
        f"{levers.policies()}, grad_accum_steps {levers.grad_accum_steps}, teacher {levers.teacher_dtype}",
        flush=True)

  jitted = plan_lib.jit_elastic_step(config)
  tic = time.perf_counter()
  compiled = jitted.lower(stage).compile()
  compile_seconds = time.perf_counter() - tic
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  memory = compiled.memory_analysis()

  training = jitted.training
  params = jax.device_put(init_params(model_config, jax.random.key(0)), training.state_shardings.params)
  teacher = jax.tree.map(lambda p: p.astype(jnp.dtype(levers.teacher_dtype)), params)
  state = training.init(jax.tree.map(jnp.copy, params))  # optimizer and router states beside the sharded params
  rng = np.random.default_rng(0)
  tokens = jax.device_put(rng.integers(0, model_config.vocab_size, (stage.batch_size, stage.seq_len + 1),
                                       dtype=np.int32), training.batch_sharding)
  probs = jax.device_put(np.asarray(stage.budget_probs, np.float32), jitted.replicated)

  times = []
  for i in range(2 + _STEPS.value):
    tic = time.perf_counter()
    state, metrics = compiled(state, teacher, tokens, probs)
    jax.block_until_ready((state, metrics))
    if i >= 2:
      times.append(time.perf_counter() - tic)
  median = statistics.median(times)
  flops = elastic_step_flops(model_config, stage.batch_size, stage.seq_len)
  mfu = flops / median / (jax.device_count() * device.peak_flops)
  estimate = plan_lib.make_plan(config, device=device_name).stages[_STAGE.value].memory
  xla_flops = float(cost.get("flops", float("nan"))) * jax.device_count()
  print(f"compiled in {compile_seconds:.1f} s; loss after {len(times) + 2} steps {float(metrics['loss']):.4f}")
  print(f"step time: median {1e3 * median:.1f} ms (min {1e3 * min(times):.1f}, max {1e3 * max(times):.1f}) over "
        f"{len(times)} steps; {stage.batch_size * stage.seq_len / median:,.0f} tokens/s")
  print(f"model FLOPs per step {flops:.4g} (XLA's count {xla_flops:.4g}, ratio {xla_flops / flops:.3f}); "
        f"MFU {100 * mfu:.1f}% of {jax.device_count()} x {device.peak_flops:.3g} FLOP/s")
  size = plan_lib.format_bytes
  print(f"memory per device: XLA temp {size(memory.temp_size_in_bytes)}, arguments "
        f"{size(memory.argument_size_in_bytes)}; planner: activations + gradients "
        f"{size(estimate['activations'] + estimate['gradients'])}, total {size(estimate['total'])}")


if __name__ == "__main__":
  app.run(main)
