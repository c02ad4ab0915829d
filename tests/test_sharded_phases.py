"""The phases around training, sharded: importance (statistics and depth ranking), permutation, extraction and
evaluation (and the decode timing's batch) on 8 virtual CPU devices equal the single-device path, on meshes (8,1,1), (2,4,1), (2,2,2) and, with the
routed experts split over the expert axis, (2,1,1,1,4); the parent holds every block kind, an MoE block included.

One subprocess (it needs ``--xla_force_host_platform_device_count=8`` before JAX starts) checks every mesh. The
reference of each phase is the same function run without a mesh: one device, host numpy params.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    import jax
    import numpy as np
    jax.config.update("jax_compilation_cache_dir", {cache!r})
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    from conftest import random_params, small_config
    from elastic_jax.data.tasks import TaskConfig, generate_examples
    from elastic_jax.data.tokenizer import ByteTokenizer
    from elastic_jax.elastic.extract import extract, extract_sharded
    from elastic_jax.elastic.importance import estimate_importance, rankings
    from elastic_jax.elastic.permute import permute_params, permute_sharded
    from elastic_jax.elastic.space import Choice
    from elastic_jax.eval.metrics import answer_accuracy, decode_speed, perplexity
    from elastic_jax.train.sharding import DEFAULT_RULES, make_mesh, param_shardings

    assert jax.device_count() == 8
    # Every block kind; widths divisible by every mesh axis they are split over (fsdp up to 4, tensor 2, expert 4).
    # The child's hidden width (24) does not divide over fsdp 4 (replicated there) but does over 2.
    config = small_config("M*-ME", hidden_size=32, intermediate_size=64, vocab_size=256, mamba_num_heads=4,
                          num_attention_heads=4, n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2,
                          moe_intermediate_size=16, moe_shared_expert_intermediate_size=16, n_shared_experts=1)
    params = jax.tree.map(np.asarray, random_params(config, seed=2))
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (8, 12)).astype(np.int32) for _ in range(2)]
    choice = Choice(hidden=24, mlp=(32,), attention_heads=(2,), mamba_heads=(2, 4), mamba_head_dim=(4, 8),
                    moe_experts=(4,), moe_expert_dim=(8,), moe_shared_dim=(12,), depth=4)
    tokenizer = ByteTokenizer()
    examples = generate_examples(TaskConfig(families=("arithmetic",)), seed=1, split="eval", count=6)
    ppl_batches = [rng.integers(0, 256, (8, 13)).astype(np.int32)]

    def phases(mesh):
      importance = estimate_importance(config, params, batches, depth=True, progress=False, mesh=mesh)
      ranks = rankings(importance, config)
      if mesh is None:
        permuted = permute_params(config, params, ranks)
        child_config, child = extract(config, permuted, choice, ranks.depth)
      else:
        permuted = permute_sharded(config, params, ranks, mesh)
        child_config, child = extract_sharded(config, permuted, choice, ranks.depth, mesh)
        for tree, cfg in ((permuted, config), (child, child_config)):  # outputs in their own shardings
          want = param_shardings(cfg, mesh, DEFAULT_RULES)
          for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(want)):
            assert leaf.sharding == sharding, (leaf.sharding, sharding)
      accuracy = answer_accuracy(child_config, child, examples, tokenizer, max_new_tokens=8, batch_size=8,
                                 ragged=True, return_generations=True, mesh=mesh)
      # Timed on the accuracy's first batch (under a mesh filled up to 8 rows, which divide over the devices).
      speed = decode_speed(child_config, child, [tokenizer.encode(e.prompt) for e in examples], max_new_tokens=8,
                           batch_size=8, reps=1, mesh=mesh)
      return dict(importance=importance, ranks=ranks, permuted=permuted, child=child,
                  ppl=perplexity(child_config, child, ppl_batches, mesh=mesh), generations=accuracy["generations"],
                  decoded=(speed["batch"], speed["tokens"]))

    reference = phases(None)
    assert reference["decoded"] == (6, 6 * (8 - 1)), reference["decoded"]  # one device: the 6 examples, not filled
    report = {{}}
    moe_fields = ("moe_experts", "moe_expert_dim", "moe_shared_dim")
    for shape in [(8, 1, 1), (2, 4, 1), (2, 2, 2), (2, 1, 1, 1, 4)]:
      got = phases(make_mesh(shape))
      for field in ("hidden", "mlp", "attention_heads", "mamba_heads", "mamba_head_dim", "depth", *moe_fields):
        assert str(jax.tree.map(np.asarray, getattr(got["ranks"], field))) == \\
            str(jax.tree.map(np.asarray, getattr(reference["ranks"], field))), (shape, field)
      worst = 0.0
      for name in ("hidden", "mlp", "attention_heads", "mamba_heads", "mamba_head_dim", "depth_scores", *moe_fields):
        for g, w in zip(jax.tree.leaves(getattr(got["importance"], name)),
                        jax.tree.leaves(getattr(reference["importance"], name))):
          worst = max(worst, float(np.max(np.abs(g - w)) / (np.max(np.abs(w)) + 1e-30)))
      assert worst < 1e-5, (shape, worst)
      for tree in ("permuted", "child"):  # pure data movement: exact
        for g, w in zip(jax.tree.leaves(got[tree]), jax.tree.leaves(reference[tree])):
          np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
      assert abs(got["ppl"] - reference["ppl"]) <= 1e-5 * reference["ppl"], (shape, got["ppl"], reference["ppl"])
      assert got["generations"] == reference["generations"], shape
      assert got["decoded"] == (8, 8 * (8 - 1)), (shape, got["decoded"])  # batch x (n - 1) tokens counted
      report[str(shape)] = dict(score_error=worst, ppl=got["ppl"])
    report["reference_ppl"] = reference["ppl"]
    report["generations"] = reference["generations"]
    print("REPORT", json.dumps(report))
""")


def test_importance_permutation_extraction_and_evaluation_sharded_equal_single_device():
  tests = pathlib.Path(__file__).parent
  cache = os.path.join("/tmp", "elastic_jax_test_xla_cache_sharded")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
  env["XLA_FLAGS"] = " ".join(flags + ["--xla_force_host_platform_device_count=8",
                                       "--xla_backend_optimization_level=0"])
  env["PYTHONPATH"] = os.pathsep.join([str(tests.parent)] + [p for p in [env.get("PYTHONPATH")] if p])
  result = subprocess.run([sys.executable, "-c", _SCRIPT.format(tests=str(tests), cache=cache)], env=env,
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
  report = json.loads(result.stdout.split("REPORT", 1)[1])
  assert set(report) == {"(8, 1, 1)", "(2, 4, 1)", "(2, 2, 2)", "(2, 1, 1, 1, 4)", "reference_ppl", "generations"}
  assert any(report["generations"])  # non-empty generations, so their equality above carries signal
