"""Running the study's arms, each seed's arms in the table's order, each arm x seed in its own folder:

  W/seed<s>/elastic/                  the main job (train.pipeline.run_pipeline) with the seed: parent, importance,
                                      permuted, elastic, children, baselines, report.*
  W/seed<s>/elastic_stage1_only/      the same layout; parent, importance and permuted are links to the elastic
  W/seed<s>/elastic_uniform/          arm's folders (see below), the elastic phase and everything after are its own
  W/seed<s>/sequential_equal/<b>/     one member's standalone run: phase_config.json, checkpoints, metrics.jsonl,
  W/seed<s>/sequential_full/<b>/      model/ (+ DONE when finished)
  W/seed<s>/scratch/<b>/
  W/seed<s>/<arm>/report.*            the arm's report, in the main job's format (eval.report.evaluate_and_report):
                                      the parent, then each member with the zero-shot pruned baseline of its size
  W/seed<s>/<arm>/study/              the arm's record: phase_config.json (the config values it ran under) and,
                                      once finished, arm.json (tokens, wall time)

Resuming is the main job's: an arm whose ``study/arm.json`` exists under the same config values is skipped; an
interrupted one resumes (the elastic arms through the main job's phases and checkpoints, a standalone member from
its last checkpoint); a changed config value reruns what depends on it (``train.pipeline.PhaseLedger``: the arm's
record, each standalone member's record, and inside the elastic arms the main job's own records).

Sharing the parent: every arm of a seed uses the same parent, importance ranking and permuted parent, made once by
the ``elastic`` arm. The other elastic arms get links (relative symlinks) named ``parent``, ``importance`` and
``permuted`` to the elastic arm's finished folders, made only once those are finished; their own phase records
then find the same config values (the arms differ only in the curriculum, which those phases do not read) and
reuse them. A link is never written through: were the values to differ, the main job sets the link aside
(renaming the link, not its target) and computes the phase in the arm's own folder. The standalone arms read the
elastic arm's models (permuted parent, pruned baselines, children's architectures) by re-entering its finished
main job, which reuses every phase.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from elastic_jax.data.pipeline import data_factory
from elastic_jax.elastic.param_count import param_count
from elastic_jax.eval.report import evaluate_and_report
from elastic_jax.model import ModelConfig
from elastic_jax.study.arms import ARMS, DISTILLED, ELASTIC, Arm, scaled_stages, stage_tokens
from elastic_jax.study.config import StudyConfig, recorded_values
from elastic_jax.train import distributed
from elastic_jax.train.config import memory_from_config, plain, section
from elastic_jax.train.kd_step import compiled_kd_step
from elastic_jax.train.loop import (Segment, Stage, StageFeed, compiled_lm_step, log, place_frozen, read_json,
                                    read_metrics_rows, release_compiled_programs, run_training, write_atomically,
                                    write_json_atomically)
from elastic_jax.train.memory import teacher_config
from elastic_jax.train.optim import OptimizerConfig
# The main job's own phase helpers, so that a standalone member is saved, loaded and checked exactly like a phase
# of the main job.
from elastic_jax.train.pipeline import (LOG_EVERY, RECORD_FILE, PhaseLedger, check_finite, load_output, run_pipeline,
                                        save_output, stop_if_preempted)
from elastic_jax.train.result import ExtractedModel, FamilyMember, PipelineResult
from elastic_jax.train.sharding import param_shardings, shard_params

RECORD_FOLDER = "study"
ARM_FILE = "arm.json"
CURVES_FILE = "curves.jsonl"
SHARED_PHASES = (("parent", "DONE"), ("importance", "rankings.json"), ("permuted", "DONE"))


def seed_folder(workdir: str, seed: int) -> str:
  return os.path.join(workdir, f"seed{seed}")


def arm_record_path(workdir: str, seed: int, arm: str) -> str:
  return os.path.join(seed_folder(workdir, seed), arm, RECORD_FOLDER, ARM_FILE)


@dataclasses.dataclass(frozen=True)
class StandaloneResult(PipelineResult):
  """A standalone arm's models for the main job's report: the same parent (the teacher) and, per member, the
  arm's trained model as the child beside the elastic arm's pruned baseline of that size. ``curves``: the arm's
  distillation losses per member (``kd_per_budget`` rows; none for the scratch arm) for the report's loss plot."""

  curves: str = ""

  @property
  def metrics_path(self) -> str:
    return self.curves


