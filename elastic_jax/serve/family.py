"""A family on disk: the elastically trained student's weights (once) and its members, read from a main-job workdir
or from a family export, and written as an export (``python -m elastic_jax.extract --workdir W --family --out DIR``).

A member is one deployed budget: its name (``75pct``, the report's), its budget, the router's deployed choice for it,
and its size. Every member is sliced out of the same weights with the same depth order, exactly as
``elastic_jax.extract`` cuts one child (``extract_budget``); ``read_family`` only gathers what that needs. The
trained router comes along too (``FamilyRouter``: its params and the run's elastic setup), so that a budget
between the trained ones can be deployed on request (``elastic.deploy.interpolated_choice``).

Export layout (``DIR``)::

  DIR/family.json     format, the parent's config, the depth order, the members (name, budget, choice, params,
                      fraction, pattern), the tokenizer, where it all came from
  DIR/model/          the student's params once, in our standalone-model format (``train.checkpoint.save_model``)
  DIR/router/         the trained router's params, same format (``family.json`` records its setup; absent when the
                      workdir had no elastic checkpoint to read them from)
  DIR/tokenizer.json  only when the run used an HF tokenizer (copied; the byte tokenizer needs no file)

The tokenizer is the one the run trained with: ``data.tokenizer`` and ``data.eos_token`` as the workdir's phases
recorded them (``phase_config.json``), UTF-8 bytes when none was named.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Sequence
from typing import Any

from elastic_jax import cli
from elastic_jax.data.tokenizer import Tokenizer, check_vocab_fits, load_tokenizer
from elastic_jax.elastic.param_count import param_count
from elastic_jax.elastic.extract import child_config
from elastic_jax.elastic.space import Choice
from elastic_jax.model import ModelConfig

Params = Any
FAMILY_FILE = "family.json"
FORMAT = "elastic_jax.family"
VERSION = 1
# The phase folders whose phase_config.json carries the run's data settings, most specific first.
_PHASES_WITH_DATA = ("elastic", "importance", "parent")


class FamilyError(cli.InputError):
  """A folder that is neither a family export nor a main-job workdir with a finished (or checkpointed) elastic
  phase, or an export that cannot be read back."""


@dataclasses.dataclass(frozen=True)
class MemberSpec:
  """One deployed budget of the family.

  Attributes:
    name: the budget's name in the report, e.g. "75pct" (``extract.budget_name``).
    budget: the budget as a fraction of the parent's parameters.
    choice: the router's deployed choice for it.
    params: the member's parameter count; fraction: ``params`` / the parent's.
    pattern: the member's block pattern (blocks its depth choice keeps).
  """
  name: str
  budget: float
  choice: Choice
  params: int
  fraction: float
  pattern: str

  def to_json(self) -> dict[str, Any]:
    return {"name": self.name, "budget": self.budget, "choice": self.choice.to_dict(), "params": self.params,
            "fraction": self.fraction, "pattern": self.pattern}


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
  """The run's tokenizer: ``file`` an HF tokenizer.json (None: UTF-8 bytes) and its end-of-document token."""
  file: str | None = None
  eos_token: str | None = None

  def load(self, vocab_size: int) -> Tokenizer:
    if self.file and not os.path.exists(self.file):
      raise FamilyError(f"the family's tokenizer {self.file} does not exist (the run's data.tokenizer, as it "
                        "recorded it); export the family with python -m elastic_jax.extract --family from where "
                        "that path resolves, or restore the file.")
    tokenizer = load_tokenizer(self.file, self.eos_token)
    check_vocab_fits(tokenizer, vocab_size)
    return tokenizer


@dataclasses.dataclass(frozen=True)
class FamilyRouter:
  """The trained router and the run's elastic setup as the training loop records it with its checkpoints
  (``train.loop.describe_run``'s ``space`` and ``elastic`` entries: budgets, depth order, router width, dead zone,
  budget metric): what deploys a budget between the trained ones."""
  description: dict[str, Any]
  params: Params

  def setup(self, config: ModelConfig) -> Any:
    """The ``ElasticSetup`` the router was trained with (``train.loop.setup_from_description``)."""
    from elastic_jax.train.loop import setup_from_description  # pylint: disable=import-outside-toplevel
    return setup_from_description(config, self.description)


