"""The main job as a user runs it on a pod: ``python -m elastic_jax.train`` as 2 processes x 2 CPU devices (gloo
collectives), parameters sharded across both processes, from a fresh workdir, compared with one process on one
device running the same command.

Every phase runs under the mesh (import, importance, permutation, training, extraction, evaluation). The global
batches do not depend on the process count, so the runs agree: identical rankings and deployed choices, the same
losses, the same report. A shortened tiny job keeps each run to about a minute of compiles and steps.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from multihost import cpu_env, run_processes

ROOT = pathlib.Path(__file__).parents[1]
TIMEOUT_S = 600  # per run: a hang (one process waiting on a collective) fails the test instead of blocking CI

# The tiny config, shortened: a few steps of every phase, batches that divide over 4 devices, checkpoints mid-stage.
SHORT = ["--config.parent.pretrain_steps=12", "--config.parent.seq_len=64", "--config.parent.long_every=3",
         "--config.importance.batches=2", "--config.importance.seq_len=64", "--config.importance.depth_batches=1",
         # every stage of one shape: one compile
         "--config.stages[0].steps=4", "--config.stages[0].batch_size=12", "--config.stages[0].seq_len=64",
         "--config.stages[1].steps=3", "--config.stages[1].batch_size=12", "--config.stages[1].seq_len=64",
         "--config.stages[2].steps=2", "--config.stages[2].batch_size=12", "--config.stages[2].seq_len=64",
         "--config.eval.examples=8", "--config.eval.max_new_tokens=12", "--config.eval.ppl_batches=1",
         "--config.eval.seq_len=64", "--config.eval.decode_batch=8", "--config.checkpoint_every=5"]


def _command(workdir: pathlib.Path, *flags: str) -> list[str]:
  return [sys.executable, "-m", "elastic_jax.train", "--config", str(ROOT / "configs" / "tiny.py"),
          "--workdir", str(workdir), *SHORT, *flags]


def run_single(workdir: pathlib.Path, *flags: str) -> str:
  """One process, one device; returns its log."""
  result = subprocess.run(_command(workdir, *flags), env=cpu_env(1), capture_output=True, text=True, timeout=TIMEOUT_S)
  log = result.stdout + result.stderr
  assert result.returncode == 0, log[-4000:]
  return log


def run_two_processes(workdir: pathlib.Path, mesh: str, *flags: str) -> list[str]:
  """Two processes of 2 CPU devices each on ``mesh``; returns their logs."""
  return run_processes(_command(workdir, f"--config.mesh.shape={mesh}", *flags), f"{workdir}.p", devices=2,
                       timeout=TIMEOUT_S)


# Report keys that time the run (decode speed): they differ from run to run and are compared by their settings only.
TIMED = ("decode_tokens_per_s", "decode_timing", "baseline_decode_tokens_per_s", "baseline_decode_timing")


def _read(path: pathlib.Path):
  return json.loads(path.read_text())


def _losses(workdir: pathlib.Path) -> dict[str, np.ndarray]:
  rows = [json.loads(line) for line in (workdir / "elastic" / "metrics.jsonl").read_text().splitlines()]
  assert [row["step"] for row in rows] == list(range(1, len(rows) + 1))
  return {key: np.asarray([row[key] for row in rows], np.float64) for key in ("loss", "kd_per_budget")}


def _report(workdir: pathlib.Path) -> dict[str, dict]:
  return {row["budget"]: row for row in _read(workdir / "report.json")["rows"]}


def assert_same_run(got: pathlib.Path, want: pathlib.Path) -> None:
  """Identical rankings and deployed choices, every logged loss within 1e-3 relative, the same report."""
  assert _read(got / "importance" / "rankings.json") == _read(want / "importance" / "rankings.json")
  assert _read(got / "elastic" / "deployed_choices.json") == _read(want / "elastic" / "deployed_choices.json")
  got_losses, want_losses = _losses(got), _losses(want)
  for key, values in want_losses.items():
    np.testing.assert_allclose(got_losses[key], values, rtol=1e-3, err_msg=key)
  got_report, want_report = _report(got), _report(want)
  assert set(got_report) == set(want_report)
  for budget, row in want_report.items():
    for key, value in row.items():
      if key.startswith(("ppl", "baseline_ppl")):
        assert got_report[budget][key] == pytest.approx(value, rel=1e-4), (budget, key)
      elif key.startswith(("accuracy", "baseline_accuracy")) or "params" in key:
        assert got_report[budget][key] == value, (budget, key)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory) -> pathlib.Path:
  workdir = tmp_path_factory.mktemp("main_job") / "single"
  run_single(workdir)
  return workdir


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["(1,4)", "(2,2)"])
def test_two_process_main_job_equals_one_process(single_run, tmp_path, mesh):
  workdir = tmp_path / "multi"
  logs = run_two_processes(workdir, mesh)
  assert_same_run(workdir, single_run)
  # The shared files come from process 0; both processes ran every phase and agree on the outcome.
  assert all("[elastic_jax] done in" in log for log in logs)
  assert "report: {}" in logs[1]  # process 1 wrote no report
  for log in logs:  # placements agree with what every program expects: no resharding by full rematerialisation
    assert "Involuntary full rematerialization" not in log


@pytest.mark.slow
def test_two_process_evaluation_of_the_same_weights_equals_one_device(single_run, tmp_path):
  # The single run's finished workdir, re-run as 2 processes on (1, 4): every phase is reused (the children are
  # restored into shards), only the evaluation runs again, under the mesh.
  workdir = tmp_path / "reevaluated"
  subprocess.run(["cp", "-r", str(single_run), str(workdir)], check=True)
  (workdir / "report.json").unlink()
  logs = run_two_processes(workdir, "(1,4)")
  assert "elastic training: reusing" in logs[0]
  want, got = _report(single_run), _report(workdir)
  for budget, row in want.items():
    assert got[budget]["decode_timing"]["tokens"] == row["decode_timing"]["tokens"]  # the same batch decoded
    for key, value in row.items():
      if key in TIMED:  # wall-clock measurements: each run its own
        continue
      if isinstance(value, float):
        assert got[budget][key] == pytest.approx(value, rel=1e-4, abs=1e-12), (budget, key)
      else:
        assert got[budget][key] == value, (budget, key)


@pytest.mark.slow
def test_two_process_main_job_from_a_transformers_checkpoint(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location("tiny", ROOT / "configs" / "tiny.py")
  tiny = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tiny)
  model = tiny.get_config().model
  torch.manual_seed(0)
  hf_config = transformers.NemotronHConfig(
      hybrid_override_pattern=model.pattern, vocab_size=model.vocab_size, hidden_size=model.hidden_size,
      intermediate_size=model.intermediate_size, num_attention_heads=model.num_attention_heads,
      num_key_value_heads=model.num_key_value_heads, head_dim=model.head_dim, mamba_num_heads=model.mamba_num_heads,
      mamba_head_dim=model.mamba_head_dim, n_groups=model.n_groups, ssm_state_size=model.ssm_state_size,
      conv_kernel=model.conv_kernel, chunk_size=model.chunk_size, use_cache=False)
  checkpoint = tmp_path / "checkpoint"
  transformers.NemotronHForCausalLM(hf_config).float().save_pretrained(checkpoint)
  workdir = tmp_path / "imported"
  logs = run_two_processes(workdir, "(1,4)", f"--config.parent.hf_path={checkpoint}")
  assert "[elastic_jax] parent: 665,928 parameters" in logs[0]
  report = _report(workdir)
  assert set(report) == {"parent", "100pct", "75pct", "50pct"} and report["parent"]["params"] == 665_928
  assert not (workdir / "parent").exists()  # imported, not pretrained
  for log in logs:
    assert "Involuntary full rematerialization" not in log


def test_a_batch_the_mesh_cannot_split_is_refused_before_any_phase(tmp_path):
  workdir = tmp_path / "refused"
  result = subprocess.run(_command(workdir, "--config.mesh.shape=(4,)", "--config.stages[1].batch_size=6"),
                          env=cpu_env(4), capture_output=True, text=True, timeout=TIMEOUT_S)
  assert result.returncode == 2
  assert ("config error: stages[1].batch_size: 6 is not divisible by the 4 data-parallel devices of mesh (4,) "
          "(make it a multiple of 4)") in result.stderr
  assert "Traceback" not in result.stderr
  assert not (workdir / "parent").exists()  # nothing ran
