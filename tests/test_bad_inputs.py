"""Bad inputs are refused before any work: one line naming the key or the file, exit status 2, no traceback.

Every case of the table goes through ``validate_run_config`` in this process (what each CLI calls first); a smaller
set goes through the real CLIs in subprocesses, each timed, with stderr checked for the one line and for the absence
of a traceback, and the workdir checked for the absence of any phase output.
"""

from __future__ import annotations

import os
import pathlib
import stat
import subprocess
import sys

import jax
import pytest
from conftest import random_params, small_config

from elastic_jax.data import DataError
from elastic_jax.data.pipeline import load_documents
from elastic_jax.interop import hf
from elastic_jax.model.config import ConfigError
from elastic_jax.train.config import default_config, section, validate_run_config
from elastic_jax.train.sharding import DEFAULT_RULES

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")


def _tiny():
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location("tiny", TINY)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _set(cfg, path: str, value) -> None:
  """``cfg.<path> = value`` for a dotted path with list indices (``stages[1].seq_len``), creating missing keys."""
  *parents, last = path.replace("[", ".[").split(".")
  node = cfg
  for part in parents:
    if not part.startswith("[") and part not in node:
      node[part] = {}
    node = node[int(part[1:-1])] if part.startswith("[") else node[part]
  if last.startswith("["):
    node[int(last[1:-1])] = value
  else:
    node[last] = value