@dataclasses.dataclass(frozen=True)
class Family:
  """Everything a server needs from a family on disk (see the module docstring).

  Attributes:
    config: the parent's (the trained student's) config.
    params: the student's params, as restored (host or device arrays).
    members: the deployed budgets, largest first.
    depth_order: block indices, most important first; None when depth is not elastic.
    tokenizer: the run's tokenizer.
    source: where it was read (for messages).
    router: the trained router (None: unknown; only the deployed members are served).
  """
  config: ModelConfig
  params: Params
  members: tuple[MemberSpec, ...]
  depth_order: tuple[int, ...] | None
  tokenizer: TokenizerSpec
  source: str
  router: FamilyRouter | None = None

  def member(self, name: str) -> MemberSpec:
    for member in self.members:
      if member.name == name:
        return member
    raise KeyError(f"no member {name!r}; the family's members are {[m.name for m in self.members]}")


def member_specs(config: ModelConfig, records: Sequence[dict[str, Any]], depth_order) -> tuple[MemberSpec, ...]:
  """The members of deployed-choice records (``{"budget", "choice"}`` each), sized, largest budget first."""
  from elastic_jax.extract import budget_name  # pylint: disable=import-outside-toplevel  (extract imports us)
  parent = param_count(config)
  members = []
  for record in records:
    choice = Choice.from_dict(record["choice"])
    child = child_config(config, choice, depth_order)
    count = param_count(child)
    members.append(MemberSpec(budget_name(record["budget"]), float(record["budget"]), choice, count, count / parent,
                              child.pattern))
  return tuple(sorted(members, key=lambda m: -m.budget))


def workdir_tokenizer(workdir: str) -> TokenizerSpec:
  """The tokenizer a main-job workdir trained with (``data.tokenizer`` / ``data.eos_token`` of its phases' records);
  UTF-8 bytes when the run named none or recorded nothing (an HF-imported parent with the default data)."""
  for phase in _PHASES_WITH_DATA:
    path = os.path.join(workdir, phase, "phase_config.json")
    if os.path.isfile(path):
      with open(path, encoding="utf-8") as f:
        record = json.load(f)
      if "data.tokenizer" in record:
        return TokenizerSpec(record["data.tokenizer"] or None, record.get("data.eos_token") or None)
  return TokenizerSpec()


def read_workdir(workdir: str, step: int | None = None, mesh: Any = None) -> Family:
  """The family of a main-job workdir: the finished run's student and deployed choices, or those of elastic
  checkpoint ``step`` (default: the latest, while training runs), as ``extract --workdir W --budget B`` reads them.
  With ``mesh`` the student is restored straight into its shardings (every process calls this together)."""
  from elastic_jax import extract  # pylint: disable=import-outside-toplevel  (extract imports us)
  deployed = extract.read_deployed_choices(workdir, step)
  try:
    config, params = extract.load_student(workdir, deployed.step, mesh)
  except extract.ExtractError:
    raise
  except Exception as error:  # pylint: disable=broad-except  (whatever Orbax raises, the folder is named)
    folder = os.path.join(workdir, "elastic", "student" if deployed.step is None else "checkpoints")
    raise cli.unreadable_checkpoint(folder, error) from error
  depth = None if deployed.depth_order is None else tuple(deployed.depth_order)
  return Family(config, params, member_specs(config, deployed.records, depth), depth, workdir_tokenizer(workdir),
                deployed.source, workdir_router(workdir, config, deployed.step))


