"""Sharded train steps on 8 virtual CPU devices equal the single-device steps, and state is really sharded.

One subprocess (it needs ``--xla_force_host_platform_device_count=8`` before JAX starts) checks every mesh, so the
unsharded reference compiles once. Reference: the same step function under a plain ``jax.jit`` on one device.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

_SCRIPT = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {tests!r})
    import jax
    import jax.numpy as jnp
    import numpy as np
    jax.config.update("jax_compilation_cache_dir", {cache!r})
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    from conftest import random_params, small_config
    from elastic_jax.elastic.router import RouterSchedule
    from elastic_jax.elastic.space import ElasticSpace
    from elastic_jax.train.loop import compiled_elastic_step, compiled_lm_step
    from elastic_jax.train.optim import OptimizerConfig, default_router_optimizer_config, make_optimizer
    from elastic_jax.train.sharding import DEFAULT_RULES, make_mesh, shard_params
    from elastic_jax.train.elastic_step import ElasticSetup, Pins, init_elastic_state, make_elastic_step
    from elastic_jax.train.lm_step import make_lm_step
    from elastic_jax.train.state import TrainState

    assert jax.device_count() == 8
    # Every block kind; widths divisible by every mesh axis they are split over (fsdp up to 4, tensor 2).
    config = small_config("M*-", hidden_size=32, intermediate_size=64, vocab_size=64)
    space = ElasticSpace.from_fractions(config, (0.5, 1.0))
    setup = ElasticSetup(config, space, (1.0, 0.5), (0, 2, 1), RouterSchedule(total_steps=10), router_width=8,
                         ce_weight=0.5)
    optimizer = OptimizerConfig(learning_rate=1e-2, warmup_steps=0)
    router_optimizer = default_router_optimizer_config()
    tx, router_tx = make_optimizer(optimizer, 10), make_optimizer(router_optimizer, 10)
    teacher = random_params(config, seed=0)
    student = random_params(config, seed=1)
    batches = [jax.random.randint(jax.random.key(i), (8, 9), 0, config.vocab_size) for i in range(2)]
    probs = jnp.asarray([0.6, 0.4])

    def close(label, got, want):
      # Within 1e-5 of each array's scale (a weight near zero has no relative precision of its own).
      got, want = jax.tree.map(np.asarray, got), jax.tree.map(np.asarray, want)
      assert jax.tree.structure(got) == jax.tree.structure(want), label
      for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        scale = float(np.max(np.abs(w))) if w.size else 0.0
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * scale + 1e-12,
                                   err_msg=f"{{label}} {{jax.tree_util.keystr(path)}}")

    def close_after_adam(label, got, want, mu, lr):
      # AdamW's first step moves a weight by about lr * g / (|g| + 1e-8): where |g| is near 1e-8, last-bit
      # differences of g (summation order across devices) change that step visibly. Those weights (|g| < 1e-6,
      # with mu = 0.1 g after one step) are held to lr, every other weight to 1e-5 of its array's scale; the
      # gradients themselves are compared through AdamW's mu and nu.
      got, want, mu = (jax.tree.map(np.asarray, t) for t in (got, want, mu))
      for (path, g), w, m in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), jax.tree.leaves(mu)):
        well = np.abs(m) >= 1e-7
        np.testing.assert_allclose(g[well], w[well], rtol=1e-5, atol=1e-5 * float(np.max(np.abs(w))) + 1e-12,
                                   err_msg=f"{{label}} {{jax.tree_util.keystr(path)}}")
        assert np.all(np.abs(g - w)[~well] <= lr), (label, jax.tree_util.keystr(path))

    def run_steps(step, state, teacher_params):
      # The state after the first step, and both steps' metrics (the second's loss sees the first's update).
      first, metrics = step(state, teacher_params, batches[0], probs, Pins.off(setup))
      after_first = jax.tree.map(np.asarray, first)
      _, second_metrics = step(first, teacher_params, batches[1], probs, Pins.off(setup))
      return after_first, [metrics, second_metrics]

    # The single-device reference.
    reference = jax.jit(make_elastic_step(setup, tx, router_tx))
    ref_state, ref_metrics = run_steps(reference, init_elastic_state(setup, student, tx, router_tx, seed=3), teacher)

    def spec_and_shard(x):
      return [list(x.sharding.spec), sorted({{tuple(s.data.shape) for s in x.addressable_shards}})]

    report = {{}}
    for shape in [(8, 1, 1), (2, 4, 1), (2, 2, 2)]:
      mesh = make_mesh(shape)
      training = compiled_elastic_step(setup, optimizer, router_optimizer, 10, 3, mesh, DEFAULT_RULES)
      state = training.init(shard_params(student, training.state_shardings.params))
      mlp_kernel = state.params["layers_2"]["mixer"]["up_proj"]["kernel"]
      adam = state.opt_state[1][0]  # clip_by_global_norm, then adamw's ScaleByAdamState
      report[str(shape)] = {{
          "up_proj": spec_and_shard(mlp_kernel),
          "up_proj_mu": spec_and_shard(adam.mu["layers_2"]["mixer"]["up_proj"]["kernel"]),
          "up_proj_nu": spec_and_shard(adam.nu["layers_2"]["mixer"]["up_proj"]["kernel"]),
          "embedding": spec_and_shard(state.params["embed"]["embedding"]),
          "q_proj": spec_and_shard(state.params["layers_1"]["mixer"]["q_proj"]["kernel"]),
          "x_proj": spec_and_shard(state.params["layers_0"]["mixer"]["x_proj"]["kernel"]),
          "router": sorted({{str(tuple(x.sharding.spec)) for x in jax.tree.leaves(state.router_params)}}),
      }}
      teacher_sharded = shard_params(teacher, training.state_shardings.params)
      state, metrics = run_steps(training.step, state, teacher_sharded)
      close(f"{{shape}} metrics", metrics, ref_metrics)
      close(f"{{shape}} optimizer state", state.opt_state, ref_state.opt_state)  # AdamW's mu, nu: the grads
      close(f"{{shape}} router optimizer state", state.router_opt_state, ref_state.router_opt_state)
      close_after_adam(f"{{shape}} params", state.params, ref_state.params, ref_state.opt_state[1][0].mu,
                       optimizer.learning_rate)
      close_after_adam(f"{{shape}} router params", state.router_params, ref_state.router_params,
                       ref_state.router_opt_state[1][0].mu, router_optimizer.learning_rate)

    # The plain LM step (parent pretraining) on the (2, 2, 2) mesh: fresh params are created sharded, and one step
    # from the same random params equals the single-device step.
    lm = compiled_lm_step(config, optimizer, 10, mesh)
    fresh = lm.init(jax.random.key(0))
    report["lm_init"] = {{"up_proj": spec_and_shard(fresh.params["layers_2"]["mixer"]["up_proj"]["kernel"]),
                          "embedding": spec_and_shard(fresh.params["embed"]["embedding"])}}
    lm_state = TrainState(step=jnp.zeros((), jnp.int32), params=student, opt_state=tx.init(student),
                          rng=jax.random.key_data(jax.random.key(0)))
    ref_lm_state, ref_lm_metrics = jax.jit(make_lm_step(config, tx))(lm_state, batches[0])
    got_lm_state, got_lm_metrics = lm.step(jax.device_put(lm_state, lm.state_shardings), batches[0])
    close("lm metrics", got_lm_metrics, ref_lm_metrics)
    close("lm params", got_lm_state.params, ref_lm_state.params)
    report["lm_params_spec"] = spec_and_shard(got_lm_state.params["layers_2"]["mixer"]["up_proj"]["kernel"])
    print("REPORT " + json.dumps(report))
""")


