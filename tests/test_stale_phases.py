"""A finished phase is reused only under the config values that produced it (invariant 11).

A finished micro main-job workdir is re-run under changed values: a budget reruns elastic training, extraction and
evaluation but not the parent, importance or permutation, and gives what a fresh run under the new values gives; a
changed ``parent.pretrain_steps`` reruns everything; a changed stage-2 batch keeps the finished stage 1;
``--reuse-stale`` keeps the old results and the report says so; a parent whose loss is not finite is not kept.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from elastic_jax.eval.report import evaluate_and_report
from elastic_jax.train.pipeline import DivergedError, parent_phase, run_pipeline
from multihost import cpu_env
from test_pipeline import _micro_config

ROOT = pathlib.Path(__file__).parents[1]
PHASES = ("parent", "importance", "permutation", "elastic training", "extraction")


def _config(**changes):
  cfg = _micro_config()
  cfg.checkpoint_every = 2  # checkpoints inside each stage, kept at each stage's end
  for key, value in changes.items():
    section, _, name = key.partition(".")
    cfg[section][name] = value
  return cfg


def _run(cfg, workdir: str, capsys, reuse_stale: bool = False) -> tuple[str, dict]:
  """One main-job run (pipeline and evaluation); returns its log and report."""
  capsys.readouterr()
  evaluate_and_report(cfg, run_pipeline(cfg, workdir, reuse_stale=reuse_stale))
  with open(os.path.join(workdir, "report.json"), encoding="utf-8") as f:
    return capsys.readouterr().out, json.load(f)


def _reused(log: str) -> set[str]:
  return {phase for phase in PHASES if f"[elastic_jax] {phase}: reusing" in log}


def _metrics(workdir) -> list[dict]:
  """The elastic phase's metrics rows without the speed readouts, which are measured anew by every run."""
  rows = [json.loads(line) for line in _read(workdir, "elastic", "metrics.jsonl").splitlines()]
  return [{k: v for k, v in row.items() if k not in ("step_time_s", "tokens_per_s", "mfu")} for row in rows]


def _read(workdir, *parts):
  with open(os.path.join(workdir, *parts), encoding="utf-8") as f:
    return f.read()


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> str:
  workdir = str(tmp_path_factory.mktemp("stale") / "finished")
  run_pipeline(_config(), workdir)
  return workdir


def _copy(finished: str, tmp_path) -> str:
  workdir = str(tmp_path / "run")
  shutil.copytree(finished, workdir)
  return workdir


def test_a_changed_budget_reruns_training_extraction_and_evaluation_only(finished, tmp_path, capsys):
  workdir = _copy(finished, tmp_path)
  stamps = {p: os.path.getmtime(os.path.join(workdir, p)) for p in ("parent/DONE", "permuted/DONE",
                                                                      "importance/rankings.json")}
  log, report = _run(_config(**{"elastic.budgets": [1.0, 0.5]}), workdir, capsys)
  assert _reused(log) == {"parent", "importance", "permutation"}
  assert ("[elastic_jax] elastic training: made under other config values (elastic.budgets: [1.0, 0.6] -> "
          "[1.0, 0.5]); rerunning it and every later phase") in log
  assert stamps == {p: os.path.getmtime(os.path.join(workdir, p)) for p in stamps}
  assert [row["budget"] for row in report["rows"]] == ["parent", "100pct", "50pct"] and "stale_phases" not in report
  assert os.path.isdir(os.path.join(workdir, "elastic.stale"))  # the previous output, set aside
  assert sorted(os.listdir(os.path.join(workdir, "children"))) == ["100pct", "50pct", "phase_config.json"]

  # The same as a fresh run under the new budgets: nothing of the old training is left in use.
  fresh = str(tmp_path / "fresh")
  run_pipeline(_config(**{"elastic.budgets": [1.0, 0.5]}), fresh)
  assert _read(workdir, "elastic", "deployed_choices.json") == _read(fresh, "elastic", "deployed_choices.json")
  assert _metrics(workdir) == _metrics(fresh)


