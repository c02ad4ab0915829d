"""The study end to end through its command line, on a micro config: two arms (the elastic family and sequential
compression at equal tokens), one seed, a few steps. study.json is checked against each arm's own report (read
here, not through the study's code) and against token counts computed from the config; a second call skips the
finished arms, an interrupted member resumes from its checkpoint, a changed value reruns what depends on it, and
bad input is refused in one line before anything is written."""

from __future__ import annotations

import json
import os
import shutil
import types

import pytest

from elastic_jax.study.arms import ARMS as ARM_TABLE
from elastic_jax.study.arms import scaled_stages, stage_tokens
from elastic_jax.study.cli import main
from test_pipeline import _micro_config

ARMS = ["elastic", "sequential_equal"]
STAGES = [dict(name="stage1", steps=4, batch_size=2, seq_len=32, budget_probs=[0.4, 0.3, 0.3]),
          dict(name="stage2", steps=2, batch_size=2, seq_len=32, budget_probs=[0.6, 0.2, 0.2])]


def _config_file(folder, stages=STAGES, arms=tuple(ARMS)) -> str:
  cfg = _micro_config().to_dict()
  cfg["elastic"]["budgets"] = [1.0, 0.75, 0.5]
  cfg["stages"] = stages
  path = os.path.join(folder, "micro_study.py")
  with open(path, "w", encoding="utf-8") as f:  # tuples in the study section: overridable from the command line
    f.write("import json\n\nimport ml_collections\n\n\ndef get_config():\n"
            f"  config = ml_collections.ConfigDict(json.loads({json.dumps(json.dumps(cfg))}))\n"
            f"  config.study = ml_collections.ConfigDict(dict(seeds=(0,), arms={tuple(arms)!r}))\n"
            "  return config\n")
  return path


def _read(*parts):
  with open(os.path.join(*parts), encoding="utf-8") as f:
    return json.load(f)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("study"))
  config, workdir = _config_file(folder), os.path.join(folder, "run")
  assert main(["--config", config, "--workdir", workdir]) == 0
  return config, workdir


def test_study_json_holds_every_arm_seed_and_member_as_the_arms_reports_measured_them(study):
  _, workdir = study
  result = _read(workdir, "study.json")
  assert result["seeds"] == [0] and result["arms"] == ARMS
  assert set(result["runs"]) == {"elastic", "sequential_equal", "parent", "pruned"}
  seed_dir = os.path.join(workdir, "seed0")
  elastic_rows = _read(seed_dir, "elastic", "report.json")["rows"]
  sequential_rows = _read(seed_dir, "sequential_equal", "report.json")["rows"]
  # The elastic arm's report: the parent, then 100pct, 75pct, 50pct with the pruned baselines beside the smaller ones.
  assert [row["budget"] for row in elastic_rows] == ["parent", "100pct", "75pct", "50pct"]
  assert [row["budget"] for row in sequential_rows] == ["parent", "75pct", "50pct"]
  expected = {("elastic", row["budget"]): (row, "") for row in elastic_rows[1:]}
  expected.update({("sequential_equal", row["budget"]): (row, "") for row in sequential_rows[1:]})
  expected.update({("pruned", row["budget"]): (row, "baseline_") for row in elastic_rows[2:]})
  expected[("parent", "100pct")] = (elastic_rows[0], "")
  for (arm, member), (row, prefix) in expected.items():
    got = result["runs"][arm]["0"]["members"][member]
    for key in ("params", "ppl", "accuracy_short", "accuracy_long"):
      assert got[key] == row[f"{prefix}{key}"], (arm, member, key)
  # Sequential compression distils the elastic arm's pruned baselines: same architectures, same sizes.
  for row in sequential_rows[1:]:
    baseline = next(r for r in elastic_rows if r["budget"] == row["budget"])
    assert row["params"] == baseline["baseline_params"]
  # The same parent (the teacher) in both reports: shared, not pretrained twice.
  assert sequential_rows[0]["ppl"] == elastic_rows[0]["ppl"]
  # One seed: the summary's mean is that seed's value.
  summary = result["summary"]["sequential_equal"]["members"]["50pct"]["accuracy_short"]
  assert summary["mean"] == sequential_rows[2]["accuracy_short"] and summary["n_seeds"] == 1