def share_phases(source: str, folder: str) -> None:
  """Links ``folder``'s parent, importance and permuted phases to the finished ones of ``source`` (see the module
  docstring); leaves any that exists alone, and replaces a link whose target is gone."""
  if distributed.is_primary():
    os.makedirs(folder, exist_ok=True)
    for name, marker in SHARED_PHASES:
      link = os.path.join(folder, name)
      if os.path.islink(link) and not os.path.exists(link):
        os.remove(link)
      if os.path.lexists(link) or not os.path.exists(os.path.join(source, name, marker)):
        continue
      os.symlink(os.path.relpath(os.path.join(source, name), folder), link)
  distributed.barrier(f"elastic_jax_study_links:{folder}")


class Study:
  """Runs every arm x seed not finished yet in ``workdir`` (see the module docstring)."""

  def __init__(self, study: StudyConfig, workdir: str):
    self.study, self.workdir = study, workdir
    self._elastic: dict[int, PipelineResult] = {}  # the elastic arm's models per seed, once loaded

  def run(self, after_seed=None) -> None:
    """Every seed's arms in order; ``after_seed(seed)`` is called when a seed's arms are all finished."""
    for s, seed in enumerate(self.study.seeds):
      for a, name in enumerate(self.study.arms):
        self.run_arm(ARMS[name], seed, f"seed {seed} ({s + 1} of {len(self.study.seeds)}), arm {name} "
                     f"({a + 1} of {len(self.study.arms)})")
      self._elastic.pop(seed, None)  # this seed's models are no longer needed
      if after_seed is not None:
        after_seed(seed)

  def run_arm(self, arm: Arm, seed: int, where: str) -> None:
    seed_dir = seed_folder(self.workdir, seed)
    cfg = self.study.arm_config(arm.name, seed)
    record_folder = os.path.join(arm.name, RECORD_FOLDER)
    done = os.path.exists(arm_record_path(self.workdir, seed, arm.name))
    if PhaseLedger(seed_dir).begin(f"study: {where}", record_folder, {"arm": arm.name, "config": recorded_values(cfg)},
                                   done):
      log(f"study: {where}: finished before, skipped")
      return
    log(f"study: {where}: {arm.description}")
    started = time.time()  # wall clock: compared with file times
    folder = os.path.join(seed_dir, arm.name)
    if arm.kind == ELASTIC:
      record = self._elastic_arm(arm, cfg, seed, folder, started)
    else:
      record = self._standalone_arm(arm, cfg, seed, folder)
    record = {"arm": arm.name, "kind": arm.kind, "seed": seed, **record,
              "wall_s": round(time.time() - started, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    if distributed.is_primary():
      write_json_atomically(os.path.join(seed_dir, record_folder, ARM_FILE), record, indent=1)
    distributed.barrier(f"elastic_jax_study_arm:{folder}")
    log(f"study: {where}: done in {record['wall_s']:.0f} s, {record['tokens']:,} training tokens")
    release_compiled_programs()  # one arm's programs would otherwise stay for the whole study

  # ---------------------------------------------------------------------------------------------- elastic arms
  def _elastic_arm(self, arm: Arm, cfg: Any, seed: int, folder: str, started: float) -> dict[str, Any]:
    source = os.path.join(seed_folder(self.workdir, seed), "elastic")
    if arm.name != "elastic":
      share_phases(source, folder)
    result = run_pipeline(cfg, folder)
    if arm.name == "elastic":
      self._elastic[seed] = result
    evaluate_and_report(cfg, result)
    stages = [plain(stage) for stage in cfg.stages]
    record = {"tokens": stage_tokens(stages), "stages": stages}
    permuted_done = os.path.join(folder, "permuted", "DONE")
    if arm.name == "elastic" and os.path.getmtime(permuted_done) >= started:
      # Made in this call: the time until the permuted parent was saved is the shared phases' (parent, importance,
      # permutation), which every arm of the seed reuses.
      record["shared_phases_s"] = round(os.path.getmtime(permuted_done) - started, 1)
    return record

  def elastic_result(self, seed: int) -> PipelineResult:
    """The elastic arm's models at ``seed``: kept from its run in this call, else its finished main job re-entered
    (every phase reused, nothing trained)."""
    if seed not in self._elastic:
      log(f"study: seed {seed}: loading the elastic arm's parent, pruned baselines and children")
      self._elastic[seed] = run_pipeline(self.study.arm_config("elastic", seed),
                                         os.path.join(seed_folder(self.workdir, seed), "elastic"))
    return self._elastic[seed]

  # ---------------------------------------------------------------------------------------------- standalone arms
  def _standalone_arm(self, arm: Arm, cfg: Any, seed: int, folder: str) -> dict[str, Any]:
    base = self.elastic_result(seed)
    seed_dir = seed_folder(self.workdir, seed)
    members = [member for member in base.members if member.budget < 1.0]
    stages = scaled_stages([plain(stage) for stage in cfg.stages], arm.member_share(len(members)))
    # The elastic stages' own streams: same seed, same stage settings, so every arm reads the same documents.
    make_data = data_factory(base.source, seed=seed, tokenizer=base.tokenizer)
    ledger = PhaseLedger(seed_dir)
    # Each member builds on the elastic arm's models: its extraction record (every value upstream of the pruned
    # baselines and children) comes first in each member's record, so a change there reruns the member.
    ledger.chain(read_json(os.path.join(base.workdir, "children", RECORD_FILE)))
    trained, curves = [], []
    for member in members:
      model = self._standalone_member(arm, cfg, seed, member, stages, make_data, base, ledger)
      trained.append(FamilyMember(member.budget, model, member.baseline))
      curves.append(read_metrics_rows(os.path.join(model.path, "metrics.jsonl")))
    curves_path = os.path.join(folder, CURVES_FILE)
    if distributed.is_primary():
      _write_curves(curves_path, curves, arm.kind == DISTILLED)
    result = StandaloneResult(folder, base.config, base.parent, tuple(trained), base.source, base.tokenizer,
                              base.mesh, base.rules, curves=curves_path)
    evaluate_and_report(cfg, result)
    per_member = stage_tokens(stages)
    return {"tokens": per_member * len(members), "tokens_per_member": per_member, "stages": stages}

  def _standalone_member(self, arm: Arm, cfg: Any, seed: int, member: FamilyMember, stages: list[dict[str, Any]],
                         make_data: Any, base: PipelineResult, ledger: PhaseLedger) -> ExtractedModel:
    """One member's standalone model: trained (or resumed, or reused when finished) in ``W/seed<s>/<arm>/<b>``."""
    # Distilled: starts from the pruned baseline (its architecture and weights); scratch: the elastic child's
    # architecture, random weights.
    start = member.baseline if arm.kind == DISTILLED else member.child
    config = start.config
    phase = os.path.join(arm.name, member.name)
    path = os.path.join(seed_folder(self.workdir, seed), phase)
    memory = memory_from_config(cfg)
    optimizer, loss = self._objective(arm, cfg)
    own = {"standalone": {"arm": arm.name, "member": member.name, "architecture": config.to_dict(),
                          "start": "pruned baseline" if arm.kind == DISTILLED else "random",
                          "stages": stages, "optimizer": dataclasses.asdict(optimizer), "loss": loss,
                          "memory": memory.to_json()}}
    label = f"{arm.name} {member.name}"
    if ledger.begin(label, phase, own, os.path.exists(os.path.join(path, "DONE"))):
      log(f"{label}: reusing {path}")
      params = load_output(path, config, base.mesh, base.rules)
    else:
      params = self._train(label, path, config, start.params if arm.kind == DISTILLED else None, stages, make_data,
                           base, cfg, seed, optimizer, loss, own)
    return ExtractedModel(config, params, start.choice, param_count(config), path)

  @staticmethod
  def _objective(arm: Arm, cfg: Any) -> tuple[OptimizerConfig, dict[str, Any]]:
    """(optimizer, loss settings): distillation with the elastic run's optimizer and KD settings; training from
    scratch like the parent's pretraining (its learning rate and warmup, weight decay 0.01)."""
    if arm.kind == DISTILLED:
      elastic = section(cfg, "elastic")
      return (OptimizerConfig(**section(cfg, "optimizer")),
              {"kind": "kd", "temperature": float(elastic["kd_temperature"]), "ce_weight": float(elastic["ce_weight"])})
    parent = section(cfg, "parent")
    return (OptimizerConfig(learning_rate=float(parent["learning_rate"]), warmup_steps=parent["warmup_steps"],
                            weight_decay=0.01), {"kind": "lm"})

  def _train(self, label: str, path: str, config: ModelConfig, start_params: Any, stages: list[dict[str, Any]],
             make_data: Any, base: PipelineResult, cfg: Any, seed: int, optimizer: OptimizerConfig,
             loss: Mapping[str, Any], own: Mapping[str, Any]) -> Any:
    memory = memory_from_config(cfg)
    curriculum = [Stage(**{**stage, "budget_probs": (1.0,)}) for stage in stages]
    total = sum(stage.steps for stage in curriculum)
    mesh, rules = base.mesh, base.rules
    if loss["kind"] == "kd":
      frozen_config, teacher = _teacher(base, memory.teacher_dtype)
      training = compiled_kd_step(config, frozen_config, optimizer, total, mesh, rules,
                                  temperature=loss["temperature"], ce_weight=loss["ce_weight"],
                                  grad_accum_steps=memory.grad_accum_steps, remat=memory.remat)
      step = lambda state, tokens: training.step(state, teacher, tokens)
      init = lambda: training.init(shard_params(start_params, training.state_shardings.params))
    else:
      training = compiled_lm_step(config, optimizer, total, mesh, rules, grad_accum_steps=memory.grad_accum_steps,
                                  remat=memory.remat)
      step = training.step
      init = lambda: training.init(jax.random.key(seed))

    def segment(index: int, stage: Stage) -> Segment:
      return Segment(stage.name, stage.steps, stage.batch_size * stage.seq_len,
                     lambda: StageFeed(make_data(stage, index), stage, training.batch_sharding), step)

    # What a resumed run must share with the checkpoint's (the stages' own settings apart, as in the main job).
    run_config = json.loads(json.dumps({**own["standalone"], "seed": seed, "stages": stages}))
    result = run_training([segment(i, stage) for i, stage in enumerate(curriculum)], path, label,
                          training.abstract_state, init, run_config,
                          checkpoint_every=section(cfg, "checkpoint_every"), log_every=LOG_EVERY)
    stop_if_preempted(result)
    check_finite(read_metrics_rows(os.path.join(path, "metrics.jsonl")), label,
                 "optimizer.learning_rate (distilled) or parent.learning_rate (scratch), and the stages")
    save_output(path, config, result.state.params, {"steps": total, "study_member": own["standalone"]["member"],
                                                    "arm": own["standalone"]["arm"]})
    return result.state.params


def _teacher(base: PipelineResult, teacher_dtype: str) -> tuple[ModelConfig, Any]:
  """The frozen teacher (the permuted parent) in its shardings, in ``memory.teacher_dtype`` as in the elastic
  arm."""
  shardings = param_shardings(base.config, base.mesh, base.rules)
  return teacher_config(base.config, teacher_dtype), place_frozen(base.parent, shardings, teacher_dtype)


def _write_curves(path: str, members: Sequence[Sequence[Mapping[str, Any]]], distillation: bool) -> None:
  """The members' losses by step, as the report's loss plot reads them (``kd_per_budget`` in member order,
  ``samples_per_budget`` 0 where a member has no row for that step); the scratch arm's LM losses under
  ``loss_per_member`` (not a KD loss: not plotted)."""
  by_step: dict[int, list[float | None]] = {}
  for index, rows in enumerate(members):
    for row in rows:
      by_step.setdefault(int(row["step"]), [None] * len(members))[index] = float(row["loss"])
  key = "kd_per_budget" if distillation else "loss_per_member"
  records = [{"step": step, key: [0.0 if v is None else v for v in losses],
              "samples_per_budget": [0 if v is None else 1 for v in losses]}
             for step, losses in sorted(by_step.items())]
  os.makedirs(os.path.dirname(path), exist_ok=True)
  write_atomically(path, lambda f: f.writelines(json.dumps(record) + "\n" for record in records))
