"""Extract one budget's child from a main-job workdir as a standalone model (zero-shot: slicing only, no training).

The choice is the router's deployed choice for the budget (a budget between the trained ones, e.g. ``60pct``: the
router fed the interpolation of the neighbouring budgets' one-hots, ``elastic.deploy.interpolated_choice``), read
from the workdir ``W`` that ``python -m elastic_jax.train`` wrote: ``W/elastic/deployed_choices.json`` once elastic training has finished; while it is still running (or with
``--step N``) the metadata of an elastic checkpoint, i.e. the router as it was at that step. The child is sliced out
of the elastically trained student with the depth order the training used, exactly as the main job's extraction
phase does: ``W/elastic/student/model`` once training has finished, else the student weights of that checkpoint.

Output in ``--out DIR``:

- ``--format orbax`` (default): ``DIR/model``, our standalone-model format (``train.checkpoint.save_model``, read back
  by ``load_model``; the layout of ``W/children/<name>/``). Any choice, heterogeneous ones included.
- ``--format hf``: ``DIR/config.json`` + ``DIR/model.safetensors``, a NemotronH checkpoint that transformers loads.
  Homogeneous choices only (a NemotronH config has one width per block kind).
- Either way ``DIR/extract.json`` records the budget, its choice, the parameter count and where the choice came from.

Several processes (a multi-host launch, see ``elastic_jax.train.distributed``; or ``--mesh`` on one host): the
student is restored straight into its param shardings on a device mesh (each process reads only its devices'
shards), the child is sliced by one program into its own shardings, and both formats are written from the shards
(the HF file streamed one tensor at a time by process 0), so no host holds the whole model. One process without
``--mesh`` works on the host, as always.

``--family`` instead of ``--budget`` writes the whole family: the student's weights once and every budget's
deployed choice with the depth order and the run's tokenizer (``DIR/family.json``, ``DIR/model``, see
``elastic_jax.serve.family``), which ``python -m elastic_jax.serve --family DIR`` serves.

CLI::

  python -m elastic_jax.extract --workdir W --budget 75pct --out DIR [--format orbax|hf] [--step N] [--mesh 1,8]
  python -m elastic_jax.extract --workdir W --family --out DIR [--step N] [--mesh 1,8]

Unusable input (a workdir without the budget, an unreadable checkpoint, an unwritable ``--out``, checked before any
work) ends with one line naming it and exit status 2; ``--verbosity 1`` adds the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from elastic_jax import cli
from elastic_jax.elastic import axes
from elastic_jax.elastic.extract import extract, extract_sharded
from elastic_jax.elastic.param_count import param_count
from elastic_jax.elastic.space import Choice
from elastic_jax.model import ModelConfig, param_shapes
from elastic_jax.train import distributed
from elastic_jax.train.checkpoint import load_model, save_model
from elastic_jax.train.sharding import DEFAULT_RULES, LogicalRules, make_mesh, param_shardings

Params = Any
FORMATS = ("orbax", "hf")
_PROG = "python -m elastic_jax.extract"


class ExtractError(cli.InputError):
  """The workdir, budget, step or output folder cannot give the requested child."""


def budget_name(budget: float) -> str:
  """The name the main job's report and folders use for a budget: 0.75 -> "75pct"."""
  return f"{int(round(100 * budget))}pct"


@dataclasses.dataclass(frozen=True)
class DeployedChoices:
  """The router's argmax per budget at one point of elastic training.

  Attributes:
    records: {"budget", "params", "fraction", "choice"} per budget, as the training loop writes them.
    depth_order: block indices, most important first (what a depth choice keeps); None when depth is fixed.
    source: where the records were read, for messages and ``extract.json``.
    step: the checkpoint's step, or None for the finished run's ``deployed_choices.json``.
  """
  records: list[dict[str, Any]]
  depth_order: list[int] | None
  source: str
  step: int | None


