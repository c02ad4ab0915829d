"""Importance: statistics against an independent slow path, planted structure, masking, iterative depth ranking."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import random_params, small_config

from elastic_jax.elastic import importance as importance_lib
from elastic_jax.elastic.importance import estimate_importance, rankings
from elastic_jax.elastic.permute import permute_params
from elastic_jax.model import HybridLM

# Blocks: 0 Mamba, 1 MLP, 2 attention, 3 Mamba, 4 MLP. Four heads per Mamba group and per KV group.
CONFIG = small_config("M-*M-", mamba_num_heads=8, num_attention_heads=8)
DEAD = 1e-3  # the scale of a planted, nearly dead component
CALIBRATION = [np.random.default_rng(i).integers(0, 64, (4, 16)).astype(np.int32) for i in range(2)]


def normalized_mse(got: np.ndarray, reference: np.ndarray) -> float:
  return float(np.sum((got - reference) ** 2) / np.sum(reference ** 2))


# ------------------------------------------------------------------------------------------------ planted model
def plant_structure(config, params, rng: np.random.Generator):
  """Scales components by a shuffled 0.1..1 spread, and a few by DEAD, so importance has something to find.

  A planted hidden channel is small in the whole residual stream (embedding, every output projection, every norm);
  a Mamba head or channel is small in x (in_proj and conv bias, so silu(conv) is small too); an MLP neuron in the
  up-projection. Query heads cannot be scaled alone (their KV group shares V), so the planted weak query heads get
  a zero query: uniform causal attention averages V over positions, a smaller output than the sharpened others.
  Returns (params, {axis: planted dead indices}).
  """
  params = jax.tree.map(np.array, params)

  def spread(n: int, dead: list[int]) -> np.ndarray:
    factors = rng.permutation(np.geomspace(0.1, 1.0, n))
    factors[dead] = DEAD
    return factors

  dead = {"hidden": [5, 20], "mlp": [7, 30], "attention_heads": [2, 5], "mamba_heads": [1, 6],
          "mamba_head_dim": [2]}
  hidden = spread(config.hidden_size, dead["hidden"])
  params["embed"]["embedding"] *= hidden
  params["norm_f"]["scale"] *= hidden
  for spec in config.block_specs():
    block = params[f"layers_{spec.index}"]
    mixer = block["mixer"]
    block["norm"]["scale"] *= hidden
    if spec.kind == "mlp":
      mixer["up_proj"]["kernel"] *= spread(spec.intermediate_size, dead["mlp"])
      mixer["down_proj"]["kernel"] *= hidden
    elif spec.kind == "attention":
      query_scale = np.full(spec.num_attention_heads, 3.0)
      query_scale[dead["attention_heads"]] = 0.0
      mixer["q_proj"]["kernel"] *= query_scale[:, None]
      mixer["o_proj"]["kernel"] *= hidden
    else:
      head_channel = (spread(spec.mamba_num_heads, dead["mamba_heads"])[:, None]
                      * spread(spec.mamba_head_dim, dead["mamba_head_dim"])[None, :])  # [H, P]
      mixer["x_proj"]["kernel"] *= head_channel
      mixer["conv_x"]["bias"] *= head_channel
      mixer["out_proj"]["kernel"] *= hidden
  return params, dead


@pytest.fixture(scope="module")
def planted():
  params, dead = plant_structure(CONFIG, random_params(CONFIG), np.random.default_rng(0))
  importance = estimate_importance(CONFIG, params, CALIBRATION, progress=False)
  return params, dead, importance, rankings(importance, CONFIG)


def test_planted_dead_components_rank_last(planted):
  _, dead, importance, order = planted
  specs = CONFIG.block_specs()
  assert sorted(order.hidden[-2:]) == dead["hidden"]
  for spec in specs:
    if spec.kind == "mlp":
      assert sorted(order.mlp[spec.index][-2:]) == dead["mlp"]
    elif spec.kind == "attention":  # one weak head per KV group: last within its group
      heads = order.attention_heads[spec.index].reshape(CONFIG.num_key_value_heads, -1)
      assert heads[:, -1].tolist() == dead["attention_heads"]
    else:  # one dead head per Mamba group: last within its group
      heads = order.mamba_heads[spec.index].reshape(CONFIG.n_groups, -1)
      assert heads[:, -1].tolist() == dead["mamba_heads"]
      assert order.mamba_head_dim[spec.index][-1] == dead["mamba_head_dim"][0]
      # Dead by a factor of ~100 against the weakest live component.
      scores = importance.mamba_head_dim[spec.index]
      assert scores[dead["mamba_head_dim"][0]] < 0.05 * np.delete(scores, dead["mamba_head_dim"]).min()
  assert importance.num_samples == sum(len(b) for b in CALIBRATION)


# ------------------------------------------------------------------------------------------------ masking
def full_masks(config, batch: int) -> dict:
  """Every mask entry the forward accepts, all ones (so one jitted forward serves every masking below)."""
  ones = lambda n: np.ones((batch, n), np.float32)
  masks = {"hidden": ones(config.hidden_size), "depth": ones(config.num_layers)}
  for spec in config.block_specs():
    if spec.kind == "mlp":
      masks[f"layers_{spec.index}"] = {"mlp": ones(spec.intermediate_size)}
    elif spec.kind == "attention":
      masks[f"layers_{spec.index}"] = {"heads": ones(spec.num_attention_heads)}
    else:
      masks[f"layers_{spec.index}"] = {"ssm_heads": ones(spec.mamba_num_heads),
                                       "mamba_head_dim": ones(spec.mamba_head_dim)}
  return masks


def drop_per_group(size: int, groups: int, count: int, drop_bottom: bool) -> np.ndarray:
  """A 1/0 mask over an importance-ordered axis dropping ``count`` per group: the last (bottom) or first (top)."""
  position = np.arange(size) % (size // groups)
  return (position < size // groups - count) if drop_bottom else (position >= count)


@jax.jit
def _masked_logits(params, tokens, masks):
  return HybridLM(CONFIG).apply({"params": params}, tokens, masks=masks)


@pytest.mark.parametrize("axis", ["hidden", "mlp", "attention_heads", "mamba_heads", "mamba_head_dim", "depth"])
@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_masking_the_bottom_ranked_perturbs_logits_less_than_the_top_ranked(planted, axis, fraction):
  params, _, _, order = planted
  permuted = permute_params(CONFIG, params, order)  # index order == importance order: bottom = suffix
  tokens = np.concatenate(CALIBRATION)
  reference = np.asarray(_masked_logits(permuted, tokens, full_masks(CONFIG, len(tokens))))

  def perturbation(drop_bottom: bool) -> float:
    masks = full_masks(CONFIG, len(tokens))
    for spec in CONFIG.block_specs():
      entry = masks.get(f"layers_{spec.index}")
      if axis == "mlp" and spec.kind == "mlp":
        n = spec.intermediate_size
        entry["mlp"][:] = drop_per_group(n, 1, int(n * fraction), drop_bottom)
      elif axis == "attention_heads" and spec.kind == "attention":
        n, groups = spec.num_attention_heads, CONFIG.num_key_value_heads
        entry["heads"][:] = drop_per_group(n, groups, int(n // groups * fraction), drop_bottom)
      elif axis == "mamba_heads" and spec.kind == "mamba":
        n, groups = spec.mamba_num_heads, CONFIG.n_groups
        entry["ssm_heads"][:] = drop_per_group(n, groups, int(n // groups * fraction), drop_bottom)
      elif axis == "mamba_head_dim" and spec.kind == "mamba":
        n = spec.mamba_head_dim
        entry["mamba_head_dim"][:] = drop_per_group(n, 1, int(n * fraction), drop_bottom)
    if axis == "hidden":
      n = CONFIG.hidden_size
      masks["hidden"][:] = drop_per_group(n, 1, int(n * fraction), drop_bottom)
    elif axis == "depth":  # blocks stay in place: drop the blocks at the end (or start) of the depth order
      count = max(1, int(CONFIG.num_layers * fraction))
      masks["depth"][:, order.depth[-count:] if drop_bottom else order.depth[:count]] = 0.0
    return normalized_mse(np.asarray(_masked_logits(permuted, tokens, masks)), reference)

  bottom, top = perturbation(drop_bottom=True), perturbation(drop_bottom=False)
  assert 0.0 < bottom < top, (bottom, top)


# ------------------------------------------------------------------------------------------------ statistics
def slow_importance(config, params, tokens: np.ndarray) -> dict:
  """Axis scores from activations captured by method interception, aggregated in float64 numpy.

  Independent of the sown statistics: reads the block norm outputs, the up-projection and x projection outputs,
  and the o_proj inputs of an eager forward.
  """
  per_sample = {}  # (block index, statistic) -> mean_t |a| [b, ...]

  def capture(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    path = context.module.path
    if context.method_name != "__call__" or not path or not path[0].startswith("layers_"):
      return out
    block = int(path[0][len("layers_"):])
    watched = {("norm",): ("hidden", out), ("mixer", "up_proj"): ("mlp", out),
               ("mixer", "x_proj"): ("ssm", out), ("mixer", "o_proj"): ("heads", args[0] if args else None)}
    if tuple(path[1:]) in watched:
      name, activation = watched[tuple(path[1:])]
      per_sample[(block, name)] = np.abs(np.asarray(activation, np.float64)).mean(axis=1)
    return out

  with nn.intercept_methods(capture):
    HybridLM(config).apply({"params": params}, tokens)
  aggregated = {key: np.sqrt(np.sum(value ** 2, axis=0)) for key, value in per_sample.items()}
  specs = config.block_specs()
  return {
      "hidden": sum(aggregated[(s.index, "hidden")] for s in specs),
      "mlp": {s.index: aggregated[(s.index, "mlp")] for s in specs if s.kind == "mlp"},
      "attention_heads": {s.index: np.linalg.norm(aggregated[(s.index, "heads")], axis=-1)
                          for s in specs if s.kind == "attention"},
      "mamba_heads": {s.index: np.linalg.norm(aggregated[(s.index, "ssm")], axis=-1)
                      for s in specs if s.kind == "mamba"},
      "mamba_head_dim": {s.index: np.linalg.norm(aggregated[(s.index, "ssm")], axis=0)
                         for s in specs if s.kind == "mamba"},
  }


def test_scores_match_an_independent_slow_path_across_batches():
  params = random_params(CONFIG, seed=3)
  got = estimate_importance(CONFIG, params, iter(CALIBRATION), depth=False, progress=False)  # a one-shot iterator
  want = slow_importance(CONFIG, params, np.concatenate(CALIBRATION))
  np.testing.assert_allclose(got.hidden, want["hidden"], rtol=1e-5)
  for axis in ("mlp", "attention_heads", "mamba_heads", "mamba_head_dim"):
    assert set(getattr(got, axis)) == set(want[axis])
    for block, scores in want[axis].items():
      np.testing.assert_allclose(getattr(got, axis)[block], scores, rtol=1e-5, err_msg=f"{axis}[{block}]")
  assert got.depth_order is None and got.depth_scores is None


def test_calibration_batches_are_checked():
  params = random_params(CONFIG)
  with pytest.raises(ValueError, match="at least one calibration batch"):
    estimate_importance(CONFIG, params, [], progress=False)
  with pytest.raises(ValueError, match=r"calibration batch 1 must be integer tokens \[b, l\]; got float32 \(4,\)"):
    estimate_importance(CONFIG, params, [CALIBRATION[0], np.zeros(4, np.float32)], progress=False)


# ------------------------------------------------------------------------------------------------ depth
def test_depth_removes_a_dead_block_first_and_matches_brute_force_greedy_removal():
  # Heterogeneous widths, and a config no other test compiles, so the compile count below is this call's own.
  config = small_config("M-M*-", vocab_size=48, intermediate_size_per_layer=(16, 40),
                        mamba_num_heads_per_layer=(2, 6), mamba_head_dim_per_layer=(8, 4),
                        num_attention_heads_per_layer=(2,))
  params = jax.tree.map(np.array, random_params(config, seed=1))
  params["layers_2"]["mixer"]["out_proj"]["kernel"][:] = 0.0  # block 2 is the identity
  batches = [np.random.default_rng(i).integers(0, 48, (2, 12)).astype(np.int32) for i in range(2)]
  importance = estimate_importance(config, params, batches, progress=False)
  programs = importance_lib.calibration_programs(config, None, None)  # the one-device programs this call ran
  assert programs.removal_error.jitted._cache_size() == 1  # depth masks are inputs: one compile for all removals
  assert importance.depth_order[-1] == 2 and importance.depth_scores[2] == 0.0
  assert sorted(importance.depth_order.tolist()) == list(range(config.num_layers))
  assert importance.mlp[1].shape == (16,) and importance.mamba_heads[2].shape == (6,)
  assert importance.mamba_head_dim[2].shape == (4,) and importance.attention_heads[3].shape == (2,)

  # Brute force: at every step, the removed block is the one whose removal (on top of the earlier ones) gives the
  # smallest normalized MSE against the full model, and its score is that MSE.
  forward = jax.jit(lambda p, t, depth: HybridLM(config).apply({"params": p}, t, masks={"depth": depth}))
  tokens = np.concatenate(batches)
  full = np.asarray(forward(params, tokens, np.ones((len(tokens), config.num_layers), np.float32)))
  removed: list[int] = []
  for block in importance.depth_order[::-1]:
    candidates = [c for c in range(config.num_layers) if c not in removed]
    errors = {}
    for c in candidates:
      depth = np.ones((len(tokens), config.num_layers), np.float32)
      depth[:, removed + [c]] = 0.0
      errors[c] = normalized_mse(np.asarray(forward(params, tokens, depth)), full)
    assert errors[block] == pytest.approx(min(errors.values()), rel=1e-6, abs=1e-12)
    assert importance.depth_scores[block] == pytest.approx(errors[block], rel=1e-4, abs=1e-12)
    removed.append(int(block))