def test_sharded_steps_equal_single_device_and_state_is_sharded(tmp_path):
  script = tmp_path / "sharded.py"
  cache = os.path.join(os.environ.get("TMPDIR", "/tmp"), "elastic_jax_test_xla_cache")
  script.write_text(_SCRIPT.format(tests=str(pathlib.Path(__file__).parent), cache=cache))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900)
  assert proc.returncode == 0, proc.stderr[-6000:]
  report = json.loads(proc.stdout.split("REPORT ", 1)[1])

  # [embed=32, mlp=64] kernels: embed over fsdp, mlp over tensor; AdamW's moments exactly like their params.
  for shape, fsdp, tensor in [("(8, 1, 1)", 1, 1), ("(2, 4, 1)", 4, 1), ("(2, 2, 2)", 2, 2)]:
    mesh = report[shape]
    for name in ("up_proj", "up_proj_mu", "up_proj_nu"):
      assert mesh[name] == [["fsdp", "tensor"], [[32 // fsdp, 64 // tensor]]], (shape, name)
    assert mesh["embedding"] == [["tensor", "fsdp"], [[64 // tensor, 32 // fsdp]]]
    # q [embed, heads=4, head_dim=8], Mamba x [embed, ssm_heads=4, mamba_head_dim=8]: heads over tensor.
    assert mesh["q_proj"] == [["fsdp", "tensor", None], [[32 // fsdp, 4 // tensor, 8]]]
    assert mesh["x_proj"] == [["fsdp", "tensor", None], [[32 // fsdp, 4 // tensor, 8]]]
    assert mesh["router"] == ["()"]  # replicated
  assert report["lm_init"]["up_proj"] == [["fsdp", "tensor"], [[16, 32]]]
  assert report["lm_init"]["embedding"] == [["tensor", "fsdp"], [[32, 16]]]
  assert report["lm_params_spec"] == [["fsdp", "tensor"], [[16, 32]]]
