"""Context parallelism: sequence-sharded conv, SSD, attention and the whole model equal their unsharded runs.

The sharded runs need several devices, so one subprocess with 4 virtual CPU devices (``XLA_FLAGS`` set before JAX
starts) runs the comparisons on two meshes, context=4 and data=2 x context=2, and reports the largest errors; the
tests below read that report. Sequences span several SSD chunks per shard and the model runs with per-sample masks. Each comparison is against an independent reference: the same computation on one
device without a mesh (the SSD also against the token-scan oracle), or slices of the unsharded input for the halo.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import warnings

import pytest

DEVICES = 4
MESH_SHAPES = {"context4": (1, 1, 1, 4, 1), "data2_context2": (2, 1, 1, 2, 1)}  # (data, fsdp, tensor, context, expert)
# What each mesh runs. The single mixers (gradients w.r.t. their inputs too) run on one mesh only, to keep compiles
# few; the whole model, which contains them, and the SSD op run on both.
CASES = {"context4": ("ssd", "mamba_mixer", "attention", "hybrid_lm"), "data2_context2": ("ssd", "hybrid_lm")}
LENGTH = 40  # 10 or 20 tokens per shard: 3 or 5 SSD chunks of 4, the last one partial
TOLERANCE = 2e-5  # fp32; errors are relative to the reference's largest magnitude


@pytest.fixture(scope="module")
def report():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={DEVICES} "
                      "--xla_backend_optimization_level=0")  # conftest's fast-compile setting, inherited
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, str(pathlib.Path(__file__))], env=env, capture_output=True, text=True,
                        timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mesh_name,case", [(mesh, case) for mesh, cases in CASES.items() for case in cases])
def test_sharded_equals_unsharded(report, mesh_name, case):
  errors = report[mesh_name][case]
  assert errors, "no comparison was made"
  for quantity, error in errors.items():
    assert error < TOLERANCE, f"{case} on {mesh_name}: {quantity} differs by {error:.2e} (relative)"


@pytest.mark.parametrize("mesh_name", MESH_SHAPES)
def test_halo_holds_the_left_neighbours_last_inputs(report, mesh_name):
  assert report[mesh_name]["halo_exact"]


@pytest.mark.parametrize("mesh_name", MESH_SHAPES)
def test_sharded_programs_communicate(report, mesh_name):
  # The comparisons above would pass trivially if the model silently took the single-device path.
  assert report[mesh_name]["collectives"] == dict.fromkeys(CASES[mesh_name], True)


@pytest.mark.parametrize("mesh_name", MESH_SHAPES)
def test_unsplittable_sequences_take_the_single_device_path(report, mesh_name):
  assert report[mesh_name]["unsplit"] == {"indivisible": True, "too_short_for_the_halo": True, "init": True}
  # Only the sequence that is long enough to split but not a multiple of the context size warns.
  (message,) = report[mesh_name]["unsplit_warnings"]
  context = MESH_SHAPES[mesh_name][3]
  assert f"sequence length {LENGTH + 1}" in message and f"'context' axis size {context}" in message


# ----------------------------------------------------------------------------------------------------------------------
# The subprocess: everything below runs with DEVICES virtual devices.


def _relative_error(actual, expected) -> float:
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  worst = 0.0
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    worst = max(worst, float(np.max(np.abs(a - e)) / max(np.max(np.abs(e)), 1e-30)))
  return worst


def _worker() -> dict:
  # pylint: disable=import-outside-toplevel
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  from conftest import random_params, small_config
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  from elastic_jax.model import HybridLM
  from elastic_jax.model.attention import Attention
  from elastic_jax.model.mamba import Mamba2Mixer
  from elastic_jax.ops import context_parallel as cp
  from elastic_jax.ops import ssd as ssd_ops
  from elastic_jax.train.sharding import DEFAULT_RULES, MESH_AXES

  assert jax.device_count() == DEVICES
  assert MESH_AXES == ("data", "fsdp", "tensor", cp.CONTEXT_AXIS, "expert")  # the order MESH_SHAPES is written in
  config = small_config("M*-M")
  params = random_params(config, seed=1)
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  batch, d = 2, config.hidden_size

  # Per-sample masks (row 1 a smaller sub-network than row 0), fractional entries included.
  masks = {
      "hidden": jnp.asarray([[1.0] * d, [1.0] * (d // 2) + [0.0] * (d // 2)]),
      "depth": jnp.asarray([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 1.0]]),
      "layers_0": {"ssm_heads": jnp.asarray([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]]),
                   "mamba_head_dim": jnp.asarray([[1.0] * 8, [1.0] * 6 + [0.5, 0.0]])},
      "layers_1": {"heads": jnp.asarray([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 1.0, 0.0]])},
      "layers_2": {"mlp": jnp.asarray([[1.0] * 48, [1.0] * 24 + [0.0] * 24])},
  }
  tokens = jnp.asarray(rng.integers(0, config.vocab_size, (batch, LENGTH)), jnp.int32)
  u = normal(batch, LENGTH, d)

  def mixer_loss(module, layer, cotangent):
    def loss(layer_params, u):
      out, _ = module.apply({"params": layer_params}, u, masks=masks[layer])
      return jnp.sum(out * cotangent), out
    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)

  mamba = Mamba2Mixer(config, config.block_specs()[0])
  attention = Attention(config, config.block_specs()[1])
  mamba_fn = mixer_loss(mamba, "layers_0", normal(batch, LENGTH, d))
  attention_fn = mixer_loss(attention, "layers_1", normal(batch, LENGTH, d))
  logits_cotangent = normal(batch, LENGTH, config.vocab_size)

  def lm_fn(params, tokens):
    def loss(params):
      logits = HybridLM(config).apply({"params": params}, tokens, masks=masks)
      return jnp.sum(logits * logits_cotangent), logits
    return jax.value_and_grad(loss, has_aux=True)(params)

  # SSD op: random inputs with varied decays; the loss reads the outputs and the final state.
  b, h, p, g, n = batch, 4, 8, 2, 16
  ssd_args = (normal(b, LENGTH, h, p), jnp.asarray(rng.uniform(0.05, 0.6, (b, LENGTH, h)), jnp.float32),
              -jnp.asarray(rng.uniform(0.3, 2.0, (h,)), jnp.float32), normal(b, LENGTH, g, n), normal(b, LENGTH, g, n),
              normal(h))
  y_cotangent, state_cotangent = normal(b, LENGTH, h, p), normal(b, h, p, n)

  def ssd_loss(run):
    def loss(*args):
      y, state = run(*args)
      return jnp.sum(y * y_cotangent) + jnp.sum(state * state_cotangent), (y, state)
    return jax.value_and_grad(loss, argnums=tuple(range(6)), has_aux=True)

  oracle_ssd = lambda *args: ssd_ops.ssd(*args, chunk_size=4, impl="oracle")
  sharded_ssd = lambda *args: cp.ssd(*args, context=cp.active_context(b, LENGTH), chunk_size=4, impl="chunked")

  conv_x = normal(b, LENGTH, h, p)

  # Unsharded references: no mesh at all.
  reference = {
      "mamba_mixer": jax.jit(mamba_fn)(params["layers_0"]["mixer"], u),
      "attention": jax.jit(attention_fn)(params["layers_1"]["mixer"], u),
      "hybrid_lm": jax.jit(lm_fn)(params, tokens),
      "ssd": jax.jit(ssd_loss(oracle_ssd))(*ssd_args),
  }

  def run_sharded(fn, *args):
    """(fn(*args) jitted, whether its program exchanges data between shards), from one trace."""
    traced = jax.jit(fn).trace(*args)
    jaxpr = str(traced.jaxpr)
    return traced.lower().compile()(*args), "ppermute" in jaxpr or "all_gather" in jaxpr

  report = {}
  for mesh_name, shape in MESH_SHAPES.items():
    mesh = Mesh(np.asarray(jax.devices()).reshape(shape), MESH_AXES)
    sequence = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), cp.CONTEXT_AXIS))
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
      shard = lambda x: jax.device_put(x, sequence)
      programs = {
          "mamba_mixer": lambda: run_sharded(mamba_fn, params["layers_0"]["mixer"], shard(u)),
          "attention": lambda: run_sharded(attention_fn, params["layers_1"]["mixer"], shard(u)),
          "hybrid_lm": lambda: run_sharded(lm_fn, params, shard(tokens)),
          "ssd": lambda: run_sharded(ssd_loss(sharded_ssd), *ssd_args),
      }
      runs = {name: programs[name]() for name in CASES[mesh_name]}
      results = {name: result for name, (result, _) in runs.items()}
      collectives = {name: communicates for name, (_, communicates) in runs.items()}
      context = cp.active_context(b, LENGTH)
      halo = jax.jit(context.shard_map(lambda x: cp.exchange_halo(x, config.conv_kernel - 1),
                                       in_specs=context.sequence_spec(4), out_specs=context.sequence_spec(4)))(conv_x)
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        unsplit = {"indivisible": cp.active_context(b, LENGTH + 1) is None,
                   "too_short_for_the_halo": cp.active_context(b, 2 * shape[3], min_shard_length=3) is None}
        indivisible_warnings = [str(w.message) for w in caught]
        # Parameter init traces a one-token sequence under the training mesh: it must take the unsplit path.
        init_shapes = jax.eval_shape(lambda: nn.meta.unbox(
            HybridLM(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]))
        unsplit["init"] = jax.tree.structure(init_shapes) == jax.tree.structure(params)

    errors = {}
    for name in {"mamba_mixer", "attention"} & set(results):
      (_, ref_out), (ref_grad_params, ref_grad_input) = reference[name]
      (_, out), (grad_params, grad_input) = results[name]
      errors[name] = {"output": _relative_error(out, ref_out),
                      "grad_params": _relative_error(grad_params, ref_grad_params),
                      "grad_input": _relative_error(grad_input, ref_grad_input)}
    (_, ref_logits), ref_grads = reference["hybrid_lm"]
    (_, logits), grads = results["hybrid_lm"]
    errors["hybrid_lm"] = {"logits": _relative_error(logits, ref_logits),
                           "grad_params": _relative_error(grads, ref_grads)}
    (_, (ref_y, ref_state)), ref_grads = reference["ssd"]
    (_, (y, state)), grads = results["ssd"]
    errors["ssd"] = {"y": _relative_error(y, ref_y), "final_state": _relative_error(state, ref_state),
                     **{f"grad_{name}": _relative_error(grad, ref_grad)
                        for name, grad, ref_grad in zip(("x", "dt", "A", "B", "C", "D"), grads, ref_grads)}}

    # Shard s's halo (rows s*(K-1) ... of the stacked result) must be the K-1 inputs before its first token.
    width, per_shard = config.conv_kernel - 1, LENGTH // shape[3]
    expected_halo = np.concatenate(
        [np.zeros_like(conv_x[:, :width]) if s == 0 else conv_x[:, s * per_shard - width:s * per_shard]
         for s in range(shape[3])], axis=1)
    report[mesh_name] = {
        **errors,
        "halo_exact": bool(np.array_equal(np.asarray(halo), expected_halo)),
        "collectives": collectives,
        "unsplit": unsplit,
        "unsplit_warnings": indivisible_warnings,
    }
  return report


if __name__ == "__main__":
  print(json.dumps(_worker()))