# (override path, value, the start of the one-line message): each a mistake a user makes.
CASES = [
    # A typo in every section (and at the top): the key named, with the closest known key.
    ("eval.exampels", 4, "eval.exampels: unknown key (did you mean examples?)"),
    ("parent.pretrain_step", 60, "parent.pretrain_step: unknown key (did you mean pretrain_steps?)"),
    ("importance.batchs", 2, "importance.batchs: unknown key (did you mean batches?)"),
    ("elastic.budgts", [1.0], "elastic.budgts: unknown key (did you mean budgets?)"),
    ("elastic.router.widht", 8, "elastic.router.widht: unknown key (did you mean width?)"),
    ("elastic.space.mlp_mod", "heterogeneous", "elastic.space.mlp_mod: unknown key (did you mean mlp_mode?)"),
    ("memory.grad_acum_steps", 2, "memory.grad_acum_steps: unknown key (did you mean grad_accum_steps?)"),
    ("mesh.shap", (1,), "mesh.shap: unknown key (did you mean shape?)"),
    ("data.tokeniser", "", "data.tokeniser: unknown key (did you mean tokenizer?)"),
    ("optimizer.learning_rat", 1e-3, "optimizer.learning_rat: unknown key (did you mean learning_rate?)"),
    ("router_optimizer.warmup", 5, "router_optimizer.warmup: unknown key (did you mean warmup_steps?)"),
    ("model.hiden_size", 64, "model.hiden_size: unknown key (did you mean hidden_size?)"),
    ("plan.devce", "v5p", "plan.devce: unknown key (did you mean device?)"),
    ("stages[0].seq_length", 64, "stages[0].seq_length: unknown key (did you mean seq_len?)"),
    ("data.stage_tasks[0].familes", ["arithmetic"], "data.stage_tasks[0].familes: unknown key (did you mean "
                                                    "families?)"),
    ("evl", {"examples": 4}, "evl: unknown key (did you mean eval?)"),
    # Values out of range, named with the key.
    ("parent.seq_len", 0, "parent.seq_len: 0 must be an integer >= 1"),
    ("parent.learning_rate", -1.0, "parent.learning_rate: -1.0 must be > 0"),
    ("parent.pretrain_steps", 0, "parent.pretrain_steps: 0 must be an integer >= 1"),
    ("importance.depth_batches", 0, "importance.depth_batches: 0 must be an integer >= 1"),
    ("elastic.budgets", [1.0, 1.5, 0.5], "elastic.budgets[1]: 1.5 is outside (0, 1]"),
    ("elastic.budgets", [], "elastic.budgets: is empty"),
    ("elastic.budgets", [1.0, 0.75, 0.751], "elastic.budgets[2]: 0.751 has the name 75pct of elastic.budgets[1]"),
    ("elastic.space.mlp", [96, 1000], "elastic.space: mlp candidate 1000 is larger than the parent's"),
    ("elastic.space.hidden", [64, 64, 128], "elastic.space: hidden candidate 64 appears more than once"),
    ("elastic.router.estimator", "gumbel", "elastic.router.estimator: 'gumbel' is not one of chosen, softmax"),
    ("elastic.router.tau_end", 0.0, "elastic.router.tau_end: 0.0 must be > 0"),
    ("elastic.kd_temperature", 0, "elastic.kd_temperature: 0 must be > 0"),
    ("elastic.budget_metric", "param", "elastic.budget_metric: 'param' is not one of params, active_params, memory "
                                       "(did you mean params?)"),
    ("stages[0].budget_probs", [0.5, 0.5], "stages[0].budget_probs: has 2 entries for 3 budgets"),
    ("stages[1].budget_probs", [0.6, 0.3, 0.3], "stages[1].budget_probs: [0.6, 0.3, 0.3] sum to 1.2"),
    ("stages[1].budget_probs", [1.2, -0.2, 0.0], "stages[1].budget_probs[1]: -0.2 must be >= 0"),
    ("stages[1].seq_len", 0, "stages[1].seq_len: 0 must be an integer >= 1"),
    ("stages[1].pinned", "yes", "stages[1].pinned: 'yes' is not a bool"),
    ("stages[0].pinned", True, "stages[0].pinned: true in the first stage would pin the untrained router's choices"),
    ("stages[1].name", "stage1", "stages[1].name: 'stage1' is empty or repeats an earlier stage's name"),
    ("stages[1].tasks", 2, "stages[1].tasks: 2 is not an index of data.stage_tasks (2 entries) (give 0..1"),
    ("stages", [], "stages: is empty"),
    ("optimizer.schedule", "cosin", "optimizer.schedule: 'cosin' is not one of cosine, constant (did you mean "
                                    "cosine?)"),
    ("router_optimizer.b2", 1.0, "router_optimizer.b2: 1.0 is outside [0, 1)"),
    ("optimizer.grad_clip", 0.0, "optimizer.grad_clip: 0.0 must be > 0"),
    ("memory.teacher_dtype", "float16", "memory.teacher_dtype: 'float16' is not one of float32, bfloat16"),
    ("memory.remat.mamba", "all", "memory.remat.mamba: 'all' is not one of none, full, dots"),
    ("memory.grad_accum_steps", 5, "parent.batch_size: 16 does not split into memory.grad_accum_steps=5 "
                                   "micro-batches (make it a multiple of 5)"),
    ("eval.decode_batch", 0, "eval.decode_batch: 0 must be an integer >= 1"),
    ("checkpoint_every", 0, "checkpoint_every: 0 must be an integer >= 1"),
    ("data.kind", "file", "data.kind: 'file' is not one of tasks, files (did you mean files?)"),
    ("data.stage_tasks[1].families", ["arithmetic", "algebra"], "data.stage_tasks[1].families: 'algebra' is not "
                                                                "one of arithmetic, modular, variables"),
    ("data.tokenizer", "/nonexistent/tokenizer.json", "data.tokenizer: /nonexistent/tokenizer.json is neither a "
                                                      "tokenizer.json nor a folder holding one"),
    ("model.pattern", "M-X", "model: pattern='M-X' contains unknown block character(s) ['X']"),
    ("model.hidden_size", 0, "model: hidden_size=0 must be a positive integer"),
    ("parent.hf_path", "/nonexistent/checkpoint", "parent.hf_path: /nonexistent/checkpoint holds no config.json"),
    ("mesh.shape", (3,), "mesh.shape: mesh shape (3,) needs 3 devices but"),
    ("mesh.shape", (1, 1, 1, 1, 1, 1), "mesh.shape: (1, 1, 1, 1, 1, 1) has 6 axes (give at most 5"),
]


@pytest.mark.parametrize("path, value, message", CASES, ids=[f"{p}={v!r}"[:40] for p, v, _ in CASES])
def test_bad_config_is_refused_naming_the_key(path, value, message):
  cfg = _tiny()
  _set(cfg, path, value)
  with pytest.raises(ConfigError) as error:
    validate_run_config(cfg)
  assert str(error.value).startswith(message), str(error.value)
  assert "\n" not in str(error.value)


