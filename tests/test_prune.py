"""Zero-shot pruning baseline: the choice search, the end-to-end pipeline and the CLI."""

from __future__ import annotations

import itertools
import json

import jax
import numpy as np
import pytest

from conftest import random_params, small_config
from elastic_jax.elastic.extract import child_config
from elastic_jax.elastic.param_count import choice_param_count, param_count
from elastic_jax.elastic.space import Choice, ElasticSpace
from elastic_jax.model import HybridLM, param_shapes
from elastic_jax.prune import DEFAULT_FRACTIONS, PruneError, calibration_tokens, main, prune, select_choice

PARENT = small_config("M-*M-*", vocab_size=256)  # byte-level vocabulary for the CLI's text calibration
CALIB_SHAPE = (2, 16)  # one calibration batch shape throughout: the importance pass compiles once


@pytest.fixture(scope="module")
def parent_params():
  return jax.tree.map(np.asarray, random_params(PARENT, seed=1))


def test_select_choice_lands_in_the_band_whenever_a_homogeneous_choice_does():
  space = ElasticSpace.from_fractions(PARENT, DEFAULT_FRACTIONS)
  total = param_count(PARENT)
  # Every homogeneous choice of the space, to know which targets are reachable at all.
  grid = [Choice.homogeneous(PARENT, hidden=h, mlp=m, attention_heads=a, mamba_heads=mh, mamba_head_dim=p)
          for h, m, a, mh, p in itertools.product(space.hidden, space.mlp, space.attention_heads, space.mamba_heads,
                                                  space.mamba_head_dim)]
  counts = np.array([choice_param_count(PARENT, c) for c in grid])
  for fraction in (0.9, 0.75, 0.6, 0.5, 0.4, 0.3, 0.2):
    target = fraction * total
    choice = select_choice(PARENT, space, target)
    choice.validate(PARENT, space)
    count = choice_param_count(PARENT, choice)
    reachable = np.any(np.abs(counts / target - 1) <= 0.02)
    print(f"target {fraction:.2f}: {choice} -> {count / total:.3f} (reachable: {reachable})")
    if reachable:
      assert abs(count / target - 1) <= 0.02
    assert select_choice(PARENT, space, target) == choice  # deterministic
  # At half size the descent spreads over several axes rather than emptying the first one.
  half = select_choice(PARENT, space, 0.5 * total)
  shrunk = [axis for axis in ("mlp", "mamba_heads", "hidden", "mamba_head_dim") if half.values(axis)[0] <
            Choice.full(PARENT).values(axis)[0]]
  assert len(shrunk) >= 3, half


def test_select_choice_errors():
  space = ElasticSpace.from_dict({"hidden": [16, 32], "mlp": [24, 48]}, PARENT)
  with pytest.raises(PruneError, match="is out of reach: the smallest sub-network of the space has"):
    select_choice(PARENT, space, 0.1 * param_count(PARENT))
  with pytest.raises(PruneError, match="must order every axis exactly once"):
    select_choice(PARENT, space, 1000, priority=("mlp", "hidden"))


