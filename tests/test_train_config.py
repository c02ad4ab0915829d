"""Run configs -> engine objects: unknown keys and bad values are errors that name the field."""

from __future__ import annotations

import ml_collections
import pytest
from conftest import small_config

from elastic_jax.train.config import (MemoryConfig, elastic_setup_from_config, memory_from_config,
                                      optimizers_from_config, stages_from_config)
from elastic_jax.train.loop import describe_run

MODEL = small_config("M-*-")


def _config(**overrides):
  config = ml_collections.ConfigDict(dict(
      elastic=dict(budgets=[1.0, 0.5], space=dict(hidden=[16, 32], mlp=[24, 48]),
                   router=dict(width=16, tau_end=0.1), dead_zone=0.01),
      stages=[dict(name="s1", steps=3, batch_size=2, seq_len=8, budget_probs=[0.5, 0.5])],
      optimizer=dict(learning_rate=1e-3), router_optimizer=dict(warmup_steps=5)))
  for key, value in overrides.items():
    config[key] = value
  return config


def test_builds_the_engine_objects():
  config = _config()
  setup = elastic_setup_from_config(config, MODEL, (0, 1, 2, 3), total_steps=3)
  assert setup.budgets == (1.0, 0.5) and setup.router_width == 16 and setup.dead_zone == 0.01
  assert setup.schedule.tau_end == 0.1 and setup.schedule.total_steps == 3
  assert setup.space.hidden == (16, 32) and setup.space.mlp == (24, 48)
  model_opt, router_opt = optimizers_from_config(config)
  assert model_opt.learning_rate == 1e-3
  assert router_opt.learning_rate == 1e-2 and router_opt.warmup_steps == 5 and router_opt.weight_decay == 0.0
  (stage,) = stages_from_config(config)
  assert stage.budget_probs == (0.5, 0.5)


@pytest.mark.parametrize("path, value, message", [
    ("elastic", dict(budgets=[1.0], temperature=2.0), r"unknown key\(s\) \['temperature'\] in config.elastic"),
    ("elastic", dict(router=dict(widht=8)), r"unknown key\(s\) \['widht'\] in config.elastic.router"),
    ("optimizer", dict(lr=1.0), r"unknown key\(s\) \['lr'\] in config.optimizer"),
    ("elastic", dict(budgets=[1.0, 1.2]), r"budget 1.2 is outside \(0, 1\]"),
    ("elastic", dict(space=dict(mlp=[24, 100])), r"mlp candidate 100 is larger than the parent"),
    ("memory", dict(remat=dict(mamba="full"), checkpointing=True),
     r"unknown key\(s\) \['checkpointing'\] in config.memory"),
    ("memory", dict(remat=dict(ssm="full")), r"config.memory.remat has block kind 'ssm'"),
    ("memory", dict(remat=dict(mlp="some")), r"config.memory.remat\['mlp'\]='some' is not a policy"),
    ("memory", dict(grad_accum_steps=0), r"config.memory.grad_accum_steps=0 must be a positive integer"),
    ("memory", dict(teacher_dtype="float16"),
     r"config.memory.teacher_dtype='float16' is not one of \('float32', 'bfloat16'\)"),
])
def test_bad_config_names_the_field(path, value, message):
  config = _config(**{path: value})
  with pytest.raises(ValueError, match=message):
    elastic_setup_from_config(config, MODEL, (0, 1, 2, 3), 3)
    optimizers_from_config(config)


def test_bad_stages():
  with pytest.raises(ValueError, match=r"unknown key\(s\) \['seq_length'\] in config.stages\[0\]"):
    stages_from_config(_config(stages=[dict(name="s", steps=1, batch_size=1, seq_length=8, budget_probs=[1.0])]))
  with pytest.raises(ValueError, match="config.stages is empty"):
    stages_from_config(_config(stages=[]))


def test_memory_section():
  assert memory_from_config(_config()) == MemoryConfig()  # absent: no remat, no accumulation, fp32 teacher
  config = _config(memory=dict(remat=dict(mamba="full", attention="dots", mlp="none"), grad_accum_steps=2,
                               teacher_dtype="bfloat16"))
  setup = elastic_setup_from_config(config, MODEL, (0, 1, 2, 3), total_steps=3)
  assert setup.remat == (("attention", "dots"), ("mamba", "full"))
  assert setup.grad_accum_steps == 2 and setup.teacher_dtype == "bfloat16"
  # The levers are part of the run's identity: a resume under another setting is refused on these fields.
  optimizers = optimizers_from_config(config)
  record = describe_run(setup, stages_from_config(config), *optimizers, seed=0)
  assert record["memory"] == {"remat": {"attention": "dots", "mamba": "full"}, "grad_accum_steps": 2,
                              "teacher_dtype": "bfloat16"}
  plain = describe_run(elastic_setup_from_config(_config(), MODEL, (0, 1, 2, 3), 3), stages_from_config(config),
                       *optimizers, seed=0)
  assert plain["memory"] == {"remat": {}, "grad_accum_steps": 1, "teacher_dtype": "float32"}


def test_tiny_config_memory_defaults():
  import importlib.util  # pylint: disable=import-outside-toplevel
  import pathlib  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(__file__).parent.parent / "configs" / "tiny.py"
  spec = importlib.util.spec_from_file_location("tiny_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert memory_from_config(module.get_config()) == MemoryConfig(remat=(), grad_accum_steps=1,
                                                                 teacher_dtype="float32")
