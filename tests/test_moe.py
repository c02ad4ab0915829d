"""MoE (``E``) blocks: grouped matmuls and the sorted-expert path against a dense evaluation of every expert, routing
against a hand derivation, logits and cached decoding against transformers 5.23's NemotronH, HF import/export
(per-expert and stacked tensor names), parameter counts (total and active), and the elastic code on E patterns.

transformers is the independent reference for the whole block: random tiny NemotronH models with MoE layers are
imported into ours and must give the same logits (fp32, within 1e-4).
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_params
from elastic_jax.elastic import masks as masks_lib
from elastic_jax.elastic.extract import child_config, extract
from elastic_jax.elastic.param_count import active_param_count, param_count
from elastic_jax.elastic.space import Choice
from elastic_jax.eval.generate import generate, generate_ragged
from elastic_jax.interop import hf
from elastic_jax.model import ConfigError, HybridLM, ModelConfig, init_cache, init_params, param_shapes
from elastic_jax.model.moe import dense_experts, route, sorted_experts
from elastic_jax.ops.grouped_matmul import grouped_matmul, tile_rows
from elastic_jax.train.flops import forward_flops_per_token

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402
from test_hf_interop import random_hf_model, set_hf_dt_limit  # noqa: E402

LOGIT_ATOL = 1e-4
BATCH, SEQ_LEN = 2, 13

# Tiny NemotronH configs with MoE layers (transformers' keys), each with Mamba, attention or MLP blocks beside them.
HF_MOE_CONFIGS = {
    # experts on the hidden size, one expert group, normalised weights, shared expert.
    "ME*E-": dict(hybrid_override_pattern="ME*E-", n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=12,
                  moe_shared_expert_intermediate_size=20, n_group=1, topk_group=1, norm_topk_prob=True,
                  routed_scaling_factor=1.0),
    # latent projection, group-limited routing (2 of 4 groups), scaled weights.
    "E*ME": dict(hybrid_override_pattern="E*ME", n_routed_experts=16, num_experts_per_tok=3, moe_intermediate_size=8,
                 moe_shared_expert_intermediate_size=14, moe_latent_size=12, n_group=4, topk_group=2,
                 norm_topk_prob=True, routed_scaling_factor=2.5),
    # unnormalised weights, 3 of 4 groups, latent; its shared expert is zeroed in the no-shared-expert test.
    "*E-EM": dict(hybrid_override_pattern="*E-EM", n_routed_experts=12, num_experts_per_tok=4, moe_intermediate_size=8,
                  moe_shared_expert_intermediate_size=16, moe_latent_size=20, n_group=4, topk_group=3,
                  norm_topk_prob=False, routed_scaling_factor=1.5),
}
# Expert widths are multiples of 4: transformers' default grouped_mm experts need 16-byte strides.
HF_COMMON = dict(vocab_size=80, hidden_size=24, intermediate_size=28, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=6, mamba_num_heads=4, mamba_head_dim=6, n_groups=2, ssm_state_size=8, chunk_size=4,
                 conv_kernel=4, layer_norm_epsilon=1e-5, use_cache=False)


# ---------------------------------------------------------------------------------------------------- helpers
def make_hf_moe_model(name: str, seed: int = 0, **overrides):
  """A transformers NemotronH with every weight and buffer random (router correction biases included), fp32."""
  model = random_hf_model({**HF_COMMON, **HF_MOE_CONFIGS[name], **overrides}, seed)
  set_hf_dt_limit(model, (0.0, math.inf))
  return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(tokens).long(), use_cache=False).logits.float().numpy()


def our_logits(config: ModelConfig, params, tokens: np.ndarray) -> np.ndarray:
  return np.asarray(jax.jit(HybridLM(config).apply)({"params": params}, tokens))


def random_tokens(vocab_size: int, seed: int = 0, shape=(BATCH, SEQ_LEN)) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab_size, shape).astype(np.int32)


def assert_close(ours: np.ndarray, theirs: np.ndarray, what: str) -> None:
  assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
  diff = float(np.max(np.abs(ours - theirs)))
  print(f"{what}: max |logit diff| = {diff:.2e} (logit scale {float(np.max(np.abs(theirs))):.2f})")
  assert float(np.std(theirs)) > 0.3, f"{what}: logits carry no signal"
  assert diff < LOGIT_ATOL, f"{what}: max |logit diff| {diff:.3e} exceeds {LOGIT_ATOL}"


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory):
  """Each config's random model, saved by transformers (per-expert tensors on disk)."""
  paths = {}
  for name in HF_MOE_CONFIGS:
    model = make_hf_moe_model(name)
    paths[name] = tmp_path_factory.mktemp("hf_moe") / name.replace("*", "a")
    model.save_pretrained(paths[name])
    paths[name] = (paths[name], model)
  return paths