# ---------------------------------------------------------------------------------------------------- reading
def _read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def checkpoint_reader(directory: str) -> ocp.CheckpointManager:
  """An Orbax manager over the training loop's checkpoints that never creates anything."""
  return ocp.CheckpointManager(os.path.abspath(directory), options=ocp.CheckpointManagerOptions(create=False))


def checkpoint_steps(directory: str) -> list[int]:
  """Steps of the complete elastic checkpoints under ``directory`` (empty when there is none)."""
  if not os.path.isdir(directory):
    return []
  manager = checkpoint_reader(directory)
  steps = sorted(manager.all_steps())
  manager.close()
  return steps


def checkpoint_metadata(directory: str, step: int) -> dict[str, Any]:
  """The JSON metadata saved with checkpoint ``step`` (the arrays are not read)."""
  manager = checkpoint_reader(directory)
  metadata = manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]
  manager.close()
  return metadata


def read_deployed_choices(workdir: str, step: int | None = None) -> DeployedChoices:
  """The deployed choices of ``workdir``: the finished run's, or those of checkpoint ``step`` (default: the latest
  checkpoint when training has not finished)."""
  if not os.path.isdir(workdir):
    raise ExtractError(f"--workdir {workdir!r} does not exist; give the folder the main job wrote "
                       "(python -m elastic_jax.train --config CONFIG --workdir W).")
  elastic = os.path.join(workdir, "elastic")
  final = os.path.join(elastic, "deployed_choices.json")
  checkpoints = os.path.join(elastic, "checkpoints")
  if step is None and os.path.isfile(final):
    rankings_file = os.path.join(workdir, "importance", "rankings.json")
    if not os.path.isfile(rankings_file):
      raise ExtractError(f"{rankings_file} is missing: the depth order the router's choices refer to is unknown. "
                         "Re-run the main job on this workdir to restore it.")
    depth = _read_json(rankings_file)["depth"]
    return DeployedChoices(_read_json(final), None if depth is None else [int(i) for i in depth], final, None)
  steps = checkpoint_steps(checkpoints)
  if not steps:
    raise ExtractError(f"workdir {workdir!r} has no elastic phase output: neither {final} nor a checkpoint in "
                       f"{checkpoints}. Run the main job on it (python -m elastic_jax.train --config CONFIG "
                       f"--workdir {workdir}) until elastic training has saved a checkpoint.")
  if step is not None and step not in steps:
    raise ExtractError(f"--step {step} has no checkpoint in {checkpoints}; the saved steps are {steps}.")
  step = steps[-1] if step is None else step
  metadata = checkpoint_metadata(checkpoints, step)
  if "deployed_choices" not in metadata:
    raise ExtractError(f"checkpoint step {step} in {checkpoints} records no deployed_choices (written by an older "
                       "version of the training loop); extract after training has finished instead.")
  depth = metadata.get("depth_order")
  return DeployedChoices(list(metadata["deployed_choices"]), None if depth is None else [int(i) for i in depth],
                         f"{checkpoints} step {step}", step)


def find_budget(records: Sequence[dict[str, Any]], name: str) -> dict[str, Any]:
  """The record of budget ``name``: a report name such as "75pct", or the budget as a fraction such as "0.75"."""
  text = name.strip()
  for record in records:
    if text == budget_name(record["budget"]):
      return record
  try:
    value = float(text)
  except ValueError:
    value = None
  if value is not None:
    for record in records:
      if abs(float(record["budget"]) - value) < 1e-9:
        return record
  valid = ", ".join(f"{budget_name(r['budget'])} (or {float(r['budget']):g})" for r in records)
  raise ExtractError(f"unknown budget {name!r}; this run's budgets are {valid}.")


def _sharded_target(config: ModelConfig, mesh: Mesh, rules: LogicalRules) -> Params:
  """The params of ``config`` as restore targets in their shardings on ``mesh``."""
  return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                      param_shapes(config), param_shardings(config, mesh, rules))


