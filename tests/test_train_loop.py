"""Training loop: exact resume (state, losses, data position), stage handling, SIGTERM saves, bad input."""

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


def _run(workdir, setup=None, **kw):
  teacher = random_params(CONFIG, seed=0)
  return train_elastic(setup or _setup(), STAGES, teacher, jax.tree.map(jnp.copy, teacher), _data, workdir,
                       optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=2), checkpoint_every=100,
                       log_every=1, progress=False, **kw)


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


def test_resume_at_a_stage_boundary(tmp_path):
  full = _run(tmp_path / "full")
  _run(tmp_path / "split", max_steps=4)
  second = _run(tmp_path / "split")
  assert _losses(second.history) == _losses(full.history)[4:]


def test_resume_under_a_changed_config_is_refused(tmp_path):
  _run(tmp_path, max_steps=2)
  with pytest.raises(ConfigMismatchError, match=r"elastic.kd_temperature: checkpoint has 1.0, current config has 2.0"):
    _run(tmp_path, setup=_setup(kd_temperature=2.0))


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