def moe_config(pattern: str = "ME*-E", **overrides) -> ModelConfig:
  base = dict(pattern=pattern, vocab_size=64, hidden_size=32, intermediate_size=40, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, mamba_num_heads=4, mamba_head_dim=8, n_groups=2, ssm_state_size=8,
              chunk_size=4, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=12,
              moe_shared_expert_intermediate_size=16, n_shared_experts=1, n_group=2, topk_group=1)
  base.update(overrides)
  return ModelConfig(**base)


# ---------------------------------------------------------------------------------------------------- grouped matmul
def _per_row_reference(x, w, sizes):
  """out[r] = x[r] @ w[group(r)], rows past the last group zero: a loop over rows."""
  out = np.zeros((x.shape[0], w.shape[2]), np.float64)
  ends = np.cumsum(sizes)
  for r in range(x.shape[0]):
    if r < ends[-1]:
      out[r] = x[r].astype(np.float64) @ w[np.searchsorted(ends, r, side="right")].astype(np.float64)
  return out


@pytest.mark.parametrize("sizes", [(3, 0, 5, 1, 0, 7), (0, 0, 16, 0, 0, 0), (1, 1, 1, 1, 1, 1), (2, 0, 3, 0, 1, 0),
                                   (40, 3, 0, 17, 9, 27)])
@pytest.mark.parametrize("impl", ["tiled", "ragged_dot"])
def test_grouped_matmul_equals_a_loop_over_rows(sizes, impl):
  rng = np.random.default_rng(sum(sizes))
  rows = max(sum(sizes), 16)  # (2, 0, 3, 0, 1, 0): rows after the last group stay zero
  x = rng.normal(size=(rows, 5)).astype(np.float32)
  w = rng.normal(size=(len(sizes), 5, 3)).astype(np.float32)
  out = jax.jit(lambda x, w, s: grouped_matmul(x, w, s, impl=impl))(x, w, np.asarray(sizes, np.int32))
  np.testing.assert_allclose(np.asarray(out), _per_row_reference(x, w, np.asarray(sizes)), atol=1e-5, rtol=1e-5)


def test_tile_rows_follow_the_rows_per_group():
  assert tile_rows(6, 128) == 1  # a decode step: one row per tile
  assert tile_rows(8192, 8) == 256 and tile_rows(4096, 64) == 64 and tile_rows(1000, 64) == 8
  for rows in (1, 7, 100, 1000, 5000):
    for groups in (1, 8, 64):
      t = tile_rows(rows, groups)
      assert 1 <= t <= 256 and (t == 1 or t <= rows / groups < 2 * t or t == 256)


def _routing(rng, tokens, experts, k):
  """Random distinct experts per token and positive weights."""
  indices = np.stack([rng.permutation(experts)[:k] for _ in range(tokens)]).astype(np.int32)
  return rng.uniform(0.1, 1.0, (tokens, k)).astype(np.float32), indices


@pytest.mark.parametrize("experts, k, tokens", [(8, 2, 24), (16, 4, 7), (64, 6, 40), (5, 5, 3), (32, 1, 1)])
@pytest.mark.parametrize("impl", ["tiled", "ragged_dot"])
def test_sorted_experts_equal_the_dense_evaluation_of_every_expert(experts, k, tokens, impl):
  """The ragged path against the oracle that runs every expert on every token, in values and gradients."""
  rng = np.random.default_rng(experts * 100 + k)
  c, i = 6, 10
  x = rng.normal(size=(tokens, c)).astype(np.float32)
  up = rng.normal(0, c ** -0.5, (experts, c, i)).astype(np.float32)
  down = rng.normal(0, i ** -0.5, (experts, i, c)).astype(np.float32)
  weights, indices = _routing(rng, tokens, experts, k)
  cotangent = rng.normal(size=(tokens, c)).astype(np.float32)

  def loss(fn, x, up, down, weights):
    return jnp.sum(fn(x, up, down, weights, indices) * cotangent)

  ours = jax.jit(jax.value_and_grad(lambda *a: loss(lambda *b: sorted_experts(*b, impl=impl), *a), (0, 1, 2, 3)))
  dense = jax.jit(jax.value_and_grad(lambda *a: loss(dense_experts, *a), (0, 1, 2, 3)))
  (value, grads), (ref_value, ref_grads) = ours(x, up, down, weights), dense(x, up, down, weights)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  np.testing.assert_allclose(sorted_experts(x, up, down, weights, indices, impl=impl),
                             dense_experts(x, up, down, weights, indices), atol=1e-5)
  for name, got, want in zip(("x", "up", "down", "weights"), grads, ref_grads):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=f"gradient w.r.t. {name}")