def load_student(workdir: str, step: int | None, mesh: Mesh | None = None,
                 rules: LogicalRules = DEFAULT_RULES) -> tuple[ModelConfig, Params]:
  """The elastically trained student the children are sliced from: ``W/elastic/student/model`` of a finished run,
  or the student weights of elastic checkpoint ``step`` (the deployed choices' step).

  With ``mesh``, the params are restored straight into ``param_shardings`` (each process reads only its devices'
  shards; of a checkpoint, only the params, not the optimizer state); all processes must call it together.
  """
  path = os.path.join(workdir, "elastic", "student")
  if step is None and os.path.exists(os.path.join(path, "DONE")):
    model = os.path.join(path, "model")
    if mesh is None:
      metadata, params = load_model(model)
      return ModelConfig.from_dict(metadata["config"]), params
    # The config first (the metadata alone), then the arrays into the shardings it implies.
    config = ModelConfig.from_dict(checkpoint_metadata(model, checkpoint_steps(model)[-1])["config"])
    return config, load_model(model, _sharded_target(config, mesh, rules))[1]
  checkpoints = os.path.join(workdir, "elastic", "checkpoints")
  steps = checkpoint_steps(checkpoints)
  step = steps[-1] if step is None and steps else step
  if step not in steps:
    raise ExtractError(f"no trained student in {path} and no elastic checkpoint to read one from in {checkpoints}. "
                       f"Run the main job on {workdir!r} until elastic training has saved a checkpoint.")
  config = ModelConfig.from_dict(checkpoint_metadata(checkpoints, step)["config"]["model"])
  manager = checkpoint_reader(checkpoints)
  if mesh is None:
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  else:  # a partial restore: the params alone, in their shardings
    target = {"params": _sharded_target(config, mesh, rules)}
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)))["state"]
  manager.close()
  return config, state["params"]


def parse_budget(name: str) -> float | None:
  """A budget's name ("60pct") or fraction ("0.6") as a fraction; None when it is neither."""
  text = name.strip()
  try:
    return int(text[:-3]) / 100 if text.endswith("pct") else float(text)
  except ValueError:
    return None


def choose_budget(workdir: str, deployed: DeployedChoices, name: str, config: ModelConfig
                  ) -> tuple[float, Choice, str]:
  """(budget, choice, where the choice came from) for budget ``name``: a deployed budget's choice, or for a budget
  between the trained ones the choice of the router fed their interpolated one-hots (within the dead zone)."""
  try:
    record = find_budget(deployed.records, name)
    return float(record["budget"]), Choice.from_dict(record["choice"]), deployed.source
  except ExtractError as unknown:
    budget = parse_budget(name)
    if budget is None:
      raise
    from elastic_jax.elastic.deploy import interpolated_choice  # pylint: disable=import-outside-toplevel
    from elastic_jax.serve.family import workdir_router  # pylint: disable=import-outside-toplevel
    router = workdir_router(workdir, config, deployed.step)
    if router is None:
      raise ExtractError(f"{unknown} A budget between them needs the trained router, and {workdir!r} keeps no "
                         "elastic checkpoint to read it from.") from None
    try:
      choice = interpolated_choice(router.setup(config), router.params, budget)
    except ValueError as error:
      raise ExtractError(f"--budget {name}: {error}") from None
    return budget, choice, f"the router interpolated between the trained budgets ({deployed.source})"