def workdir_router(workdir: str, config: ModelConfig, step: int | None) -> FamilyRouter | None:
  """The trained router of a main-job workdir: its params in elastic checkpoint ``step`` (default: the last one,
  which the finished run's deployed choices come from) and the run's ``elastic`` settings recorded with it. None
  when the workdir keeps no elastic checkpoint."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from elastic_jax import extract  # pylint: disable=import-outside-toplevel  (extract imports us)
  checkpoints = os.path.join(workdir, "elastic", "checkpoints")
  steps = extract.checkpoint_steps(checkpoints)
  if not steps:
    return None
  step = steps[-1] if step is None else step
  run = extract.checkpoint_metadata(checkpoints, step)["config"]
  description = {"space": run["space"], "elastic": run["elastic"]}
  setup = FamilyRouter(description, None).setup(config)
  target = {"router_params": jax.eval_shape(lambda: setup.router.init(jax.random.key(0),
                                                                      jnp.zeros((1,), jnp.int32))["params"])}
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
  manager = extract.checkpoint_reader(checkpoints)
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      target, restore_args=args, partial_restore=True)))["state"]
  manager.close()
  return FamilyRouter(description, state["router_params"])


def read_export(directory: str) -> Family:
  """A family written by ``write_family``."""
  from elastic_jax.train.checkpoint import load_model  # pylint: disable=import-outside-toplevel
  path = os.path.join(directory, FAMILY_FILE)
  with open(path, encoding="utf-8") as f:
    record = json.load(f)
  if record.get("format") != FORMAT or record.get("version") != VERSION:
    raise FamilyError(f"{path} is not a family export of version {VERSION} (format {record.get('format')!r}, version "
                      f"{record.get('version')!r}); write it again with python -m elastic_jax.extract --family.")
  try:
    metadata, params = load_model(os.path.join(directory, "model"))
  except Exception as error:  # pylint: disable=broad-except
    raise cli.unreadable_checkpoint(os.path.join(directory, "model"), error) from error
  config = ModelConfig.from_dict(metadata["config"])
  depth = None if record["depth_order"] is None else tuple(int(i) for i in record["depth_order"])
  tokenizer = record["tokenizer"]
  file = os.path.join(directory, tokenizer["file"]) if tokenizer.get("file") else None
  members = member_specs(config, record["members"], depth)
  router = None
  if record.get("router") is not None:
    try:
      router = FamilyRouter(record["router"], load_model(os.path.join(directory, "router"))[1])
    except Exception as error:  # pylint: disable=broad-except
      raise cli.unreadable_checkpoint(os.path.join(directory, "router"), error) from error
  return Family(config, params, members, depth, TokenizerSpec(file, tokenizer.get("eos_token")), path, router)


def read_family(path: str, step: int | None = None) -> Family:
  """A family export (a folder with ``family.json``) or a main-job workdir (a folder with ``elastic/``)."""
  if os.path.isfile(os.path.join(path, FAMILY_FILE)):
    if step is not None:
      raise FamilyError(f"--step {step} applies to a main-job workdir; {path} is a family export (one fixed step).")
    return read_export(path)
  if os.path.isdir(os.path.join(path, "elastic")):
    return read_workdir(path, step)
  raise FamilyError(f"--family {path!r} is neither a family export (no {FAMILY_FILE}) nor a main-job workdir (no "
                    "elastic/ folder); give the folder python -m elastic_jax.train wrote, or one written by "
                    "python -m elastic_jax.extract --workdir W --family --out DIR.")


def write_family(out: str, family: Family) -> list[str]:
  """Writes ``family`` as an export into ``out`` (created; must not hold a family yet); returns the paths written.

  Params may be global arrays sharded over several processes: every process calls this and saves its own shards;
  process 0 alone writes ``family.json`` and copies the tokenizer.
  """
  from elastic_jax.train import distributed  # pylint: disable=import-outside-toplevel
  from elastic_jax.train.checkpoint import save_model  # pylint: disable=import-outside-toplevel
  index = os.path.join(out, FAMILY_FILE)
  if os.path.exists(index) or os.path.exists(os.path.join(out, "model")):
    raise FamilyError(f"--out {out!r} already holds a family ({index} or model/); choose another folder or remove it.")
  distributed.barrier(f"elastic_jax_family_checked:{out}")
  os.makedirs(out, exist_ok=True)
  model = os.path.join(out, "model")
  save_model(model, family.config.to_dict(), family.params, {"family": FAMILY_FILE})
  written = [model]
  if family.router is not None:
    save_model(os.path.join(out, "router"), family.config.to_dict(), family.router.params, {"family": FAMILY_FILE})
    written.append(os.path.join(out, "router"))
  tokenizer: dict[str, Any] = {"file": None, "eos_token": family.tokenizer.eos_token}
  if family.tokenizer.file:
    source = family.tokenizer.file
    source = os.path.join(source, "tokenizer.json") if os.path.isdir(source) else source
    tokenizer["file"] = "tokenizer.json"
    if distributed.is_primary():
      shutil.copyfile(source, os.path.join(out, "tokenizer.json"))
    written.append(os.path.join(out, "tokenizer.json"))
  record = {"format": FORMAT, "version": VERSION, "source": family.source, "parent_params": param_count(family.config),
            "pattern": family.config.pattern,
            "depth_order": None if family.depth_order is None else list(family.depth_order),
            "tokenizer": tokenizer, "members": [member.to_json() for member in family.members],
            "router": None if family.router is None else family.router.description}
  if distributed.is_primary():
    with open(index, "w", encoding="utf-8") as f:
      json.dump(record, f, indent=1)
      f.write("\n")
  distributed.barrier(f"elastic_jax_family_written:{out}")
  return written + [index]