# ---------------------------------------------------------------------------------------------------- routing
def test_routing_by_hand():
  """Two tokens, 8 experts in 4 groups of 2, top 2 groups, k = 2: worked out by hand from the rule's wording."""
  config = moe_config(n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, norm_topk_prob=True,
                      routed_scaling_factor=2.0)
  # Router logits are the scores' inverse sigmoid; x = identity rows pick kernel rows straight out.
  scores = np.array([[0.9, 0.1, 0.2, 0.3, 0.8, 0.7, 0.6, 0.05],
                     [0.5, 0.5, 0.1, 0.1, 0.3, 0.9, 0.2, 0.2]], np.float32)
  bias = np.array([0.0, 0.0, 0.0, 0.9, 0.0, 0.0, 0.0, 0.0], np.float32)
  # Token 0, choice = scores + bias: groups {0.9, 0.1}=1.0, {0.2, 1.2}=1.4, {0.8, 0.7}=1.5, {0.6, 0.05}=0.65 ->
  # groups 2 and 1 -> candidates experts 2..5 with choices 0.2, 1.2, 0.8, 0.7 -> experts 3 and 4 (expert 0's 0.9
  # is in a dropped group). Weights from the raw scores: 0.3 and 0.8, normalised and doubled: 0.6/1.1, 1.6/1.1.
  # Token 1: choices 0.5, 0.5, 0.1, 1.0, 0.3, 0.9, 0.2, 0.2 -> groups 1.0, 1.1, 1.2, 0.4 -> groups 2 and 1 ->
  # candidates 0.1, 1.0, 0.3, 0.9 -> experts 3 and 5; raw scores 0.1 and 0.9 -> 0.2, 1.8.
  kernel = np.log(scores / (1 - scores)).astype(np.float32)  # x = the first unit vectors: logits == kernel rows
  weights, indices = route(config, np.eye(2, 32, dtype=np.float32), np.pad(kernel, ((0, 30), (0, 0))), bias)
  order = np.argsort(np.asarray(indices), axis=1)
  np.testing.assert_array_equal(np.take_along_axis(np.asarray(indices), order, 1), [[3, 4], [3, 5]])
  np.testing.assert_allclose(np.take_along_axis(np.asarray(weights), order, 1),
                             [[0.6 / 1.1, 1.6 / 1.1], [0.2, 1.8]], rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", list(HF_MOE_CONFIGS))
def test_logits_equal_transformers(hf_checkpoints, name):
  path, model = hf_checkpoints[name]
  config, params = hf.load(path)
  assert config.pattern == HF_MOE_CONFIGS[name]["hybrid_override_pattern"]
  tokens = random_tokens(config.vocab_size, seed=1)
  theirs = hf_logits(model, tokens)
  assert_close(our_logits(config, params, tokens), theirs, name)
  # Both grouped-matmul implementations (the CPU default is "tiled").
  assert_close(our_logits(config.replace(moe_impl="ragged_dot"), params, tokens), theirs, f"{name} ragged_dot")


def test_correction_bias_changes_the_choice_and_matters(hf_checkpoints):
  """The correction bias is exercised: zeroing it in both models changes the logits, and they still agree."""
  path, _ = hf_checkpoints["ME*E-"]
  config, params = hf.load(path)
  model = make_hf_moe_model("ME*E-")  # the saved model again (same seed), to edit without touching the fixture's
  tokens = random_tokens(config.vocab_size, seed=2)
  with_bias = our_logits(config, params, tokens)
  for spec in config.block_specs():
    if spec.kind == "moe":
      gate = params[f"layers_{spec.index}"]["mixer"]["gate"]
      gate["e_score_correction_bias"] = np.zeros_like(gate["e_score_correction_bias"])
  for layer in model.model.layers:
    if layer.block_type == "moe":
      layer.mixer.gate.e_score_correction_bias.zero_()
  without = our_logits(config, params, tokens)
  assert float(np.max(np.abs(with_bias - without))) > 1e-2
  assert_close(without, hf_logits(model, tokens), "ME*E- without correction bias")


def test_logits_equal_transformers_without_shared_expert(hf_checkpoints, tmp_path):
  """No shared expert (ours: width 0, no weights) == transformers with its shared expert's weights zeroed."""
  model = make_hf_moe_model("*E-EM", seed=4)
  with torch.no_grad():
    for layer in model.model.layers:
      if layer.block_type == "moe":
        layer.mixer.shared_experts.up_proj.weight.zero_()
        layer.mixer.shared_experts.down_proj.weight.zero_()
  model.save_pretrained(tmp_path / "zeroed")
  config, params = hf.load(tmp_path / "zeroed")
  config = config.replace(moe_shared_expert_intermediate_size=0, n_shared_experts=0)
  for spec in config.block_specs():
    if spec.kind == "moe":
      del params[f"layers_{spec.index}"]["mixer"]["shared_experts"]
  assert jax.tree.structure(params) == jax.tree.structure(param_shapes(config))
  tokens = random_tokens(config.vocab_size, seed=3)
  assert_close(our_logits(config, params, tokens), hf_logits(model, tokens), "*E-EM without shared expert")
  with pytest.raises(hf.CheckpointError, match=r"moe_shared_expert_intermediate_size=0.*always builds one"):
    hf.save(tmp_path / "out", config, params)


def test_cached_decoding_equals_transformers_generate(hf_checkpoints):
  """Greedy decoding with caches (prefill + one-token steps) against transformers' generate with its cache, token
  by token and in the logits of every step."""
  path, model = hf_checkpoints["E*ME"]
  config, params = hf.load(path)
  prompts = random_tokens(config.vocab_size, seed=5, shape=(2, 7))
  new_tokens = 6
  ours = np.asarray(generate(config, params, prompts, max_new_tokens=new_tokens))
  with torch.no_grad():
    out = model.generate(torch.from_numpy(prompts).long(), max_new_tokens=new_tokens, do_sample=False,
                         use_cache=True, output_logits=True, return_dict_in_generate=True, pad_token_id=0,
                         eos_token_id=None)
  np.testing.assert_array_equal(ours, out.sequences.numpy())
  # Our cached logits of every step against transformers' cached logits of the same step.
  cache = init_cache(config, 2, 7 + new_tokens)
  step = jax.jit(lambda p, t, c: HybridLM(config).apply({"params": p}, t, cache=c))
  logits, cache = step(params, prompts, cache)
  ours_steps = [np.asarray(logits[:, -1])]
  for j in range(new_tokens - 1):
    logits, cache = step(params, ours[:, 7 + j:8 + j], cache)
    ours_steps.append(np.asarray(logits[:, -1]))
  assert_close(np.stack(ours_steps, 1), torch.stack(out.logits, 1).float().numpy(), "E*ME cached decoding")


def test_cached_decoding_equals_full_forward():
  config = moe_config("E*M-E")
  params = random_params(config, seed=1)
  tokens = np.asarray(jax.random.randint(jax.random.key(2), (3, 11), 0, config.vocab_size))
  full = our_logits(config, params, tokens)
  cache = init_cache(config, 3, 11)
  step = jax.jit(lambda p, t, c: HybridLM(config).apply({"params": p}, t, cache=c))
  pieces = []
  for start, stop in [(0, 5)] + [(t, t + 1) for t in range(5, 11)]:
    out, cache = step(params, tokens[:, start:stop], cache)
    pieces.append(np.asarray(out))
  assert float(np.std(full)) > 0.3
  np.testing.assert_allclose(np.concatenate(pieces, 1), full, atol=1e-4, rtol=0)


def test_ragged_generation_on_moe_equals_each_prompt_alone():
  """Left-padded rows are routed too; they must not change the real rows' experts or outputs."""
  config = moe_config("ME*E")
  params = random_params(config, seed=6)
  prompts = random_tokens(config.vocab_size, seed=7, shape=(3, 9))
  lengths = np.array([9, 4, 6], np.int32)
  out = np.asarray(generate_ragged(config, params, prompts, lengths, max_new_tokens=5))
  for row, length in enumerate(lengths):
    alone = np.asarray(generate(config, params, prompts[row:row + 1, :length], max_new_tokens=5))[0, length:]
    np.testing.assert_array_equal(out[row], alone)


# ---------------------------------------------------------------------------------------------------- import/export
def test_saved_checkpoint_holds_one_tensor_per_expert(hf_checkpoints):
  path, _ = hf_checkpoints["E*ME"]
  keys = set(load_file(str(path / "model.safetensors")))
  assert "backbone.layers.0.mixer.experts.15.up_proj.weight" in keys
  assert "backbone.layers.0.mixer.gate.e_score_correction_bias" in keys
  assert "backbone.layers.0.mixer.fc1_latent_proj.weight" in keys
  assert not any(key.endswith("experts.up_proj") for key in keys)
  raw = json.loads((path / "config.json").read_text())
  assert raw["layers_block_type"] == ["moe", "full_attention", "linear_attention", "moe"]


def test_export_loads_in_transformers_with_the_same_logits(hf_checkpoints, tmp_path):
  path, model = hf_checkpoints["E*ME"]
  config, params = hf.load(path)
  hf.save(tmp_path / "ours", config, params)
  # Same tensor names, shapes and values as transformers' own file.
  theirs, ours = load_file(str(path / "model.safetensors")), load_file(str(tmp_path / "ours" / "model.safetensors"))
  assert sorted(ours) == sorted(theirs)
  for key in theirs:
    np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
  exported = json.loads((tmp_path / "ours" / "config.json").read_text())
  for key in ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "moe_shared_expert_intermediate_size",
              "moe_latent_size", "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor"):
    assert exported[key] == HF_MOE_CONFIGS["E*ME"][key], key
  assert exported["hybrid_override_pattern"] == "E*ME"
  reloaded = transformers.NemotronHForCausalLM.from_pretrained(tmp_path / "ours").float().eval()
  set_hf_dt_limit(reloaded, (0.0, math.inf))
  tokens = random_tokens(config.vocab_size, seed=8)
  assert_close(hf_logits(reloaded, tokens), our_logits(config, params, tokens), "E*ME exported")
  assert hf.load(tmp_path / "ours")[0] == config


