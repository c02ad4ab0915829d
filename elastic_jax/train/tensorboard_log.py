"""TensorBoard event files of a training run: a second view of ``metrics.jsonl``, written by the training loop.

Every metrics row becomes one event at its step, under readable, grouped tags (``scalar_tags``): ``loss/total``,
``kd/75pct``, ``router/expected_size/75pct``, ``schedule/tau``, ``speed/mfu``... The files go to
``<run dir>/tensorboard/``, one per call of the loop, named so that they sort in the order they were written (the
order TensorBoard reads them in).

Resume: a resumed call starts its file with a ``SessionLog.START`` event at the first step it runs again (the
restored step + 1). TensorBoard's readers drop every point of the files before it at that step or later, so steps
logged by a run that was killed after its last checkpoint appear once, with the values of the run that continued
(``tensorboard.backend.event_processing.event_accumulator``; the web UI's data server likewise keeps, per tag, the
points written last for a step it sees again). Every call, a fresh one included, starts with such an event, because
the UI's accumulator takes the first ``START`` of a run as its start, not a restart.

The events are written with tensorboardX's synchronous ``EventsWriter`` (no TensorFlow, no writer thread), so that
``flush`` puts every event on disk before the loop writes a checkpoint: a run killed after that checkpoint has each
step up to it in its event files, as in ``metrics.jsonl``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.proto.summary_pb2 import Summary

# Scalar metrics -> tag.
SCALAR_TAGS = {
    "loss": "loss/total",
    "kd": "loss/kd",
    "router_loss": "loss/router",
    "grad_norm": "optim/grad_norm",
    "tau": "schedule/tau",
    "logit_scale": "schedule/logit_scale",
    "step_time_s": "speed/step_time_s",
    "tokens_per_s": "speed/tokens_per_s",
    "mfu": "speed/mfu",
}
# Per-budget metrics (one entry per budget) -> (tag prefix, whether the entry is only a value in steps whose batch
# drew that budget). A budget no sample of the batch drew has no KD loss and no expected size in that step: the step
# logs 0 there (a mean over no samples), which is not a point of the curve.
BUDGET_TAGS = {
    "kd_per_budget": ("kd", True),
    "expected_size_per_budget": ("router/expected_size", True),
    "argmax_size_per_budget": ("router/argmax_size", False),
    "samples_per_budget": ("budgets/samples", False),
}
DIRECTORY = "tensorboard"


def scalar_tags(row: Mapping[str, Any], budget_names: Sequence[str] = ()) -> dict[str, float]:
  """One metrics row (``metrics.jsonl``) -> {tag: value}: the known metrics under ``SCALAR_TAGS`` and
  ``BUDGET_TAGS`` (per-budget entries named by ``budget_names``, else ``budget<i>``), any other number under
  ``metrics/<key>`` and any other list of numbers under ``metrics/<key>/<index>``. ``step`` is the event's step,
  not a scalar."""
  sampled = row.get("samples_per_budget")
  name = lambda index: budget_names[index] if index < len(budget_names) else f"budget{index}"
  tags = {}
  for key, value in row.items():
    if key == "step":
      continue
    if key in BUDGET_TAGS:
      prefix, only_when_drawn = BUDGET_TAGS[key]
      for index, entry in enumerate(value):
        if not (only_when_drawn and sampled is not None and sampled[index] == 0):
          tags[f"{prefix}/{name(index)}"] = float(entry)
    elif _is_number(value):
      tags[SCALAR_TAGS.get(key, f"metrics/{key}")] = float(value)
    elif isinstance(value, (list, tuple)) and all(_is_number(entry) for entry in value):
      tags.update({f"metrics/{key}/{index}": float(entry) for index, entry in enumerate(value)})
  return tags


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


class TensorBoardLog:
  """The event file of one call of the training loop, in ``logdir``; the first step it logs is ``start_step`` + 1
  (the ``START`` event that makes readers drop older points from that step on)."""

  def __init__(self, logdir: str, start_step: int, budget_names: Sequence[str] = ()):
    os.makedirs(logdir, exist_ok=True)
    self.budget_names = tuple(budget_names)
    # Named events.out.tfevents.<seconds>.<host>.<nanoseconds>: two calls in the same second still sort in order
    # (and never share a file: the writer truncates an existing one).
    self._writer = EventsWriter(os.path.join(logdir, "events"), f".{time.time_ns()}")
    self._writer.write_event(Event(wall_time=time.time(), step=start_step + 1,
                                   session_log=SessionLog(status=SessionLog.START)))

  def write(self, rows: Sequence[Mapping[str, Any]], wall_time: float | None = None) -> None:
    """One event per metrics row, at its step, stamped ``wall_time`` (default now: when the rows reached the
    host)."""
    wall_time = time.time() if wall_time is None else wall_time
    for row in rows:
      values = [Summary.Value(tag=tag, simple_value=value)
                for tag, value in scalar_tags(row, self.budget_names).items()]
      self._writer.write_event(Event(wall_time=wall_time, step=int(row["step"]), summary=Summary(value=values)))

  def flush(self) -> None:
    """Every event written so far is on disk (in the OS's hands) when this returns."""
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()
