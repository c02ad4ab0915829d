"""Run configs -> engine objects: unknown keys and bad values are errors that name the field."""

from __future__ import annotations

import pathlib

import jax
import ml_collections
import pytest
from conftest import small_config

from elastic_jax.train.config import (elastic_setup_from_config, memory_from_config, optimizers_from_config,
                                      stages_from_config)
from elastic_jax.train.loop import describe_run
from elastic_jax.train.memory import MemoryConfig

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
    ("elastic", dict(budgets=[1.0], temperature=2.0), r"elastic.temperature: unknown key \(did you mean "
                                                      r"kd_temperature\?\)"),
    ("elastic", dict(router=dict(widht=8)), r"elastic.router.widht: unknown key \(did you mean width\?\)"),
    ("optimizer", dict(lr=1.0), r"optimizer.lr: unknown key \(known keys: b1, b2, "),
    ("elastic", dict(budgets=[1.0, 1.2]), r"budget 1.2 is outside \(0, 1\]"),
    ("elastic", dict(space=dict(mlp=[24, 100])), r"mlp candidate 100 is larger than the parent"),
    ("memory", dict(remat=dict(mamba="full"), checkpointing=True), r"memory.checkpointing: unknown key"),
    ("memory", dict(remat=dict(ssm="full")),
     r"memory.remat.ssm: unknown key \(known keys: attention, mamba, mlp, moe\)"),
    ("memory", dict(remat=dict(mlp="some")), r"memory.remat.mlp: 'some' is not one of none, full, dots"),
    ("memory", dict(grad_accum_steps=0), r"memory.grad_accum_steps: 0 must be an integer >= 1"),
    ("memory", dict(teacher_dtype="float16"),
     r"memory.teacher_dtype: 'float16' is not one of float32, bfloat16 \(did you mean bfloat16\?\)"),
])
def test_bad_config_names_the_field(path, value, message):
  config = _config(**{path: value})
  with pytest.raises(ValueError, match=message):
    elastic_setup_from_config(config, MODEL, (0, 1, 2, 3), 3)
    optimizers_from_config(config)


def test_bad_stages():
  with pytest.raises(ValueError, match=r"stages\[0\].seq_length: unknown key \(did you mean seq_len\?\)"):
    stages_from_config(_config(stages=[dict(name="s", steps=1, batch_size=1, seq_length=8, budget_probs=[1.0])]))
  with pytest.raises(ValueError, match="stages: is empty"):
    stages_from_config(_config(stages=[]))


def test_memory_section():
  assert memory_from_config(_config()) == MemoryConfig()  # absent: no remat, no accumulation, fp32 teacher
  config = _config(memory=dict(remat=dict(mamba="full", attention="dots", mlp="none"), grad_accum_steps=2,
                               teacher_dtype="bfloat16"))
  setup = elastic_setup_from_config(config, MODEL, (0, 1, 2, 3), total_steps=3)
  assert setup.memory == MemoryConfig(remat=dict(mamba="full", attention="dots"), grad_accum_steps=2,
                                      teacher_dtype="bfloat16")
  assert setup.memory.remat == (("attention", "dots"), ("mamba", "full"))
  # The levers are part of the run's identity: a resume under another setting is refused on these fields.
  optimizers = optimizers_from_config(config)
  record = describe_run(setup, stages_from_config(config), *optimizers, seed=0)
  assert record["memory"] == {"remat": {"attention": "dots", "mamba": "full"}, "grad_accum_steps": 2,
                              "teacher_dtype": "bfloat16"}
  plain = describe_run(elastic_setup_from_config(_config(), MODEL, (0, 1, 2, 3), 3), stages_from_config(config),
                       *optimizers, seed=0)
  assert plain["memory"] == {"remat": {}, "grad_accum_steps": 1, "teacher_dtype": "float32"}


def test_memory_config_is_the_one_type_of_the_levers():
  memory = MemoryConfig(remat={"mlp": "dots", "mamba": "none"}, grad_accum_steps=4)
  assert memory.remat == (("mlp", "dots"),)  # hashable pairs of the kinds rematerialised; "none" is left out
  assert [memory.policy(kind) for kind in ("mamba", "attention", "mlp")] == ["none", "none", "dots"]
  assert memory.policies() == {"mamba": "none", "attention": "none", "mlp": "dots", "moe": "none"}
  assert memory.policies("M-M") == {"mamba": "none", "mlp": "dots"}  # the kinds of a pattern
  assert MemoryConfig(remat=memory.remat, grad_accum_steps=4) == memory  # the stored pairs read back the same
  hash(memory)  # a static field of ElasticSetup
  # The constructor and the config section refuse bad values with the same one-line errors.
  for kwargs, message in ((dict(remat={"ssm": "full"}), r"memory.remat.ssm: unknown key"),
                          (dict(remat={"mlp": "some"}), r"memory.remat.mlp: 'some' is not one of none, full, dots"),
                          (dict(remat=["full"]), r"memory.remat: \['full'\] is not a dict"),
                          (dict(grad_accum_steps=0), r"memory.grad_accum_steps: 0 must be an integer >= 1"),
                          (dict(grad_accum_steps=True), r"memory.grad_accum_steps: True must be an integer >= 1"),
                          (dict(teacher_dtype="fp16"), r"memory.teacher_dtype: 'fp16' is not one of float32")):
    with pytest.raises(ValueError, match=message):
      MemoryConfig(**kwargs)
  with pytest.raises(ValueError, match=r"memory.remat: \(\('mlp', 'dots'\),\) is not a dict"):
    MemoryConfig.from_dict({"remat": (("mlp", "dots"),)})  # a config gives a dict
  with pytest.raises(ValueError, match=r"memory.grad_acum_steps: unknown key \(did you mean grad_accum_steps\?\)"):
    MemoryConfig.from_dict({"grad_acum_steps": 2})