def test_our_own_model_exports_and_matches_transformers(tmp_path):
  """A model made by us (random params, not imported) -> save -> transformers' logits == ours."""
  config = moe_config("ME*-E", moe_latent_size=12, n_group=4, topk_group=2, num_experts_per_tok=3,
                      routed_scaling_factor=2.0)
  params = jax.tree.map(np.asarray, random_params(config, seed=9))
  hf.save(tmp_path / "ours", config, params)
  model = transformers.NemotronHForCausalLM.from_pretrained(tmp_path / "ours").float().eval()
  set_hf_dt_limit(model, (0.0, math.inf))
  tokens = random_tokens(config.vocab_size, seed=10)
  assert_close(hf_logits(model, tokens), our_logits(config, params, tokens), "our ME*-E exported")


def test_stacked_expert_tensors_load_too(hf_checkpoints, tmp_path):
  """transformers' in-memory names (experts.up_proj [E, I, c]) read as well as the per-expert ones on disk."""
  path, model = hf_checkpoints["ME*E-"]
  (tmp_path / "stacked").mkdir()
  (tmp_path / "stacked" / "config.json").write_text((path / "config.json").read_text())
  state = {key: value.numpy() for key, value in model.state_dict().items()}
  assert "model.layers.1.mixer.experts.up_proj" in state
  save_file(state, str(tmp_path / "stacked" / "model.safetensors"), metadata={"format": "pt"})
  _, stacked = hf.load(tmp_path / "stacked")
  _, per_expert = hf.load(path)
  jax.tree.map(np.testing.assert_array_equal, stacked, per_expert)
  # The mesh loader reads each expert's rows through a slice of the stacked tensor.
  from elastic_jax.train.sharding import make_mesh  # pylint: disable=import-outside-toplevel
  _, sharded = hf.load(tmp_path / "stacked", mesh=make_mesh((1,), devices=jax.devices()[:1]))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), sharded, per_expert)


