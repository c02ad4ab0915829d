"""HF NemotronH interop: weight/config mapping, refusals, and logit parity with transformers' NemotronH.

transformers (5.23, CPU torch) is the independent numerical reference: random tiny NemotronH models are saved with
``save_pretrained``, loaded with ``elastic_jax.interop.hf.load`` and run by our ``HybridLM``; logits must agree.
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

from elastic_jax.interop import hf  # noqa: E402
from elastic_jax.model import HybridLM, ModelConfig, init_params  # noqa: E402

LOGIT_ATOL = 1e-4
BATCH, SEQ_LEN = 2, 21  # with chunk sizes of 4-8 the Mamba scan spans several chunks and a ragged last one

# Tiny configs covering every block kind, n_groups >= 2, explicit head_dim and chunk_size < SEQ_LEN.
HF_CONFIGS = {
    "M-*": dict(hybrid_override_pattern="M-*", hidden_size=32, intermediate_size=48, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, mamba_num_heads=4, mamba_head_dim=8, n_groups=2,
                ssm_state_size=16, chunk_size=8),
    "M*M-M": dict(hybrid_override_pattern="M*M-M", hidden_size=24, intermediate_size=40, num_attention_heads=6,
                  num_key_value_heads=3, head_dim=4, mamba_num_heads=6, mamba_head_dim=6, n_groups=3,
                  ssm_state_size=8, chunk_size=5),
    "*-M-M*": dict(layers_block_type=["full_attention", "mlp", "linear_attention", "mlp", "linear_attention",
                                      "full_attention"],
                   hidden_size=40, intermediate_size=24, num_attention_heads=4, num_key_value_heads=4, head_dim=12,
                   mamba_num_heads=8, mamba_head_dim=4, n_groups=4, ssm_state_size=6, conv_kernel=3, chunk_size=4),
}
# The keys that every config above shares (a config may override them).
HF_BASE = dict(vocab_size=96, conv_kernel=4, layer_norm_epsilon=1e-5, use_cache=False)


# ---------------------------------------------------------------------------------------------------- helpers
def make_hf_model(name: str, seed: int = 0, dt_bias_range: tuple[float, float] = (-4.0, 1.0), **overrides):
  """A transformers NemotronH with every weight random (not at its init value), float32, eval mode."""
  return random_hf_model({**HF_BASE, **HF_CONFIGS[name], **overrides}, seed, dt_bias_range)


def random_hf_model(config: dict, seed: int = 0, dt_bias_range: tuple[float, float] = (-4.0, 1.0)):
  """A transformers NemotronH of ``config`` (transformers' keys), float32, eval mode, with every weight and buffer
  random in a realistic range (the MoE routers' correction biases included)."""
  torch.manual_seed(seed)
  model = transformers.NemotronHForCausalLM(transformers.NemotronHConfig(**config)).float().eval()
  gen = torch.Generator().manual_seed(seed + 1)

  def uniform(shape, low, high):
    return low + (high - low) * torch.rand(shape, generator=gen)

  with torch.no_grad():
    for key, p in model.named_parameters():
      if key.endswith("A_log"):
        p.copy_(torch.log(uniform(p.shape, 0.5, 8.0)))
      elif key.endswith(".D"):
        p.copy_(uniform(p.shape, 0.5, 1.5))
      elif key.endswith("dt_bias"):
        p.copy_(uniform(p.shape, *dt_bias_range))
      elif key.endswith("norm.weight") or key.endswith("norm_f.weight"):
        p.copy_(uniform(p.shape, 0.6, 1.4))
      elif key.endswith("conv1d.bias"):
        p.copy_(0.2 * torch.randn(p.shape, generator=gen))
      else:  # weights [.., out, in]: unit-variance outputs for unit-variance inputs, so every block moves the residual
        p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    for key, b in model.named_buffers():
      if key.endswith("e_score_correction_bias"):  # the size of score gaps, so that it changes choices
        b.copy_(0.15 * torch.randn(b.shape, generator=gen))
  return model


def set_hf_dt_limit(model, limit: tuple[float, float]) -> None:
  """transformers >= 5.15 clamps dt at (time_step_min, inf); NVIDIA's kernels (and our default) do not."""
  for layer in model.model.layers:
    if layer.block_type == "linear_attention":
      layer.mixer.time_step_limit = limit


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(tokens).long()).logits.float().numpy()


def our_logits(config: ModelConfig, params, tokens: np.ndarray) -> np.ndarray:
  return np.asarray(HybridLM(config).apply({"params": params}, tokens))


def random_tokens(vocab_size: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab_size, (BATCH, SEQ_LEN)).astype(np.int32)


def assert_logits_close(ours: np.ndarray, theirs: np.ndarray, what: str) -> float:
  assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
  diff = float(np.max(np.abs(ours - theirs)))
  print(f"{what}: max |logit diff| = {diff:.2e} (logit scale {float(np.max(np.abs(theirs))):.2f})")
  assert diff < LOGIT_ATOL, f"{what}: max |logit diff| {diff:.3e} exceeds {LOGIT_ATOL}"
  return diff


def tree_leaves(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from tree_leaves(v, prefix + (k,))
    else:
      yield prefix + (k,), v


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory) -> pathlib.Path:
  """The "M-*" model saved by transformers (single file)."""
  path = tmp_path_factory.mktemp("hf") / "m_mlp_attn"
  make_hf_model("M-*").save_pretrained(path)
  return path


def copy_checkpoint(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
  shutil.copytree(src, dst)
  return dst


def edit_config(path: pathlib.Path, **changes) -> None:
  config = json.loads((path / "config.json").read_text())
  config.update(changes)
  (path / "config.json").write_text(json.dumps(config))


def edit_tensors(path: pathlib.Path, edit) -> None:
  tensors = load_file(str(path / "model.safetensors"))
  edit(tensors)
  save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------------- config
def test_config_from_saved_checkpoint(saved_checkpoint):
  raw = json.loads((saved_checkpoint / "config.json").read_text())
  assert raw["time_step_limit"][1] == {"__float__": "Infinity"}  # the JSON encoding this must survive
  config, _ = hf.load(saved_checkpoint)
  assert config.pattern == "M-*"
  assert (config.vocab_size, config.hidden_size, config.intermediate_size) == (96, 32, 48)
  assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 8)
  assert (config.mamba_num_heads, config.mamba_head_dim, config.n_groups) == (4, 8, 2)
  assert (config.ssm_state_size, config.conv_kernel, config.chunk_size) == (16, 4, 8)
  assert config.layer_norm_epsilon == 1e-5
  assert config.time_step_limit == (0.0, math.inf)
  assert config.param_dtype == "float32"


def test_config_from_legacy_keys():
  legacy = {
      "model_type": "nemotron_h", "hybrid_override_pattern": "M-M*", "vocab_size": 10, "hidden_size": 16,
      "intermediate_size": 8, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
      "mamba_num_heads": 4, "mamba_head_dim": 4, "mamba_n_groups": 2, "ssm_state_size": 4, "mamba_d_conv": 3,
      "mamba_chunk_size": 16, "mamba_dt_limit": [0.0, "Infinity"], "rms_norm_eps": 1e-6,
      "layer_norm_epsilon": 1e-6, "eos_token_id": [2, 11],
  }
  config = hf.config_from_hf(legacy)
  assert config.pattern == "M-M*"
  assert (config.n_groups, config.conv_kernel, config.chunk_size) == (2, 3, 16)
  assert config.time_step_limit == (0.0, math.inf)
  assert config.layer_norm_epsilon == 1e-6
  assert config.eos_token_id == 2


def test_layers_block_type_wins_over_pattern_string():
  config = hf.config_from_hf({"layers_block_type": ["mlp", "linear_attention"], "hybrid_override_pattern": "**",
                              "vocab_size": 10, "hidden_size": 16, "mamba_num_heads": 4, "mamba_head_dim": 4,
                              "n_groups": 2, "ssm_state_size": 4})
  assert config.pattern == "-M"


def test_time_step_limit_argument_and_dtype(saved_checkpoint):
  config, params = hf.load(saved_checkpoint, time_step_limit=(1e-3, math.inf), dtype="bfloat16")
  assert config.time_step_limit == (1e-3, math.inf)
  assert config.param_dtype == "bfloat16"
  assert {leaf.dtype.name for _, leaf in tree_leaves(params)} == {"bfloat16"}


# ---------------------------------------------------------------------------------------------------- weights
def test_weight_mapping_against_checkpoint_tensors(saved_checkpoint):
  """Each of our arrays equals the documented slice of the checkpoint tensor, element by element."""
  raw = load_file(str(saved_checkpoint / "model.safetensors"))
  config, params = hf.load(saved_checkpoint)
  H, P, G, N, K, d = 4, 8, 2, 16, 4, 32
  d_inner, gn = H * P, G * N
  mamba, mlp, attn = params["layers_0"]["mixer"], params["layers_1"]["mixer"], params["layers_2"]["mixer"]
  in_proj = raw["backbone.layers.0.mixer.in_proj.weight"]
  conv_w = raw["backbone.layers.0.mixer.conv1d.weight"]
  conv_b = raw["backbone.layers.0.mixer.conv1d.bias"]
  rng = np.random.default_rng(0)
  for _ in range(50):
    i, h, p, g, n, k = (int(rng.integers(m)) for m in (d, H, P, G, N, K))
    assert mamba["z_proj"]["kernel"][i, h, p] == in_proj[h * P + p, i]
    assert mamba["x_proj"]["kernel"][i, h, p] == in_proj[d_inner + h * P + p, i]
    assert mamba["B_proj"]["kernel"][i, g, n] == in_proj[2 * d_inner + g * N + n, i]
    assert mamba["C_proj"]["kernel"][i, g, n] == in_proj[2 * d_inner + gn + g * N + n, i]
    assert mamba["dt_proj"]["kernel"][i, h] == in_proj[2 * d_inner + 2 * gn + h, i]
    assert mamba["conv_x"]["kernel"][k, h, p] == conv_w[h * P + p, 0, k]
    assert mamba["conv_B"]["kernel"][k, g, n] == conv_w[d_inner + g * N + n, 0, k]
    assert mamba["conv_C"]["kernel"][k, g, n] == conv_w[d_inner + gn + g * N + n, 0, k]
    assert mamba["conv_x"]["bias"][h, p] == conv_b[h * P + p]
    assert mamba["conv_B"]["bias"][g, n] == conv_b[d_inner + g * N + n]
    assert mamba["conv_C"]["bias"][g, n] == conv_b[d_inner + gn + g * N + n]
    assert mamba["norm"]["scale"][h, p] == raw["backbone.layers.0.mixer.norm.weight"][h * P + p]
    assert mamba["out_proj"]["kernel"][h, p, i] == raw["backbone.layers.0.mixer.out_proj.weight"][i, h * P + p]
    e, kv = int(rng.integers(8)), int(rng.integers(2))
    assert attn["q_proj"]["kernel"][i, h, e] == raw["backbone.layers.2.mixer.q_proj.weight"][h * 8 + e, i]
    assert attn["k_proj"]["kernel"][i, kv, e] == raw["backbone.layers.2.mixer.k_proj.weight"][kv * 8 + e, i]
    assert attn["v_proj"]["kernel"][i, kv, e] == raw["backbone.layers.2.mixer.v_proj.weight"][kv * 8 + e, i]
    assert attn["o_proj"]["kernel"][h, e, i] == raw["backbone.layers.2.mixer.o_proj.weight"][i, h * 8 + e]
  assert mamba["conv_x"]["kernel"].shape == (K, H, P)
  for key in ("A_log", "D", "dt_bias"):
    np.testing.assert_array_equal(mamba[key], raw[f"backbone.layers.0.mixer.{key}"])
  np.testing.assert_array_equal(mlp["up_proj"]["kernel"], raw["backbone.layers.1.mixer.up_proj.weight"].T)
  np.testing.assert_array_equal(mlp["down_proj"]["kernel"], raw["backbone.layers.1.mixer.down_proj.weight"].T)
  np.testing.assert_array_equal(params["embed"]["embedding"], raw["backbone.embeddings.weight"])
  np.testing.assert_array_equal(params["lm_head"]["kernel"], raw["lm_head.weight"].T)
  np.testing.assert_array_equal(params["norm_f"]["scale"], raw["backbone.norm_f.weight"])
  for i in range(3):
    np.testing.assert_array_equal(params[f"layers_{i}"]["norm"]["scale"], raw[f"backbone.layers.{i}.norm.weight"])
  assert sum(leaf.size for _, leaf in tree_leaves(params)) == sum(t.size for t in raw.values())


def test_save_load_round_trip_is_exact(saved_checkpoint, tmp_path):
  config, params = hf.load(saved_checkpoint)
  config = config.replace(time_step_limit=(0.25, 7.5))
  hf.save(tmp_path / "out", config, params)
  config2, params2 = hf.load(tmp_path / "out")
  assert config2 == config
  leaves, leaves2 = dict(tree_leaves(params)), dict(tree_leaves(params2))
  assert leaves.keys() == leaves2.keys()
  for path, leaf in leaves.items():
    assert leaf.dtype == leaves2[path].dtype and np.array_equal(leaf, leaves2[path]), path
  # The exported file holds exactly the tensors transformers saved.
  original, exported = (load_file(str(p / "model.safetensors")) for p in (saved_checkpoint, tmp_path / "out"))
  assert original.keys() == exported.keys()
  for key in original:
    np.testing.assert_array_equal(original[key], exported[key], err_msg=key)


def test_in_memory_prefix_accepted_and_mtp_heads_ignored(saved_checkpoint):
  """transformers reads both the on-disk ``backbone.`` and in-memory ``model.`` prefixes and skips ``mtp.*``."""
  raw = load_file(str(saved_checkpoint / "model.safetensors"))
  config, params = hf.load(saved_checkpoint)
  renamed = {("model." + k[len("backbone."):] if k.startswith("backbone.") else k): v for k, v in raw.items()}
  renamed["mtp.layers.0.norm.weight"] = np.ones(32, np.float32)
  for (path, a), (_, b) in zip(tree_leaves(params), tree_leaves(hf.params_from_hf(renamed, config))):
    assert np.array_equal(a, b), path


def test_round_trip_keeps_bfloat16(saved_checkpoint, tmp_path):
  config, params = hf.load(saved_checkpoint, dtype="bfloat16")
  hf.save(tmp_path / "bf16", config, params)
  assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
  _, params2 = hf.load(tmp_path / "bf16", dtype="bfloat16")
  _, params32 = hf.load(tmp_path / "bf16")  # bf16 on disk, fp32 by default in memory
  for (path, a), (_, b), (_, c) in zip(tree_leaves(params), tree_leaves(params2), tree_leaves(params32)):
    assert b.dtype.name == "bfloat16" and np.array_equal(a, b), path
    assert c.dtype.name == "float32" and np.array_equal(a.astype(np.float32), c), path


def test_save_refuses_heterogeneous_config(saved_checkpoint, tmp_path):
  config, params = hf.load(saved_checkpoint)
  child = config.replace(pattern="M-*-", intermediate_size_per_layer=(48, 24))
  with pytest.raises(hf.CheckpointError, match="heterogeneous.*intermediate_size_per_layer=\\(48, 24\\)"):
    hf.save(tmp_path / "child", child, params)
  assert not (tmp_path / "child").exists()


def test_save_refuses_params_that_do_not_match_config(saved_checkpoint, tmp_path):
  config, params = hf.load(saved_checkpoint)
  params["layers_1"]["mixer"]["up_proj"]["kernel"] = np.zeros((32, 47), np.float32)
  with pytest.raises(hf.CheckpointError, match=r"layers_1/mixer/up_proj/kernel has shape \(32, 47\), expected "
                                               r"\(32, 48\) for pattern index 1 \(MLP\)"):
    hf.save(tmp_path / "bad", config, params)


# ---------------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("changes, match", [
    (dict(tie_word_embeddings=True), r"tie_word_embeddings is True; only False is supported"),
    (dict(use_bias=True), r"use_bias is True; only False is supported"),
    (dict(mlp_bias=True), r"mlp_bias is True; only False is supported"),
    (dict(attention_bias=True), r"attention_bias is True; only False is supported"),
    (dict(use_conv_bias=False), r"use_conv_bias is False; only True is supported"),
    (dict(mlp_hidden_act="gelu"), r"mlp_hidden_act is 'gelu'; only 'relu2' is supported"),
])
def test_refuses_unsupported_config(saved_checkpoint, tmp_path, changes, match):
  path = copy_checkpoint(saved_checkpoint, tmp_path / "ckpt")
  config = json.loads((path / "config.json").read_text())
  config.update(changes)
  (path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
  with pytest.raises(hf.UnsupportedCheckpointError, match=match):
    hf.load(path)


def test_refuses_missing_tensor(saved_checkpoint, tmp_path):
  path = copy_checkpoint(saved_checkpoint, tmp_path / "ckpt")
  edit_tensors(path, lambda t: t.pop("backbone.layers.0.mixer.dt_bias"))
  with pytest.raises(hf.CheckpointError, match=r"missing tensor backbone\.layers\.0\.mixer\.dt_bias, expected "
                                               r"shape \(4,\) for pattern index 0 \(Mamba\)"):
    hf.load(path)


def test_refuses_extra_tensor(saved_checkpoint, tmp_path):
  path = copy_checkpoint(saved_checkpoint, tmp_path / "ckpt")
  edit_tensors(path, lambda t: t.update({"backbone.layers.1.mixer.up_proj.bias": np.zeros(48, np.float32)}))
  with pytest.raises(hf.CheckpointError, match=r"unexpected tensor backbone\.layers\.1\.mixer\.up_proj\.bias"):
    hf.load(path)


def test_refuses_wrong_shape(saved_checkpoint, tmp_path):
  path = copy_checkpoint(saved_checkpoint, tmp_path / "ckpt")

  def truncate(t):
    t["backbone.layers.0.mixer.in_proj.weight"] = t["backbone.layers.0.mixer.in_proj.weight"][:100]

  edit_tensors(path, truncate)
  with pytest.raises(hf.CheckpointError, match=r"backbone\.layers\.0\.mixer\.in_proj\.weight has shape \(100, 32\), "
                                               r"expected \(132, 32\) for pattern index 0 \(Mamba\)"):
    hf.load(path)


def test_refuses_config_that_disagrees_with_tensors(saved_checkpoint, tmp_path):
  path = copy_checkpoint(saved_checkpoint, tmp_path / "ckpt")
  edit_config(path, intermediate_size=64)
  with pytest.raises(hf.CheckpointError, match=r"up_proj\.weight has shape \(48, 32\), expected \(64, 32\) for "
                                               r"pattern index 1 \(MLP\)"):
    hf.load(path)


def test_refuses_missing_files_and_pickles(saved_checkpoint, tmp_path):
  with pytest.raises(hf.CheckpointError, match=r"config\.json does not exist"):
    hf.load(tmp_path / "nowhere")
  path = copy_checkpoint(saved_checkpoint, tmp_path / "ckpt")
  (path / "model.safetensors").rename(path / "pytorch_model.bin")
  with pytest.raises(hf.CheckpointError, match=r"no model\.safetensors or model\.safetensors\.index\.json .*"
                                               r"pickled ones \(pytorch_model\.bin\) are refused"):
    hf.load(path)


# ---------------------------------------------------------------------------------------------------- sharded
@pytest.fixture(scope="module")
def sharded_checkpoint(tmp_path_factory):
  """The "M*M-M" model saved by transformers in several shards, and the model."""
  model = make_hf_model("M*M-M", seed=3)
  path = tmp_path_factory.mktemp("hf") / "sharded"
  model.save_pretrained(path, max_shard_size="10KB")
  return path, model


def test_sharded_checkpoint_loads_like_the_tensors(sharded_checkpoint):
  path, model = sharded_checkpoint
  shards = sorted(p.name for p in path.glob("model-*.safetensors"))
  assert len(shards) >= 3, shards
  assert (path / "model.safetensors.index.json").is_file()
  merged = {}
  for shard in shards:
    merged.update(load_file(str(path / shard)))
  _, params = hf.load(path)
  reference = hf.params_from_hf(merged, hf.config_from_hf(json.loads((path / "config.json").read_text())))
  for (p, a), (_, b) in zip(tree_leaves(params), tree_leaves(reference)):
    assert np.array_equal(a, b), p


def test_refuses_missing_shard(sharded_checkpoint, tmp_path):
  path = copy_checkpoint(sharded_checkpoint[0], tmp_path / "ckpt")
  victim = sorted(path.glob("model-*.safetensors"))[1]
  victim.unlink()
  with pytest.raises(hf.CheckpointError, match=rf"shard {victim.name} named in model\.safetensors\.index\.json "
                                               r"\(for backbone\..* is missing"):
    hf.load(path)


# ---------------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("seed, name", list(enumerate(HF_CONFIGS)))
def test_logits_match_transformers(seed, name, tmp_path):
  model = make_hf_model(name, seed=10 + seed)
  set_hf_dt_limit(model, (0.0, math.inf))
  model.save_pretrained(tmp_path / "ckpt")
  config, params = hf.load(tmp_path / "ckpt")
  tokens = random_tokens(config.vocab_size)
  assert_logits_close(our_logits(config, params, tokens), hf_logits(model, tokens), f"{name} (no dt clamp)")


def test_logits_match_sharded_checkpoint(sharded_checkpoint):
  path, model = sharded_checkpoint
  set_hf_dt_limit(model, (0.0, math.inf))
  config, params = hf.load(path)
  tokens = random_tokens(config.vocab_size, seed=1)
  assert_logits_close(our_logits(config, params, tokens), hf_logits(model, tokens), "sharded M*M-M")


def test_logits_match_transformers_dt_clamp(tmp_path):
  """transformers' own clamp at time_step_min, reproduced by loading with time_step_limit=(time_step_min, inf)."""
  # dt_bias this negative puts softplus(dt) below time_step_min=1e-3 for many (token, head) pairs.
  model = make_hf_model("M*M-M", seed=7, dt_bias_range=(-9.0, -5.0))
  model.save_pretrained(tmp_path / "ckpt")
  time_step_min = model.config.time_step_min
  config, params = hf.load(tmp_path / "ckpt", time_step_limit=(time_step_min, math.inf))
  tokens = random_tokens(config.vocab_size, seed=2)

  # Make sure the clamp is exercised: recompute dt of the first Mamba block from its own input.
  captured = {}
  mixer = model.model.layers[0].mixer
  handle = mixer.in_proj.register_forward_hook(lambda m, i, o: captured.setdefault("proj", o))
  theirs = hf_logits(model, tokens)
  handle.remove()
  dt = torch.nn.functional.softplus(captured["proj"][..., -mixer.num_heads:] + mixer.dt_bias)
  assert (dt < time_step_min).float().mean() > 0.2

  assert_logits_close(our_logits(config, params, tokens), theirs, "M*M-M (dt clamped at time_step_min)")
  # And the clamp matters at this scale: without it ours would differ.
  unclamped = our_logits(config.replace(time_step_limit=(0.0, math.inf)), params, tokens)
  assert np.max(np.abs(unclamped - theirs)) > 10 * LOGIT_ATOL


# ---------------------------------------------------------------------------------------------------- export
def test_export_loads_in_transformers(tmp_path):
  """Our params (random, never touched by load) -> save -> NemotronHForCausalLM.from_pretrained -> same logits."""
  # A positive lower dt limit is exported as time_step_min, so stock transformers clamps exactly as we do.
  config = ModelConfig(pattern="*-M-M*", vocab_size=80, hidden_size=40, intermediate_size=24, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=12, mamba_num_heads=8, mamba_head_dim=4, n_groups=4,
                       ssm_state_size=6, conv_kernel=3, chunk_size=4, time_step_limit=(0.02, math.inf))
  tokens = random_tokens(config.vocab_size, seed=3)
  shapes = {path: leaf.shape for path, leaf in
            tree_leaves(jax.eval_shape(lambda: init_params(config, jax.random.key(0))))}
  rng = np.random.default_rng(11)
  params: dict = {}
  for path, shape in shapes.items():
    if path[-1] == "A_log":
      value = np.log(rng.uniform(0.5, 8.0, shape))
    elif path[-1] == "D":
      value = rng.uniform(0.5, 1.5, shape)
    elif path[-1] == "dt_bias":  # some dt fall below the 0.02 limit
      value = rng.uniform(-6.0, 0.0, shape)
    elif path[-1] == "scale":
      value = rng.uniform(0.6, 1.4, shape)
    elif path[-1] == "bias":
      value = 0.2 * rng.standard_normal(shape)
    elif path[-1] == "embedding" or path[-2].startswith("conv_"):
      value = 0.5 * rng.standard_normal(shape)
    else:  # projections: input ones are [d, ...], output ones [..., d]; keep activations at unit scale
      fan_in = shape[0] if shape[0] == config.hidden_size else math.prod(shape[:-1])
      value = rng.standard_normal(shape) / math.sqrt(fan_in)
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value.astype(np.float32)

  hf.save(tmp_path / "export", config, params)
  model = transformers.NemotronHForCausalLM.from_pretrained(tmp_path / "export").eval()
  assert model.model.layers[2].mixer.time_step_limit == (0.02, math.inf)
  assert_logits_close(our_logits(config, params, tokens), hf_logits(model, tokens), "export *-M-M* (dt >= 0.02)")
