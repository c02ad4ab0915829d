"""Checkpointer: exact round trip, config mismatch errors, half-written checkpoints ignored, SIGTERM guard."""

from __future__ import annotations

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elastic_jax.train.checkpoint import (Checkpointer, ConfigMismatchError, PreemptionGuard, abstract_like,
                                          config_differences)


def _state(seed: int):
  rng = np.random.default_rng(seed)
  return {"params": {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "b": jnp.asarray(rng.normal(size=4))},
          "step": jnp.asarray(seed, jnp.int32), "rng": jax.random.key_data(jax.random.key(seed))}


def test_round_trip_is_exact_and_latest_wins(tmp_path):
  ckpt = Checkpointer(tmp_path, max_to_keep=2)
  for step in (1, 2, 3):
    ckpt.save(step, _state(step), {"config": {"a": 1}, "data": {"position": step * 10}})
  ckpt.wait()
  assert ckpt.latest_step() == 3
  state, meta = ckpt.restore(abstract_like(_state(0)), expected_config={"a": 1})
  jax.tree.map(np.testing.assert_array_equal, state, _state(3))
  assert meta["data"] == {"position": 30}
  assert sorted(int(p) for p in os.listdir(tmp_path) if p.isdigit()) == [2, 3]  # max_to_keep
  ckpt.close()


def test_resume_under_changed_config_names_the_field(tmp_path):
  ckpt = Checkpointer(tmp_path, async_save=False)
  ckpt.save(5, _state(5), {"config": {"model": {"hidden_size": 64, "pattern": "M-"}, "seed": 0}})
  with pytest.raises(ConfigMismatchError, match=r"model.hidden_size: checkpoint has 64, current config has 96"):
    ckpt.restore(abstract_like(_state(0)), expected_config={"model": {"hidden_size": 96, "pattern": "M-"},
                                                            "seed": 0})
  ckpt.close()


def test_config_differences_lists_missing_and_changed():
  diffs = config_differences({"a": 1, "b": {"c": 2}, "gone": 0}, {"a": 1, "b": {"c": 3}, "new": 1})
  assert diffs == ["b.c: checkpoint has 2, current config has 3", "gone (only in the checkpoint)",
                   "new (only in the current config)"]


def test_half_written_checkpoint_is_never_picked_up(tmp_path):
  ckpt = Checkpointer(tmp_path, async_save=False)
  ckpt.save(3, _state(3), {})
  # What an interrupted save leaves behind: a temporary directory that was never renamed into place.
  partial = tmp_path / "7.orbax-checkpoint-tmp-12345"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "garbage").write_bytes(b"\0" * 10)
  assert ckpt.latest_step() == 3
  state, _ = ckpt.restore(abstract_like(_state(0)))
  np.testing.assert_array_equal(state["step"], 3)
  ckpt.close()


def test_restore_without_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no complete checkpoint in"):
    Checkpointer(tmp_path).restore(abstract_like(_state(0)))


def test_preemption_guard_turns_sigterm_into_a_flag():
  before = signal.getsignal(signal.SIGTERM)
  with PreemptionGuard() as guard:
    assert not guard.requested
    os.kill(os.getpid(), signal.SIGTERM)
    assert guard.requested
  assert signal.getsignal(signal.SIGTERM) == before
