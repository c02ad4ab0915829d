"""Training loop: exact resume (state, losses, data position, one metrics row per step, also after kill -9), stage
handling (a stage not started takes new settings, a changed stage restarts from its start), SIGTERM saves, bad
input."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_params, small_config

from elastic_jax.data.random_tokens import RandomTokenBatches
from elastic_jax.elastic.router import RouterSchedule
from elastic_jax.elastic.param_count import choice_param_count
from elastic_jax.elastic.space import Choice, ElasticSpace
from elastic_jax.train.checkpoint import Checkpointer, ConfigMismatchError, abstract_like
from elastic_jax.train.loop import Stage, train_elastic
from elastic_jax.train.optim import OptimizerConfig
from elastic_jax.train.elastic_step import ElasticSetup
from elastic_jax.train.memory import MemoryConfig

CONFIG = small_config("M-*M", hidden_size=32, intermediate_size=48)
# Same batch shape in both stages (one compile per test); the stage change still switches data and probabilities.
STAGES = (Stage("stage1", 4, 4, 8, (1 / 3, 1 / 3, 1 / 3)), Stage("stage2", 3, 4, 8, (0.5, 0.3, 0.2)))


def _setup(**kw):
  space = ElasticSpace.from_dict(dict(hidden=[16, 32], mlp=[24, 48], attention_heads=[2, 4], mamba_heads=[2, 4],
                                      mamba_head_dim=[4, 8], depth=[3, 4]), CONFIG)
  return ElasticSetup(CONFIG, space, (1.0, 0.75, 0.5), depth_order=(0, 2, 1, 3),
                      schedule=RouterSchedule(total_steps=7), router_width=16, **kw)


def _data(stage, index):
  return RandomTokenBatches(seed=10 + index, batch_size=stage.batch_size, length=stage.seq_len + 1,
                            vocab_size=CONFIG.vocab_size)


def _run(workdir, setup=None, stages=STAGES, **kw):
  teacher = random_params(CONFIG, seed=0)
  kw = {"checkpoint_every": 100, "log_every": 1, "progress": False, **kw}
  return train_elastic(setup or _setup(), stages, teacher, jax.tree.map(jnp.copy, teacher), _data, workdir,
                       optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=2), **kw)


def _losses(history):
  return [(h["step"], h["loss"]) for h in history]


def test_resume_continues_exactly(tmp_path):
  full = _run(tmp_path / "full")
  assert [h["step"] for h in full.history] == list(range(1, 8))

  rankings = {"rankings": {"hidden": [3, 1, 2, 0]}}
  first = _run(tmp_path / "split", max_steps=3, metadata=rankings)  # stops inside stage 1 (and checkpoints)
  second = _run(tmp_path / "split", metadata=rankings)  # resumes at step 3: data position, PRNG, optimizer, router
  assert _losses(first.history) + _losses(second.history) == _losses(full.history)
  for a, b in zip(jax.tree.leaves((full.state.params, full.state.router_params)),
                  jax.tree.leaves((second.state.params, second.state.router_params))):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
  # The metrics log reads as one uninterrupted run.
  lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 7
  _, meta = Checkpointer(tmp_path / "split" / "checkpoints").restore(abstract_like(first.state))
  assert meta["step"] == 7 and meta["rankings"] == {"hidden": [3, 1, 2, 0]}
  assert meta["data_state"] == [{"stage": 1, "iterator": {"position": 3}}]  # 3 batches into stage 2 (one process)
  # The choice each budget deploys with is saved for extraction, with its exact size.
  records = json.loads((tmp_path / "split" / "deployed_choices.json").read_text())
  assert [r["budget"] for r in records] == [1.0, 0.75, 0.5]
  for record in records:
    choice = Choice.from_dict(record["choice"])
    assert record["params"] == choice_param_count(CONFIG, choice, (0, 2, 1, 3))


PINNED = (STAGES[0], Stage("stage2", 3, 4, 8, (0.5, 0.3, 0.2), pinned=True))


def test_a_pinned_stage_trains_the_deployed_choices_with_the_router_frozen_and_resumes_exactly(tmp_path):
  routed = _run(tmp_path / "routed", stages=PINNED[:1])  # stage 1 alone: the router the pinned stage starts from
  full = _run(tmp_path / "full", stages=PINNED)
  assert _losses(full.history)[:4] == _losses(routed.history)
  assert [h["pinned"] for h in full.history] == [0] * 4 + [1] * 3
  # Frozen: the router after the pinned steps is the router before them.
  for a, b in zip(jax.tree.leaves(routed.state.router_params), jax.tree.leaves(full.state.router_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Each pinned step's per-budget size is exactly its deployed choice's, which extraction cuts.
  records = json.loads((tmp_path / "full" / "deployed_choices.json").read_text())
  for row in full.history[4:]:
    for b, (count, record) in enumerate(zip(row["samples_per_budget"], records)):
      if count:
        assert row["expected_size_per_budget"][b] == pytest.approx(record["fraction"], rel=1e-5)
  # Stopped inside the pinned stage and resumed: the same choices are pinned again, the run continues exactly.
  _run(tmp_path / "split", stages=PINNED, max_steps=5)
  second = _run(tmp_path / "split", stages=PINNED)
  assert _losses(second.history) == _losses(full.history)[5:]


def test_resume_at_a_stage_boundary(tmp_path):
  full = _run(tmp_path / "full")
  _run(tmp_path / "split", max_steps=4)
  second = _run(tmp_path / "split")
  assert _losses(second.history) == _losses(full.history)[4:]


def test_resume_under_a_changed_config_is_refused(tmp_path):
  _run(tmp_path, max_steps=2)
  with pytest.raises(ConfigMismatchError, match=r"elastic.kd_temperature: checkpoint has 1.0, current config has 2.0"):
    _run(tmp_path, setup=_setup(kd_temperature=2.0))


def test_resume_under_another_memory_setting_is_refused_naming_its_values(tmp_path):
  _run(tmp_path, max_steps=2)
  with pytest.raises(ConfigMismatchError, match=r"memory.grad_accum_steps: checkpoint has 1, current config has 2"):
    _run(tmp_path, setup=_setup(memory=MemoryConfig(grad_accum_steps=2)))


NEW_STAGES = (STAGES[0], Stage("stage2", 3, 4, 8, (0.2, 0.3, 0.5)))  # stage 2 draws other budgets


def test_a_stage_not_started_takes_new_settings(tmp_path, capsys):
  reference = _run(tmp_path / "reference", stages=NEW_STAGES)
  _run(tmp_path / "split", max_steps=3)  # stops inside stage 1
  resumed = _run(tmp_path / "split", stages=NEW_STAGES, progress=True)  # stage 2 changed before it started
  assert "resuming from the checkpoint of step 3 of 7, 3 steps into stage1" in capsys.readouterr().out
  assert _losses(resumed.history) == _losses(reference.history)[3:]
  assert not [p for p in os.listdir(tmp_path / "split" / "checkpoints") if not p.isdigit()]  # nothing set aside


def test_a_changed_stage_restarts_from_its_start_keeping_the_stages_before_it(tmp_path, capsys):
  reference = _run(tmp_path / "reference", stages=NEW_STAGES)
  _run(tmp_path / "run", checkpoint_every=2)  # finished under the old stage 2: checkpoints 4 (stage end), 6, 7
  again = _run(tmp_path / "run", stages=NEW_STAGES, checkpoint_every=2, progress=True)
  out = capsys.readouterr().out
  assert "stages[1].budget_probs: checkpoint has [0.5, 0.3, 0.2], current config has [0.2, 0.3, 0.5]" in out
  assert "resuming from the checkpoint of step 4 of 7, at the start of stage2" in out
  assert _losses(again.history) == _losses(reference.history)[4:]  # stage 1 kept, stage 2 under its new settings
  checkpoints = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
  assert "6.stale" in checkpoints and "7.stale" in checkpoints and "4" in checkpoints  # set aside, not deleted
  rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [(row["step"], row["loss"]) for row in rows] == _losses(reference.history)


_KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time, jax, jax.numpy as jnp
    sys.path.insert(0, {tests!r})
    import test_train_loop as t

    class KillAtStep7(t.RandomTokenBatches):
      def __next__(self):
        if self.seed == 11 and self.position == 2:  # stage 2's third batch: step 7, after the checkpoint of step 6
          time.sleep(1.0)  # the asynchronous save of step 6 completes; metrics of step 6 are not due until step 10
          os.kill(os.getpid(), signal.SIGKILL)
        return super().__next__()

    data = lambda stage, index: KillAtStep7(10 + index, stage.batch_size, stage.seq_len + 1, t.CONFIG.vocab_size)
    teacher = t.random_params(t.CONFIG, seed=0)
    t.train_elastic(t._setup(), t.STAGES, teacher, jax.tree.map(jnp.copy, teacher), data, {workdir!r},
                    optimizer=t.OptimizerConfig(learning_rate=1e-3, warmup_steps=2), checkpoint_every=2,
                    log_every=10, progress=False)
""")


