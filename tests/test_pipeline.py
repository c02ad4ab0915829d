"""The main job end to end on a micro config: every phase, the report, and resumption without redoing phases."""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from elastic_jax.elastic.extract import extract
from elastic_jax.elastic.space import Choice
from elastic_jax.eval.report import evaluate_and_report
from elastic_jax.train.checkpoint import load_model
from elastic_jax.train.pipeline import run_pipeline


def _micro_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      seed=0,
      model=dict(pattern="M-*-", vocab_size=256, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=16, mamba_num_heads=4, mamba_head_dim=8, n_groups=2,
                 ssm_state_size=8, chunk_size=16),
      data=dict(kind="tasks"),
      parent=dict(hf_path="", pretrain_steps=6, batch_size=2, seq_len=32, learning_rate=3e-3, warmup_steps=2),
      importance=dict(batches=2, batch_size=2, seq_len=32, depth_batches=1),
      elastic=dict(budgets=[1.0, 0.6], space=dict(hidden=[16, 32], mlp=[32, 64], mamba_heads=[2, 4]),
                   router=dict(width=8)),
      stages=[dict(name="stage1", steps=3, batch_size=2, seq_len=32, budget_probs=[0.5, 0.5]),
              dict(name="stage2", steps=2, batch_size=2, seq_len=32, budget_probs=[0.7, 0.3])],
      optimizer=dict(learning_rate=1e-3, warmup_steps=1), router_optimizer=dict(warmup_steps=1),
      checkpoint_every=100,
      eval=dict(ppl_batches=1, batch_size=2, seq_len=32, examples=2, max_new_tokens=8, decode_batch=2)))


def test_pipeline_runs_every_phase_and_resumes_without_redoing_them(tmp_path, capsys):
  cfg = _micro_config()
  workdir = str(tmp_path / "run")
  result = run_pipeline(cfg, workdir)
  files = evaluate_and_report(cfg, result)
  for phase in ("parent/DONE", "importance/rankings.json", "permuted/DONE", "elastic/deployed_choices.json",
                "elastic/student/DONE",
                "children/100pct/DONE", "children/60pct/DONE", "baselines/60pct/DONE", "report.md", "report.json"):
    assert os.path.exists(os.path.join(workdir, phase)), phase
  report = json.loads(open(os.path.join(workdir, "report.json"), encoding="utf-8").read())
  rows = report["rows"] if isinstance(report, dict) and "rows" in report else report
  assert [r["budget"] for r in rows] == ["parent", "100pct", "60pct"]
  assert rows[1]["full_size"] and "baseline_ppl" not in rows[1]  # nothing is pruned at 100%: no baseline to measure
  assert rows[2]["baseline_params"] < rows[0]["params"] and "baseline_ppl" in rows[2]
  assert "report.md" in " ".join(str(v) for v in files.values())
  # Every model's decode speed, timed on the same batch (eval.decode_batch prompts of the short set, the same width)
  # and the same new tokens (eval.max_new_tokens): the tokens counted in its outputs are batch x (n - 1).
  timings = [row["decode_timing"] for row in rows] + [rows[2]["baseline_decode_timing"]]
  assert len({timing["prompt_width"] for timing in timings}) == 1
  for timing in timings:
    assert (timing["batch"], timing["new_tokens"]) == (2, 8) and timing["tokens"] == 2 * (8 - 1)
    assert timing["tokens_per_s"] == (timing["tokens"] / timing["seconds"] if timing["seconds"] > 0 else None)
  for row in rows:
    assert row["decode_tokens_per_s"] == row["decode_timing"]["tokens_per_s"]
  markdown = open(os.path.join(workdir, "report.md"), encoding="utf-8").read()
  table = [line.strip("|").split(" | ") for line in markdown.splitlines() if line.startswith("| ")]
  column = [cell.strip() for cell in table[0]].index("decode tok/s")
  for row, cells in zip(rows, table[1:]):
    speed = row["decode_tokens_per_s"]
    assert cells[column].strip() == ("—" if speed is None else f"{speed:,.0f}")

  # Children are slices of the elastically trained student; pruned baselines slices of the untrained parent.
  _, student = load_model(os.path.join(workdir, "elastic", "student", "model"))
  _, permuted = load_model(os.path.join(workdir, "permuted", "model"))
  depth_order = [int(i) for i in json.load(open(os.path.join(workdir, "importance", "rankings.json")))["depth"]]
  records = json.load(open(os.path.join(workdir, "elastic", "deployed_choices.json"), encoding="utf-8"))
  for record in records:
    name = f"{int(round(100 * record['budget']))}pct"
    _, saved = load_model(os.path.join(workdir, "children", name, "model"))
    _, sliced = extract(result.config, student, Choice.from_dict(record["choice"]), depth_order)
    jax.tree.map(np.testing.assert_array_equal, saved, sliced)
  # The typed result holds, per budget, the deployed choice's child and the baseline, as saved.
  assert [(m.name, m.budget) for m in result.members] == [("100pct", 1.0), ("60pct", 0.6)]
  for member, record, row in zip(result.members, records, rows[1:]):
    assert member.child.choice == Choice.from_dict(record["choice"])
    assert member.child.path == os.path.join(workdir, "children", member.name)
    assert member.baseline.path == os.path.join(workdir, "baselines", member.name)
    assert row["params"] == member.child.param_count == record["params"]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(member.child.params),
                 load_model(os.path.join(member.child.path, "model"))[1])
  _, full_child = load_model(os.path.join(workdir, "children", "100pct", "model"))
  trained = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), full_child,
                                         permuted))
  assert any(trained)  # the 100% child carries the trained weights, not the parent's

  stamps = {p: os.path.getmtime(os.path.join(workdir, p)) for p in ("parent/DONE", "permuted/DONE")}
  capsys.readouterr()
  run_pipeline(cfg, workdir)  # a re-run finds every phase done
  out = capsys.readouterr().out
  for phase in ("parent", "importance", "permutation", "elastic training"):
    assert f"{phase}: reusing" in out
  assert stamps == {p: os.path.getmtime(os.path.join(workdir, p)) for p in stamps}


