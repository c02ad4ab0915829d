"""HybridLM: config validation, cached decoding == full forward, generation == uncached greedy, dtypes."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_params, small_config

from elastic_jax.eval.generate import generate, generate_ragged
from elastic_jax.model import ConfigError, HybridLM, ModelConfig, init_cache, param_logical_axes


# ------------------------------------------------------------------------------------------------ config validation
@pytest.mark.parametrize("overrides, message", [
    (dict(pattern="M-X*"), r"unknown block character\(s\) \['X'\]; use 'M' \(Mamba\).*'E' \(MoE\)"),
    (dict(pattern=""), "pattern is empty"),
    (dict(mamba_num_heads=6, n_groups=4), r"mamba_num_heads=6 is not a multiple of n_groups=4"),
    (dict(num_attention_heads=6, num_key_value_heads=4), r"num_attention_heads=6 is not a multiple of "
                                                          r"num_key_value_heads=4"),
    (dict(intermediate_size_per_layer=(16, 32)), r"intermediate_size_per_layer has 2 entries but .* 1 mlp blocks"),
    (dict(mamba_num_heads_per_layer=(4, 5)), r"Mamba block 3: mamba_num_heads=5 is not a multiple of n_groups=2"),
    (dict(num_attention_heads_per_layer=(0,)), r"num_attention_heads_per_layer\[0\]=0 must be a positive integer"),
    (dict(hidden_size=0), r"hidden_size=0 must be a positive integer"),
    (dict(ssm_state_size=-1), r"ssm_state_size=-1 must be a positive integer"),
    (dict(dtype="float8"), r"dtype='float8' is not supported"),
    (dict(ssd_impl="cuda"), r"ssd_impl='cuda' is not one of"),
    (dict(ssd_inter_chunk="tree"), r"ssd_inter_chunk='tree' is not one of"),
    (dict(time_step_limit=(0.1, 0.01)), r"time_step_limit=\(0.1, 0.01\) must satisfy"),
    (dict(layer_norm_epsilon=0.0), r"layer_norm_epsilon=0.0 must be > 0"),
])
def test_config_errors_name_field_and_value(overrides, message):
  with pytest.raises(ConfigError, match=message):
    small_config(**overrides)


def test_config_from_dict_rejects_unknown_keys_and_round_trips():
  config = small_config(mamba_num_heads_per_layer=(4, 2), intermediate_size_per_layer=(24,))
  assert ModelConfig.from_dict(config.to_dict()) == config
  with pytest.raises(ConfigError, match=r"unknown model config key\(s\) \['hiden_size'\]"):
    ModelConfig.from_dict({**config.to_dict(), "hiden_size": 3})


def test_block_specs_apply_per_layer_widths_in_pattern_order():
  config = small_config("M-M*-", intermediate_size_per_layer=(16, 40), mamba_num_heads_per_layer=(2, 6),
                        mamba_head_dim_per_layer=(8, 4), num_attention_heads_per_layer=(2,))
  specs = config.block_specs()
  assert [s.kind for s in specs] == ["mamba", "mlp", "mamba", "attention", "mlp"]
  assert (specs[0].mamba_num_heads, specs[0].mamba_head_dim) == (2, 8)
  assert (specs[2].mamba_num_heads, specs[2].mamba_head_dim) == (6, 4)
  assert specs[1].intermediate_size == 16 and specs[4].intermediate_size == 40
  assert specs[3].num_attention_heads == 2
  assert not config.is_homogeneous and small_config().is_homogeneous


def test_heterogeneous_model_has_per_layer_shapes():
  config = small_config("M-M*-", intermediate_size_per_layer=(16, 40), mamba_num_heads_per_layer=(2, 6),
                        mamba_head_dim_per_layer=(8, 4), num_attention_heads_per_layer=(2,))
  params = random_params(config)
  assert params["layers_0"]["mixer"]["x_proj"]["kernel"].shape == (32, 2, 8)
  assert params["layers_2"]["mixer"]["out_proj"]["kernel"].shape == (6, 4, 32)
  assert params["layers_2"]["mixer"]["norm"]["scale"].shape == (6, 4)
  assert params["layers_3"]["mixer"]["q_proj"]["kernel"].shape == (32, 2, 8)
  assert params["layers_4"]["mixer"]["up_proj"]["kernel"].shape == (32, 40)
  logits = jax.jit(HybridLM(config).apply)({"params": params}, jnp.zeros((2, 9), jnp.int32))
  assert logits.shape == (2, 9, 64) and logits.dtype == jnp.float32


def test_every_param_has_logical_axes():
  config = small_config()
  axes = param_logical_axes(config)
  params = random_params(config)
  for spec, leaf in zip(jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
                        jax.tree.leaves(params)):
    assert len(spec) == leaf.ndim and all(isinstance(a, str) for a in spec)


# ------------------------------------------------------------------------------------------------ decoding
def _decode_token_by_token(config, params, tokens):
  model = HybridLM(config)
  cache = init_cache(config, tokens.shape[0], tokens.shape[1])
  step = jax.jit(lambda p, t, c: model.apply({"params": p}, t, cache=c))
  logits = []
  for t in range(tokens.shape[1]):
    out, cache = step(params, tokens[:, t:t + 1], cache)
    logits.append(out)
  return jnp.concatenate(logits, axis=1)


@pytest.mark.parametrize("pattern", ["M", "*", "-", "M-*M*-"])
def test_cached_decoding_reproduces_full_forward(pattern):
  config = small_config(pattern)
  params = random_params(config, seed=1)
  tokens = jax.random.randint(jax.random.key(2), (3, 13), 0, config.vocab_size)
  full = jax.jit(HybridLM(config).apply)({"params": params}, tokens)
  assert float(jnp.std(full)) > 0.3  # the comparison carries signal
  stepwise = _decode_token_by_token(config, params, tokens)
  np.testing.assert_allclose(stepwise, full, atol=1e-4, rtol=0)


def test_prefill_in_pieces_then_decode_reproduces_full_forward():
  """Multi-token continuation from a cache: chunked SSD from an initial state, conv history, KV cache offset."""
  config = small_config("M*-M")
  params = random_params(config, seed=3)
  tokens = jax.random.randint(jax.random.key(4), (2, 17), 0, config.vocab_size)
  apply = jax.jit(HybridLM(config).apply)
  full = apply({"params": params}, tokens)
  cache = init_cache(config, 2, 17)
  pieces = []
  for start, stop in [(0, 6), (6, 7), (7, 16), (16, 17)]:
    out, cache = apply({"params": params}, tokens[:, start:stop], cache=cache)
    pieces.append(out)
  np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=1e-4, rtol=0)
  assert int(cache["position"]) == 17


# ------------------------------------------------------------------------------------------------ generation
def _greedy_without_cache(config, params, prompts, n):
  """Slow path: recompute the whole forward for every new token (right-padded to one length: the model is causal,
  so the padding never reaches the position read)."""
  forward = jax.jit(HybridLM(config).apply)
  length = prompts.shape[1]
  seq = jnp.pad(prompts, ((0, 0), (0, n)))
  for t in range(length, length + n):
    nxt = jnp.argmax(forward({"params": params}, seq)[:, t - 1], axis=-1).astype(jnp.int32)
    seq = seq.at[:, t].set(nxt)
  return seq


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_generate_matches_uncached_greedy(batch):
  config = small_config("M-*M")
  params = random_params(config, seed=5)
  prompts = jax.random.randint(jax.random.key(batch), (batch, 6), 0, config.vocab_size)
  out = generate(config, params, prompts, max_new_tokens=7)
  np.testing.assert_array_equal(out, _greedy_without_cache(config, params, prompts, 7))


def test_sampling_is_reproducible_and_uses_temperature():
  config = small_config("M*")
  params = random_params(config, seed=6)
  prompts = jnp.zeros((4, 3), jnp.int32)
  a = generate(config, params, prompts, max_new_tokens=12, temperature=1.5, rng=jax.random.key(7))
  b = generate(config, params, prompts, max_new_tokens=12, temperature=1.5, rng=jax.random.key(7))
  greedy = generate(config, params, prompts, max_new_tokens=12)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, greedy)  # sampling at high temperature departs from greedy
  # Every greedy row is identical (same prompt), sampled rows differ from each other.
  assert len({tuple(r) for r in np.asarray(greedy)}) == 1 and len({tuple(r) for r in np.asarray(a)}) > 1


def test_generate_stops_rows_at_eos():
  config = small_config("-*")
  params = random_params(config, seed=8)
  prompts = jax.random.randint(jax.random.key(9), (2, 4), 0, config.vocab_size)
  free = np.asarray(generate(config, params, prompts, max_new_tokens=8))
  eos = int(free[0, 6])  # the third generated token of row 0
  out = np.asarray(generate(config, params, prompts, max_new_tokens=8, eos_id=eos))
  first = 4 + int(np.argmax(free[0, 4:] == eos))
  np.testing.assert_array_equal(out[0, :first + 1], free[0, :first + 1])
  assert (out[0, first:] == eos).all()


# ------------------------------------------------------------------------------------------------ numerics
def test_bf16_compute_tracks_fp32():
  config = small_config("M-*M")
  params = random_params(config, seed=10)
  tokens = jax.random.randint(jax.random.key(11), (2, 16), 0, config.vocab_size)
  ref = jax.jit(HybridLM(config).apply)({"params": params}, tokens)
  low = jax.jit(HybridLM(config.replace(dtype="bfloat16")).apply)({"params": params}, tokens)
  assert low.dtype == jnp.float32  # logits always come back in fp32
  rel = float(jnp.linalg.norm(low - ref) / jnp.linalg.norm(ref))
  assert rel < 5e-2, rel


def test_time_step_limit_clamps_dt():
  """A lower dt clamp changes the output exactly when some softplus(dt) falls below it."""
  config = small_config("M")
  params = random_params(config, seed=12)
  tokens = jax.random.randint(jax.random.key(13), (2, 9), 0, config.vocab_size)
  base = HybridLM(config).apply({"params": params}, tokens)
  params["layers_0"]["mixer"]["dt_bias"] = jnp.full((4,), -12.0)  # softplus ~ 6e-6, far below 1e-3
  unclamped = HybridLM(config).apply({"params": params}, tokens)
  clamped = HybridLM(config.replace(time_step_limit=(1e-3, math.inf))).apply({"params": params}, tokens)
  assert float(jnp.abs(unclamped - base).max()) > 1e-3
  assert float(jnp.abs(clamped - unclamped).max()) > 1e-5


# ------------------------------------------------------------------------------------------------ ragged prompts
RAGGED_WIDTH = 10  # > chunk_size 4: the one-pass prefill crosses several SSD chunks
RAGGED_LENGTHS = np.array([3, RAGGED_WIDTH, 1, 7, 2])  # 1 and 2 are shorter than conv_kernel - 1 = 3


def _ragged_prompts(config, seed):
  """[b, T] right-padded prompts (the padding is random tokens: it must not matter) and their lengths."""
  rng = np.random.default_rng(seed)
  return rng.integers(0, config.vocab_size, (len(RAGGED_LENGTHS), RAGGED_WIDTH)).astype(np.int32), RAGGED_LENGTHS


@pytest.mark.parametrize("pattern", ["M-*M*-", "*M", "M", "*"])
def test_ragged_generation_equals_each_prompt_alone(pattern):
  config = small_config(pattern)
  params = random_params(config, seed=5)
  prompts, lengths = _ragged_prompts(config, seed=0)
  out = np.asarray(generate_ragged(config, params, prompts, lengths, max_new_tokens=6))
  for i, length in enumerate(lengths):
    alone = np.asarray(generate(config, params, prompts[i:i + 1, :length], max_new_tokens=6))[0, length:]
    np.testing.assert_array_equal(out[i], alone, err_msg=f"row {i} (prompt length {length})")
  eos = int(out[1, 2])
  stopped = np.asarray(generate_ragged(config, params, prompts, lengths, max_new_tokens=6, eos_id=eos))
  first = int(np.argmax(out[1] == eos))
  assert (stopped[1, first:] == eos).all() and (stopped[1, :first] == out[1, :first]).all()


def test_rows_end_at_their_own_limit_or_stop_sequence_and_the_others_go_on():
  """Per-row limits and stop sequences cut each row exactly where asked, with ``eos_id`` after the cut, and leave the
  other rows of the batch as they were without them (reference: the same batch decoded with neither)."""
  config = small_config("M-*M*-")
  params = random_params(config, seed=5)
  prompts, lengths = _ragged_prompts(config, seed=0)
  new_tokens, fill = 8, config.vocab_size - 1
  full = np.asarray(generate_ragged(config, params, prompts, lengths, max_new_tokens=new_tokens, eos_id=fill))
  assert not (full == fill).any()  # the filler marks only the cut positions below
  limits = np.asarray([3, new_tokens, 1, 5, new_tokens][:len(lengths)], np.int32)
  stop = np.full((len(lengths), 3), -1, np.int32)
  stop[1, 1:] = full[1, 3:5]  # row 1 stops after its 5th token (its first match: checked below)
  stop[4, :] = full[4, 2:5]   # row 4 after its 5th, on a three-token sequence
  cut = np.asarray(generate_ragged(config, params, prompts, lengths, max_new_tokens=new_tokens, eos_id=fill,
                                   limits=limits, stop=stop))
  ends = []
  for i in range(len(lengths)):
    end = int(limits[i])
    if (stop[i] >= 0).any():
      seq = stop[i][stop[i] >= 0]
      end = min(end, next(j + 1 for j in range(len(seq) - 1, new_tokens) if (full[i, j + 1 - len(seq):j + 1] == seq).all()))
    ends.append(end)
    np.testing.assert_array_equal(cut[i, :end], full[i, :end], err_msg=f"row {i}")
    assert (cut[i, end:] == fill).all(), f"row {i} goes on after token {end}: {cut[i]}"
  assert ends[1] <= 5 and ends[4] <= 5 and ends[0] == 3 and ends[2] == 1


@pytest.mark.parametrize("pattern", ["M-*M*-", "*M", "M", "*"])
def test_left_padded_prefill_equals_each_prompt_alone(pattern):
  """One cached pass over left-padded prompts gives, from each row's start on, the logits of its prompt alone
  (unpadded, uncached forward), whatever the pad tokens; so does the next decode step from that cache."""
  config = small_config(pattern)
  params = random_params(config, seed=7)
  apply = jax.jit(HybridLM(config).apply)
  rows, lengths = _ragged_prompts(config, seed=1)
  width = RAGGED_WIDTH
  start = width - lengths
  # Left-align by hand; the pad prefix keeps random tokens, so a leak of pad activations would show.
  pad = np.random.default_rng(2).integers(0, config.vocab_size, rows.shape).astype(np.int32)
  left = np.stack([np.concatenate([pad[i, :start[i]], rows[i, :length]]) for i, length in enumerate(lengths)])
  nxt = np.random.default_rng(3).integers(0, config.vocab_size, (len(lengths), 1)).astype(np.int32)
  cache = init_cache(config, len(lengths), width + 1, start=start)
  logits, cache = apply({"params": params}, jnp.asarray(left), cache=cache)
  step_logits, _ = apply({"params": params}, jnp.asarray(nxt), cache=cache)
  for i, length in enumerate(lengths):
    alone = apply({"params": params}, jnp.asarray(np.concatenate([rows[i, :length], nxt[i]]))[None])[0]
    assert float(jnp.std(alone)) > 0.3  # the comparison carries signal
    np.testing.assert_allclose(logits[i, start[i]:], alone[:length], atol=1e-5, rtol=0, err_msg=f"row {i}")
    np.testing.assert_allclose(step_logits[i, 0], alone[length], atol=1e-5, rtol=0, err_msg=f"row {i}")


def _loops(jaxpr) -> list[tuple[str, int | None]]:
  """The ``lax.scan``s (with their lengths) and ``lax.while_loop``s in ``jaxpr``, descending into calls but not into
  a loop's own body."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("scan", "while"):
      found.append((eqn.primitive.name, eqn.params.get("length")))
      continue
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr wraps its Jaxpr
        if hasattr(sub, "eqns"):
          found += _loops(sub)
  return found


