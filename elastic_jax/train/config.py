"""The run config: one schema with one default per key, one function that validates a whole run before any phase,
and the builders from a run's ``ml_collections`` config to the training engine's objects.

A config file sets only what differs from :func:`default_config`; :func:`validate_run_config` merges the two and
checks every section, every value and the shapes against the mesh. An error is one line naming the key, what is
wrong and how to fix it: ``eval.exampels: unknown key (did you mean examples?)``.

Layout of the training part of a config (see ``configs/tiny.py``)::

  config.elastic = dict(
      budgets=(1.0, 0.75, 0.5),                 # fractions of the parent's parameter count
      space=dict(hidden=[...], mlp=[...], ..., mlp_mode="homogeneous"),   # ElasticSpace.from_dict
      router=dict(width=256, hard=True, estimator="chosen",  # or "softmax" (straight-through Gumbel-softmax)
                  tau_start=1.0, tau_end=0.05, scale_start=1.0, scale_end=10.0, tau_decay="exponential"),
      kd_temperature=1.0, ce_weight=0.0, router_loss_weight=1.0, argmax_loss_weight=0.0, dead_zone=0.02,
      stratified=False,
      budget_metric="params",  # or "active_params" (MoE: the experts a token uses), or "memory": weights + KV
                               # cache + SSM state at memory_context tokens
      memory_context=8192)
  config.stages = [dict(name="stage1", steps=..., batch_size=..., seq_len=..., budget_probs=[...]), ...]
  config.optimizer = dict(learning_rate=9e-5, warmup_steps=60, ...)        # OptimizerConfig
  config.router_optimizer = dict(learning_rate=1e-2, ...)                  # OptimizerConfig
  config.memory = dict(                                    # levers that trade compute for memory (all optional)
      remat=dict(mamba="none", attention="none", mlp="none"),  # per block kind: none | full | dots
      grad_accum_steps=1,      # micro-batches per step, for the elastic stages and parent pretraining
      teacher_dtype="float32")  # or "bfloat16": the frozen teacher stored and run in bf16
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import ml_collections

from elastic_jax.data.pipeline import SOURCE_KINDS, SourceConfig
from elastic_jax.data.tasks import FAMILIES, TaskConfig
from elastic_jax.elastic import axes
from elastic_jax.elastic.router import ESTIMATORS, RouterSchedule
from elastic_jax.elastic.space import ElasticSpace
from elastic_jax.model.config import ConfigError, ModelConfig
from elastic_jax.train.config_checks import (check_boolean, check_integer, check_keys, check_number, check_one_of,
                                             check_sequence, check_string, config_error, key_path)
from elastic_jax.train.elastic_step import BUDGET_METRICS, ElasticSetup
from elastic_jax.train.memory import MemoryConfig
from elastic_jax.train.loop import Stage
from elastic_jax.train.optim import SCHEDULES, OptimizerConfig, default_router_optimizer_config

T = TypeVar("T")
# ElasticSetup fields that config.elastic sets under the same name (the router's under config.elastic.router).
_LOSS_KEYS = ("kd_temperature", "ce_weight", "router_loss_weight", "argmax_loss_weight", "dead_zone", "stratified",
              "budget_metric", "memory_context")
_ROUTER_SETUP_KEYS = {"width": "router_width", "hard": "hard", "estimator": "estimator"}
TAU_DECAYS = ("exponential", "linear")


def plain(values: Any) -> dict[str, Any]:
  """A ConfigDict / mapping as a plain dict (None as empty)."""
  if values is None:
    return {}
  return dict(values.to_dict() if hasattr(values, "to_dict") else values)


def _is_mapping(value: Any) -> bool:
  return isinstance(value, Mapping) or hasattr(value, "to_dict")


# ------------------------------------------------------------------------------------------------ the schema
def _field_defaults(cls: type) -> dict[str, Any]:
  """The fields of dataclass ``cls`` that have a default, with it."""
  out = {}
  for field in dataclasses.fields(cls):
    if field.default is not dataclasses.MISSING:
      out[field.name] = field.default
    elif field.default_factory is not dataclasses.MISSING:
      out[field.name] = field.default_factory()
  return out


def default_config() -> dict[str, Any]:
  """Every key a run config may set, with its one default (a new plain dict per call).

  A section read into a dataclass takes that dataclass's defaults (``optimizer``: ``OptimizerConfig``; the losses
  of ``elastic``: ``ElasticSetup``; ``elastic.router``: ``RouterSchedule``; ``memory``: ``MemoryConfig``; ``data``:
  ``SourceConfig``). Empty mappings (``model``, ``elastic.space``, ``memory.remat``) take the keys their own
  dataclass or table knows; ``stages`` has no default stage. ``plan`` values of None leave the planner's defaults.
  """
  setup, schedule = _field_defaults(ElasticSetup), _field_defaults(RouterSchedule)
  source, memory = _field_defaults(SourceConfig), _field_defaults(MemoryConfig)
  return {
      "seed": 0,
      "model": {},  # ModelConfig fields; empty with parent.hf_path (the checkpoint's config.json says)
      "data": {**source, "paths": list(source["paths"]),
               "stage_tasks": [dataclasses.asdict(task) for task in source["stage_tasks"]]},
      # hf_path "": pretrain here; every long_every-th batch has the last stage's (long-context) task settings.
      "parent": {"hf_path": "", "pretrain_steps": 1500, "batch_size": 16, "seq_len": 128, "learning_rate": 3e-3,
                 "warmup_steps": 50, "long_every": 4},
      "importance": {"batches": 8, "batch_size": 8, "seq_len": 256, "depth_batches": 2},
      "elastic": {"budgets": (1.0, 0.75, 0.5), "space": {},
                  "router": {**{key: setup[field] for key, field in _ROUTER_SETUP_KEYS.items()}, **schedule},
                  **{key: setup[key] for key in _LOSS_KEYS}},
      "stages": [],
      "optimizer": _field_defaults(OptimizerConfig),
      "router_optimizer": dataclasses.asdict(default_router_optimizer_config()),
      "checkpoint_every": 100,
      "mesh": {"shape": (), "rules": ()},
      "memory": {**memory, "remat": {}},
      "eval": {"ppl_batches": 4, "batch_size": 8, "seq_len": 256, "examples": 64, "max_new_tokens": 96,
               "decode_batch": 32},
      "plan": {"device": None, "num_devices": None, "mfu": None, "devices_per_host": None, "storage_gb_per_s": None,
               "checkpoint_dtype": None, "prompt_len": None},
  }


def _merge(defaults: Mapping[str, Any], values: Any, where: str) -> dict[str, Any]:
  """``defaults`` overlaid with ``values``, recursively into sections with fixed keys; unknown keys refused."""
  values = plain(values)
  check_keys(values, list(defaults), where)
  out = dict(defaults)
  for name, value in values.items():
    default = defaults[name]
    if isinstance(default, dict) and default and _is_mapping(value):
      out[name] = _merge(default, value, key_path(where, name))
    elif isinstance(default, dict) and value is not None and not _is_mapping(value):
      raise config_error(key_path(where, name), f"{value!r} is not a section", f"give a dict of {name} keys")
    else:
      out[name] = plain(value) if _is_mapping(value) else value
  return out


def section(config: Any, name: str) -> Any:
  """Section ``name`` of a run config with every default filled in (a plain dict); for a top-level setting such
  as ``seed`` or ``checkpoint_every``, its value or default."""
  default = default_config()[name]
  if not isinstance(default, dict):
    value = config.get(name)
    return default if value is None else value
  return _merge(default, config.get(name), name)


def _records(key: str, value: Any, fields: Sequence[str]):
  """(``key[i]``, entry as a plain dict) for each entry of the list ``value``: dicts whose keys are among ``fields``."""
  for i, entry in enumerate(check_sequence(key, value)):
    where = f"{key}[{i}]"
    if not _is_mapping(entry):
      raise config_error(where, f"{entry!r} is not a dict", f"give a dict of {', '.join(fields)}")
    entry = plain(entry)
    check_keys(entry, fields, where)
    yield where, entry


def _wrapped(key: str, build, *args, **kwargs):
  """``build(...)``, its ValueError (a dataclass's own check) as a ConfigError naming ``key``."""
  try:
    return build(*args, **kwargs)
  except ConfigError as error:
    raise config_error(key, str(error).rstrip(".")) from error
  except (ValueError, TypeError) as error:
    raise config_error(key, str(error).rstrip(".")) from error


def _check_model(run: dict[str, Any], inputs: bool) -> ModelConfig | None:
  """The parent's architecture: ``config.model``, else (with ``parent.hf_path``) its checkpoint's config.json."""
  model, hf_path = run["model"], run["parent"]["hf_path"]
  check_keys(model, [f.name for f in dataclasses.fields(ModelConfig)], "model")
  if model:
    return _wrapped("model", ModelConfig.from_dict, model)
  if not hf_path:
    raise config_error("model", "missing", "give the parent's architecture (pattern, vocab_size, hidden_size, ...) "
                       "or parent.hf_path to import one")
  if not inputs:
    return None
  from elastic_jax.interop import hf  # pylint: disable=import-outside-toplevel  (its config.json only)
  file = os.path.join(hf_path, hf.CONFIG_FILE)
  try:
    with open(file, encoding="utf-8") as f:
      values = json.load(f)
  except (OSError, ValueError) as error:
    raise config_error("parent.hf_path", f"cannot read {file}: {error}",
                       "give the folder of an HF NemotronH checkpoint") from error
  return _wrapped("parent.hf_path", hf.config_from_hf, values)


def _check_parent(parent: dict[str, Any], inputs: bool) -> None:
  check_string("parent.hf_path", parent["hf_path"])
  if parent["hf_path"]:
    if inputs and not os.path.isfile(os.path.join(parent["hf_path"], "config.json")):
      raise config_error("parent.hf_path", f"{parent['hf_path']} holds no config.json",
                         "give the folder of an HF NemotronH checkpoint: config.json + model.safetensors")
    return  # imported, not pretrained: the pretraining keys are not read
  # Without a checkpoint the parent is pretrained here, and a parent of no steps is an untrained model (the planner
  # accepts 0: a config that imports its parent at run time, as configs/nano_v2_12b.py).
  check_integer("parent.pretrain_steps", parent["pretrain_steps"], 1 if inputs else 0)
  if parent["pretrain_steps"] == 0:
    return
  for name in ("batch_size", "seq_len"):
    check_integer(f"parent.{name}", parent[name], 1)
  check_number("parent.learning_rate", parent["learning_rate"], 0, low_open=True)
  check_integer("parent.warmup_steps", parent["warmup_steps"], 0)
  check_integer("parent.long_every", parent["long_every"], 0)


def _check_optimizer(where: str, values: dict[str, Any]) -> None:
  check_number(f"{where}.learning_rate", values["learning_rate"], 0, low_open=True)
  check_integer(f"{where}.warmup_steps", values["warmup_steps"], 0)
  check_one_of(f"{where}.schedule", values["schedule"], SCHEDULES)
  check_number(f"{where}.final_lr_ratio", values["final_lr_ratio"], 0, 1)
  for name in ("b1", "b2"):
    check_number(f"{where}.{name}", values[name], 0, 1, high_open=True)
  check_number(f"{where}.weight_decay", values["weight_decay"], 0)
  if values["grad_clip"] is not None:
    check_number(f"{where}.grad_clip", values["grad_clip"], 0, low_open=True)


def _check_elastic(elastic: dict[str, Any], model: ModelConfig | None) -> tuple[float, ...]:
  budgets = check_sequence("elastic.budgets", elastic["budgets"])
  if not budgets:
    raise config_error("elastic.budgets", "is empty", "give at least one fraction of the parent, e.g. [1.0, 0.5]")
  names = {}
  for i, budget in enumerate(budgets):
    check_number(f"elastic.budgets[{i}]", budget, 0, 1, low_open=True)
    name = f"{int(round(100 * budget))}pct"
    if name in names:
      raise config_error(f"elastic.budgets[{i}]", f"{budget!r} has the name {name} of elastic.budgets[{names[name]}]",
                         "give budgets at least 1% apart")
    names[name] = i
  router = elastic["router"]
  check_integer("elastic.router.width", router["width"], 1)
  check_boolean("elastic.router.hard", router["hard"])
  check_one_of("elastic.router.estimator", router["estimator"], ESTIMATORS)
  for name in ("tau_start", "tau_end", "scale_start", "scale_end"):
    check_number(f"elastic.router.{name}", router[name], 0, low_open=True)
  check_one_of("elastic.router.tau_decay", router["tau_decay"], TAU_DECAYS)
  check_number("elastic.kd_temperature", elastic["kd_temperature"], 0, low_open=True)
  for name in ("ce_weight", "router_loss_weight", "argmax_loss_weight"):
    check_number(f"elastic.{name}", elastic[name], 0)
  check_number("elastic.dead_zone", elastic["dead_zone"], 0, 1, high_open=True)
  check_boolean("elastic.stratified", elastic["stratified"])
  check_one_of("elastic.budget_metric", elastic["budget_metric"], BUDGET_METRICS)
  check_integer("elastic.memory_context", elastic["memory_context"], 1)
  check_keys(elastic["space"], [*axes.names(), *axes.mode_fields()], "elastic.space")
  if model is not None:
    _wrapped("elastic.space", ElasticSpace.from_dict, elastic["space"], model)
  return tuple(float(b) for b in budgets)


def _check_stages(stages: Any, budgets: Sequence[float], grad_accum_steps: int, task_settings: int) -> None:
  stages = check_sequence("stages", stages)
  if not stages:
    raise config_error("stages", "is empty", "give at least one stage: name, steps, batch_size, seq_len, "
                       "budget_probs")
  fields = [f.name for f in dataclasses.fields(Stage)]
  required = [f.name for f in dataclasses.fields(Stage) if f.default is dataclasses.MISSING]
  names = set()
  for where, stage in _records("stages", stages, fields):
    missing = [name for name in required if name not in stage]
    if missing:
      raise config_error(f"{where}.{missing[0]}", "missing", f"a stage sets every one of {', '.join(required)}")
    if not isinstance(stage.get("pinned", False), bool):
      raise config_error(f"{where}.pinned", f"{stage['pinned']!r} is not a bool",
                         "true freezes the router and trains each budget's deployed choice; false routes")
    if stage.get("pinned", False) and where == "stages[0]":
      raise config_error(f"{where}.pinned", "true in the first stage would pin the untrained router's choices",
                         "route at least one stage before a pinned one")
    task_index = stage.get("tasks")
    if task_index is not None and (isinstance(task_index, bool) or not isinstance(task_index, numbers.Integral)
                                   or not 0 <= task_index < task_settings):
      raise config_error(f"{where}.tasks", f"{task_index!r} is not an index of data.stage_tasks "
                         f"({task_settings} entries)", "give 0.."
                         f"{task_settings - 1} to read that entry's task settings, or None for this stage's own")
    check_string(f"{where}.name", stage["name"])
    if not stage["name"] or stage["name"] in names:
      raise config_error(f"{where}.name", f"{stage['name']!r} is empty or repeats an earlier stage's name",
                         "give every stage its own name")
    names.add(stage["name"])
    for name in ("steps", "batch_size", "seq_len"):
      check_integer(f"{where}.{name}", stage[name], 1)
    if stage["batch_size"] % grad_accum_steps:
      raise config_error(f"{where}.batch_size", f"{stage['batch_size']} does not split into "
                         f"memory.grad_accum_steps={grad_accum_steps} micro-batches",
                         f"make it a multiple of {grad_accum_steps}")
    probs = check_sequence(f"{where}.budget_probs", stage["budget_probs"])
    if len(probs) != len(budgets):
      raise config_error(f"{where}.budget_probs", f"has {len(probs)} entries for {len(budgets)} budgets",
                         "give one probability per entry of elastic.budgets")
    for j, p in enumerate(probs):
      check_number(f"{where}.budget_probs[{j}]", p, 0)
    if abs(sum(probs) - 1.0) > 1e-6:
      raise config_error(f"{where}.budget_probs", f"{probs} sum to {sum(probs):.6g}", "make them sum to 1")


def _check_mesh(mesh: dict[str, Any]) -> None:
  from elastic_jax.train.sharding import MESH_AXES  # pylint: disable=import-outside-toplevel
  shape = check_sequence("mesh.shape", mesh["shape"])
  if len(shape) > len(MESH_AXES):
    raise config_error("mesh.shape", f"{tuple(shape)} has {len(shape)} axes",
                       f"give at most {len(MESH_AXES)}: {', '.join(MESH_AXES)}")
  for i, size in enumerate(shape):
    check_integer(f"mesh.shape[{i}]", size, 1)
  for i, rule in enumerate(check_sequence("mesh.rules", mesh["rules"])):
    if isinstance(rule, (str, bytes)) or not isinstance(rule, Sequence) or len(rule) != 2:
      raise config_error(f"mesh.rules[{i}]", f"{rule!r} is not a (logical name, mesh axes) pair")
    axes = rule[1] if isinstance(rule[1], (list, tuple)) else () if rule[1] is None else (rule[1],)
    for axis in axes:
      check_one_of(f"mesh.rules[{i}]", axis, MESH_AXES)


def _check_data(data: dict[str, Any], inputs: bool) -> None:
  check_one_of("data.kind", data["kind"], SOURCE_KINDS)
  for name in ("tokenizer", "eos_token"):
    check_string(f"data.{name}", data[name])
  paths = data["paths"]
  paths = ([paths] if paths else []) if isinstance(paths, str) else check_sequence("data.paths", paths)
  tasks = check_sequence("data.stage_tasks", data["stage_tasks"])
  if data["kind"] == "tasks" and not tasks:
    raise config_error("data.stage_tasks", "is empty", "give the task settings of at least one stage")
  task_fields = [f.name for f in dataclasses.fields(TaskConfig)]
  for where, task in _records("data.stage_tasks", tasks, task_fields):
    for family in check_sequence(f"{where}.families", task.get("families", FAMILIES)):
      check_one_of(f"{where}.families", family, FAMILIES)
    check_integer(f"{where}.difficulty", task.get("difficulty", 1), 1)
    check_integer(f"{where}.distractors", task.get("distractors", 0), 0)
  if not inputs:
    return
  if data["kind"] == "files" and not paths:
    raise config_error("data.paths", "is empty", "data.kind='files' reads .txt/.jsonl files or folders of them")
  for i, path in enumerate(paths if data["kind"] == "files" else ()):
    if not os.path.exists(path):
      raise config_error(f"data.paths[{i}]", f"{path} does not exist", "give a .txt or .jsonl file or a folder")
  tokenizer = data["tokenizer"]
  if tokenizer and not (os.path.isfile(tokenizer) or os.path.isfile(os.path.join(tokenizer, "tokenizer.json"))):
    raise config_error("data.tokenizer", f"{tokenizer} is neither a tokenizer.json nor a folder holding one",
                       "empty reads UTF-8 bytes")


def _check_eval(evaluation: dict[str, Any]) -> None:
  for name in ("ppl_batches", "batch_size", "seq_len", "examples", "max_new_tokens", "decode_batch"):
    check_integer(f"eval.{name}", evaluation[name], 1)


def _check_importance(importance: dict[str, Any]) -> None:
  for name in ("batches", "batch_size", "seq_len", "depth_batches"):
    check_integer(f"importance.{name}", importance[name], 1)


def _check_plan(plan: dict[str, Any]) -> None:
  for name in ("device", "checkpoint_dtype"):
    if plan[name] is not None:
      check_string(f"plan.{name}", plan[name])
  for name in ("num_devices", "devices_per_host", "prompt_len"):
    if plan[name] is not None:
      check_integer(f"plan.{name}", plan[name], 1)
  if plan["mfu"] is not None:
    check_number("plan.mfu", plan["mfu"], 0, 1, low_open=True)
  if plan["storage_gb_per_s"] is not None:
    check_number("plan.storage_gb_per_s", plan["storage_gb_per_s"], 0, low_open=True)


def validate_run_config(config: Any, mesh: Any = None, rules: Any = None, *, inputs: bool = True,
                        shapes: bool = True) -> ml_collections.ConfigDict:
  """The whole run config checked, before any phase: every section's keys (unknown ones refused with the closest
  known key), every value's type and range, the model and the elastic space, the stages against the budgets and
  the gradient accumulation and, with ``shapes``, every batch and length against ``mesh`` (default: the mesh of
  ``config.mesh`` on this process's devices; see :func:`check_run_shapes`). ``inputs`` also checks that the files
  the run reads exist (parent checkpoint, data paths, tokenizer); the planner, which reads none, turns it off.

  Returns the config with every default filled in (a new ``ConfigDict``); raises ``ConfigError``
  (``<key>: <what> (<fix>)``) at the first problem. Takes seconds: nothing is compiled and no data is read.
  """
  run = _merge(default_config(), config, "")
  check_integer("seed", run["seed"], 0)
  check_integer("checkpoint_every", run["checkpoint_every"], 1)
  _check_parent(run["parent"], inputs)
  model = _check_model(run, inputs)
  _check_data(run["data"], inputs)
  _check_importance(run["importance"])
  budgets = _check_elastic(run["elastic"], model)
  MemoryConfig.from_dict(run["memory"])  # it checks its own values, naming each key
  grad_accum_steps = run["memory"]["grad_accum_steps"]
  pretrains = not run["parent"]["hf_path"] and run["parent"]["pretrain_steps"] > 0
  if pretrains and run["parent"]["batch_size"] % grad_accum_steps:
    raise config_error("parent.batch_size", f"{run['parent']['batch_size']} does not split into "
                       f"memory.grad_accum_steps={grad_accum_steps} micro-batches",
                       f"make it a multiple of {grad_accum_steps}")
  _check_stages(run["stages"], budgets, grad_accum_steps, len(run["data"]["stage_tasks"]))
  for name in ("optimizer", "router_optimizer"):
    _check_optimizer(name, run[name])
  _check_mesh(run["mesh"])
  _check_eval(run["eval"])
  _check_plan(run["plan"])
  resolved = ml_collections.ConfigDict(run)
  if shapes:
    if mesh is None:
      mesh, rules = mesh_from_config(resolved)
    check_run_shapes(resolved, mesh, rules)
  return resolved


def mesh_from_config(cfg: Any) -> tuple[Any, tuple]:
  """``config.mesh``: ``shape`` over (data, fsdp, tensor, context, expert) and ``rules``, the logical-axis rules table
  as (logical name, mesh axis or axes or None) pairs (default: ``DEFAULT_RULES``).

  ``shape`` may be shorter than five axes (trailing ones are 1, e.g. (2, 4) = data 2 x fsdp 4); empty puts every
  device on data. ``context`` > 1 splits every sequence over that many devices (context parallelism; the rules map
  the ``length`` axis there), e.g. (1, 2, 1, 4) for long-context stages. ``expert`` > 1 splits the routed experts
  of MoE blocks (and the batch) over that many devices, e.g. (1, 2, 1, 1, 4).
  """
  from elastic_jax.train.sharding import make_mesh, rules_from_config  # pylint: disable=import-outside-toplevel
  mesh_cfg = section(cfg, "mesh")
  shape = mesh_cfg["shape"]
  try:
    mesh = make_mesh(tuple(shape) if shape else None)
  except ValueError as error:
    raise config_error("mesh.shape", str(error).rstrip(".")) from None
  return mesh, rules_from_config(mesh_cfg["rules"])


# ------------------------------------------------------------------------------------------------ builders
def dataclass_from(cls: type[T], values: Any, where: str, **defaults: Any) -> T:
  """``cls(**values)`` after rejecting keys ``cls`` does not have, naming ``where`` in the error."""
  values = plain(values)
  check_keys(values, [f.name for f in dataclasses.fields(cls)], where)
  return cls(**{**defaults, **values})


def optimizers_from_config(config: Any) -> tuple[OptimizerConfig, OptimizerConfig]:
  return (OptimizerConfig(**section(config, "optimizer")),
          OptimizerConfig(**section(config, "router_optimizer")))


def stages_from_config(config: Any) -> tuple[Stage, ...]:
  stages = config.get("stages")
  if not stages:
    raise config_error("stages", "is empty", "give at least one stage: name, steps, batch_size, seq_len, "
                       "budget_probs")
  out = []
  for i, stage in enumerate(stages):
    values = plain(stage)
    values["budget_probs"] = tuple(float(p) for p in values.get("budget_probs", ()))
    out.append(dataclass_from(Stage, values, f"stages[{i}]"))
  return tuple(out)


def memory_from_config(config: Any) -> MemoryConfig:
  """Reads and validates ``config.memory`` (absent: no remat, no accumulation, fp32 teacher)."""
  return MemoryConfig.from_dict(section(config, "memory"))


def elastic_setup_from_config(config: Any, model_config: ModelConfig, depth_order: Sequence[int],
                              total_steps: int) -> ElasticSetup:
  """Builds the ElasticSetup of ``config.elastic`` and ``config.memory``; the router schedule spans the whole run
  (D-4)."""
  elastic = section(config, "elastic")
  router = dict(elastic["router"])
  setup_router = {field: router.pop(key) for key, field in _ROUTER_SETUP_KEYS.items()}
  space = _wrapped("elastic.space", ElasticSpace.from_dict, elastic["space"], model_config)
  schedule = RouterSchedule(total_steps=total_steps, **router)
  return ElasticSetup(model_config, space, tuple(float(b) for b in elastic["budgets"]),
                      tuple(int(i) for i in depth_order), schedule, **setup_router,
                      memory=memory_from_config(config), **{key: elastic[key] for key in _LOSS_KEYS})


def check_run_shapes(config: Any, mesh: Any, rules: Any) -> None:
  """Every batch size and sequence length of a run against its mesh (a ``Mesh`` or ``AbstractMesh``: only its axis
  sizes are read) and logical-axis ``rules``, before any phase runs.

  Batches (parent pretraining, calibration, each stage, evaluation) are split over the data-parallel devices (the
  mesh axes of the ``batch`` rule) and over the processes; with gradient accumulation each micro-batch is. Sequence
  lengths are split over the context axis. Raises ``ConfigError`` naming the first field that does not divide, e.g.
  ``stages[1].batch_size: 6 is not divisible by the 4 data-parallel devices of mesh (4,) (make it a multiple of 4)``.
  """
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  axes = nn.logical_to_mesh_axes(("batch",), rules)[0]  # the mesh axes the batch rule splits rows over
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  data = 1
  for name in axes:
    data *= mesh.shape.get(name, 1)  # a rule may name an axis a custom mesh leaves out
  context = mesh.shape.get("context", 1)
  processes = jax.process_count()
  shape = tuple(mesh.shape.values())
  while len(shape) > 1 and shape[-1] == 1:
    shape = shape[:-1]
  mesh_text = f"mesh {shape if len(shape) > 1 else f'({shape[0]},)'}"
  grad_accum = section(config, "memory")["grad_accum_steps"]
  grad_accum = grad_accum if isinstance(grad_accum, int) and grad_accum >= 1 else 1

  def batch(key: str, value: Any, micro: int = 1) -> None:
    value = int(value)
    if value % processes:
      raise config_error(key, f"{value} is the global batch, split evenly over {processes} processes",
                         f"make it a multiple of {processes}")
    if micro > 1 and value % micro == 0 and (value // micro) % data:
      raise config_error(key, f"{value} in {micro} micro-batches (memory.grad_accum_steps) gives {value // micro} "
                         f"rows per micro-batch, not divisible by the {data} data-parallel devices of {mesh_text}",
                         f"make {key} a multiple of {micro * data}")
    if value % data:
      raise config_error(key, f"{value} is not divisible by the {data} data-parallel devices of {mesh_text}",
                         f"make it a multiple of {data}")

  def length(key: str, value: Any) -> None:
    value = int(value)
    if value % context:
      raise config_error(key, f"{value} is not divisible by the {context} context-parallel devices of {mesh_text}",
                         f"make it a multiple of {context}")

  parent = section(config, "parent")
  if not parent["hf_path"]:
    batch("parent.batch_size", parent["batch_size"], grad_accum)
    length("parent.seq_len", parent["seq_len"])
  importance = section(config, "importance")
  batch("importance.batch_size", importance["batch_size"])
  length("importance.seq_len", importance["seq_len"])
  for i, stage in enumerate(config.get("stages") or ()):
    stage = plain(stage)
    if "batch_size" in stage:
      batch(f"stages[{i}].batch_size", stage["batch_size"], grad_accum)
    if "seq_len" in stage:
      length(f"stages[{i}].seq_len", stage["seq_len"])
  evaluation = section(config, "eval")
  batch("eval.batch_size", evaluation["batch_size"])
  batch("eval.decode_batch", evaluation["decode_batch"])
  length("eval.seq_len", evaluation["seq_len"])