def test_sharded_import_of_experts(hf_checkpoints):
  """The mesh loader reads expert rows per device box (one device here; the boxes are the whole arrays)."""
  from elastic_jax.train.sharding import make_mesh  # pylint: disable=import-outside-toplevel
  path, _ = hf_checkpoints["E*ME"]
  _, host = hf.load(path)
  _, sharded = hf.load(path, mesh=make_mesh((1,), devices=jax.devices()[:1]))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), sharded, host)


_EIGHT_DEVICE_IMPORT = """
import json, sys
import jax, numpy as np
from elastic_jax.interop import hf
from elastic_jax.train.sharding import make_mesh
assert jax.device_count() == 8
# The expert axis and the expert rows split over devices (the default rules keep experts whole): every box reads
# its experts' rows from their own tensors (per-expert file) or from slices of the stacked ones.
rules = (("expert", "fsdp"), ("embed", "tensor"), ("expert_mlp", "data"), ("moe_latent", "tensor"),
         ("shared_mlp", "fsdp"), ("vocab", "fsdp"), ("heads", "fsdp"), ("kv_heads", "fsdp"), ("ssm_heads", "fsdp"))
for path in json.loads(sys.argv[1]):
  _, want = hf.load(path)
  for shape in [(2, 2, 2), (1, 4, 2), (1, 8, 1)]:
    _, got = hf.load(path, mesh=make_mesh(shape), rules=rules)
    split = 0
    for (key, leaf), expected in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
      assert np.array_equal(np.asarray(leaf), expected), (path, shape, jax.tree_util.keystr(key))
      for shard in leaf.addressable_shards:
        assert np.array_equal(np.asarray(shard.data), expected[shard.index]), (path, shape, shard.index)
      split += "experts" in jax.tree_util.keystr(key) and leaf.addressable_shards[0].data.shape[0] < leaf.shape[0]
    assert split >= 2, (path, shape, split)
print("OK")
"""