def test_prune_keeps_the_important_neurons(parent_params):
  """Half of every MLP block's neurons are dead (zero up columns and down rows); pruning the MLP to half must
  find and drop exactly those, so the child computes the parent's logits."""
  params = jax.tree.map(np.copy, parent_params)
  rng = np.random.default_rng(0)
  for name in ("layers_1", "layers_4"):
    dead = rng.permutation(PARENT.intermediate_size)[:PARENT.intermediate_size // 2]
    params[name]["mixer"]["up_proj"]["kernel"][:, dead] = 0.0
    params[name]["mixer"]["down_proj"]["kernel"][dead] = 0.0
  space = ElasticSpace.from_dict({"mlp": [24, 48]}, PARENT)
  target = choice_param_count(PARENT, Choice.homogeneous(PARENT, mlp=24))
  tokens = np.random.default_rng(1).integers(0, PARENT.vocab_size, (2, *CALIB_SHAPE)).astype(np.int32)
  config, child, choice = prune(PARENT, params, list(tokens), target_params=target, space=space, tolerance=0.0)
  tokens = tokens[0]
  assert choice == Choice.homogeneous(PARENT, mlp=24)
  assert config.intermediate_size == 24 and param_count(config) == target
  parent_logits = jax.jit(HybridLM(PARENT).apply)({"params": params}, tokens)
  child_logits = jax.jit(HybridLM(config).apply)({"params": child}, tokens)
  np.testing.assert_allclose(child_logits, parent_logits, atol=1e-4)


def test_prune_with_depth_and_fraction(parent_params):
  space = ElasticSpace.from_dict({"hidden": [16, 24, 32], "mlp": [24, 48], "depth": [4, 5, 6]}, PARENT)
  tokens = np.random.default_rng(2).integers(0, PARENT.vocab_size, CALIB_SHAPE).astype(np.int32)
  config, child, choice = prune(PARENT, parent_params, [tokens], target_fraction=0.5, space=space, tolerance=0.1)
  assert abs(param_count(config) / (0.5 * param_count(PARENT)) - 1) <= 0.1
  assert config.num_layers == choice.depth and config.is_homogeneous
  assert sum(leaf.size for leaf in jax.tree.leaves(child)) == param_count(config)
  with pytest.raises(PruneError, match="give exactly one of target_params and target_fraction"):
    prune(PARENT, parent_params, [tokens], target_fraction=0.5, target_params=10)


def test_calibration_tokens(tmp_path):
  (tmp_path / "a.jsonl").write_text(json.dumps({"text": "héllo world"}) + "\n\n" + json.dumps({"text": "abc"}))
  tokens = calibration_tokens(str(tmp_path / "a.jsonl"), 256, samples=3, seq_len=4)
  data = "héllo world\nabc".encode("utf-8")
  assert tokens.shape == (3, 4) and tokens.dtype == np.int32
  assert bytes(tokens[0].astype(np.uint8)) == data[:4] and bytes(tokens[-1].astype(np.uint8)) == data[-4:]
  assert calibration_tokens("random", 64, samples=2, seq_len=5).max() < 64
  with pytest.raises(PruneError, match="byte tokens need vocab_size >= 256"):
    calibration_tokens(str(tmp_path / "a.jsonl"), 64, samples=1, seq_len=4)
  (tmp_path / "b.jsonl").write_text(json.dumps({"body": "x"}))
  with pytest.raises(PruneError, match="b.jsonl:1 has no string field 'text'"):
    calibration_tokens(str(tmp_path / "b.jsonl"), 256, samples=1, seq_len=4)


def test_cli(parent_params, tmp_path, capsys):
  from elastic_jax.interop import hf
  from elastic_jax.train.checkpoint import Checkpointer

  with pytest.raises(SystemExit):
    main(["--help"])
  help_text = capsys.readouterr().out
  for flag in ("--hf", "--target", "--calib", "--tokenizer", "--space", "--tolerance", "--out", "--format"):
    assert flag in help_text

  hf.save(tmp_path / "parent", PARENT, parent_params)
  (tmp_path / "calib.txt").write_text("The quick brown fox jumps over the lazy dog. " * 8)
  common = ["--hf", str(tmp_path / "parent"), "--calib", str(tmp_path / "calib.txt"), "--samples", "4",
            "--seq-len", str(CALIB_SHAPE[1]), "--batch-size", str(CALIB_SHAPE[0]), "--tolerance", "0.05"]
  assert main(common + ["--target", "0.6", "--out", str(tmp_path / "hf_child")]) == 0
  report = json.loads((tmp_path / "hf_child" / "prune.json").read_text())
  config, params = hf.load(tmp_path / "hf_child")
  assert report["child_params"] == param_count(config) == sum(leaf.size for leaf in jax.tree.leaves(params))
  assert abs(report["child_fraction"] / 0.6 - 1) <= 0.05

  space = json.dumps({"hidden": [16, 32], "mlp": [24, 48]})
  absolute = 0.75 * param_count(PARENT)  # > 1: an absolute count
  assert main(common + ["--target", str(absolute), "--space", space, "--calib", "random", "--format", "orbax",
                        "--out", str(tmp_path / "orbax_child")]) == 0
  report = json.loads((tmp_path / "orbax_child" / "prune.json").read_text())
  assert report["format"] == "orbax" and report["target_params"] == absolute
  config = child_config(PARENT, Choice.from_dict(report["choice"]))
  checkpointer = Checkpointer(tmp_path / "orbax_child" / "checkpoint")
  params, metadata = checkpointer.restore(param_shapes(config), expected_config=config.to_dict())
  checkpointer.close()
  assert metadata["choice"] == report["choice"]
  assert sum(leaf.size for leaf in jax.tree.leaves(params)) == report["child_params"] == param_count(config)