def test_tiny_config_memory_defaults():
  import importlib.util  # pylint: disable=import-outside-toplevel
  import pathlib  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(__file__).parent.parent / "configs" / "tiny.py"
  spec = importlib.util.spec_from_file_location("tiny_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert memory_from_config(module.get_config()) == MemoryConfig(remat=(), grad_accum_steps=1,
                                                                 teacher_dtype="float32")


# ------------------------------------------------------------------------------------------------ shapes vs mesh
def _tiny():
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location("tiny", pathlib.Path(__file__).parents[1] / "configs" / "tiny.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _divisible_tiny():
  """The tiny config with every batch (24) and length (240) divisible by every mesh the cases use."""
  cfg = _tiny()
  for section in (cfg.parent, cfg.importance, cfg.eval, *cfg.stages):
    section["batch_size"], section["seq_len"] = 24, 240
  cfg.eval.decode_batch = 24
  return cfg


def _mesh(*sizes):
  sizes = tuple(sizes) + (1,) * (4 - len(sizes))
  return jax.sharding.AbstractMesh(sizes, ("data", "fsdp", "tensor", "context"))


@pytest.mark.parametrize("mesh, key, value, message", [
    ((4,), "stages[1].batch_size", 6,
     r"stages\[1\].batch_size: 6 is not divisible by the 4 data-parallel devices of mesh \(4,\) \(make it a "
     r"multiple of 4"),
    ((2, 2), "stages[0].batch_size", 10, r"stages\[0\].batch_size: 10 is not divisible by the 4 "
                                         r"data-parallel devices of mesh \(2, 2\)"),
    ((1, 1, 1, 2), "stages[1].seq_len", 255, r"stages\[1\].seq_len: 255 is not divisible by the 2 "
                                             r"context-parallel devices of mesh \(1, 1, 1, 2\)"),
    ((3,), "parent.batch_size", 16, r"parent.batch_size: 16 is not divisible by the 3 data-parallel"),
    ((3,), "parent.hf_path", "/some/checkpoint", None),  # an imported parent is not pretrained: its batch is free
    ((1, 1, 1, 3), "parent.seq_len", 128, r"parent.seq_len: 128 is not divisible by the 3 context-parallel"),
    ((3,), "importance.batch_size", 8, r"importance.batch_size: 8 is not divisible by the 3"),
    ((1, 1, 1, 2), "importance.seq_len", 255, r"importance.seq_len: 255 is not divisible by the 2 context"),
    ((8,), "eval.batch_size", 4, r"eval.batch_size: 4 is not divisible by the 8 data-parallel"),
    ((8,), "eval.decode_batch", 12, r"eval.decode_batch: 12 is not divisible by the 8 data-parallel"),
    ((1, 1, 1, 2), "eval.seq_len", 99, r"eval.seq_len: 99 is not divisible by the 2 context-parallel"),
    ((8,), "memory.grad_accum_steps", 2, r"parent.batch_size: 24 in 2 micro-batches \(memory."
                                         r"grad_accum_steps\) gives 12 rows per micro-batch, not divisible by the 8 "
                                         r"data-parallel devices of mesh \(8,\) \(make parent.batch_size a "
                                         r"multiple of 16\)"),
])
def test_run_shapes_that_the_mesh_cannot_split_are_refused_naming_the_field(mesh, key, value, message):
  from elastic_jax.model.config import ConfigError  # pylint: disable=import-outside-toplevel
  from elastic_jax.train.config import check_run_shapes  # pylint: disable=import-outside-toplevel
  from elastic_jax.train.sharding import DEFAULT_RULES  # pylint: disable=import-outside-toplevel
  cfg = _divisible_tiny()
  section, _, field = key.partition(".")
  if section.startswith("stages["):
    cfg.stages[int(section[7:-1])][field] = value
  else:
    cfg[section][field] = value
  if message is None:
    cfg.parent.batch_size = 16  # would not divide over 3 devices were the parent pretrained here
    check_run_shapes(cfg, _mesh(*mesh), DEFAULT_RULES)
    return
  with pytest.raises(ConfigError, match=message):
    check_run_shapes(cfg, _mesh(*mesh), DEFAULT_RULES)


def test_run_shapes_that_divide_pass_on_every_mesh():
  from elastic_jax.train.config import check_run_shapes  # pylint: disable=import-outside-toplevel
  from elastic_jax.train.sharding import DEFAULT_RULES  # pylint: disable=import-outside-toplevel
  cfg = _divisible_tiny()
  for mesh in ((1,), (2,), (3,), (4,), (8,), (2, 2), (1, 4), (2, 2, 2), (1, 2, 1, 2), (2, 1, 1, 4)):
    check_run_shapes(cfg, _mesh(*mesh), DEFAULT_RULES)
  # Rows go where the batch rule puts them: with the batch on data only, fsdp (5 devices) does not split it.
  check_run_shapes(cfg, _mesh(2, 5), (("batch", "data"),) + DEFAULT_RULES[1:])
