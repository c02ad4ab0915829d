"""Fault injection: the shortened main job killed with SIGKILL at random moments in every phase (parent pretraining,
importance, permutation, each elastic stage, extraction, evaluation, report) and re-run after each kill ends with
the rankings, deployed choices, metrics and report of an uninterrupted run, and no temporary checkpoint folder left.

The moments are random but aimed: each kill waits for its phase's log line (for the report, its first file) and
then sleeps a random fraction of that phase's length, measured on an uninterrupted run. A kill lands in the phase
whose line came last before it; kills meant for a phase that ended first count where they landed. Evaluation and
report run again on every run, so a kill meant for them is retried until it lands.

CI runs 12 kills, at least one in every phase. The long run, by hand (about 10 minutes on 2 cores)::

    ELASTIC_JAX_FAULT_KILLS=60 ELASTIC_JAX_FAULT_SEED=2024 python -m pytest -q -s tests/test_fault_injection.py

``ELASTIC_JAX_FAULT_SEED`` fixes the moments (default: a new seed each run); the seed is printed either way, and
the kill table too.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from multihost import cpu_env
from test_pipeline import _micro_config

ROOT = pathlib.Path(__file__).parents[1]
KILLS = int(os.environ.get("ELASTIC_JAX_FAULT_KILLS", "12"))
SEED = int(os.environ.get("ELASTIC_JAX_FAULT_SEED", str(np.random.SeedSequence().entropy % 2**31)))
TIMEOUT_S = 300  # per run: a hang fails the test instead of blocking CI
# Each phase and the log line that starts it (the report: its first file, see _report_started).
PHASES = ("parent", "importance", "permutation", "stage1", "stage2", "extraction", "evaluation", "report")
MARKERS = (("parent", "[elastic_jax] parent pretraining: "),
           ("importance", "[elastic_jax] importance: calibrating"),
           ("permutation", "[elastic_jax] permutation: permuting"),
           ("stage1", "[elastic_jax] elastic training: starting at step 0"),
           ("stage1", "[elastic_jax] elastic training: stage1 ("),
           ("stage2", "[elastic_jax] elastic training: stage2 ("),
           ("extraction", "[elastic_jax] extraction: slicing"),
           ("evaluation", "[elastic_jax] phases done"))
RETRIED = ("evaluation", "report")  # they run again on every run
OUTPUTS = (("importance", "rankings.json"), ("elastic", "deployed_choices.json"), ("elastic", "metrics.jsonl"),
           ("report.json",))


def _config_file(path: pathlib.Path) -> str:
  """The micro config, long enough that every phase takes a moment: checkpoints every 2 steps, stages of 6 and 5."""
  cfg = _micro_config()
  cfg.parent.pretrain_steps = 12
  cfg.checkpoint_every = 2
  cfg.stages[0]["steps"], cfg.stages[1]["steps"] = 6, 5
  path.write_text(f"import ml_collections\n\n\ndef get_config():\n  return ml_collections.ConfigDict({cfg.to_dict()!r})\n")
  return str(path)


class Run:
  """One ``python -m elastic_jax.train`` process; its stdout lines are collected, with their arrival times."""

  def __init__(self, config: str, workdir: pathlib.Path, log: pathlib.Path):
    self.workdir, self.started = workdir, time.time()
    self.stderr = open(log, "a", encoding="utf-8")  # progress bars and warnings
    self.proc = subprocess.Popen([sys.executable, "-m", "elastic_jax.train", "--config", config, "--workdir",
                                  str(workdir)], env=cpu_env(1), cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=self.stderr, text=True)
    self.lines: list[tuple[float, str]] = []
    self.reader = threading.Thread(target=self._read, daemon=True)
    self.reader.start()

  def _read(self) -> None:
    for line in self.proc.stdout:
      self.lines.append((time.time(), line.rstrip("\n")))

  def phase(self) -> str | None:
    """The phase this run is in, from the lines so far (None before its first phase starts)."""
    current = None
    for _, line in list(self.lines):
      current = next((phase for phase, marker in MARKERS if line.startswith(marker)), current)
    if current == "evaluation" and self._report_started():
      current = "report"
    return current

  def _report_started(self) -> bool:
    first = self.workdir / "accuracy_vs_params.png"  # write_report's first file
    return first.exists() and first.stat().st_mtime >= self.started

  def wait_for(self, phase: str) -> bool:
    """Waits until the run is in ``phase`` or later; False when it exited first."""
    deadline = time.time() + TIMEOUT_S
    while time.time() < deadline:
      current = self.phase()
      if current is not None and PHASES.index(current) >= PHASES.index(phase):
        return True
      if self.proc.poll() is not None:
        self.finish()
        return False
      time.sleep(0.005)
    raise TimeoutError(f"no {phase} phase within {TIMEOUT_S} s:\n{self.text()[-3000:]}")

  def kill(self) -> str | None:
    """SIGKILL now; returns the phase it landed in (None: the run had already exited)."""
    if self.proc.poll() is not None:
      self.finish()
      return None
    os.kill(self.proc.pid, signal.SIGKILL)
    self.finish()
    if self.proc.returncode != -signal.SIGKILL:
      return None
    return self.phase()

  def finish(self) -> int:
    self.proc.wait(timeout=TIMEOUT_S)
    self.reader.join(timeout=10)
    self.stderr.close()
    if self.proc.returncode not in (0, -signal.SIGKILL):
      raise AssertionError(f"the main job failed (exit {self.proc.returncode}):\n{self.text()[-4000:]}\n"
                           f"{pathlib.Path(self.stderr.name).read_text()[-4000:]}")
    return self.proc.returncode

  def text(self) -> str:
    return "\n".join(line for _, line in self.lines)

  def durations(self) -> dict[str, float]:
    """Seconds from each phase's start to the next one's (the report: to the run's end), of a finished run."""
    starts = {}
    for when, line in self.lines:
      phase = next((phase for phase, marker in MARKERS if line.startswith(marker)), None)
      if phase is not None:
        starts.setdefault(phase, when)
    starts["report"] = (self.workdir / "accuracy_vs_params.png").stat().st_mtime
    end = next(when for when, line in self.lines if line.startswith("[elastic_jax] done in"))
    times = [starts[phase] for phase in PHASES] + [end]
    return {phase: times[i + 1] - times[i] for i, phase in enumerate(PHASES)}


def _run_to_end(config: str, workdir: pathlib.Path, log: pathlib.Path) -> Run:
  run = Run(config, workdir, log)
  assert run.finish() == 0
  return run


def _kill_plan(rng: np.random.Generator, kills: int) -> list[tuple[str, float]]:
  """One kill per phase and the rest spread over the phases at random, each at a random fraction of its phase."""
  per_phase = np.ones(len(PHASES), int) + np.bincount(rng.integers(0, len(PHASES), max(kills - len(PHASES), 0)),
                                                      minlength=len(PHASES))
  return [(phase, float(rng.uniform(0.0, 0.5))) for phase, count in zip(PHASES, per_phase) for _ in range(count)]


SPEED = ("step_time_s", "tokens_per_s", "mfu")  # measured per run: the metrics rows are compared without them
# The same for the report's rows (each model's decode speed).
REPORT_SPEED = ("decode_tokens_per_s", "decode_timing", "baseline_decode_tokens_per_s", "baseline_decode_timing")


def _outputs(workdir: pathlib.Path) -> dict[str, str]:
  outputs = {os.path.join(*part): (workdir / os.path.join(*part)).read_text() for part in OUTPUTS}
  metrics = os.path.join("elastic", "metrics.jsonl")
  rows = [json.loads(line) for line in outputs[metrics].splitlines()]
  outputs[metrics] = "".join(json.dumps({k: v for k, v in row.items() if k not in SPEED}) + "\n" for row in rows)
  report = json.loads(outputs["report.json"])
  report["rows"] = [{k: v for k, v in row.items() if k not in REPORT_SPEED} for row in report["rows"]]
  outputs["report.json"] = json.dumps(report)
  return outputs


@pytest.mark.slow
def test_kill_9_in_every_phase_then_rerun_gives_the_uninterrupted_result(tmp_path):
  print(f"\nfault injection: seed {SEED}, {KILLS} kills (ELASTIC_JAX_FAULT_SEED, ELASTIC_JAX_FAULT_KILLS)")
  assert KILLS >= len(PHASES), f"ELASTIC_JAX_FAULT_KILLS={KILLS}: at least one kill per phase ({len(PHASES)})"
  config = _config_file(tmp_path / "micro.py")
  # The first run compiles (or reads the compile cache); the second, warm like every re-run, times the phases.
  reference = tmp_path / "reference"
  _run_to_end(config, reference, tmp_path / "reference.log")
  timing = _run_to_end(config, tmp_path / "timing", tmp_path / "timing.log")
  durations = timing.durations()
  assert _outputs(tmp_path / "timing") == _outputs(reference)  # two uninterrupted runs agree
  print("phase lengths (s): " + ", ".join(f"{phase} {seconds:.2f}" for phase, seconds in durations.items()))

  rng = np.random.default_rng(SEED)
  workdir, log = tmp_path / "faulted", tmp_path / "faulted.log"
  landed: list[tuple[str, str, float]] = []  # (meant for, landed in, delay)
  for target, fraction in _kill_plan(rng, KILLS):
    for _ in range(5 if target in RETRIED else 1):
      run = Run(config, workdir, log)
      if not run.wait_for(target):  # the run ended first: the phase was already done
        continue
      delay = fraction * durations[target]
      time.sleep(delay)
      phase = run.kill()
      if phase is not None:
        landed.append((target, phase, delay))
        break
  final = _run_to_end(config, workdir, log)

  table = "\n".join(f"  {i + 1:3d}. meant for {target:11s} landed in {phase:11s} after {delay:.3f} s"
                    for i, (target, phase, delay) in enumerate(landed))
  print(f"kills (seed {SEED}):\n{table}")
  assert len(landed) >= KILLS, f"seed {SEED}: only {len(landed)} of {KILLS} kills landed:\n{table}"
  missed = [phase for phase in PHASES if phase not in {phase for _, phase, _ in landed}]
  assert not missed, f"seed {SEED}: no kill landed in {missed}:\n{table}"
  assert _outputs(workdir) == _outputs(reference), f"seed {SEED}: the result differs from an uninterrupted run"
  leftovers = [str(p) for p in workdir.rglob("*.orbax-checkpoint-tmp*")]
  assert not leftovers, f"seed {SEED}: temporary checkpoint folders left: {leftovers}"
  assert "[elastic_jax] done in" in final.text()
