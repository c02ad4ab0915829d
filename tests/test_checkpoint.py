"""Checkpointer: exact round trip, config mismatch errors, half-written checkpoints ignored and cleaned up, a torn
latest checkpoint set aside for the previous one, SIGTERM guard."""

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


def test_leftover_temporary_folders_are_removed_when_a_writer_opens_the_directory(tmp_path):
  partial = tmp_path / "7.orbax-checkpoint-tmp-12345"  # what a save killed half-way leaves behind
  (partial / "state").mkdir(parents=True)
  ckpt = Checkpointer(tmp_path, async_save=False)
  ckpt.save(3, _state(3), {})
  ckpt.close()
  assert sorted(os.listdir(tmp_path)) == ["3"]


def _truncate_largest_file(folder) -> str:
  files = [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)
  return largest


def test_a_truncated_latest_checkpoint_is_set_aside_and_the_previous_step_restored(tmp_path):
  ckpt = Checkpointer(tmp_path, max_to_keep=3, async_save=False)
  for step in (1, 2, 3):
    ckpt.save(step, _state(step), {"step": step})
  _truncate_largest_file(tmp_path / "3" / "state")  # a file lost half its bytes after the save completed
  with pytest.warns(UserWarning, match=r"checkpoint 3 in .* does not restore .*set aside as .*3\.unrestorable"):
    state, meta = ckpt.restore_latest(abstract_like(_state(0)))
  jax.tree.map(np.testing.assert_array_equal, state, _state(2))
  assert meta == {"step": 2}
  assert sorted(os.listdir(tmp_path)) == ["1", "2", "3.unrestorable"]  # renamed, never deleted
  assert ckpt.latest_step() == 2
  ckpt.save(3, _state(3), {"step": 3})  # the run carries on and saves step 3 again
  assert ckpt.latest_step() == 3 and os.path.isdir(tmp_path / "3.unrestorable")
  ckpt.close()


def test_two_unrestorable_checkpoints_in_a_row_are_an_error_not_a_silent_restart(tmp_path):
  ckpt = Checkpointer(tmp_path, max_to_keep=3, async_save=False)
  for step in (1, 2, 3):
    ckpt.save(step, _state(step), {})
  wrong_shape = {"params": {"w": jax.ShapeDtypeStruct((5, 4), jnp.float32), "b": jax.ShapeDtypeStruct((4,),
                                                                                                       jnp.float64)},
                 "step": jax.ShapeDtypeStruct((), jnp.int32), "rng": abstract_like(_state(0))["rng"]}
  with pytest.warns(UserWarning, match="checkpoint 3"), pytest.raises(RuntimeError, match="checkpoint 2 .* either"):
    ckpt.restore_latest(wrong_shape)
  assert sorted(os.listdir(tmp_path)) == ["1", "2", "3.unrestorable"]
  ckpt.close()


def test_restore_latest_sets_aside_checkpoints_the_run_no_longer_accepts(tmp_path, capsys):
  ckpt = Checkpointer(tmp_path, max_to_keep=3, async_save=False)
  for step in (1, 2, 3):
    ckpt.save(step, _state(step), {"stage": 0 if step < 2 else 1})
  state, _ = ckpt.restore_latest(abstract_like(_state(0)),
                                 accept=lambda step, meta: "stage 1 changed" if meta["stage"] == 1 else None)
  np.testing.assert_array_equal(state["step"], 1)
  assert sorted(os.listdir(tmp_path)) == ["1", "2.stale", "3.stale"]
  assert "checkpoint 3 set aside as" in capsys.readouterr().out
  assert ckpt.restore_latest(abstract_like(_state(0)), accept=lambda step, meta: "no") is None
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
