"""TensorBoard event files of the training loop, read back with TensorBoard's own readers and checked against
``metrics.jsonl`` (the independent record): every scalar present, one point per step that has it, the same values;
speed and MFU against the FLOP model; resumed runs with no duplicate points; process 0 only."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from tensorboard.backend.event_processing import event_accumulator, plugin_event_accumulator
from test_pipeline import _micro_config
from test_train_loop import CONFIG, NEW_STAGES, _run

from elastic_jax.plan import DEVICES
from elastic_jax.train.flops import elastic_step_flops, lm_step_flops
from elastic_jax.train.tensorboard_log import scalar_tags

BUDGETS = ("100pct", "75pct", "50pct")  # test_train_loop's budgets (1.0, 0.75, 0.5)
SPEED = ("step_time_s", "tokens_per_s", "mfu")


def _rows(run_dir) -> list[dict]:
  return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8")]


def _events(run_dir) -> dict[str, list[tuple[int, float]]]:
  """Every scalar of the run's event files as TensorBoard shows it: {tag: [(step, value), ...]}."""
  accumulator = event_accumulator.EventAccumulator(os.path.join(run_dir, "tensorboard"),
                                                   size_guidance={event_accumulator.SCALARS: 0})
  accumulator.Reload()
  return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
          for tag in accumulator.Tags()["scalars"]}


def _ui_steps(run_dir) -> dict[str, list[int]]:
  """The steps of every tag as the web UI's accumulator keeps them (it reads scalars as tensors)."""
  accumulator = plugin_event_accumulator.EventAccumulator(os.path.join(run_dir, "tensorboard"),
                                                          size_guidance={plugin_event_accumulator.TENSORS: 0})
  accumulator.Reload()
  return {tag: [event.step for event in accumulator.Tensors(tag)] for tag in accumulator.Tags()["tensors"]}