def test_after_kill_9_metrics_keep_exactly_one_row_per_step(tmp_path):
  """Killed at step 7 with the checkpoint of step 6 complete: rows 1..6 are on disk (written before each checkpoint,
  not only every log_every steps), and the resumed run adds 7 once."""
  script = tmp_path / "run.py"
  script.write_text(_KILL_SCRIPT.format(tests=str(pathlib.Path(__file__).parent), workdir=str(tmp_path / "w")))
  proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  assert Checkpointer(tmp_path / "w" / "checkpoints", clean_up=False).latest_step() == 6
  rows = [json.loads(line)["step"] for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
  assert rows == [1, 2, 3, 4, 5, 6]
  resumed = _run(tmp_path / "w", checkpoint_every=2)
  full = _run(tmp_path / "full")
  assert _losses(resumed.history) == _losses(full.history)[6:]
  rows = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
  assert [(row["step"], row["loss"]) for row in rows] == _losses(full.history)


def test_metrics_past_the_restored_step_and_a_torn_last_line_are_dropped(tmp_path):
  from elastic_jax.train.loop import _truncate_metrics  # pylint: disable=import-outside-toplevel
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps({"step": step, "loss": 1.0}) + "\n" for step in (1, 2, 3, 4)) + '{"step": 5, "lo')
  _truncate_metrics(str(path), 3)
  assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_bad_stage_inputs(tmp_path):
  teacher = random_params(CONFIG)
  bad = (Stage("stage1", 2, 4, 8, (0.5, 0.3, 0.3)),)
  with pytest.raises(ValueError, match=r"stage 'stage1' budget_probs \[0.5, 0.3, 0.3\] must be non-negative and "
                                        r"sum to 1"):
    train_elastic(_setup(), bad, teacher, teacher, _data, tmp_path, progress=False)
  with pytest.raises(ValueError, match=r"stage 'x': steps=0 must be a positive integer"):
    train_elastic(_setup(), (Stage("x", 0, 4, 8, (1, 0, 0)),), teacher, teacher, _data, tmp_path, progress=False)
  wrong_shape = lambda stage, index: RandomTokenBatches(0, stage.batch_size, stage.seq_len, CONFIG.vocab_size)
  with pytest.raises(ValueError, match=r"gave a batch of shape \(4, 8\), expected \(4, 9\)"):
    train_elastic(_setup(), STAGES, teacher, jax.tree.map(jnp.copy, teacher), wrong_shape, tmp_path / "w",
                  progress=False)


