"""Sharded train steps on 8 virtual CPU devices equal the single-device steps, and state is really sharded: dense
blocks over (data, fsdp, tensor) meshes, MoE blocks with their experts split over the expert axis.

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
    import json, os, re, sys
    import flax.linen as nn
    sys.path.insert(0, {tests!r})
    import jax
    import jax.numpy as jnp
    import numpy as np
    jax.config.update("jax_compilation_cache_dir", {cache!r})
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    from conftest import random_params, small_config
    from elastic_jax.model.hybrid import HybridLM
    from elastic_jax.elastic.router import RouterSchedule
    from elastic_jax.elastic.space import ElasticSpace
    from elastic_jax.train.loop import compiled_elastic_step, compiled_lm_step
    from elastic_jax.train.optim import OptimizerConfig, default_router_optimizer_config, make_optimizer
    from elastic_jax.train.sharding import DEFAULT_RULES, make_mesh, shard_params
    from elastic_jax.train.elastic_step import ElasticSetup, Pins, init_elastic_state, make_elastic_step
    from elastic_jax.train.lm_step import make_lm_step
    from elastic_jax.train.state import TrainState

    assert jax.device_count() == 8
    optimizer = OptimizerConfig(learning_rate=1e-2, warmup_steps=0)
    router_optimizer = default_router_optimizer_config()
    tx, router_tx = make_optimizer(optimizer, 10), make_optimizer(router_optimizer, 10)
    probs = jnp.asarray([0.6, 0.4])

    def elastic_setup(config):
      space = ElasticSpace.from_fractions(config, (0.5, 1.0))
      return ElasticSetup(config, space, (1.0, 0.5), tuple(range(config.num_layers))[::-1], RouterSchedule(
          total_steps=10), router_width=8, ce_weight=0.5)

    # Every dense block kind; widths divisible by every mesh axis they are split over (fsdp up to 4, tensor 2).
    config = small_config("M*-", hidden_size=32, intermediate_size=64, vocab_size=64)
    setup = elastic_setup(config)
    teacher = random_params(config, seed=0)
    student = random_params(config, seed=1)
    batches = [jax.random.randint(jax.random.key(i), (8, 9), 0, config.vocab_size) for i in range(2)]

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

    def run_steps(step, state, teacher_params, setup=setup):
      # The state after the first step, and both steps' metrics (the second's loss sees the first's update).
      first, metrics = step(state, teacher_params, batches[0], probs, Pins.off(setup))
      after_first = jax.tree.map(np.asarray, first)
      _, second_metrics = step(first, teacher_params, batches[1], probs, Pins.off(setup))
      return after_first, [metrics, second_metrics]

    def check_step(label, setup, training, state, ref_state, ref_metrics, teacher_sharded):
      state, metrics = run_steps(training.step, state, teacher_sharded, setup)
      close(f"{{label}} metrics", metrics, ref_metrics)
      close(f"{{label}} optimizer state", state.opt_state, ref_state.opt_state)  # AdamW's mu, nu: the grads
      close(f"{{label}} router optimizer state", state.router_opt_state, ref_state.router_opt_state)
      close_after_adam(f"{{label}} params", state.params, ref_state.params, ref_state.opt_state[1][0].mu,
                       optimizer.learning_rate)
      close_after_adam(f"{{label}} router params", state.router_params, ref_state.router_params,
                       ref_state.router_opt_state[1][0].mu, router_optimizer.learning_rate)

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
      check_step(str(shape), setup, training, state, ref_state, ref_metrics,
                 shard_params(teacher, training.state_shardings.params))

    # MoE blocks with their routed experts split over the expert axis (8 experts: 2 or 4 per device), the batch over
    # data x fsdp x expert; the elastic space includes the MoE axes (experts kept, expert and shared widths). No Mamba
    # block here: its gradients differ from one device's by up to 1e-4 of their scale on any data-parallel mesh
    # (summation order, amplified), which the dense case above covers, and would hide the experts' own agreement.
    moe = small_config("E*-E", hidden_size=32, intermediate_size=64, vocab_size=64, n_routed_experts=8, n_group=2,
                       topk_group=1, num_experts_per_tok=2, moe_intermediate_size=16,
                       moe_shared_expert_intermediate_size=16, n_shared_experts=1)
    moe_setup = elastic_setup(moe)
    assert all(len(moe_setup.space.candidates(axis)) > 1 for axis in ("moe_experts", "moe_expert_dim")), moe_setup.space
    moe_teacher, moe_student = random_params(moe, seed=4), random_params(moe, seed=5)
    moe_ref_state, moe_ref_metrics = run_steps(
        jax.jit(make_elastic_step(moe_setup, tx, router_tx)),
        init_elastic_state(moe_setup, moe_student, tx, router_tx, seed=3), moe_teacher, moe_setup)
    for shape in [(2, 1, 1, 1, 4), (1, 2, 2, 1, 2)]:
      mesh = make_mesh(shape)
      training = compiled_elastic_step(moe_setup, optimizer, router_optimizer, 10, 3, mesh, DEFAULT_RULES)
      state = training.init(shard_params(moe_student, training.state_shardings.params))
      experts = state.params["layers_0"]["mixer"]["experts"]
      report[str(shape)] = {{
          "experts_up": spec_and_shard(experts["up_proj"]),
          "experts_up_mu": spec_and_shard(state.opt_state[1][0].mu["layers_0"]["mixer"]["experts"]["up_proj"]),
          "experts_down": spec_and_shard(experts["down_proj"]),
          "gate": spec_and_shard(state.params["layers_0"]["mixer"]["gate"]["kernel"]),
          "bias": spec_and_shard(state.params["layers_0"]["mixer"]["gate"]["e_score_correction_bias"]),
          "batch": list(training.batch_sharding.spec),
      }}
      check_step(str(shape), moe_setup, training, state, moe_ref_state, moe_ref_metrics,
                 shard_params(moe_teacher, training.state_shardings.params))

    # Each device sorts only its own tokens' expert assignments: 8 x 8 tokens, k = 2, over 8 data-parallel devices
    # (2 data x 4 expert) are 16 rows per device, not all 128.
    tokens = jax.random.randint(jax.random.key(9), (8, 8), 0, moe.vocab_size)
    with jax.set_mesh(make_mesh((2, 1, 1, 1, 4))), nn.logical_axis_rules(DEFAULT_RULES):
      jaxpr = str(jax.make_jaxpr(lambda p, t: HybridLM(moe).apply({{"params": p}}, t))(moe_student, tokens))
    report["moe_sort_rows"] = sorted({{int(n) for line in jaxpr.splitlines() if "= sort[" in line
                                      for n in re.findall(r":i32\[(\d+)\]", line.split("= sort[")[0])}})

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
  # Routed experts [E=8, embed=32, expert_mlp=16]: experts over the expert axis, embed over fsdp; the gate's
  # [embed, expert] kernel and [expert] correction bias follow; AdamW's moments like their params.
  for shape, fsdp, expert in [("(2, 1, 1, 1, 4)", 1, 4), ("(1, 2, 2, 1, 2)", 2, 2)]:
    mesh = report[shape]
    for name in ("experts_up", "experts_up_mu"):
      assert mesh[name] == [["expert", "fsdp", None], [[8 // expert, 32 // fsdp, 16]]], (shape, name)
    assert mesh["experts_down"] == [["expert", None, "fsdp"], [[8 // expert, 16, 32 // fsdp]]]
    assert mesh["gate"] == [["fsdp", "expert"], [[32 // fsdp, 8 // expert]]]
    assert mesh["bias"] == [["expert"], [[8 // expert]]]
    assert mesh["batch"] == [["data", "fsdp", "expert"], None]
  assert report["moe_sort_rows"] == [16], report["moe_sort_rows"]
  assert report["lm_init"]["up_proj"] == [["fsdp", "tensor"], [[16, 32]]]
  assert report["lm_init"]["embedding"] == [["tensor", "fsdp"], [[32, 16]]]
  assert report["lm_params_spec"] == [["fsdp", "tensor"], [[16, 32]]]