def test_parent_pretraining_resumes_from_its_checkpoint_exactly(tmp_path):
  """Reference: an uninterrupted pretraining run; the interrupted one restarts from its step-3 checkpoint."""
  from elastic_jax.data.pipeline import SourceConfig, data_factory  # pylint: disable=import-outside-toplevel
  from elastic_jax.train.pipeline import parent_phase  # pylint: disable=import-outside-toplevel
  cfg = _micro_config()
  cfg.checkpoint_every = 3
  make_data = data_factory(SourceConfig(), seed=1, vocab_size=256)
  _, reference = parent_phase(cfg, str(tmp_path / "straight"), make_data)

  class Interrupted(Exception):
    pass

  def failing_data(stage, index):
    iterator, served = make_data(stage, index), []

    class Failing:
      def __next__(self):
        served.append(1)
        if index == 0 and len(served) == 3:  # step 5's batch (long_every=2): after the step-3 checkpoint
          raise Interrupted()
        return next(iterator)

      def get_state(self):
        return iterator.get_state()

      def set_state(self, state):
        iterator.set_state(state)
    return Failing()

  workdir = str(tmp_path / "interrupted")
  with pytest.raises(Interrupted):
    parent_phase(cfg, workdir, failing_data)
  assert not os.path.exists(os.path.join(workdir, "parent", "DONE"))
  _, resumed = parent_phase(cfg, workdir, make_data)
  jax.tree.map(np.testing.assert_array_equal, resumed, reference)
  # The training loop's log reads as one uninterrupted run, and the resume check compares the memory settings' values.
  rows = [json.loads(line) for line in open(os.path.join(workdir, "parent", "metrics.jsonl"), encoding="utf-8")]
  assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
  metadata, _ = load_model(os.path.join(workdir, "parent", "checkpoints"))
  assert metadata["step"] == 6
  assert metadata["config"]["memory"] == {"remat": {}, "grad_accum_steps": 1, "teacher_dtype": "float32"}