def test_sharded_import_splits_the_expert_axis_on_eight_devices(hf_checkpoints, tmp_path):
  """Experts split over devices (per-expert and stacked files) load as the host load gives them, box by box."""
  import subprocess, sys  # pylint: disable=import-outside-toplevel,multiple-imports
  from multihost import cpu_env  # pylint: disable=import-outside-toplevel
  path, model = hf_checkpoints["E*ME"]
  stacked = tmp_path / "stacked"
  stacked.mkdir()
  (stacked / "config.json").write_text((path / "config.json").read_text())
  save_file({key: value.numpy() for key, value in model.state_dict().items()}, str(stacked / "model.safetensors"),
            metadata={"format": "pt"})
  script = tmp_path / "eight.py"
  script.write_text(_EIGHT_DEVICE_IMPORT)
  proc = subprocess.run([sys.executable, str(script), json.dumps([str(path), str(stacked)])], capture_output=True,
                        text=True, env=cpu_env(8), timeout=300)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-6000:]


def test_config_round_trip_and_transformers_defaults():
  config = moe_config("ME*E-", moe_latent_size=6, norm_topk_prob=False, routed_scaling_factor=2.5)
  assert hf.config_from_hf(hf.config_to_hf(config)) == config.replace(moe_impl="auto")
  # Absent MoE keys mean NemotronHConfig's defaults; a shared width of 0 means intermediate_size in transformers.
  sparse = {k: v for k, v in hf.config_to_hf(config).items()
            if k not in ("n_routed_experts", "num_experts_per_tok", "n_group", "topk_group", "n_shared_experts")}
  sparse["moe_shared_expert_intermediate_size"] = 0
  imported = hf.config_from_hf(sparse)
  assert (imported.n_routed_experts, imported.num_experts_per_tok) == (8, 2)
  assert (imported.n_group, imported.topk_group) == (1, 1)
  assert imported.moe_shared_expert_intermediate_size == config.intermediate_size and imported.n_shared_experts == 1
  # Patterns without E write no MoE keys.
  assert "n_routed_experts" not in hf.config_to_hf(moe_config("M*-"))
  with pytest.raises(hf.CheckpointError, match=r"layers_block_type\[1\] is 'moo'; expected one of"):
    hf.config_from_hf({**hf.config_to_hf(config), "layers_block_type": ["linear_attention", "moo"]})


# ---------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("overrides, message", [
    (dict(n_routed_experts=0), r"n_routed_experts=0 must be a positive integer"),
    (dict(num_experts_per_tok=0), r"num_experts_per_tok=0 must be a positive integer"),
    (dict(moe_intermediate_size=-2), r"moe_intermediate_size=-2 must be a positive integer"),
    (dict(n_routed_experts=9, n_group=2), r"n_routed_experts=9 is not a multiple of n_group=2"),
    (dict(n_routed_experts=4, n_group=4), r"leaves 1 expert per group.*give each group >= 2"),
    (dict(topk_group=3, n_group=2), r"topk_group=3 is larger than n_group=2"),
    (dict(num_experts_per_tok=5, n_group=2, topk_group=1), r"num_experts_per_tok=5 is larger than the 4 experts"),
    (dict(moe_latent_size=0), r"moe_latent_size=0 must be a positive integer, or None"),
    (dict(n_shared_experts=0), r"n_shared_experts=0 and moe_shared_expert_intermediate_size=16 disagree"),
    (dict(moe_shared_expert_intermediate_size=-1), r"moe_shared_expert_intermediate_size=-1 must be an integer >= 0"),
    (dict(routed_scaling_factor=0.0), r"routed_scaling_factor=0.0 must be a finite number > 0"),
    (dict(moe_impl="loop"), r"moe_impl='loop' is not one of \('auto', 'ragged_dot', 'tiled'\)"),
])
def test_config_errors_name_field_value_and_fix(overrides, message):
  with pytest.raises(ConfigError, match=message):
    moe_config(**overrides)


