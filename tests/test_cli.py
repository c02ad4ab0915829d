"""The extract and evaluate CLIs on a micro main-job workdir, and the main job's refusals of bad input.

References: the masked trained student's logits for extracted children (invariant 4), transformers' NemotronH for
the HF export, a torch log-softmax over hand-packed evaluation-split tokens for perplexity, controlled generations
for per-family grading.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from elastic_jax import evaluate as evaluate_cli
from elastic_jax import extract as extract_cli
from elastic_jax.data import tasks
from elastic_jax.elastic.extract import child_config
from elastic_jax.elastic.masks import choice_masks
from elastic_jax.elastic.param_count import param_count
from elastic_jax.elastic.space import Choice
from elastic_jax.eval import metrics
from elastic_jax.model import HybridLM, ModelConfig
from elastic_jax.model.config import ConfigError
from elastic_jax.train.checkpoint import load_model
from elastic_jax.train.pipeline import run_pipeline
from test_data import write_word_tokenizer
from test_pipeline import _micro_config

TOKENS = np.random.default_rng(0).integers(0, 256, (2, 19)).astype(np.int32)


def _read_json(path) -> dict:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> str:
  """A finished micro main-job run (budgets 100% and 60%; a homogeneous space, so every child exports to HF)."""
  path = str(tmp_path_factory.mktemp("cli") / "run")
  run_pipeline(_micro_config(), path)
  return path


@pytest.fixture(scope="module")
def extracted(workdir, tmp_path_factory) -> dict[str, str]:
  """The 60% child written by the CLI in both formats."""
  out = tmp_path_factory.mktemp("extracted")
  paths = {"orbax": str(out / "orbax"), "hf": str(out / "hf")}
  assert extract_cli.main(["--workdir", workdir, "--budget", "60pct", "--out", paths["orbax"]]) == 0
  assert extract_cli.main(["--workdir", workdir, "--budget", "0.6", "--out", paths["hf"], "--format", "hf"]) == 0
  return paths


def permuted_parent(workdir: str) -> tuple[ModelConfig, dict]:
  metadata, params = load_model(os.path.join(workdir, "permuted", "model"))
  return ModelConfig.from_dict(metadata["config"]), params


def trained_student(workdir: str, step: int | None = None) -> tuple[ModelConfig, dict]:
  """The weights children are sliced from: the finished run's student, or the student of checkpoint ``step``
  (read here with Orbax's own restore of the whole train state)."""
  config = permuted_parent(workdir)[0]
  if step is None:
    return config, load_model(os.path.join(workdir, "elastic", "student", "model"))[1]
  manager = ocp.CheckpointManager(os.path.join(workdir, "elastic", "checkpoints"))
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  manager.close()
  return config, state["params"]


def masked_parent_logits(workdir: str, choice: Choice, depth_order, step: int | None = None) -> np.ndarray:
  """The reference: the trained student run with the choice's masks (no slicing involved)."""
  config, params = trained_student(workdir, step)
  masks = choice_masks(config, [choice] * TOKENS.shape[0], depth_order)
  return np.asarray(jax.jit(HybridLM(config).apply)({"params": params}, TOKENS, masks=masks))


def child_logits(config: ModelConfig, params) -> np.ndarray:
  return np.asarray(jax.jit(HybridLM(config).apply)({"params": params}, TOKENS))


def deployed_record(workdir: str, budget: float) -> dict:
  records = _read_json(os.path.join(workdir, "elastic", "deployed_choices.json"))
  return next(r for r in records if r["budget"] == budget)


def depth_order(workdir: str) -> list[int]:
  return [int(i) for i in _read_json(os.path.join(workdir, "importance", "rankings.json"))["depth"]]


# ---------------------------------------------------------------------------------------------------- extract
def test_extract_orbax_child_is_the_deployed_choice_and_equals_the_masked_trained_student(workdir, extracted):
  record = deployed_record(workdir, 0.6)
  info = _read_json(os.path.join(extracted["orbax"], "extract.json"))
  assert info["choice"] == record["choice"] and info["name"] == "60pct" and info["step"] is None
  # "0.6" names the same budget as "60pct".
  assert _read_json(os.path.join(extracted["hf"], "extract.json"))["choice"] == record["choice"]
  metadata, params = load_model(os.path.join(extracted["orbax"], "model"))
  config = ModelConfig.from_dict(metadata["config"])
  assert param_count(config) == record["params"] < param_count(permuted_parent(workdir)[0])
  reference = masked_parent_logits(workdir, Choice.from_dict(record["choice"]), depth_order(workdir))
  np.testing.assert_allclose(child_logits(config, params), reference, atol=1e-5)


def test_extract_a_budget_between_the_trained_ones_from_the_interpolated_router(workdir, tmp_path, capsys):
  """Budgets between the trained 60% and 100%: where some choice of the space lands within the dead zone (found
  here by enumerating the space), the CLI extracts one that does, sliced exactly (the masked student's logits);
  where none does, it refuses naming the dead zone."""
  import itertools  # pylint: disable=import-outside-toplevel
  config = permuted_parent(workdir)[0]
  space = {"hidden": [16, 32], "mlp": [32, 64], "mamba_heads": [2, 4]}  # the micro run's (test_pipeline)
  order = depth_order(workdir)
  fractions = [param_count(child_config(config, Choice.homogeneous(config, hidden=h, mlp=m, mamba_heads=n), order))
               / param_count(config) for h, m, n in itertools.product(*space.values())]
  fits = {p: any(abs(f / (p / 100) - 1) <= 0.02 for f in fractions) for p in range(61, 100)}
  fitting, missing = [p for p, ok in fits.items() if ok], [p for p, ok in fits.items() if not ok]
  assert fitting and missing  # both outcomes are exercised
  percent = fitting[len(fitting) // 2]
  out = str(tmp_path / "between")
  assert extract_cli.main(["--workdir", workdir, "--budget", f"{percent}pct", "--out", out]) == 0
  info = _read_json(os.path.join(out, "extract.json"))
  assert info["name"] == f"{percent}pct" and "interpolated" in info["choice_source"]
  assert abs(info["fraction"] / (percent / 100) - 1) <= 0.02
  metadata, params = load_model(os.path.join(out, "model"))
  reference = masked_parent_logits(workdir, Choice.from_dict(info["choice"]), order)
  np.testing.assert_allclose(child_logits(ModelConfig.from_dict(metadata["config"]), params), reference, atol=1e-5)
  capsys.readouterr()
  assert extract_cli.main(["--workdir", workdir, "--budget", f"{missing[0]}pct", "--out", str(tmp_path / "no")]) == 2
  assert f"no choice of the router for budget {missing[0] / 100:g} lands within the dead zone" in \
      capsys.readouterr().err


def test_extract_hf_child_loads_in_transformers_with_our_logits(workdir, extracted):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  record = deployed_record(workdir, 0.6)
  model = transformers.AutoModelForCausalLM.from_pretrained(extracted["hf"]).float().eval()
  assert type(model).__name__ == "NemotronHForCausalLM"
  # transformers clamps dt from below at time_step_min; the parent was trained without that clamp (NVIDIA's kernels).
  for layer in model.model.layers:
    if layer.block_type == "linear_attention":
      layer.mixer.time_step_limit = (0.0, math.inf)
  with torch.no_grad():
    theirs = model(torch.from_numpy(TOKENS).long()).logits.float().numpy()
  reference = masked_parent_logits(workdir, Choice.from_dict(record["choice"]), depth_order(workdir))
  diff = float(np.max(np.abs(theirs - reference)))
  print(f"transformers vs masked student: max |logit diff| {diff:.2e}")
  assert diff < 1e-4


def test_extract_reads_checkpoints_when_training_has_not_finished(workdir, tmp_path):
  # A copy of the run as it was before deployed_choices.json was written: the latest checkpoint decides.
  unfinished = tmp_path / "unfinished"
  for part in ("permuted", "importance", os.path.join("elastic", "checkpoints")):
    shutil.copytree(os.path.join(workdir, part), unfinished / part)
  steps = extract_cli.checkpoint_steps(str(unfinished / "elastic" / "checkpoints"))
  assert len(steps) == 2  # end of stage 1 and end of stage 2 (the last step)
  assert extract_cli.main(["--workdir", str(unfinished), "--budget", "100pct", "--out", str(tmp_path / "a")]) == 0
  info = _read_json(tmp_path / "a" / "extract.json")
  # The last checkpoint's router is the finished run's router.
  assert info["step"] == steps[-1] and info["choice"] == deployed_record(workdir, 1.0)["choice"]

  assert extract_cli.main(["--workdir", workdir, "--budget", "100pct", "--step", str(steps[0]),
                           "--out", str(tmp_path / "b")]) == 0
  info = _read_json(tmp_path / "b" / "extract.json")
  assert info["step"] == steps[0] and info["depth_order"] == depth_order(workdir)
  metadata, params = load_model(tmp_path / "b" / "model")
  config = ModelConfig.from_dict(metadata["config"])
  reference = masked_parent_logits(workdir, Choice.from_dict(info["choice"]), info["depth_order"], steps[0])
  np.testing.assert_allclose(child_logits(config, params), reference, atol=1e-5)
  # The last checkpoint's student is the finished run's student: both paths give the same child.
  _, last = load_model(tmp_path / "a" / "model")
  final_config, final = extract_cli.extract_budget(workdir, "100pct")[:2]
  jax.tree.map(np.testing.assert_array_equal, last, final)


def test_extract_refuses_bad_input_naming_the_value(workdir, tmp_path, capsys):
  out = str(tmp_path / "out")
  assert extract_cli.main(["--workdir", workdir, "--budget", "half", "--out", out]) == 2
  message = capsys.readouterr().err
  assert "unknown budget 'half'" in message and "100pct (or 1)" in message and "60pct (or 0.6)" in message
  assert extract_cli.main(["--workdir", workdir, "--budget", "50pct", "--out", out]) == 2
  assert "budget 0.5 is outside the trained range [0.6, 1]" in capsys.readouterr().err

  assert extract_cli.main(["--workdir", workdir, "--budget", "1.0", "--step", "4", "--out", out]) == 2
  assert "--step 4 has no checkpoint" in capsys.readouterr().err

  no_elastic = tmp_path / "no_elastic"
  shutil.copytree(os.path.join(workdir, "importance"), no_elastic / "importance")
  assert extract_cli.main(["--workdir", str(no_elastic), "--budget", "100pct", "--out", out]) == 2
  message = capsys.readouterr().err
  assert f"workdir '{no_elastic}' has no elastic phase output" in message and "elastic_jax.train" in message

  with pytest.raises(SystemExit) as exit_info:
    extract_cli.main(["--workdir", workdir, "--budget", "100pct", "--out", out, "--format", "onnx"])
  assert exit_info.value.code == 2
  assert "invalid choice: 'onnx' (choose from 'orbax', 'hf')" in capsys.readouterr().err
  assert not os.path.exists(out)


def test_extract_hf_refuses_a_heterogeneous_choice(workdir, tmp_path, capsys):
  run = tmp_path / "hetero"
  for part in ("permuted", "importance", os.path.join("elastic", "student")):
    shutil.copytree(os.path.join(workdir, part), run / part)
  choice = dict(deployed_record(workdir, 1.0)["choice"], mlp=[32, 64])  # the two MLP blocks differ
  with open(run / "elastic" / "deployed_choices.json", "w", encoding="utf-8") as f:
    json.dump([{"budget": 0.8, "params": 0, "fraction": 0.8, "choice": choice}], f)
  assert extract_cli.main(["--workdir", str(run), "--budget", "80pct", "--out", str(tmp_path / "hf"),
                           "--format", "hf"]) == 2
  message = capsys.readouterr().err
  assert "heterogeneous (intermediate_size_per_layer=[32, 64])" in message and "Use --format orbax" in message
  assert extract_cli.main(["--workdir", str(run), "--budget", "80pct", "--out", str(tmp_path / "orbax")]) == 0
  metadata, _ = load_model(tmp_path / "orbax" / "model")
  assert metadata["config"]["intermediate_size_per_layer"] == [32, 64]


# ---------------------------------------------------------------------------------------------------- evaluate
def _hand_packed_eval_batch(batch_size: int, seq_len: int) -> np.ndarray:
  """Evaluation-split documents of every family as UTF-8 bytes, each followed by NUL: row r packs documents
  r, r + batch_size, r + 2 batch_size, ... and keeps its first seq_len + 1 bytes."""
  rows = []
  for row in range(batch_size):
    stream, index = [], row
    while len(stream) < seq_len + 1:
      stream += list(tasks.generate_example(tasks.TaskConfig(), 0, "eval", index).text.encode("utf-8")) + [0]
      index += batch_size
    rows.append(stream[:seq_len + 1])
  return np.asarray(rows, np.int64)


def test_evaluate_both_formats_against_an_independent_perplexity(extracted, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  flags = ["--examples", "1", "--ppl-batches", "1", "--batch-size", "2", "--seq-len", "24", "--max-new-tokens", "4",
           "--decode-batch", "3"]
  results = {}
  for fmt, path in extracted.items():
    assert evaluate_cli.main(["--model", path, "--json", str(tmp_path / f"{fmt}.json"), *flags]) == 0
    results[fmt] = _read_json(tmp_path / f"{fmt}.json")
  assert results["orbax"]["format"] == "orbax" and results["hf"]["format"] == "hf"
  assert results["orbax"]["accuracy"] == results["hf"]["accuracy"]
  assert {family: r["n"] for family, r in results["hf"]["accuracy"]["per_task"].items()} == {
      family: 1 for family in tasks.FAMILIES}

  batch = _hand_packed_eval_batch(2, 24)
  model = transformers.AutoModelForCausalLM.from_pretrained(extracted["hf"]).float().eval()
  for layer in model.model.layers:  # no dt clamp, as trained (see the export test)
    if layer.block_type == "linear_attention":
      layer.mixer.time_step_limit = (0.0, math.inf)
  with torch.no_grad():
    logits = model(torch.from_numpy(batch[:, :-1])).logits.double()
  targets = torch.from_numpy(batch[:, 1:]).reshape(-1)
  nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets)
  reference = math.exp(float(nll))
  for fmt, result in results.items():
    assert result["perplexity"] == pytest.approx(reference, rel=1e-4), fmt


def test_evaluate_grades_each_task_family_on_its_own(extracted, tmp_path, monkeypatch, capsys):
  """Controlled generations: the right solution for arithmetic prompts, a wrong answer for the others."""
  examples = {example.prompt: example for family in ("arithmetic", "modular")
              for example in tasks.generate_examples(tasks.TaskConfig(families=(family,)), 0, "eval", 3)}

  def fake_generate_ragged(config, params, prompts, lengths, *, max_new_tokens, eos_id, limits=None):
    del config, params
    limits = np.full(prompts.shape[0], max_new_tokens) if limits is None else np.asarray(limits)
    rows = np.full((prompts.shape[0], max_new_tokens), eos_id, np.int32)
    for row, (ids, length) in enumerate(zip(np.asarray(prompts), np.asarray(lengths))):
      example = examples[bytes(int(i) for i in ids[:length]).decode("utf-8")]
      text = example.solution if example.family == "arithmetic" else " #### -1\n"
      encoded = list(text.encode("utf-8"))[:min(max_new_tokens, int(limits[row]))]
      rows[row, :len(encoded)] = encoded
    return rows

  monkeypatch.setattr(metrics, "generate_ragged", fake_generate_ragged)
  out = tmp_path / "graded.json"
  assert evaluate_cli.main(["--model", extracted["orbax"], "--tasks", "modular", "arithmetic", "--examples", "3",
                            "--ppl-batches", "0", "--max-new-tokens", "400", "--decode-batch", "4",
                            "--json", str(out)]) == 0
  result = _read_json(out)
  assert result["perplexity"] is None
  assert result["accuracy"]["per_task"] == {"arithmetic": {"accuracy": 1.0, "n": 3},
                                            "modular": {"accuracy": 0.0, "n": 3}}
  assert result["accuracy"]["all"] == {"accuracy": 0.5, "n": 6, "correct": 3}
  table = capsys.readouterr().out
  assert "arithmetic" in table and "variables" not in table


def test_evaluate_refuses_bad_input_naming_the_value(extracted, tmp_path, capsys):
  missing = str(tmp_path / "missing")
  assert evaluate_cli.main(["--model", missing]) == 2
  assert f"--model '{missing}' does not exist" in capsys.readouterr().err

  with pytest.raises(SystemExit) as exit_info:
    evaluate_cli.main(["--model", extracted["orbax"], "--tasks", "arithmetic", "algebra"])
  assert exit_info.value.code == 2
  assert "invalid choice: 'algebra' (choose from 'arithmetic', 'modular', 'variables')" in capsys.readouterr().err

  tokenizer = write_word_tokenizer(tmp_path, 298)  # 300 tokens; the model has 256
  assert evaluate_cli.main(["--model", extracted["hf"], "--tokenizer", tokenizer]) == 2
  message = capsys.readouterr().err
  assert "tokenizer has 300 tokens but model vocab_size=256" in message and tokenizer in message


# ---------------------------------------------------------------------------------------------------- main job
@pytest.mark.parametrize("case", ["missing data path", "empty data file", "tokenizer too large"])
def test_main_job_refuses_bad_data_and_tokenizer_before_training(case, tmp_path):
  cfg = _micro_config()
  if case == "missing data path":
    bad = str(tmp_path / "corpus" / "absent.jsonl")
    cfg.data = {"kind": "files", "paths": [bad]}
    error, expected = ConfigError, f"data.paths[0]: {bad} does not exist"
  elif case == "empty data file":
    bad = tmp_path / "empty.txt"
    bad.write_text("")
    cfg.data = {"kind": "files", "paths": [str(bad)]}
    error, expected = ValueError, f"data file is empty: {bad}"
  else:
    bad = write_word_tokenizer(tmp_path, 298)
    cfg.data.tokenizer = bad
    error, expected = ValueError, f"tokenizer has 300 tokens but model vocab_size=256 ({bad})"
  workdir = tmp_path / "run"
  with pytest.raises(error) as error_info:
    run_pipeline(cfg, str(workdir))
  assert expected in str(error_info.value)
  assert not os.path.exists(workdir / "parent")  # refused before pretraining started