def test_tokens_are_what_each_arm_trained_on(study):
  _, workdir = study
  result = _read(workdir, "study.json")
  elastic_tokens = sum(s["steps"] * s["batch_size"] * s["seq_len"] for s in STAGES)  # T = 4*64 + 2*64
  # Two smaller members at equal total: T/2 each, i.e. half of each stage's steps.
  member_steps = [s["steps"] // 2 for s in STAGES]
  member_tokens = sum(n * s["batch_size"] * s["seq_len"] for n, s in zip(member_steps, STAGES))
  assert result["runs"]["elastic"]["0"]["tokens"] == elastic_tokens
  assert result["runs"]["sequential_equal"]["0"]["tokens"] == 2 * member_tokens == elastic_tokens
  assert result["tokens"]["ratio_to_elastic"]["sequential_equal"] == 1.0
  for member in ("75pct", "50pct"):
    with open(os.path.join(workdir, "seed0", "sequential_equal", member, "metrics.jsonl"), encoding="utf-8") as f:
      assert [json.loads(line)["step"] for line in f] == list(range(1, sum(member_steps) + 1))
  rows = [json.loads(line) for line in open(os.path.join(workdir, "seed0", "elastic", "elastic", "metrics.jsonl"),
                                            encoding="utf-8")]
  assert len(rows) == sum(s["steps"] for s in STAGES)


def test_comparisons_markdown_and_plots(study):
  _, workdir = study
  result = _read(workdir, "study.json")
  entries = result["comparisons"]
  versus_sequential = [e for e in entries if e["reference"] == "sequential_equal"]
  assert {(e["member"], e["metric"]) for e in versus_sequential} == {
      (m, k) for m in ("75pct", "50pct") for k in ("accuracy_short", "accuracy_long", "ppl")}
  for entry in entries:
    assert entry["verdict"] in ("elastic better", f"{entry['reference']} better", "not distinguishable")
    assert entry["method"].startswith("one seed")
  text = open(os.path.join(workdir, "study.md"), encoding="utf-8").read()
  assert "`elastic` vs `sequential_equal`" in text and "(d) Training tokens" in text and "1 seed only" in text
  for name in ("accuracy_vs_params.png", "tokens_per_arm.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0 and name in text


def test_a_second_call_skips_finished_arms_and_an_interrupted_member_resumes(study, tmp_path, capsys):
  config, finished = study
  workdir = str(tmp_path / "run")
  shutil.copytree(finished, workdir, symlinks=True)
  before = _read(workdir, "study.json")
  capsys.readouterr()
  assert main(["--config", config, "--workdir", workdir]) == 0
  out = capsys.readouterr().out
  assert out.count("finished before, skipped") == 2 and "training" not in out.replace("training tokens", "")
  assert _read(workdir, "study.json")["runs"] == before["runs"]

  # A member interrupted after its last checkpoint (no saved model, no arm record): it resumes from the checkpoint,
  # and the arm's report is the uninterrupted one's.
  member = os.path.join(workdir, "seed0", "sequential_equal", "50pct")
  os.remove(os.path.join(member, "DONE"))
  shutil.rmtree(os.path.join(member, "model"))
  os.remove(os.path.join(workdir, "seed0", "sequential_equal", "study", "arm.json"))
  assert main(["--config", config, "--workdir", workdir]) == 0
  out = capsys.readouterr().out
  assert "arm elastic (1 of 2): finished before, skipped" in out
  assert "sequential_equal 75pct: reusing" in out and "sequential_equal 50pct: resuming from the checkpoint" in out
  after = _read(workdir, "study.json")["runs"]["sequential_equal"]["0"]["members"]
  assert after == before["runs"]["sequential_equal"]["0"]["members"]


def test_a_changed_value_reruns_the_arms_that_depend_on_it(study, tmp_path, capsys):
  config, finished = study
  workdir = str(tmp_path / "run")
  shutil.copytree(finished, workdir, symlinks=True)
  capsys.readouterr()
  # Evaluation settings: both arms are evaluated again, nothing is trained again.
  assert main(["--config", config, "--workdir", workdir, "--config.eval.examples=3"]) == 0
  out = capsys.readouterr().out
  assert "finished before, skipped" not in out and "eval.examples: 2 -> 3" in out
  assert "sequential_equal 75pct: reusing" in out and "elastic training: reusing" in out
  members = _read(workdir, "study.json")["runs"]["sequential_equal"]["0"]["members"]
  assert all(member["accuracy_short_n"] == 3 for member in members.values())


def test_the_arms_curricula_against_hand_counted_tokens():
  stages = [dict(name="stage1", steps=400, batch_size=12, seq_len=128, budget_probs=[1 / 3] * 3),
            dict(name="stage2", steps=80, batch_size=6, seq_len=256, budget_probs=[0.5, 0.3, 0.2]),
            dict(name="tail", steps=60, batch_size=6, seq_len=256, budget_probs=[0.5, 0.3, 0.2], pinned=True)]
  assert stage_tokens(stages) == 400 * 1536 + 140 * 1536
  # Stage 2 off: stage 1 for the routed stages' tokens (400 + 80 of its steps), then the pinned tail at stage 1's
  # settings (its task settings included: no long-context data) for the tail's 60 x 1536 tokens.
  assert ARM_TABLE["elastic_stage1_only"].curriculum(stages, "study.arms") == [
      dict(stages[0], steps=480), dict(stages[0], name="tail", steps=60, pinned=True, tasks=0)]
  # Uniform stage 2: every stage after the first, the pinned tail included (and still pinned).
  uniform = ARM_TABLE["elastic_uniform"].curriculum(stages, "study.arms")
  assert uniform[0] == stages[0] and [s["budget_probs"] for s in uniform[1:]] == [[1 / 3] * 3] * 2
  assert uniform[2]["pinned"] and [s["steps"] for s in uniform] == [400, 80, 60]
  # Equal total over two smaller members: half of every stage's steps each.
  assert [s["steps"] for s in scaled_stages(stages, ARM_TABLE["sequential_equal"].member_share(2))] == [200, 40, 30]
  assert ARM_TABLE["sequential_full"].member_share(2) == ARM_TABLE["scratch"].member_share(2) == 1.0


UNIFORM_STAGE2 = [STAGES[0], dict(STAGES[1], budget_probs=[1 / 3, 1 / 3, 1 / 3])]


@pytest.mark.parametrize("args, stages, expected", [
    (["--config.study.arms=('elastic', 'sequential')"], STAGES,
     "config error: study.arms[1]: 'sequential' is not one of elastic, elastic_stage1_only"),
    (["--config.study.arms=('scratch',)"], STAGES, "config error: study.arms: ['scratch'] has no 'elastic'"),
    (["--config.study.seeds=(0, 0)"], STAGES, "config error: study.seeds[1]: 0 repeats study.seeds[0]"),
    (["--config.study.sedes=(1,)"], STAGES, "config error: study.sedes: unknown key (did you mean seeds?)"),
    (["--config.study.arms=('elastic', 'elastic_uniform')"], UNIFORM_STAGE2,
     "config error: study.arms: elastic_uniform: the budget_probs of the stages after the first"),
    (["--config.parent.seq_len=0"], STAGES, "config error: parent.seq_len: 0 must be an integer >= 1"),
], ids=["unknown arm", "no elastic arm", "repeated seed", "typo", "uniform already", "run config"])
def test_bad_input_is_refused_in_one_line_before_anything_is_written(args, stages, expected, tmp_path, capsys):
  config, workdir = _config_file(str(tmp_path), stages), tmp_path / "run"
  capsys.readouterr()
  assert main(["--config", config, "--workdir", str(workdir), *args]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err and err[-1].startswith(expected), err
  assert not workdir.exists()


def test_a_study_stopped_by_sigterm_exits_1_with_the_resume_line(tmp_path, capsys, monkeypatch):
  """The main job's preemption stop (a checkpoint saved, then SystemExit with a message) inside an arm: the study's
  main returns 1 and prints that line, as the process would, instead of failing on the message."""
  from elastic_jax.study import run as study_run  # pylint: disable=import-outside-toplevel
  from elastic_jax.train.pipeline import stop_if_preempted  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(study_run, "run_pipeline",
                      lambda cfg, folder: stop_if_preempted(types.SimpleNamespace(preempted=True)))
  config = _config_file(str(tmp_path), STAGES)
  capsys.readouterr()
  assert main(["--config", config, "--workdir", str(tmp_path / "run"), "--config.study.seeds=(0,)"]) == 1
  assert capsys.readouterr().err.strip().splitlines()[-1] == (
      "[elastic_jax] stopped by SIGTERM after saving a checkpoint; run the same command to resume.")


def test_accuracy_intervals_over_seeds_stay_within_0_and_100_percent():
  from elastic_jax.study.summary import summarize
  import numpy as np
  accuracies, ppls = [0.99, 0.28, 1.0], [1.30, 1.35, 1.29]
  runs = {"elastic": {seed: {"members": {"50pct": {"params": 1000, "accuracy_short": a, "ppl": p}}}
                      for seed, (a, p) in enumerate(zip(accuracies, ppls))}}
  entry = summarize(runs)["elastic"]["members"]["50pct"]
  # By hand: mean 0.7567, s = 0.4128, t(0.975, 2) = 4.3027 -> half width 1.0255: [-0.269, 1.782] before clipping.
  half = 4.302652729749464 * np.std(accuracies, ddof=1) / np.sqrt(3)
  assert entry["accuracy_short"]["mean"] == pytest.approx(np.mean(accuracies))
  assert (entry["accuracy_short"]["low"], entry["accuracy_short"]["high"]) == (0.0, 1.0)
  assert np.mean(accuracies) - half < 0 and np.mean(accuracies) + half > 1  # the clip did something
  # A difference of accuracies lies in [-100, +100] points: paired by seed, 0.99 - 0.0, 0.28 - 0.5, 1.0 - 0.0 has a t
  # interval of about [-1.15, +2.33], clipped to [-1, 1]; the verdict is unchanged (0 inside either way).
  from elastic_jax.study.summary import compare
  runs["baseline"] = {seed: {"members": {"50pct": {"accuracy_short": b}}, "_per_problem": {}}
                      for seed, b in enumerate([0.0, 0.5, 0.0])}
  for run in (*runs["elastic"].values(), *runs["baseline"].values()):
    run["members"]["50pct"]["_per_problem"] = {}
  diff = compare(runs, "elastic", "baseline", "50pct", "accuracy_short")
  diffs = np.array(accuracies) - np.array([0.0, 0.5, 0.0])
  diff_half = 4.302652729749464 * np.std(diffs, ddof=1) / np.sqrt(3)
  assert diffs.mean() - diff_half < -1 and diffs.mean() + diff_half > 1
  assert (diff["low"], diff["high"]) == (-1.0, 1.0) and diff["diff"] == pytest.approx(diffs.mean())
  assert diff["verdict"] == "not distinguishable"
  # Perplexity has no upper bound: its interval stays the t interval.
  ppl_half = 4.302652729749464 * np.std(ppls, ddof=1) / np.sqrt(3)
  assert entry["ppl"]["low"] == pytest.approx(np.mean(ppls) - ppl_half)
  assert entry["ppl"]["high"] == pytest.approx(np.mean(ppls) + ppl_half)