def _expected_elastic(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
  """The points each tag must have, read off the metrics rows: per-budget KD loss and expected size only in steps
  whose batch drew that budget, the speed in the rows that carry it."""
  points = {tag: [] for tag in ("loss/total", "schedule/tau", "schedule/logit_scale",
                                *(f"speed/{key}" for key in SPEED))}
  for budget in BUDGETS:
    for tag in (f"kd/{budget}", f"router/expected_size/{budget}", f"router/argmax_size/{budget}"):
      points[tag] = []
  for row in rows:
    point = lambda value: (row["step"], float(np.float32(value)))  # event files hold float32
    points["loss/total"].append(point(row["loss"]))
    points["schedule/tau"].append(point(row["tau"]))
    points["schedule/logit_scale"].append(point(row["logit_scale"]))
    for key in SPEED:
      if key in row:
        points[f"speed/{key}"].append(point(row[key]))
    for index, budget in enumerate(BUDGETS):
      points[f"router/argmax_size/{budget}"].append(point(row["argmax_size_per_budget"][index]))
      if row["samples_per_budget"][index] > 0:
        points[f"kd/{budget}"].append(point(row["kd_per_budget"][index]))
        points[f"router/expected_size/{budget}"].append(point(row["expected_size_per_budget"][index]))
  return points


def _assert_speed(rows: list[dict], flops_per_step: float, tokens_per_step: int) -> None:
  peak = DEVICES["cpu"].peak_flops * jax.device_count()  # the planner's nominal CPU peak, on every CPU device
  for row in (row for row in rows if "mfu" in row):
    assert row["step_time_s"] > 0
    np.testing.assert_allclose(row["tokens_per_s"] * row["step_time_s"], tokens_per_step, rtol=1e-9)
    np.testing.assert_allclose(row["mfu"] * peak * row["step_time_s"], flops_per_step, rtol=1e-9)


def test_an_elastic_run_logs_every_scalar_of_its_metrics(tmp_path):
  """Stages of 4 and 3 steps, flushes every 3 steps and at the checkpoint of step 4 (the end of stage 1)."""
  run_dir = tmp_path / "run"
  _run(run_dir, log_every=3, checkpoint_every=4)
  rows = _rows(run_dir)
  assert [row["step"] for row in rows] == list(range(1, 8))
  # The speed of each flush's steps, on its last row: steps 2-3 (step 1 compiles), 4, 6 (stage 2's first step is
  # not timed either), 7.
  assert [row["step"] for row in rows if "tokens_per_s" in row] == [3, 4, 6, 7]
  assert [row["step"] for row in rows if "mfu" in row] == [3, 4, 6, 7]
  _assert_speed(rows, elastic_step_flops(CONFIG, 4, 8), 4 * 8)

  events, expected = _events(run_dir), _expected_elastic(rows)
  assert set(expected) <= set(events)
  for tag, points in expected.items():
    assert events[tag] == points, tag
  assert len(events["loss/total"]) == 7 and len(events["speed/mfu"]) == 4
  # Some budget went undrawn in some step: that step has no point of its KD loss (the metrics hold 0 there).
  undrawn = [(row["step"], BUDGETS[i]) for row in rows for i, n in enumerate(row["samples_per_budget"]) if n == 0]
  assert undrawn
  for step, budget in undrawn:
    assert step not in [s for s, _ in events[f"kd/{budget}"]]
  # The other metrics of the step are there too.
  assert [value for _, value in events["loss/kd"]] == [float(np.float32(row["kd"])) for row in rows]
  assert len(events["optim/grad_norm"]) == len(events["loss/router"]) == 7
  assert len(events["budgets/samples/50pct"]) == 7
  assert len(os.listdir(run_dir / "tensorboard")) == 1


def test_a_resumed_run_replaces_the_points_of_the_steps_it_runs_again(tmp_path):
  """A finished run (checkpoints every 2 steps) re-run under a changed stage 2 restarts from step 4: the event files
  then hold the first run's steps 5-7 and the second's, and TensorBoard shows each step once, with the second's
  values, as metrics.jsonl does."""
  run_dir = tmp_path / "run"
  _run(run_dir, log_every=1, checkpoint_every=2)
  before = _rows(run_dir)
  _run(run_dir, stages=NEW_STAGES, log_every=1, checkpoint_every=2)
  rows = _rows(run_dir)
  assert [row["step"] for row in rows] == list(range(1, 8))
  assert rows[:4] == before[:4] and rows[4]["loss"] != before[4]["loss"]  # stage 2 ran again, under other settings
  assert len(os.listdir(run_dir / "tensorboard")) == 2  # one event file per run

  events = _events(run_dir)
  for tag, points in _expected_elastic(rows).items():
    assert events[tag] == points, tag
  assert [step for step, _ in events["loss/total"]] == list(range(1, 8))
  ui = _ui_steps(run_dir)
  assert ui["loss/total"] == list(range(1, 8)) and ui["router/argmax_size/50pct"] == list(range(1, 8))


def test_a_run_split_in_two_reads_as_one(tmp_path):
  run_dir = tmp_path / "split"
  _run(run_dir, max_steps=3, log_every=2)
  _run(run_dir, log_every=2)
  rows = _rows(run_dir)
  events = _events(run_dir)
  for tag, points in _expected_elastic(rows).items():
    assert events[tag] == points, tag
  # Untimed: steps 1, 4 and 5, each the first of a segment in its call (4: the resumed call's), so the flush at
  # step 4 has no speed to report.
  assert [row["step"] for row in rows if "mfu" in row] == [2, 3, 6, 7]


def test_parent_pretraining_logs_its_loss_and_speed(tmp_path):
  from elastic_jax.data.pipeline import SourceConfig, data_factory  # pylint: disable=import-outside-toplevel
  from elastic_jax.model import ModelConfig  # pylint: disable=import-outside-toplevel
  from elastic_jax.train.pipeline import parent_phase  # pylint: disable=import-outside-toplevel
  cfg = _micro_config()
  cfg.checkpoint_every = 4
  parent_phase(cfg, str(tmp_path), data_factory(SourceConfig(), seed=1, vocab_size=256))
  run_dir = tmp_path / "parent"
  rows = _rows(run_dir)
  assert [row["step"] for row in rows] == list(range(1, 7))
  assert [row["step"] for row in rows if "mfu" in row] == [4, 6]  # the checkpoint of step 4, the end
  _assert_speed(rows, lm_step_flops(ModelConfig.from_dict(cfg.model), 2, 32), 2 * 32)
  events = _events(run_dir)
  assert set(events) == {"loss/total", "optim/grad_norm", *(f"speed/{key}" for key in SPEED)}
  assert events["loss/total"] == [(row["step"], float(np.float32(row["loss"]))) for row in rows]
  assert events["optim/grad_norm"] == [(row["step"], float(np.float32(row["grad_norm"]))) for row in rows]
  for key in SPEED:
    assert events[f"speed/{key}"] == [(row["step"], float(np.float32(row[key]))) for row in rows if key in row]


def test_only_process_0_writes_events(tmp_path, monkeypatch):
  from elastic_jax.train import distributed  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(distributed, "is_primary", lambda: False)
  result = _run(tmp_path / "run", max_steps=2)
  assert [row["step"] for row in result.history] == [1, 2]
  assert not (tmp_path / "run" / "tensorboard").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_tags_of_a_row():
  row = {"step": 5, "loss": 1.5, "kd_per_budget": [0.5, 0.0], "samples_per_budget": [2.0, 0.0],
         "expected_size_per_budget": [0.9, 0.0], "argmax_size_per_budget": [1.0, 0.5], "tau": 0.9,
         "new_metric": 3, "new_vector": [1, 2], "flag": True, "note": "text"}
  assert scalar_tags(row, ("100pct", "50pct")) == {
      "loss/total": 1.5, "kd/100pct": 0.5, "budgets/samples/100pct": 2.0, "budgets/samples/50pct": 0.0,
      "router/expected_size/100pct": 0.9, "router/argmax_size/100pct": 1.0, "router/argmax_size/50pct": 0.5,
      "schedule/tau": 0.9, "metrics/new_metric": 3.0, "metrics/new_vector/0": 1.0, "metrics/new_vector/1": 2.0}
  assert set(scalar_tags(row)) >= {"kd/budget0", "router/argmax_size/budget1"}  # no names given