def test_a_stage_batch_the_mesh_cannot_split_is_refused_with_the_other_checks():
  cfg = _tiny()
  cfg.stages[1]["batch_size"] = 6
  mesh = jax.sharding.AbstractMesh((4, 1, 1, 1), ("data", "fsdp", "tensor", "context"))
  with pytest.raises(ConfigError, match=r"^stages\[1\].batch_size: 6 is not divisible by the 4 data-parallel "
                                        r"devices of mesh \(4,\) \(make it a multiple of 4\)$"):
    validate_run_config(cfg, mesh, DEFAULT_RULES)


def test_data_paths_are_checked_before_any_phase(tmp_path):
  cfg = _tiny()
  cfg.data = {"kind": "files", "paths": [str(tmp_path / "absent.jsonl")]}
  with pytest.raises(ConfigError, match=rf"^data.paths\[0\]: {tmp_path}/absent.jsonl does not exist"):
    validate_run_config(cfg)
  cfg.data = {"kind": "files"}
  with pytest.raises(ConfigError, match=r"^data.paths: is empty"):
    validate_run_config(cfg)


def test_one_default_per_key_and_the_tiny_config_unchanged():
  """A config that leaves a key out gets the schema's default; tiny's values are those defaults where they meet."""
  defaults = default_config()
  assert defaults["parent"]["pretrain_steps"] == 1500 and defaults["parent"]["long_every"] == 4
  assert defaults["eval"]["decode_batch"] == 32
  tiny = _tiny()
  for name in ("parent", "importance", "eval"):
    assert section(tiny, name) == tiny[name].to_dict()  # tiny sets every key of these sections
  resolved = validate_run_config(tiny)
  assert resolved.parent.to_dict() == tiny.parent.to_dict() and resolved.eval.to_dict() == tiny.eval.to_dict()
  assert resolved.elastic.kd_temperature == 1.0 and resolved.memory.grad_accum_steps == 1  # left out: defaults
  minimal = _tiny()
  del minimal["eval"], minimal["memory"], minimal["mesh"]
  resolved = validate_run_config(minimal)
  assert resolved.eval.to_dict() == defaults["eval"] and resolved.mesh.shape == ()


# ------------------------------------------------------------------------------------------------ files
def test_a_data_file_that_is_not_text_is_named_with_the_byte_offset(tmp_path):
  binary = tmp_path / "program.txt"
  binary.write_bytes(b"header ok\n" + bytes([0xC3, 0x28]) + b" more")
  with pytest.raises(DataError, match=rf"data file {binary} is not UTF-8 text: byte offset 10 \(0xc3\)"):
    load_documents([binary])
  nul = tmp_path / "nul.txt"
  nul.write_bytes(b"abc\x00def")
  with pytest.raises(DataError, match=rf"data file {nul} holds a NUL byte at byte offset 3"):
    load_documents([nul])


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory) -> pathlib.Path:
  """A tiny HF NemotronH checkpoint written by our exporter."""
  path = tmp_path_factory.mktemp("hf") / "model"
  config = small_config("M-*-")
  hf.save(path, config, random_params(config))
  return path


def test_exported_safetensors_have_normal_permissions(hf_model):
  umask = os.umask(0)
  os.umask(umask)
  for name in (hf.SINGLE_FILE, hf.CONFIG_FILE):
    assert stat.S_IMODE(os.stat(hf_model / name).st_mode) == 0o666 & ~umask, name