def extract_budget(workdir: str, name: str, step: int | None = None, mesh: Mesh | None = None,
                   rules: LogicalRules = DEFAULT_RULES) -> tuple[ModelConfig, Params, dict[str, Any]]:
  """Budget ``name``'s child of ``workdir``: ``(config, params, info)``, info being what ``extract.json`` records.
  A budget between the trained ones gets the interpolated router's choice (``choose_budget``).

  With ``mesh`` the child's params are global arrays in its ``param_shardings``, sliced on the devices from the
  student's shards (all processes call this together); without, host arrays as the student was saved.
  """
  deployed = read_deployed_choices(workdir, step)
  if parse_budget(name) is None:
    find_budget(deployed.records, name)  # an unknown name is refused before any checkpoint is read
  try:
    parent_config, student_params = load_student(workdir, deployed.step, mesh, rules)
  except ExtractError:
    raise
  except Exception as error:  # pylint: disable=broad-except  (whatever Orbax raises, the folder is named)
    folder = os.path.join(workdir, "elastic", "student" if deployed.step is None else "checkpoints")
    raise cli.unreadable_checkpoint(folder, error) from error
  budget, choice, source = choose_budget(workdir, deployed, name, parent_config)
  if mesh is None:
    config, params = extract(parent_config, student_params, choice, deployed.depth_order)
  else:
    config, params = extract_sharded(parent_config, student_params, choice, deployed.depth_order, mesh, rules)
  parent_count, count = param_count(parent_config), param_count(config)
  info = {"workdir": os.path.abspath(workdir), "budget": budget, "name": budget_name(budget),
          "choice": choice.to_dict(), "params": count, "parent_params": parent_count,
          "fraction": count / parent_count, "choice_source": source, "step": deployed.step,
          "depth_order": deployed.depth_order, "pattern": config.pattern}
  return config, params, info


def heterogeneous_widths(config: ModelConfig) -> dict[str, list[int]]:
  """The per-layer width fields of ``config`` whose blocks differ (empty for a homogeneous config)."""
  found = {}
  for field in dict.fromkeys(axis.per_layer_field for axis in axes.block_axes() if axis.per_layer_field):
    values = getattr(config, field)
    if values is not None and len(set(values)) > 1:
      found[field] = list(values)
  return found


def write_child(out: str, config: ModelConfig, params: Params, info: dict[str, Any], fmt: str) -> list[str]:
  """Writes the child in format ``fmt`` plus ``extract.json`` into ``out``; returns the paths written.

  Params may be global arrays sharded over several processes; then every process calls this, each saves its own
  shards (Orbax) or takes part in gathering one tensor at a time (HF, written by process 0), process 0 alone writes
  ``extract.json``, and all return once everything is written.
  """
  if fmt not in FORMATS:
    raise ExtractError(f"--format {fmt!r} is not one of {list(FORMATS)}.")
  if fmt == "hf" and not config.is_homogeneous:
    widths = ", ".join(f"{k}={v}" for k, v in heterogeneous_widths(config).items())
    raise ExtractError(f"budget {info['name']}'s choice is heterogeneous ({widths}): a NemotronH config.json has one "
                       "width per block kind, so it cannot be written as an HF checkpoint. Use --format orbax.")
  model_path = os.path.join(out, "model") if fmt == "orbax" else os.path.join(out, "config.json")
  if os.path.exists(model_path):
    raise ExtractError(f"--out {out!r} already holds a model ({model_path}); choose another folder or remove it.")
  distributed.barrier(f"elastic_jax_extract_checked:{out}")  # every process checked before any writes
  os.makedirs(out, exist_ok=True)
  if fmt == "orbax":
    save_model(model_path, config.to_dict(), params, {"choice": info["choice"], "budget": info["budget"]})
    written = [model_path]
  else:
    from elastic_jax.interop import hf  # pylint: disable=import-outside-toplevel  (safetensors only when needed)
    hf.save(out, config, params)
    written = [model_path, os.path.join(out, hf.SINGLE_FILE)]
  info_path = os.path.join(out, "extract.json")
  if distributed.is_primary():
    with open(info_path, "w", encoding="utf-8") as f:
      json.dump({**info, "format": fmt}, f, indent=1)
      f.write("\n")
  distributed.barrier(f"elastic_jax_extract_written:{out}")
  return written + [info_path]


