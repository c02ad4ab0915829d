"""The elastic axes of MoE blocks: routed experts kept (``moe_experts``), the experts' width (``moe_expert_dim``) and
the shared expert's width (``moe_shared_dim``).

The masked parent computes what the extracted child computes (fp32), homogeneous and per layer, with group-limited
routing (n_group > 1, topk_group < n_group), with and without a shared expert and a latent projection; the child's
leaves sum to the analytic count and its active count is the leaves minus the routed experts a token does not use;
dropped experts are never chosen; permuting into importance order keeps the logits, and the expert scores equal a
slow reference written here; spaces and choices the routing rules forbid are refused.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_params, small_config
from elastic_jax.elastic import masks as masks_lib
from elastic_jax.elastic.extract import child_config, extract
from elastic_jax.elastic.importance import Rankings, estimate_importance, rankings
from elastic_jax.elastic.param_count import (active_param_count, choice_param_count, expected_param_count,
                                             param_count)
from elastic_jax.elastic.permute import RankingError, check_rankings, permute_params
from elastic_jax.elastic.router import RouterSchedule
from elastic_jax.elastic.space import Choice, ElasticSpace, SpaceError
from elastic_jax.model import HybridLM
from elastic_jax.model.config import ConfigError
from elastic_jax.model.moe import route
from elastic_jax.train.elastic_step import ElasticSetup

LOGIT_ATOL = 1e-4
SEQ_LEN = 9
# 12 experts in 3 groups of 4; a token picks 3 experts from its 2 best groups. A group is scored by its two best
# experts, so each group keeps 2, 3 or 4 experts (and 2 groups x 2 >= 3 = k): 6, 9 or 12 in all.
ROUTING = dict(n_routed_experts=12, n_group=3, topk_group=2, num_experts_per_tok=3, moe_intermediate_size=12,
               moe_shared_expert_intermediate_size=16, n_shared_experts=1)
KEPT_PER_GROUP = (2, 3, 4)
NO_SHARED = dict(moe_shared_expert_intermediate_size=0, n_shared_experts=0)
VARIANTS = {
    "shared_latent": dict(moe_latent_size=10),
    "shared": {},
    "latent": dict(moe_latent_size=10, **NO_SHARED),
    "plain": NO_SHARED,
}


@functools.lru_cache(maxsize=None)
def moe_parent(variant: str, pattern: str = "ME-E"):
  """Two E blocks (per-layer sizes possible) around a Mamba and an MLP block."""
  return small_config(pattern, chunk_size=4, ssd_impl="oracle", **{**ROUTING, **VARIANTS[variant]})


@functools.lru_cache(maxsize=None)
def parent_params(variant: str):
  return jax.tree.map(np.asarray, random_params(moe_parent(variant), seed=21))


@functools.lru_cache(maxsize=None)
def forward(config):
  return jax.jit(lambda params, tokens, masks: HybridLM(config).apply({"params": params}, tokens, masks=masks))


def child_logits(config, params, tokens: np.ndarray) -> np.ndarray:
  fn = jax.jit(lambda p, t: HybridLM(config).apply({"params": p}, t))
  compiled = fn.lower(params, tokens).compile(compiler_options={"xla_backend_optimization_level": 0})
  return np.asarray(compiled(params, tokens))


def random_choice(config, rng: np.random.Generator, heterogeneous: bool) -> Choice:
  """A random sub-network: the MoE axes always, hidden channels and depth every other draw."""
  full = Choice.full(config)
  blocks = len(full.moe_experts)
  draw = lambda values: tuple(int(v) for v in np.resize(values, blocks))
  n = blocks if heterogeneous else 1
  sizes = dict(moe_experts=draw(config.n_group * rng.choice(KEPT_PER_GROUP, n)),
               moe_expert_dim=draw(rng.integers(1, config.moe_intermediate_size + 1, n)))
  if config.moe_shared_expert_intermediate_size:
    sizes["moe_shared_dim"] = draw(rng.integers(1, config.moe_shared_expert_intermediate_size + 1, n))
  if rng.integers(2):
    sizes["hidden"] = int(rng.integers(8, config.hidden_size + 1))
    sizes["depth"] = int(rng.integers(2, config.num_layers + 1))
  return Choice(**{**full.to_dict(), **sizes})


def unused_expert_params(config, child) -> int:
  """Counted from the child's own leaves: per E block, the routed experts' share a token does not use."""
  unused = 0
  for spec in config.block_specs():
    if spec.kind == "moe":
      experts = child[f"layers_{spec.index}"]["mixer"]["experts"]
      per_expert = sum(np.size(x) for x in jax.tree.leaves(experts)) // spec.n_routed_experts
      unused += (spec.n_routed_experts - config.num_experts_per_tok) * per_expert
  return unused


# ---------------------------------------------------------------------------------------------------- masked == sliced
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_masked_parent_equals_extracted_child(variant):
  """Eight sub-networks per variant (32 in all), four homogeneous and four per layer, one masked batch each."""
  config, params = moe_parent(variant), parent_params(variant)
  rng = np.random.default_rng(sorted(VARIANTS).index(variant))
  choices = [random_choice(config, rng, heterogeneous=i % 2 == 1) for i in range(8)]
  order = [int(i) for i in rng.permutation(config.num_layers)]
  tokens = rng.integers(0, config.vocab_size, (len(choices), SEQ_LEN)).astype(np.int32)
  masked = np.asarray(forward(config)(params, tokens, masks_lib.choice_masks(config, choices, order)))
  worst = 0.0
  for row, choice in enumerate(choices):
    child_cfg, child = extract(config, params, choice, order)
    assert child_cfg == child_config(config, choice, order)
    moe_blocks = [s.index for s in config.block_specs() if s.kind == "moe"]
    kept = [k for k, j in enumerate(moe_blocks) if j in order[:choice.depth]]
    assert [s.n_routed_experts for s in child_cfg.block_specs() if s.kind == "moe"] == [
        choice.moe_experts[k] for k in kept]
    ours = child_logits(child_cfg, child, tokens[row:row + 1])
    diff = float(np.max(np.abs(masked[row:row + 1] - ours)))
    assert diff < LOGIT_ATOL, f"{choice} order={order}: masked parent vs child max |diff| {diff:.2e}"
    assert float(np.max(np.abs(ours))) > 0.5
    worst = max(worst, diff)
    leaves = sum(np.size(x) for x in jax.tree.leaves(child))
    assert choice_param_count(config, choice, order) == param_count(child_cfg) == leaves
    assert choice_param_count(config, choice, order, active=True) == active_param_count(child_cfg) == (
        leaves - unused_expert_params(child_cfg, child))
  print(f"{variant}: max |masked - child| = {worst:.2e}")


def test_a_child_with_fewer_experts_is_not_the_parent():
  """The sweep above means something: dropping experts changes the logits (the tokens route elsewhere)."""
  config, params = moe_parent("plain"), parent_params("plain")
  tokens = np.random.default_rng(1).integers(0, config.vocab_size, (1, SEQ_LEN)).astype(np.int32)
  full = np.asarray(forward(config)(params, tokens, masks_lib.choice_masks(config, Choice.full(config))))
  small = Choice.homogeneous(config, moe_experts=6)
  masked = np.asarray(forward(config)(params, tokens, masks_lib.choice_masks(config, small)))
  assert float(np.max(np.abs(full - masked))) > 1e-2


# ---------------------------------------------------------------------------------------------------- routing
def test_dropped_experts_are_never_selected():
  """Prefix masks (two kept per group) and a mask dropping a whole group: no token chooses a dropped expert, a
  dropped group is never among the chosen groups, and with a prefix mask the routing equals the child's (the
  sliced router) index for index and weight for weight. Without the mask the same tokens do choose those experts."""
  config = small_config("E", n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3,
                        moe_intermediate_size=4, moe_shared_expert_intermediate_size=0, n_shared_experts=0)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(256, config.hidden_size)).astype(np.float32)
  kernel = rng.normal(size=(config.hidden_size, 16)).astype(np.float32)
  bias = rng.normal(0.0, 0.3, 16).astype(np.float32)
  prefix = np.tile([1, 1, 0, 0], 4).astype(np.float32)
  no_group_1 = np.ones(16, np.float32)
  no_group_1[4:8] = 0
  for mask in (prefix, no_group_1):
    masked_weights, masked_indices = map(np.asarray, route(config, x, kernel, bias, np.tile(mask, (256, 1))))
    _, free_indices = map(np.asarray, route(config, x, kernel, bias))
    dropped = np.flatnonzero(mask == 0)
    assert not np.isin(masked_indices, dropped).any()
    assert np.isin(free_indices, dropped).any()
    groups = masked_indices // 4
    assert all(len(set(row)) <= config.topk_group for row in groups.tolist())
  kept = np.flatnonzero(prefix)
  child = config.replace(n_routed_experts=8)
  child_weights, child_indices = map(np.asarray, route(child, x, kernel[:, kept], bias[kept]))
  masked_weights, masked_indices = map(np.asarray, route(config, x, kernel, bias, np.tile(prefix, (256, 1))))
  np.testing.assert_array_equal(masked_indices, kept[child_indices])
  np.testing.assert_allclose(masked_weights, child_weights, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------- importance
def reference_moe_statistics(config, params, tokens: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray]]:
  """Per E block, sqrt(Σ_samples stat²) of (mean_t of each expert's output norm [E], mean_t |up output| [E, I]),
  by a token-by-token loop: group scores, group choice and top-k by sorting, each chosen expert run alone."""
  _, state = HybridLM(config).apply({"params": params}, tokens, capture_intermediates=True,
                                    mutable=["intermediates"])
  out = {}
  for spec in config.block_specs():
    if spec.kind != "moe":
      continue
    block = params[f"layers_{spec.index}"]["mixer"]
    x = np.asarray(state["intermediates"][f"layers_{spec.index}"]["norm"]["__call__"][0], np.float64)
    e, per_group = spec.n_routed_experts, spec.n_routed_experts // config.n_group
    expert_sums, neuron_sums = np.zeros(e), np.zeros((e, spec.moe_intermediate_size))
    for sample in range(tokens.shape[0]):
      expert_stat, neuron_stat = np.zeros(e), np.zeros((e, spec.moe_intermediate_size))
      for t in range(tokens.shape[1]):
        u = x[sample, t]
        choice = 1 / (1 + np.exp(-(u @ block["gate"]["kernel"]))) + block["gate"]["e_score_correction_bias"]
        group_score = [np.sum(np.sort(choice[g * per_group:(g + 1) * per_group])[-2:]) for g in range(config.n_group)]
        groups = np.argsort(group_score)[::-1][:config.topk_group]
        allowed = [j for j in range(e) if j // per_group in groups]
        chosen = sorted(allowed, key=lambda j: -choice[j])[:config.num_experts_per_tok]
        v = u if config.moe_latent_size is None else u @ block["fc1_latent_proj"]["kernel"]
        for j in chosen:
          hidden = v @ block["experts"]["up_proj"][j]
          expert_out = np.maximum(hidden, 0) ** 2 @ block["experts"]["down_proj"][j]
          expert_stat[j] += np.linalg.norm(expert_out) / tokens.shape[1]
          neuron_stat[j] += np.abs(hidden) / tokens.shape[1]
      expert_sums += expert_stat ** 2
      neuron_sums += neuron_stat ** 2
    out[spec.index] = (np.sqrt(expert_sums), np.sqrt(neuron_sums))
  return out


@pytest.mark.parametrize("variant", ["shared_latent", "plain"])
def test_importance_scores_and_permutation_keep_the_logits(variant):
  """Expert scores (routing frequency x mean output norm) and expert-neuron scores (L2 over experts of the up
  output) equal the slow reference; the rankings keep experts in their groups; permuting every axis (experts,
  their neurons, the shared expert's neurons, hidden channels and the other blocks' axes) keeps the logits."""
  config, params = moe_parent(variant), parent_params(variant)
  tokens = np.random.default_rng(5).integers(0, config.vocab_size, (2, 8)).astype(np.int32)
  importance = estimate_importance(config, params, [tokens], depth=False, progress=False)
  reference = reference_moe_statistics(config, params, tokens)
  for index, (experts, neurons) in reference.items():
    np.testing.assert_allclose(importance.moe_experts[index], experts, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(importance.moe_expert_dim[index], np.linalg.norm(neurons, axis=0), rtol=1e-4,
                               atol=1e-6)
  assert set(importance.moe_shared_dim) == ({1, 3} if config.moe_shared_expert_intermediate_size else set())
  order = rankings(importance, config)
  for index in (1, 3):
    experts = order.moe_experts[index]
    assert not np.array_equal(experts, np.arange(12))
    assert [int(j) // 4 for j in experts] == [g for g in range(3) for _ in range(4)]  # within groups
    assert not np.array_equal(order.moe_expert_dim[index], np.arange(12))
  permuted = permute_params(config, params, order)
  model = HybridLM(config)
  np.testing.assert_allclose(model.apply({"params": permuted}, tokens), model.apply({"params": params}, tokens),
                             atol=1e-5, rtol=1e-5)
  block = params["layers_1"]["mixer"]
  np.testing.assert_array_equal(permuted["layers_1"]["mixer"]["gate"]["e_score_correction_bias"],
                                block["gate"]["e_score_correction_bias"][order.moe_experts[1]])
  down = block["experts"]["down_proj"][order.moe_experts[1]][:, order.moe_expert_dim[1]]
  if config.moe_latent_size is None:  # the experts write hidden channels, reordered too
    down = down[:, :, order.hidden]
  np.testing.assert_array_equal(permuted["layers_1"]["mixer"]["experts"]["down_proj"], down)


def test_rankings_that_move_an_expert_across_groups_are_refused():
  config = moe_parent("plain")
  order = Rankings.identity(config)
  moved = {**order.moe_experts, 1: np.roll(np.arange(12), 1)}
  with pytest.raises(RankingError, match="puts routed expert 11 .expert group 2. at position 0 .expert group 0."):
    check_rankings(config, Rankings(**{**order.fields(), "moe_experts": moved}))


# ---------------------------------------------------------------------------------------------------- counts
@pytest.mark.parametrize("active", [False, True])
def test_expected_count_of_one_hot_choices_equals_the_exact_count(active):
  """Per-layer MoE axes: the router's differentiable count at one-hot probabilities is the exact count of that
  choice's child, total or active; the masks of one-hot weights are that choice's masks."""
  config = moe_parent("shared_latent")
  space = ElasticSpace.from_dict(dict(moe_experts=[6, 9, 12], moe_expert_dim=[4, 12], moe_shared_dim=[8, 16],
                                      hidden=[16, 32], depth=[3, 4], moe_mode="heterogeneous"), config)
  order = [2, 0, 3, 1]
  one_hot = lambda index, n: np.eye(n)[np.asarray(index)][None]
  for picks in ((0, [2, 0], [1, 0], [0, 1], 1), (1, [1, 1], [0, 1], [1, 0], 0)):
    hidden, experts, width, shared, depth = picks
    probs = {"hidden": one_hot(hidden, 2), "moe_experts": one_hot(experts, 3), "moe_expert_dim": one_hot(width, 2),
             "moe_shared_dim": one_hot(shared, 2), "depth": one_hot(depth, 2)}
    choice = Choice(**{**Choice.full(config).to_dict(), "hidden": space.hidden[hidden], "depth": space.depth[depth],
                       "moe_experts": tuple(space.moe_experts[i] for i in experts),
                       "moe_expert_dim": tuple(space.moe_expert_dim[i] for i in width),
                       "moe_shared_dim": tuple(space.moe_shared_dim[i] for i in shared)})
    choice.validate(config, space)
    assert float(expected_param_count(config, space, probs, order, active=active)[0]) == pytest.approx(
        choice_param_count(config, choice, order, active=active), rel=1e-6)
    weighted = masks_lib.masks_from_weights(config, space, probs, order)
    exact = masks_lib.choice_masks(config, choice, order)
    for key, mask in weighted.items():
      for name, value in (mask.items() if isinstance(mask, dict) else [(None, mask)]):
        np.testing.assert_array_equal(value, exact[key] if name is None else exact[key][name])


def test_active_params_budget_metric():
  """budget_metric="active_params": budgets are fractions of the parameters a token computes with."""
  config = moe_parent("shared")
  space = ElasticSpace.from_fractions(config, (0.5, 1.0), axis_names=("moe_experts", "moe_expert_dim"))
  assert space.moe_experts == (6, 12) and space.moe_expert_dim == (6, 12)
  setup = ElasticSetup(config, space, (1.0, 0.5), (0, 1, 2, 3), RouterSchedule(total_steps=1),
                       budget_metric="active_params")
  assert setup.parent_size == active_param_count(config) < param_count(config)
  probs = {"moe_experts": np.array([[1.0, 0.0]]), "moe_expert_dim": np.array([[1.0, 0.0]])}
  choice = Choice.homogeneous(config, moe_experts=6, moe_expert_dim=6)
  assert float(setup.expected_size(probs, np.arange(4))[0]) == pytest.approx(
      choice_param_count(config, choice, active=True), rel=1e-6)
  with pytest.raises(ValueError, match=r"budget_metric='active' is not one of \('params', 'active_params', "):
    ElasticSetup(config, space, (1.0,), (0, 1, 2, 3), RouterSchedule(total_steps=1), budget_metric="active")


# ---------------------------------------------------------------------------------------------------- refusals
def test_spaces_and_choices_the_routing_rules_forbid_are_refused():
  config = moe_parent("shared")
  with pytest.raises(SpaceError, match="moe_experts candidate 4 is not a multiple of n_group=3"):
    ElasticSpace.from_dict({"moe_experts": [4, 12]}, config)
  with pytest.raises(SpaceError, match=r"moe_experts candidate 3 is below 6, the fewest routed experts a moe block "
                                       r"can keep \(each of n_group=3 expert groups keeps 2"):
    ElasticSpace.from_dict({"moe_experts": [3, 12]}, config)
  with pytest.raises(SpaceError, match=r"Choice.moe_experts\[1\] 3 is below 6"):
    Choice(**{**Choice.full(config).to_dict(), "moe_experts": (12, 3)}).validate(config)
  with pytest.raises(SpaceError, match="moe_experts count 3 for layers_3 is below 6"):
    masks_lib.masks_from_counts(config, {"moe_experts": np.array([[12, 3]])})
  with pytest.raises(SpaceError, match="moe_expert_dim candidate 13 is larger than the parent's"):
    ElasticSpace.from_dict({"moe_expert_dim": [13]}, config)
  # One expert per group cannot be scored by its two best; k=3 cannot come from 2 groups of 1 either.
  assert ElasticSpace.from_fractions(config, (0.25, 0.5, 1.0)).moe_experts == (6, 12)
  plain = moe_parent("plain")
  with pytest.raises(SpaceError, match=r"moe_shared_dim has candidates \[8\] but the parent's moe blocks have "
                                       r"moe_shared_expert_intermediate_size=0"):
    ElasticSpace.from_dict({"moe_shared_dim": [8]}, plain)
  assert ElasticSpace.from_fractions(plain).moe_shared_dim == ()
  with pytest.raises(ConfigError, match="MoE block 3: n_routed_experts=3 over n_group=3 leaves 1 expert per group"):
    plain.replace(n_routed_experts_per_layer=(12, 3))


def test_choices_without_moe_axes_still_load():
  """A choice or rankings file written before the MoE axes existed reads as empty MoE axes (parents without E
  blocks accept it); a parent with E blocks names the missing sizes."""
  config = small_config("M-*")
  stored = {k: v for k, v in Choice.full(config).to_dict().items() if not k.startswith("moe_")}
  assert Choice.from_dict(stored) == Choice.full(config)
  with pytest.raises(SpaceError, match=r"Choice.moe_experts has 0 entries but pattern='ME-E' has 2 moe blocks"):
    Choice.from_dict({**stored, "mlp": (48,), "mamba_heads": (4,), "mamba_head_dim": (8,),
                      "attention_heads": ()}).validate(moe_parent("plain"))
  assert child_config(config, Choice.full(config)) == config


# ---------------------------------------------------------------------------------------------------- training
def test_the_elastic_step_routes_the_moe_axes_with_one_compile():
  """The train step on an MoE parent, per-layer MoE axes, budgets in active parameters: one compile serves every
  budget draw, losses stay finite, and with no router loss the router's MoE logits still learn, from the KD loss
  alone (the chosen experts' weights carry the straight-through mask)."""
  import optax  # pylint: disable=import-outside-toplevel
  from elastic_jax.train.elastic_step import init_elastic_state, make_elastic_step  # pylint: disable=C0415
  config = moe_parent("shared_latent")
  space = ElasticSpace.from_dict(dict(moe_experts=[6, 9, 12], moe_expert_dim=[6, 12], moe_shared_dim=[8, 16],
                                      moe_mode="heterogeneous"), config)
  setup = ElasticSetup(config, space, (1.0, 0.6), (0, 1, 2, 3), RouterSchedule(total_steps=10), router_width=16,
                       budget_metric="active_params", router_loss_weight=0.0)
  tx, router_tx = optax.sgd(1e-3), optax.sgd(1.0)
  teacher = jax.tree.map(jnp.asarray, parent_params("shared_latent"))
  state = init_elastic_state(setup, jax.tree.map(jnp.copy, teacher), tx, router_tx, seed=0)
  before = state.router_params
  step = jax.jit(make_elastic_step(setup, tx, router_tx))
  for i in range(3):
    tokens = jax.random.randint(jax.random.key(i), (4, 10), 0, config.vocab_size)
    state, metrics = step(state, teacher, tokens, jnp.asarray([0.5, 0.5]))
    assert np.isfinite(float(metrics["loss"]))
  assert step._cache_size() == 1  # pylint: disable=protected-access
  for axis in ("moe_experts", "moe_expert_dim", "moe_shared_dim"):
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                         state.router_params[axis], before[axis])
    assert max(jax.tree.leaves(moved)) > 0, axis
