"""Nested masks and extraction: the masked parent computes exactly what the extracted child computes (spec D-2).

The reference for every mask is a loop written here from the spec's wording (first k units of each group), not the
library's vectorised rule. For extraction the reference is the child itself: a plain ``HybridLM`` with a smaller
config and sliced weights, run on its own. One jitted masked-parent forward serves every case (masks are inputs);
children compile per shape, so the sweep uses a tiny parent with two blocks of each kind, compiles children at
XLA's lowest optimisation level and runs the Mamba scan with the token-by-token oracle (cheapest to compile; masks act
outside the scan, and a few cases repeat the check with the chunked scan).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_params, small_config
from elastic_jax.elastic import masks as masks_lib
from elastic_jax.elastic.extract import child_config, extract, extract_params
from elastic_jax.elastic.space import Choice, ElasticSpace, SpaceError
from elastic_jax.model import HybridLM, param_shapes

LOGIT_ATOL = 1e-4
SEQ_LEN = 9  # chunk 4: the scan spans several chunks and a ragged last one
# Two blocks of every kind, so that heterogeneous widths are possible.
PARENT = small_config("M-*M-*", chunk_size=4, ssd_impl="oracle")
PARENT_CHUNKED = PARENT.replace(ssd_impl="chunked")
AXES = ("hidden", "mlp", "attention_heads", "mamba_heads", "mamba_head_dim", "depth")


# ---------------------------------------------------------------------------------------------------- references
def reference_prefix(count: int, size: int, groups: int = 1) -> np.ndarray:
  """The spec's rule spelled out: each of ``groups`` contiguous groups keeps its first ``count // groups`` units."""
  mask = np.zeros(size, np.float32)
  per_group = size // groups
  for g in range(groups):
    for j in range(count // groups):
      mask[g * per_group + j] = 1.0
  return mask


def reference_depth(count: int, order: list[int], num_layers: int) -> np.ndarray:
  mask = np.zeros(num_layers, np.float32)
  for block in order[:count]:
    mask[block] = 1.0
  return mask


# ---------------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def parent_params():
  # numpy: slicing numpy arrays is free, whereas every new slice shape of a JAX array compiles an XLA op.
  return jax.tree.map(np.asarray, random_params(PARENT, seed=3))


@functools.lru_cache(maxsize=None)
def parent_forward(config=PARENT):
  return jax.jit(lambda params, tokens, masks: HybridLM(config).apply({"params": params}, tokens, masks=masks))


_CHILD_FORWARDS = {}


def child_logits(config, params, tokens: np.ndarray) -> np.ndarray:
  """A child's forward, compiled once per child shape at -O0 (compile time dominates on CPU, not run time)."""
  key = (config, tokens.shape)
  if key not in _CHILD_FORWARDS:
    fn = jax.jit(lambda p, t: HybridLM(config).apply({"params": p}, t))
    _CHILD_FORWARDS[key] = fn.lower(params, tokens).compile(compiler_options={"xla_backend_optimization_level": 0})
  return np.asarray(_CHILD_FORWARDS[key](params, tokens))


def random_choice(rng: np.random.Generator, axes, heterogeneous: bool) -> Choice:
  """A random sub-network of PARENT changing only ``axes`` (others stay full)."""
  full = Choice.full(PARENT)
  def draw(axis: str) -> tuple[int, ...]:
    n = len(getattr(full, axis))
    count = n if heterogeneous else 1
    if axis == "mlp":
      values = rng.integers(1, PARENT.intermediate_size + 1, count)
    elif axis == "attention_heads":
      values = PARENT.num_key_value_heads * rng.integers(1, 3, count)
    elif axis == "mamba_heads":
      values = PARENT.n_groups * rng.integers(1, 3, count)
    else:
      values = rng.integers(1, PARENT.mamba_head_dim + 1, count)
    return tuple(int(v) for v in np.resize(values, n))
  return Choice(
      hidden=int(rng.integers(1, PARENT.hidden_size + 1)) if "hidden" in axes else full.hidden,
      mlp=draw("mlp") if "mlp" in axes else full.mlp,
      attention_heads=draw("attention_heads") if "attention_heads" in axes else full.attention_heads,
      mamba_heads=draw("mamba_heads") if "mamba_heads" in axes else full.mamba_heads,
      mamba_head_dim=draw("mamba_head_dim") if "mamba_head_dim" in axes else full.mamba_head_dim,
      depth=int(rng.integers(1, PARENT.num_layers + 1)) if "depth" in axes else full.depth)


def check_masked_equals_child(params, choices: list[Choice], order: list[int], seed: int,
                              parent=PARENT) -> float:
  """Runs the masked parent on a batch (row i under choices[i]) and each row's child alone; returns max |diff|.

  All rows share the depth order (the ranking is a property of the parent, the depth count is per sample).
  """
  tokens = np.random.default_rng(seed).integers(0, parent.vocab_size, (len(choices), SEQ_LEN)).astype(np.int32)
  masks = masks_lib.choice_masks(parent, choices, order)
  masked = np.asarray(parent_forward(parent)(params, tokens, masks))
  worst = 0.0
  for row, choice in enumerate(choices):
    config, child = extract(parent, params, choice, order)
    assert child_config(parent, choice, order) == config
    ours = child_logits(config, child, tokens[row:row + 1])
    diff = float(np.max(np.abs(masked[row:row + 1] - ours)))
    assert diff < LOGIT_ATOL, f"{choice} order={order}: masked parent vs child max |diff| {diff:.2e}"
    assert float(np.max(np.abs(ours))) > 0.5  # logits carry signal
    worst = max(worst, diff)
  return worst


# ---------------------------------------------------------------------------------------------------- masks
def test_prefix_masks_match_the_spec_rule():
  for size, groups in ((8, 1), (12, 3), (16, 4), (6, 6)):
    for count in range(0, size + 1, groups):
      np.testing.assert_array_equal(masks_lib.prefix_mask(count, size, groups), reference_prefix(count, size, groups))
  order = [4, 1, 5, 0, 3, 2]
  for count in range(7):
    np.testing.assert_array_equal(masks_lib.depth_mask(count, order, 6), reference_depth(count, order, 6))



def test_depth_ranks_invert_the_order_also_when_traced():
  rng = np.random.default_rng(3)
  ranks_jit = jax.jit(masks_lib.depth_ranks, static_argnums=1)
  for num_layers in (1, 6, 13):
    order = rng.permutation(num_layers)
    expected = np.empty(num_layers, np.int32)
    expected[order] = np.arange(num_layers)  # block order[i] has rank i
    for ranks in (masks_lib.depth_ranks(order, num_layers), ranks_jit(order, num_layers)):
      assert ranks.dtype == jnp.int32
      np.testing.assert_array_equal(ranks, expected)

def test_choice_masks_layout_and_values():
  choice = Choice(hidden=20, mlp=(7, 48), attention_heads=(2, 4), mamba_heads=(2, 4), mamba_head_dim=(3, 8),
                  depth=4)
  order = [5, 0, 3, 1, 2, 4]
  masks = masks_lib.choice_masks(PARENT, choice, order)
  assert set(masks) == {"hidden", "depth", *(f"layers_{i}" for i in range(6))}
  np.testing.assert_array_equal(masks["hidden"], reference_prefix(20, 32)[None])
  np.testing.assert_array_equal(masks["depth"], reference_depth(4, order, 6)[None])
  np.testing.assert_array_equal(masks["layers_0"]["ssm_heads"], reference_prefix(2, 4, 2)[None])  # 1 per group
  np.testing.assert_array_equal(masks["layers_0"]["mamba_head_dim"], reference_prefix(3, 8)[None])
  np.testing.assert_array_equal(masks["layers_3"]["ssm_heads"], np.ones((1, 4)))
  np.testing.assert_array_equal(masks["layers_1"]["mlp"], reference_prefix(7, 48)[None])
  np.testing.assert_array_equal(masks["layers_2"]["heads"], reference_prefix(2, 4, 2)[None])  # 1 per KV group
  assert masks["layers_0"]["ssm_heads"].shape == (1, 4)


def test_traced_counts_equal_python_counts_with_one_compile():
  traces = []

  @jax.jit
  def build(hidden, mlp, heads, ssm_heads, ssm_dim, depth, order):
    traces.append(1)
    return masks_lib.masks_from_counts(PARENT, {"hidden": hidden, "mlp": mlp, "attention_heads": heads,
                                                "mamba_heads": ssm_heads, "mamba_head_dim": ssm_dim,
                                                "depth": depth}, depth_order=order)

  order = np.array([2, 0, 1, 5, 4, 3], np.int32)
  rng = np.random.default_rng(0)
  for _ in range(4):
    counts = dict(hidden=int(rng.integers(1, 33)), mlp=[int(v) for v in rng.integers(1, 49, 2)],
                  attention_heads=[2 * int(v) for v in rng.integers(1, 3, 2)],
                  mamba_heads=[2 * int(v) for v in rng.integers(1, 3, 2)],
                  mamba_head_dim=[int(v) for v in rng.integers(1, 9, 2)], depth=int(rng.integers(1, 7)))
    python = masks_lib.masks_from_counts(PARENT, {k: np.array([v]) for k, v in counts.items()}, order.tolist())
    traced = build(*(jnp.asarray([v], jnp.int32) for v in counts.values()), jnp.asarray(order))
    jax.tree.map(np.testing.assert_array_equal, python, traced)
    np.testing.assert_array_equal(traced["layers_4"]["mlp"][0], reference_prefix(counts["mlp"][1], 48))
  assert len(traces) == 1


def test_per_sample_and_per_layer_count_shapes():
  counts = {"hidden": np.array([32, 8, 16]), "mlp": np.array([[1, 48], [5, 6], [48, 48]]), "mamba_heads": 2}
  masks = masks_lib.masks_from_counts(PARENT, counts)
  assert masks["hidden"].shape == (3, 32)
  for row, (h, (m1, m2)) in enumerate(zip(counts["hidden"], counts["mlp"])):
    np.testing.assert_array_equal(masks["hidden"][row], reference_prefix(h, 32))
    np.testing.assert_array_equal(masks["layers_1"]["mlp"][row], reference_prefix(m1, 48))
    np.testing.assert_array_equal(masks["layers_4"]["mlp"][row], reference_prefix(m2, 48))
    np.testing.assert_array_equal(masks["layers_3"]["ssm_heads"][row], reference_prefix(2, 4, 2))
  assert "layers_2" not in masks and "depth" not in masks  # absent axes stay full
  assert masks_lib.masks_from_counts(PARENT, {"hidden": 4}, batch_size=5)["hidden"].shape == (5, 32)


def test_weighted_masks_are_mixtures_of_candidate_masks():
  space = ElasticSpace.from_dict({"hidden": [8, 16, 32], "mlp": [12, 48], "mamba_heads": [2, 4],
                                  "depth": [2, 6], "mlp_mode": "heterogeneous"}, PARENT)
  order = [1, 0, 2, 3, 5, 4]
  probs = {"hidden": np.array([[0.2, 0.3, 0.5]]), "mlp": np.array([[[0.9, 0.1], [0.4, 0.6]]]),
           "mamba_heads": np.array([[0.25, 0.75]]), "depth": np.array([[0.7, 0.3]])}
  soft = masks_lib.masks_from_weights(PARENT, space, probs, order)
  np.testing.assert_allclose(soft["hidden"][0], 0.2 * reference_prefix(8, 32) + 0.3 * reference_prefix(16, 32)
                             + 0.5 * reference_prefix(32, 32), rtol=1e-6)
  np.testing.assert_allclose(soft["layers_1"]["mlp"][0], 0.9 * reference_prefix(12, 48) + 0.1, rtol=1e-6)
  np.testing.assert_allclose(soft["layers_4"]["mlp"][0], 0.4 * reference_prefix(12, 48) + 0.6, rtol=1e-6)
  np.testing.assert_allclose(soft["layers_3"]["ssm_heads"][0], 0.25 * reference_prefix(2, 4, 2) + 0.75, rtol=1e-6)
  np.testing.assert_allclose(soft["depth"][0], 0.7 * reference_depth(2, order, 6) + 0.3, rtol=1e-6)
  # One-hot weights give the hard masks of the chosen candidates, and a router's [b, 1, n] row serves all blocks.
  one_hot = {"hidden": np.array([[0, 1, 0]]), "mlp": np.array([[[1, 0]]]), "depth": np.array([[1, 0]])}
  hard = masks_lib.masks_from_weights(PARENT, space, one_hot, order)
  expected = masks_lib.masks_from_counts(PARENT, {"hidden": 16, "mlp": 12, "depth": 2}, order)
  jax.tree.map(np.testing.assert_array_equal, hard, expected)


def test_mask_errors_name_the_axis():
  with pytest.raises(SpaceError, match="mamba_heads count 3 for layers_0 is not a multiple of n_groups=2"):
    masks_lib.masks_from_counts(PARENT, {"mamba_heads": 3})
  with pytest.raises(SpaceError, match="attention_heads count 3 for layers_2 is not a multiple of "
                                       "num_key_value_heads=2"):
    masks_lib.masks_from_counts(PARENT, {"attention_heads": np.array([[2, 3]])[:, ::-1]})
  with pytest.raises(SpaceError, match=r"hidden count 33 for the model is outside \[0, 32\]"):
    masks_lib.masks_from_counts(PARENT, {"hidden": 33})
  with pytest.raises(SpaceError, match="needs depth_order"):
    masks_lib.masks_from_counts(PARENT, {"depth": 3})
  with pytest.raises(SpaceError, match="depth_order must be a permutation"):
    masks_lib.masks_from_counts(PARENT, {"depth": 3}, depth_order=[0, 0, 1, 2, 3, 4])
  with pytest.raises(SpaceError, match="disagree on the batch size"):
    masks_lib.masks_from_counts(PARENT, {"hidden": np.array([1, 2]), "mlp": np.array([1, 2, 3])})
  with pytest.raises(SpaceError, match="unknown axis name"):
    masks_lib.masks_from_counts(PARENT, {"heads": 2})
  with pytest.raises(SpaceError, match="mlp counts have 3 columns but pattern='M-\\*M-\\*' has 2 mlp blocks"):
    masks_lib.masks_from_counts(PARENT, {"mlp": np.ones((1, 3), np.int32)})


# ---------------------------------------------------------------------------------------------------- masked == sliced
@pytest.mark.parametrize("axis", AXES)
def test_each_axis_alone(parent_params, axis):
  rng = np.random.default_rng(100 + AXES.index(axis))
  worst = 0.0
  for case in range(3):  # per-layer axes: one homogeneous and two heterogeneous draws
    choice = random_choice(rng, {axis}, heterogeneous=case > 0)
    order = [int(i) for i in rng.permutation(PARENT.num_layers)]
    worst = max(worst, check_masked_equals_child(parent_params, [choice], order, seed=case))
  print(f"{axis}: max |masked - child| = {worst:.2e}")


@pytest.mark.parametrize("heterogeneous", [False, True])
def test_all_axes_together(parent_params, heterogeneous):
  rng = np.random.default_rng(7 + heterogeneous)
  worst = 0.0
  for case in range(9):
    choice = random_choice(rng, set(AXES), heterogeneous)
    order = [int(i) for i in rng.permutation(PARENT.num_layers)]
    worst = max(worst, check_masked_equals_child(parent_params, [choice], order, seed=10 + case))
  print(f"heterogeneous={heterogeneous}: max |masked - child| = {worst:.2e}")


def test_all_axes_with_the_chunked_scan(parent_params):
  rng = np.random.default_rng(11)
  order = [int(i) for i in rng.permutation(PARENT.num_layers)]
  choices = [random_choice(rng, set(AXES), heterogeneous=True) for _ in range(3)]
  worst = check_masked_equals_child(parent_params, choices, order, seed=4, parent=PARENT_CHUNKED)
  print(f"chunked scan: max |masked - child| = {worst:.2e}")


@pytest.mark.parametrize("seed", [0, 1])
def test_per_sample_budgets_in_one_batch(parent_params, seed):
  """Six rows, six sub-networks, one masked forward: each row equals its own child."""
  rng = np.random.default_rng(1000 + seed)
  order = [int(i) for i in rng.permutation(PARENT.num_layers)]
  choices = [random_choice(rng, set(AXES), heterogeneous=bool(i % 2)) for i in range(5)] + [Choice.full(PARENT)]
  worst = check_masked_equals_child(parent_params, choices, order, seed=seed)
  print(f"mixed batch {seed}: max |masked - child| = {worst:.2e}")


def test_extracted_shapes_and_config(parent_params):
  choice = Choice(hidden=20, mlp=(7, 30), attention_heads=(2, 2), mamba_heads=(2, 4), mamba_head_dim=(3, 8),
                  depth=4)
  order = [5, 0, 3, 1, 2, 4]  # keeps blocks 0, 1, 3, 5 -> pattern "M-M*"
  config, child = extract(PARENT, parent_params, choice, order)
  assert config.pattern == "M-M*"
  assert config.hidden_size == 20 and config.intermediate_size == 7 and config.intermediate_size_per_layer is None
  assert config.num_attention_heads == 2 and config.num_attention_heads_per_layer is None
  assert config.mamba_num_heads_per_layer == (2, 4) and config.mamba_head_dim_per_layer == (3, 8)
  assert not config.is_homogeneous
  assert jax.tree.map(np.shape, child) == jax.tree.map(np.shape, param_shapes(config))
  # Group-balanced heads: block 0 keeps head 0 of group 0 and head 2 (the first of group 1); channels 0..2.
  np.testing.assert_array_equal(child["layers_0"]["mixer"]["x_proj"]["kernel"],
                                parent_params["layers_0"]["mixer"]["x_proj"]["kernel"][:20][:, [0, 2]][:, :, :3])
  np.testing.assert_array_equal(child["layers_0"]["mixer"]["out_proj"]["kernel"],
                                parent_params["layers_0"]["mixer"]["out_proj"]["kernel"][[0, 2]][:, :3, :20])
  # B/C, KV heads and the attention head dim are never touched (only the hidden input side shrinks).
  np.testing.assert_array_equal(child["layers_2"]["mixer"]["B_proj"]["kernel"],
                                parent_params["layers_3"]["mixer"]["B_proj"]["kernel"][:20])
  np.testing.assert_array_equal(child["layers_3"]["mixer"]["k_proj"]["kernel"],
                                parent_params["layers_5"]["mixer"]["k_proj"]["kernel"][:20])
  # Query heads: the first per KV group (heads 0 and 2), o_proj rows likewise.
  np.testing.assert_array_equal(child["layers_3"]["mixer"]["o_proj"]["kernel"],
                                parent_params["layers_5"]["mixer"]["o_proj"]["kernel"][[0, 2]][:, :, :20])
  np.testing.assert_array_equal(child["embed"]["embedding"], parent_params["embed"]["embedding"][:, :20])
  np.testing.assert_array_equal(child["lm_head"]["kernel"], parent_params["lm_head"]["kernel"][:20])


def test_extraction_keeps_array_type_and_runs_abstractly(parent_params):
  choice = Choice.homogeneous(PARENT, hidden=16, mlp=24, depth=5)
  order = list(range(6))
  _, child = extract(PARENT, parent_params, choice, order)
  assert all(isinstance(x, np.ndarray) and x.base is None for x in jax.tree.leaves(child))  # not parent views
  _, on_device = extract(PARENT, jax.tree.map(jnp.asarray, parent_params), choice, order)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(on_device))
  jax.tree.map(np.testing.assert_array_equal, on_device, child)
  abstract = jax.eval_shape(lambda p: extract_params(PARENT, p, choice, order), param_shapes(PARENT))
  assert jax.tree.map(np.shape, abstract) == jax.tree.map(np.shape, child)


