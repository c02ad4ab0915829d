"""The MoE default (``configs/tiny_moe.py``) and the CLI export of an MoE child.

References: transformers' NemotronH for the HF export of a child cut through the experts (the masked trained
student, no slicing, for our side); the saved arrays themselves (sizes summed here, not our parameter-count formula)
for the main job's member sizes.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from elastic_jax import extract as extract_cli
from elastic_jax.elastic import axes
from elastic_jax.elastic.space import Choice
from elastic_jax.train.checkpoint import load_model
from elastic_jax.train.config import validate_run_config
from elastic_jax.train.pipeline import run_pipeline
from test_cli import TOKENS, deployed_record, depth_order, masked_parent_logits

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_MOE = ROOT / "configs" / "tiny_moe.py"
MOE_AXES = ("moe_experts", "moe_expert_dim", "moe_shared_dim")


def _tiny_moe() -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location("tiny_moe", TINY_MOE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _array_count(path: str) -> int:
  """The number of parameters a saved model holds, summed over its arrays."""
  _, params = load_model(os.path.join(path, "model"))
  return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(params))


# ------------------------------------------------------------------------------------------------ the config
def test_tiny_moe_config_is_valid_and_elastic_on_the_moe_axes():
  cfg = _tiny_moe()
  validate_run_config(cfg)
  assert set(cfg.model.pattern) == {"M", "E", "*"}
  space = cfg.elastic.space
  for axis in MOE_AXES:  # every MoE axis elastic, below the parent's size
    assert len(space[axis]) >= 2 and max(space[axis]) == cfg.model[axes.get(axis).config_field], axis
  assert space.get("moe_mode", "homogeneous") == "homogeneous"  # children export to HF


# A few steps of every phase, every stage of one shape (one compile), a few short problems to evaluate.
SHORT = ["--config.parent.pretrain_steps=4", "--config.parent.seq_len=64", "--config.parent.batch_size=4",
         "--config.parent.long_every=3", "--config.importance.batches=1", "--config.importance.batch_size=2",
         "--config.importance.seq_len=64", "--config.importance.depth_batches=1",
         *(f"--config.stages[{i}].{key}" for i in range(3)
           for key in ("steps=2", "batch_size=6", "seq_len=64")),
         "--config.eval.examples=4", "--config.eval.max_new_tokens=4", "--config.eval.ppl_batches=1",
         "--config.eval.batch_size=2", "--config.eval.seq_len=64", "--config.eval.decode_batch=4"]


@pytest.mark.slow
def test_tiny_moe_main_job_runs_and_every_member_lands_on_its_budget(tmp_path):
  """The main job's CLI on configs/tiny_moe.py with a few steps per phase: a report row per member, each child and
  its pruned baseline within 3% of the member's share of the parent's parameters, counted from the saved arrays."""
  workdir = tmp_path / "run"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-m", "elastic_jax.train", "--config", str(TINY_MOE), "--workdir",
                           str(workdir), *SHORT], env=env, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
  rows = json.loads((workdir / "report.json").read_text())["rows"]
  assert [row["budget"] for row in rows] == ["parent", "100pct", "75pct", "50pct"]
  parent = _array_count(str(workdir / "permuted"))
  assert rows[0]["params"] == parent
  for row, budget in zip(rows[1:], (1.0, 0.75, 0.5)):
    child = _array_count(str(workdir / "children" / row["budget"]))
    assert row["params"] == child and abs(child / parent - budget) <= 0.03, (row["budget"], child / parent)
    if budget < 1.0:
      baseline = _array_count(str(workdir / "baselines" / row["budget"]))
      assert row["baseline_params"] == baseline and abs(baseline / parent - budget) <= 0.03, row["budget"]
  assert "| 50pct |" in (workdir / "report.md").read_text()


# ------------------------------------------------------------------------------------------------ HF export
def _micro_moe_config() -> ml_collections.ConfigDict:
  """A micro main job on an MoE parent whose elastic axes are the MoE ones only: every child under 100% is cut
  through the experts. 8 routed experts (a token uses 2) and a shared expert per E block; widths multiples of 4
  (transformers' grouped experts need 16-byte strides). The 70% budget is reached by (2, 16, 16), (4, 8, 16)
  or (4, 8, 8) experts, expert and shared widths (70.6%, 70.9%, 68.5% of the parent)."""
  return ml_collections.ConfigDict(dict(
      seed=0,
      model=dict(pattern="ME*E", vocab_size=256, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                 head_dim=16, mamba_num_heads=4, mamba_head_dim=8, n_groups=2, ssm_state_size=8, chunk_size=16,
                 n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1, moe_intermediate_size=16,
                 moe_shared_expert_intermediate_size=16, n_shared_experts=1),
      data=dict(kind="tasks"),
      parent=dict(hf_path="", pretrain_steps=6, batch_size=2, seq_len=32, learning_rate=3e-3, warmup_steps=2),
      importance=dict(batches=2, batch_size=2, seq_len=32, depth_batches=1),
      elastic=dict(budgets=[1.0, 0.7], space=dict(moe_experts=[2, 4, 8], moe_expert_dim=[8, 16],
                                                   moe_shared_dim=[8, 16]), router=dict(width=8)),
      stages=[dict(name="stage1", steps=3, batch_size=2, seq_len=32, budget_probs=[0.5, 0.5])],
      optimizer=dict(learning_rate=1e-3, warmup_steps=1), router_optimizer=dict(warmup_steps=1),
      checkpoint_every=100,
      eval=dict(ppl_batches=1, batch_size=2, seq_len=32, examples=2, max_new_tokens=8, decode_batch=2)))


def test_extract_hf_moe_child_through_the_cli_loads_in_transformers_with_our_logits(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  workdir = str(tmp_path / "run")
  run_pipeline(_micro_moe_config(), workdir)
  out = str(tmp_path / "hf")
  assert extract_cli.main(["--workdir", workdir, "--budget", "70pct", "--out", out, "--format", "hf"]) == 0
  record = deployed_record(workdir, 0.7)
  choice = Choice.from_dict(record["choice"])
  assert choice.is_homogeneous
  with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
    hf_config = json.load(f)
  kept = (hf_config["n_routed_experts"], hf_config["moe_intermediate_size"],
          hf_config["moe_shared_expert_intermediate_size"])
  assert kept == (choice.moe_experts[0], choice.moe_expert_dim[0], choice.moe_shared_dim[0]) != (8, 16, 16)
  assert abs(record["fraction"] - 0.7) <= 0.02

  model = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
  assert type(model).__name__ == "NemotronHForCausalLM"
  # transformers holds each router's correction bias (one per kept expert) as a buffer, not a parameter.
  biases = sum(b.numel() for name, b in model.named_buffers() if name.endswith("e_score_correction_bias"))
  assert sum(p.numel() for p in model.parameters()) + biases == record["params"]
  for layer in model.model.layers:  # transformers clamps dt from below; the run (like NVIDIA's kernels) does not
    if layer.block_type == "linear_attention":
      layer.mixer.time_step_limit = (0.0, math.inf)
  with torch.no_grad():
    theirs = model(torch.from_numpy(TOKENS).long()).logits.float().numpy()
  reference = masked_parent_logits(workdir, choice, depth_order(workdir))
  np.testing.assert_allclose(theirs, reference, atol=1e-4, rtol=0)