def test_patterns_without_moe_ignore_the_moe_fields():
  config = moe_config("M*-", n_routed_experts=0, num_experts_per_tok=0, moe_intermediate_size=0)
  assert ModelConfig.from_dict(config.to_dict()) == config
  assert ModelConfig.from_dict(moe_config().to_dict()) == moe_config()


# ---------------------------------------------------------------------------------------------------- counts
@pytest.mark.parametrize("overrides", [dict(), dict(moe_latent_size=10), dict(moe_shared_expert_intermediate_size=0,
                                                                               n_shared_experts=0)])
def test_param_count_equals_the_param_tree(overrides):
  config = moe_config("ME*-E", **overrides)
  leaves = jax.tree.leaves(param_shapes(config))
  assert param_count(config) == sum(math.prod(leaf.shape) for leaf in leaves)


def test_active_param_count_by_hand():
  """d=32, V=64, pattern "E-": embedding + head + final norm 2·64·32 + 32 = 4128; MLP block 2·32·40 + 32 = 2592;
  MoE block with k=2 of 8 experts of width 12 on a latent of 10, shared width 16: router 32·8 + 8 = 264, two experts
  2·(2·10·12) = 480, shared 2·32·16 = 1024, latent projections 2·32·10 = 640, pre-norm 32: 2440. Total 9160.
  All 8 experts: 8·240 = 1920 in place of 480 -> 10600 parameters in the tree."""
  config = moe_config("E-", moe_latent_size=10)
  assert active_param_count(config) == 9160
  assert param_count(config) == 10600 == sum(math.prod(x.shape) for x in jax.tree.leaves(param_shapes(config)))
  dense = moe_config("M*-")
  assert active_param_count(dense) == param_count(dense)


def test_flops_count_the_active_experts():
  config = moe_config("E", moe_latent_size=10)
  matmul = forward_flops_per_token(config, 8)["matmul"]
  assert matmul == 2 * (32 * 64 + 32 * 8 + 2 * 2 * 10 * 12 + 2 * 32 * 16 + 2 * 32 * 10)


# ---------------------------------------------------------------------------------------------------- elastic
def test_full_choice_extracts_the_parent_and_narrower_hidden_matches_the_masked_parent():
  """A full choice keeps E blocks whole, and a choice of fewer hidden channels (the global axis every block reads)
  gives a child whose logits equal the masked parent's (the MoE axes themselves: test_moe_elastic.py)."""
  config = moe_config("ME*-E", moe_latent_size=10)
  params = jax.tree.map(np.asarray, random_params(config, seed=11))
  full = Choice.full(config)
  child_cfg, child = extract(config, params, full)
  assert child_cfg == config
  jax.tree.map(np.testing.assert_array_equal, child, params)

  tokens = random_tokens(config.vocab_size, seed=12, shape=(1, 9))
  order = [4, 0, 1, 2, 3]
  for choice in (Choice.homogeneous(config, hidden=24, mlp=20, attention_heads=2, mamba_heads=2),
                 Choice.homogeneous(config, hidden=16, depth=3)):
    masks = masks_lib.choice_masks(config, [choice], order)
    masked = np.asarray(jax.jit(lambda p, t, m: HybridLM(config).apply({"params": p}, t, masks=m))(
        params, tokens, masks))
    small_cfg, small = extract(config, params, choice, order)
    assert small_cfg == child_config(config, choice, order)
    assert small_cfg.pattern == "".join(config.pattern[i] for i in sorted(order[:choice.depth]))
    np.testing.assert_allclose(our_logits(small_cfg, small, tokens), masked, atol=1e-4, rtol=0)
    assert param_count(small_cfg) == sum(np.size(x) for x in jax.tree.leaves(small))


def test_a_child_with_fewer_narrower_experts_loads_in_transformers(hf_checkpoints, tmp_path):
  """Slicing the MoE axes gives a stock NemotronH checkpoint: transformers' logits for the child equal our masked
  parent's (group-limited routing, 2 of 4 groups, over the 8 kept experts of 16)."""
  path, _ = hf_checkpoints["E*ME"]
  config, params = hf.load(path)
  choice = Choice.homogeneous(config, moe_experts=8, moe_expert_dim=4, moe_shared_dim=7, hidden=20)
  child_cfg, child = extract(config, params, choice)
  assert (child_cfg.n_routed_experts, child_cfg.moe_intermediate_size) == (8, 4)
  hf.save(tmp_path / "child", child_cfg, jax.tree.map(np.asarray, child))
  model = transformers.NemotronHForCausalLM.from_pretrained(tmp_path / "child").float().eval()
  set_hf_dt_limit(model, (0.0, math.inf))
  tokens = random_tokens(config.vocab_size, seed=15)
  masks = masks_lib.choice_masks(config, [choice] * tokens.shape[0])
  masked = np.asarray(jax.jit(lambda p, t, m: HybridLM(config).apply({"params": p}, t, masks=m))(params, tokens, masks))
  assert_close(hf_logits(model, tokens), masked, "E*ME child with 8 of 16 experts")