def test_a_truncated_safetensors_file_is_named(hf_model, tmp_path):
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / hf.CONFIG_FILE).write_bytes((hf_model / hf.CONFIG_FILE).read_bytes())
  data = (hf_model / hf.SINGLE_FILE).read_bytes()
  (broken / hf.SINGLE_FILE).write_bytes(data[:len(data) // 2])
  with pytest.raises(hf.CheckpointError, match=rf"{broken / hf.SINGLE_FILE} is not a readable safetensors file"):
    hf.load(broken)


# ------------------------------------------------------------------------------------------------ real CLIs
def _cli(module: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120,
                        cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})


def _refused(done: subprocess.CompletedProcess, expected: str) -> None:
  """Exit 2 with one line naming the problem, no traceback (that it comes before any work is checked by what the
  caller finds unwritten, not by the time it took)."""
  lines = [line for line in done.stderr.splitlines() if "error" in line]
  assert done.returncode == 2, done.stderr[-3000:]
  assert "Traceback" not in done.stderr, done.stderr[-3000:]
  assert lines and expected in lines[-1], done.stderr[-3000:]


@pytest.fixture()
def not_a_folder(tmp_path) -> pathlib.Path:
  """A regular file: no path under it can be written (whoever runs the tests, root included)."""
  path = tmp_path / "a_file"
  path.write_text("x")
  return path


@pytest.mark.parametrize("args, env, expected", [
    (["--config.eval.exampels=4"], {}, "config error: eval.exampels: unknown key (did you mean examples?)"),
    (["--config.evl.examples=4"], {}, "config error: evl: unknown key (did you mean eval?)"),
    (["--config.parent.seq_len=0"], {}, "config error: parent.seq_len: 0 must be an integer >= 1"),
    (["--config.eval.examples=many"], {}, "config error: eval.examples: invalid literal for int()"),
    (["--config.elastic.budgets[1]=1.5"], {}, "config error: elastic.budgets[1]: 1.5 is outside (0, 1]"),
    (["--config.mesh.shape=(4,)", "--config.stages[1].batch_size=6"],
     {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
     "config error: stages[1].batch_size: 6 is not divisible by the 4 data-parallel devices of mesh (4,)"),
], ids=["typo", "section typo", "parent seq_len", "wrong type", "budget", "stage batch vs mesh"])
def test_the_main_job_refuses_bad_config_before_any_phase(args, env, expected, tmp_path):
  workdir = tmp_path / "run"
  done = _cli("elastic_jax.train", "--config", TINY, *args, "--workdir", str(workdir), env=env)
  _refused(done, expected)
  assert not workdir.exists()  # nothing written: refused before the first phase


def test_the_main_job_refuses_an_unwritable_workdir_and_bad_data(not_a_folder, tmp_path):
  workdir = not_a_folder / "run"
  done = _cli("elastic_jax.train", "--config", TINY, "--workdir", str(workdir))
  _refused(done, f"error: --workdir {workdir}: {not_a_folder} is a file, not a folder")

  binary = tmp_path / "corpus.txt"
  binary.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(128, 256)))
  workdir = tmp_path / "run"
  done = _cli("elastic_jax.train", "--config", TINY, "--config.data.kind=files",
              f"--config.data.paths={binary}", "--workdir", str(workdir))
  _refused(done, f"error: data file {binary} is not UTF-8 text: byte offset 8 (0x80)")
  assert not (workdir / "parent").exists() and not list(workdir.rglob("metrics.jsonl"))


def test_verbosity_1_adds_the_traceback(tmp_path):
  done = _cli("elastic_jax.train", "--config", TINY, "--config.parent.seq_len=0", "--verbosity=1",
              "--workdir", str(tmp_path / "run"))
  assert done.returncode == 2 and "Traceback" in done.stderr
  assert done.stderr.rstrip().endswith("config error: parent.seq_len: 0 must be an integer >= 1")


def test_the_other_clis_name_the_bad_file_before_any_work(hf_model, not_a_folder, tmp_path):
  out = str(not_a_folder / "x.json")
  done = _cli("elastic_jax.evaluate", "--model", str(hf_model), "--json", out)
  _refused(done, f"error: --json {out}: {not_a_folder} is a file, not a folder")

  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / hf.CONFIG_FILE).write_bytes((hf_model / hf.CONFIG_FILE).read_bytes())
  (broken / hf.SINGLE_FILE).write_bytes((hf_model / hf.SINGLE_FILE).read_bytes()[:100])
  done = _cli("elastic_jax.evaluate", "--model", str(broken))
  _refused(done, f"error: {broken / hf.SINGLE_FILE} is not a readable safetensors file")

  orbax = tmp_path / "orbax" / "model"
  (orbax / "0").mkdir(parents=True)
  (orbax / "0" / "_CHECKPOINT_METADATA").write_text("{not json")
  done = _cli("elastic_jax.evaluate", "--model", str(orbax.parent))
  _refused(done, f"error: {orbax}: cannot read this Orbax checkpoint")

  out = str(not_a_folder / "child")
  done = _cli("elastic_jax.extract", "--workdir", str(tmp_path), "--budget", "50pct", "--out", out)
  _refused(done, f"error: --out {out}: {not_a_folder} is a file, not a folder")

  done = _cli("elastic_jax.plan", "--config", TINY, "--config.eval.exampels=4")
  _refused(done, "config error: eval.exampels: unknown key (did you mean examples?)")