# ---------------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog=_PROG,
      description="Extract one budget's child from a main-job workdir (python -m elastic_jax.train) as a standalone "
                  "model: the router's choice for that budget, sliced out of the elastically trained weights.")
  parser.add_argument("--workdir", required=True, metavar="W",
                      help="the main job's output folder (holds importance/ and elastic/).")
  which = parser.add_mutually_exclusive_group(required=True)
  which.add_argument("--budget", metavar="NAME",
                     help="the budget: its name in the report (e.g. 75pct) or its fraction of the parent (e.g. "
                          "0.75), one of the run's config.elastic.budgets, or any budget between them (e.g. 60pct: "
                          "the router fed the interpolation of the neighbouring budgets chooses it).")
  which.add_argument("--family", action="store_true",
                     help="every budget at once: the student's weights once plus each budget's deployed choice, the "
                          "depth order and the tokenizer (DIR/family.json, DIR/model), for python -m "
                          "elastic_jax.serve --family DIR.")
  parser.add_argument("--out", required=True, metavar="DIR",
                      help="output folder (created; must not already hold a model of the chosen format).")
  parser.add_argument("--format", default="orbax", choices=FORMATS,
                      help="orbax (default): DIR/model in our standalone-model format (load_model; any choice). hf: "
                           "DIR/config.json + model.safetensors, a NemotronH checkpoint transformers loads "
                           "(homogeneous choices only). Either way DIR/extract.json records the choice.")
  parser.add_argument("--step", type=int, default=None, metavar="N",
                      help="take the router's choice as it was at elastic checkpoint N instead of the finished run's "
                           "W/elastic/deployed_choices.json (without --step, a run that has not finished uses its "
                           "latest checkpoint).")
  parser.add_argument("--mesh", default=None, metavar="SIZES",
                      help="slice and write on a device mesh of these sizes (data,fsdp[,tensor[,context]], e.g. "
                           "1,8), the student restored straight into its shards. Default: with several processes "
                           "(a multi-host launch), fsdp over every device; with one, none (on the host).")
  parser.add_argument("--verbosity", type=int, default=0, metavar="N",
                      help="1: print the traceback with an error message (default 0: the message only).")
  return parser


def _mesh(sizes: str | None) -> Mesh | None:
  """The ``--mesh`` argument as a mesh; by default a mesh only when the run spans several processes."""
  if sizes is None:
    return make_mesh((1, jax.device_count())) if jax.process_count() > 1 else None
  try:
    shape = tuple(int(n) for n in sizes.split(","))
  except ValueError:
    raise ExtractError(f"--mesh {sizes!r} must be comma-separated integers, e.g. 1,8.") from None
  try:
    return make_mesh(shape)
  except ValueError as error:
    raise ExtractError(f"--mesh {sizes!r}: {error}") from None


def _extract_family(args: argparse.Namespace) -> int:
  """``--family``: the whole family as an export (see ``elastic_jax.serve.family``)."""
  from elastic_jax.serve import family as family_io  # pylint: disable=import-outside-toplevel
  if args.format != "orbax":
    raise ExtractError(f"--format {args.format} does not apply to --family: a family export holds the student's "
                       "weights once in our format; extract single budgets with --budget NAME --format hf.")
  family = family_io.read_workdir(args.workdir, args.step, _mesh(args.mesh))
  written = family_io.write_family(args.out, family)
  if distributed.is_primary():
    print(f"exported the family of {family.source}: {param_count(family.config):,} parameters held once, members "
          + ", ".join(f"{m.name} ({m.params:,}, {100 * m.fraction:.1f}%)" for m in family.members))
    for path in written:
      print(f"  {path}")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  distributed.initialize()  # a no-op unless launched as one of several processes
  try:
    cli.check_writable_dir(args.out, "--out")
    if args.family:
      return _extract_family(args)
    config, params, info = extract_budget(args.workdir, args.budget, args.step, _mesh(args.mesh))
    written = write_child(args.out, config, params, info, args.format)
  except cli.refused_errors() as error:
    return cli.refuse(error, args.verbosity >= 1)
  if not distributed.is_primary():
    return 0
  print(f"extracted {info['name']} (budget {float(info['budget']):g}; choice from {info['choice_source']}): "
        f"{info['params']:,} parameters ({100 * info['fraction']:.1f}% of the parent), pattern {info['pattern']!r}, "
        f"format {args.format}")
  for path in written:
    print(f"  {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