def test_expected_param_count_of_one_hot_choices_on_moe_patterns():
  """The router's differentiable count, at one-hot probabilities, is the exact count of that choice's child."""
  from elastic_jax.elastic.param_count import choice_param_count, expected_param_count  # pylint: disable=C0415
  from elastic_jax.elastic.space import ElasticSpace  # pylint: disable=import-outside-toplevel
  config = moe_config("ME*-E", moe_latent_size=12)
  space = ElasticSpace.from_fractions(config, (0.5, 1.0))
  order = [4, 0, 1, 2, 3]
  for pick in (0, 1):
    probs = {axis: np.eye(len(space.candidates(axis)))[min(pick, len(space.candidates(axis)) - 1)]
             for axis in ("hidden", "mlp", "attention_heads", "mamba_heads", "mamba_head_dim")}
    sizes = {axis: space.candidates(axis)[int(np.argmax(p))] for axis, p in probs.items()}
    choice = Choice.homogeneous(config, **sizes)
    assert float(expected_param_count(config, space, probs, order)) == pytest.approx(
        choice_param_count(config, choice, order), rel=1e-6)


def test_importance_and_permutation_run_on_moe_patterns():
  """Calibration scores the other blocks' axes and the hidden channels MoE blocks read; permuting into that order
  (the hidden axis reorders the router, experts, shared expert and latent projections' d side) keeps the logits."""
  from elastic_jax.elastic.importance import estimate_importance, rankings  # pylint: disable=import-outside-toplevel
  from elastic_jax.elastic.permute import permute_params  # pylint: disable=import-outside-toplevel
  tokens = random_tokens(64, seed=13, shape=(2, 10))
  for config in (moe_config("ME*-E"), moe_config("E-E", moe_latent_size=12)):
    params = random_params(config, seed=14)
    importance = estimate_importance(config, params, [tokens], depth=True, progress=False)
    order = rankings(importance, config)
    assert sorted(order.depth.tolist()) == list(range(config.num_layers))
    assert not np.array_equal(order.hidden, np.arange(config.hidden_size))
    np.testing.assert_allclose(our_logits(config, permute_params(config, params, order), tokens),
                               our_logits(config, params, tokens), atol=1e-5, rtol=1e-5)


def test_gradients_reach_the_router_not_the_correction_bias_and_remat_keeps_them():
  """Training through E blocks: the router kernel learns through the routing weights, the correction bias (a buffer
  that only chooses experts) gets a zero gradient, and rematerialising the MoE blocks changes no gradient."""
  from elastic_jax.model.hybrid import remat_policies  # pylint: disable=import-outside-toplevel
  config = moe_config("ME*E")
  params = random_params(config, seed=15)
  tokens = random_tokens(config.vocab_size, seed=16, shape=(2, 8))

  def loss(params, model):
    logits = model.apply({"params": params}, tokens[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1))

  grads = jax.jit(jax.grad(lambda p: loss(p, HybridLM(config))))(params)
  gate = grads["layers_1"]["mixer"]["gate"]
  assert float(jnp.max(jnp.abs(gate["kernel"]))) > 1e-4
  assert float(jnp.max(jnp.abs(gate["e_score_correction_bias"]))) == 0.0
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  for policy in ("full", "dots"):
    remat = HybridLM(config, remat=remat_policies({"moe": policy}))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5),
                 jax.jit(jax.grad(lambda p, m=remat: loss(p, m)))(params), grads)


def test_bf16_compute_tracks_fp32():
  """bf16 matmuls with the router in fp32: the logits stay close to the fp32 model's."""
  config = moe_config("ME*E")
  params = random_params(config, seed=17)
  tokens = random_tokens(config.vocab_size, seed=18)
  full = our_logits(config, params, tokens)
  half = our_logits(config.replace(dtype="bfloat16"), params, tokens)
  assert half.dtype == np.float32 and np.all(np.isfinite(half))
  assert float(np.corrcoef(full.ravel(), half.ravel())[0, 1]) > 0.99