def test_a_changed_pretraining_length_reruns_everything(finished, tmp_path, capsys):
  workdir = _copy(finished, tmp_path)
  log, _ = _run(_config(**{"parent.pretrain_steps": 8}), workdir, capsys)
  assert _reused(log) == set()
  assert ("[elastic_jax] parent: made under other config values (parent.pretrain_steps: 6 -> 8); rerunning it and "
          "every later phase") in log
  for phase in ("importance", "permutation", "elastic training", "extraction"):  # each names the upstream key
    assert f"[elastic_jax] {phase}: made under other config values (parent.pretrain_steps: 6 -> 8)" in log
  assert "parent pretraining: starting at step 0 of 8" in log
  assert json.loads(_read(workdir, "parent", "phase_config.json"))["parent.pretrain_steps"] == 8
  log, _ = _run(_config(**{"parent.pretrain_steps": 8}), workdir, capsys)  # and now it is all reused
  assert _reused(log) == set(PHASES)


def test_a_changed_stage_2_batch_keeps_the_finished_stage_1(finished, tmp_path, capsys):
  workdir = _copy(finished, tmp_path)
  cfg = _config()
  cfg.stages[1]["batch_size"] = 4
  capsys.readouterr()
  run_pipeline(cfg, workdir)
  log = capsys.readouterr().out
  assert _reused(log) == {"parent", "importance", "permutation"}
  assert "elastic training: made under other stage settings (stages[1].batch_size: 2 -> 4)" in log
  assert "resuming from the checkpoint of step 3 of 5, at the start of stage2" in log
  assert "stage2 (stage 2 of 2, steps 4-5)" in log
  rows = [json.loads(line) for line in _read(workdir, "elastic", "metrics.jsonl").splitlines()]
  finished_rows = [json.loads(line) for line in _read(finished, "elastic", "metrics.jsonl").splitlines()]
  assert [row["step"] for row in rows] == [1, 2, 3, 4, 5]
  assert rows[:3] == finished_rows[:3]  # stage 1 as it was trained
  assert os.path.isdir(os.path.join(workdir, "elastic", "student.stale"))


def test_reuse_stale_keeps_old_results_and_the_report_says_so(finished, tmp_path):
  """Through the command line: ``--reuse-stale`` after a changed budget."""
  workdir = _copy(finished, tmp_path)
  config_file = tmp_path / "micro.py"
  config_file.write_text(f"import ml_collections\n\n\ndef get_config():\n"
                         f"  return ml_collections.ConfigDict({_config().to_dict()!r})\n")
  command = [sys.executable, "-m", "elastic_jax.train", "--config", str(config_file), "--workdir", workdir,
             "--config.elastic.budgets[1]=0.5", "--reuse-stale"]
  result = subprocess.run(command, env=cpu_env(1), capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "elastic training: made under other config values (elastic.budgets: [1.0, 0.6] -> [1.0, 0.5]); kept as " \
         "it is (--reuse-stale)" in result.stdout
  for phase in ("parent", "importance", "permutation", "elastic training", "extraction"):
    assert f"[elastic_jax] {phase}: reusing" in result.stdout
  report = json.loads(_read(workdir, "report.json"))
  assert report["stale_phases"] == [{"phase": "elastic training",
                                     "changes": ["elastic.budgets: [1.0, 0.6] -> [1.0, 0.5]"]}]
  assert [row["budget"] for row in report["rows"]] == ["parent", "100pct", "60pct"]  # the old family, labelled
  markdown = _read(workdir, "report.md")
  assert "**Stale results**" in markdown and "- elastic training: elastic.budgets: [1.0, 0.6] -> [1.0, 0.5]" in markdown


def test_a_parent_whose_loss_is_not_finite_is_not_marked_done(tmp_path):
  from elastic_jax.data.pipeline import SourceConfig, data_factory  # pylint: disable=import-outside-toplevel
  cfg = _config(**{"parent.learning_rate": 1e30})  # the first update sends the weights to infinity
  workdir = str(tmp_path / "run")
  with pytest.raises(DivergedError, match=r"parent pretraining: the loss is (nan|inf) at step \d+ .* its result is "
                                          r"not kept and no later phase runs on it \(check parent.seq_len"):
    parent_phase(cfg, workdir, data_factory(SourceConfig(), seed=1, vocab_size=256))
  assert not os.path.exists(os.path.join(workdir, "parent", "DONE"))
  assert not os.path.exists(os.path.join(workdir, "parent", "model"))