def test_ragged_generation_prefills_in_one_pass_with_one_compile():
  """The only loops are the SSD's scans over chunks (prefill, one per Mamba block) and the decode loop of one-token
  steps: no token of any prompt goes through a decode step. Any length mix reuses one compile."""
  config = small_config("M-*M*-", ssd_impl="chunked", ssd_inter_chunk="scan")
  params = random_params(config, seed=5)
  prompts, lengths = _ragged_prompts(config, seed=0)
  new_tokens = 6
  jaxpr = jax.make_jaxpr(lambda p, t, n: generate_ragged(config, p, t, n, max_new_tokens=new_tokens))(
      params, prompts, lengths)
  chunks = -(-RAGGED_WIDTH // config.chunk_size)
  mamba_blocks = config.pattern.count("M")
  assert sorted(_loops(jaxpr.jaxpr), key=str) == sorted([("scan", chunks)] * mamba_blocks + [("while", None)],
                                                        key=str)

  generate_ragged(config, params, prompts, lengths, max_new_tokens=new_tokens)
  compiled = generate_ragged._cache_size()  # pylint: disable=protected-access
  for mix in ([1, 1, 1, 1, 1], [RAGGED_WIDTH] * 5, [4, 9, 2, 6, 3]):
    generate_ragged(config, params, prompts, np.asarray(mix), max_new_tokens=new_tokens)
  assert generate_ragged._cache_size() == compiled  # pylint: disable=protected-access