_SIGTERM_SCRIPT = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp
    sys.path.insert(0, {tests!r})
    import test_train_loop as t
    from elastic_jax.train.loop import Stage, train_elastic
    stages = (Stage("long", 100000, 2, 8, (1 / 3, 1 / 3, 1 / 3)),)
    teacher = t.random_params(t.CONFIG, seed=0)

    class Announce(t.RandomTokenBatches):
      def __next__(self):
        if self.position == 3:
          print("ready", flush=True)
        return super().__next__()

    data = lambda stage, index: Announce(0, stage.batch_size, stage.seq_len + 1, t.CONFIG.vocab_size)
    result = train_elastic(t._setup(), stages, teacher, jax.tree.map(jnp.copy, teacher), data, {workdir!r},
                           checkpoint_every=100000, log_every=1, progress=False)
    print("preempted", result.preempted, int(result.state.step), flush=True)
""")


def test_sigterm_leaves_a_complete_checkpoint(tmp_path):
  script = tmp_path / "run.py"
  script.write_text(_SIGTERM_SCRIPT.format(tests=str(pathlib.Path(__file__).parent), workdir=str(tmp_path / "w")))
  proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
  finally:
    proc.kill()
  assert proc.returncode == 0, err[-2000:]
  words = out.split()
  assert words[0] == "preempted" and words[1] == "True"
  stopped_at = int(words[2])
  steps = sorted(int(p) for p in os.listdir(tmp_path / "w" / "checkpoints") if p.isdigit())
  assert steps == [stopped_at]  # the checkpoint of the step it stopped at, complete and listed
  from elastic_jax.train.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
  _, meta = Checkpointer(tmp_path / "w" / "checkpoints").restore(
      _abstract_state_like_run(), expected_config=None)
  assert meta["step"] == stopped_at and meta["data_state"][0]["iterator"]["position"] == stopped_at


def _abstract_state_like_run():
  from elastic_jax.train.checkpoint import abstract_like  # pylint: disable=import-outside-toplevel
  from elastic_jax.train.optim import default_router_optimizer_config, make_optimizer  # pylint: disable=import-outside-toplevel
  from elastic_jax.train.elastic_step import init_elastic_state  # pylint: disable=import-outside-toplevel
  teacher = random_params(CONFIG, seed=0)
  tx = make_optimizer(OptimizerConfig(), 100000)
  router_tx = make_optimizer(default_router_optimizer_config(), 100000)
  return abstract_like(init_elastic_state(_setup(), teacher, tx, router_tx, 0))