def test_choice_errors_in_extraction(parent_params):
  with pytest.raises(SpaceError, match="depth=3 < num_layers=6 needs depth_order"):
    extract(PARENT, parent_params, Choice.homogeneous(PARENT, depth=3))
  with pytest.raises(SpaceError, match=r"Choice.mamba_heads\[1\] 3 is not a multiple of n_groups=2"):
    extract(PARENT, parent_params, Choice(hidden=32, mlp=(48, 48), attention_heads=(4, 4), mamba_heads=(4, 3),
                                          mamba_head_dim=(8, 8), depth=6))


# ---------------------------------------------------------------------------------------------------- transformers
def test_extracted_children_load_in_transformers(parent_params, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from elastic_jax.interop import hf

  tokens = np.random.default_rng(5).integers(0, PARENT.vocab_size, (2, SEQ_LEN)).astype(np.int32)
  cases = {
      "widths": (Choice.homogeneous(PARENT, hidden=24, mlp=20, attention_heads=2, mamba_heads=2, mamba_head_dim=6),
                 None),
      "widths_and_depth": (Choice.homogeneous(PARENT, hidden=16, mlp=40, mamba_head_dim=5, depth=4),
                           [3, 5, 1, 0, 2, 4]),
  }
  for name, (choice, order) in cases.items():
    config, child = extract(PARENT_CHUNKED, parent_params, choice, order)
    hf.save(tmp_path / name, config, jax.tree.map(np.asarray, child))
    model = transformers.NemotronHForCausalLM.from_pretrained(tmp_path / name, dtype=torch.float32).eval()
    for layer in model.model.layers:
      if layer.block_type == "linear_attention":
        layer.mixer.time_step_limit = (0.0, math.inf)
    with torch.no_grad():
      theirs = model(torch.from_numpy(tokens).long()).logits.float().numpy()
    ours = child_logits(config, child, tokens)
    diff = float(np.max(np.abs(ours - theirs)))
    print(f"{name} ({config.pattern}, d={config.hidden_size}): max |ours - transformers| = {diff:.2e}")
    assert diff < LOGIT_ATOL
