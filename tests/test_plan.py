"""The planner: per-device state bytes against a real sharded train state, the activation model against XLA's
memory analysis, every phase of the main job (import, importance, permutation, training, extraction, evaluation),
the Nano V2 12B plan, its errors, and ``--compile-for``: the plan beside libtpu's memory analysis of the real step
compiled for compile-only v5p chips."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import ml_collections
import pytest

from elastic_jax import aot
from elastic_jax import plan as plan_lib
from elastic_jax.elastic.param_count import param_count
from elastic_jax.model import ModelConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(f"config_{name}", ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def small_run_config(batch: int = 4, seq_len: int = 64, mesh_shape=(), num_devices=None) -> ml_collections.ConfigDict:
  """Every block kind, dims divisible by 2 on every sharded axis, a short two-stage curriculum."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = dict(pattern="M*-", vocab_size=128, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, mamba_num_heads=4, mamba_head_dim=8, n_groups=2,
                      ssm_state_size=16, chunk_size=16)
  config.elastic = dict(budgets=[1.0, 0.5], space=dict(hidden=[16, 32], mlp=[24, 48], attention_heads=[2, 4],
                                                        mamba_heads=[2, 4], mamba_head_dim=[4, 8]),
                        router=dict(width=8))
  config.stages = [dict(name="stage1", steps=3, batch_size=batch, seq_len=seq_len, budget_probs=[0.5, 0.5])]
  config.mesh = dict(shape=tuple(mesh_shape), rules=())
  config.plan = dict(device="cpu") if num_devices is None else dict(device="cpu", num_devices=num_devices)
  return config


# The reference: a real train state built and placed as the training loop places it, on 8 virtual CPU devices;
# bytes held by each device summed over ``addressable_shards``.
_SHARDED_STATE_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    import jax.numpy as jnp
    sys.path.insert(0, {tests!r})
    from test_plan import small_run_config
    from elastic_jax import plan as plan_lib
    from elastic_jax.model import ModelConfig, init_params
    from elastic_jax.train import loop, sharding
    from elastic_jax.train.config import elastic_setup_from_config, optimizers_from_config
    from elastic_jax.train.optim import make_optimizer
    from elastic_jax.train.elastic_step import init_elastic_state

    config = small_run_config(mesh_shape=(2, 2, 2), num_devices=8)
    config.plan.devices_per_host = 2  # four hosts of 2 devices
    plan = plan_lib.make_plan(config)
    estimate = plan.stages[0].memory
    imported = next(phase for phase in plan.phases if phase.name == "import")
    model_config = ModelConfig.from_dict(config.model)
    setup = elastic_setup_from_config(config, model_config, range(model_config.num_layers), 3)
    optimizer, router_optimizer = optimizers_from_config(config)
    mesh = sharding.make_mesh((2, 2, 2))
    training = loop.compiled_elastic_step(setup, optimizer, router_optimizer, 3, 0, mesh, sharding.DEFAULT_RULES)
    shardings = training.state_shardings if hasattr(training, "state_shardings") else training[1]
    tx, router_tx = make_optimizer(optimizer, 3), make_optimizer(router_optimizer, 3)
    state = jax.device_put(init_elastic_state(setup, init_params(model_config, jax.random.key(0)), tx, router_tx,
                                              seed=0), shardings)
    # The checkpoint's dtype in the params' shardings: what each device receives of an import.
    checkpoint = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(jnp.bfloat16), p),
                         out_shardings=shardings.params)(state.params)
    real = {{}}
    for device in jax.devices():
      for part, tree in (("params", state.params), ("opt_state", state.opt_state), ("checkpoint", checkpoint)):
        held = sum(shard.data.nbytes for leaf in jax.tree.leaves(tree)
                   for shard in leaf.addressable_shards if shard.device == device)
        real.setdefault(part, []).append(held)
    unsharded = sum(leaf.nbytes for leaf in jax.tree.leaves(state.params))
    print(json.dumps({{"estimate": estimate, "real": real, "unsharded_params": unsharded,
                      "import": {{"memory": imported.memory, "host_bytes": imported.host_bytes}}}}))
""")


def _subprocess_env(num_devices: int) -> dict[str, str]:
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={num_devices}"])
  env["JAX_PLATFORMS"] = "cpu"
  return env


def test_state_bytes_equal_real_sharded_state_on_8_devices():
  result = subprocess.run([sys.executable, "-c", _SHARDED_STATE_SCRIPT.format(tests=str(ROOT / "tests"))],
                          env=_subprocess_env(8), capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  real, estimate = out["real"], out["estimate"]
  for part in ("params", "opt_state"):
    assert len(set(real[part])) == 1, f"{part}: devices hold different amounts {real[part]}"
    assert estimate[part] == real[part][0], (part, estimate[part], real[part][0])
  # The mesh really shards: each device holds well under the whole (every kernel splits 2 or 4 ways).
  assert real["params"][0] < out["unsharded_params"] / 2
  # Import: each device ends with its fp32 shards; each host reads its 2 devices' bf16 slices, not the whole model.
  assert len(set(real["checkpoint"])) == 1
  assert out["import"]["memory"]["params"] == real["params"][0]
  assert out["import"]["host_bytes"] == 2 * real["checkpoint"][0]
  assert out["import"]["host_bytes"] < out["unsharded_params"] / 2  # the whole model in bf16 is unsharded / 2


def test_activation_estimate_within_factor_2_of_xla_temp_bytes():
  """XLA's temp buffers of the compiled step hold the activations and the gradients (the state is donated and
  aliased): the analytical estimate of those two must be within a factor 2 of it."""
  config = small_run_config(batch=4, seq_len=128)
  stage = plan_lib.make_plan(config).stages[0]
  xla = plan_lib.compiled_memory(config, 0)
  estimate = stage.memory["activations"] + stage.memory["gradients"]
  ratio = estimate / xla["temp_size_in_bytes"]
  assert 0.5 <= ratio <= 2.0, (estimate, xla)
  # Activations, not the state, dominate this shape, so the check is about the activation model.
  assert stage.memory["activations"] > 5 * stage.memory["gradients"]


def test_nano_v2_12b_has_the_parent_count_and_fits_its_documented_mesh():
  config = load_config("nano_v2_12b")
  model = ModelConfig.from_dict(config.model)
  assert param_count(model) == 12_310_001_152
  plan = plan_lib.make_plan(config, "nano_v2_12b")
  hardware = plan.hardware
  assert hardware.device_name == "v5p" and hardware.num_devices == config.plan.num_devices == 128
  assert [s.name for s in plan.stages] == ["stage1", "stage2"]
  assert [(s.seq_len, s.batch_size) for s in plan.stages] == [(8192, 1536), (49152, 512)]
  for stage in plan.stages:
    assert stage.fits and stage.memory["total"] < 95e9 * 0.9, (stage.name, stage.memory)
  # Hand-computed bounds: fp32 params split over fsdp x tensor at best, and the small unsplit leaves (norms, B/C
  # projections, conv, SSM scalars) add under 10%; Adam's two moments are twice that; the bf16 teacher half.
  fsdp, tensor = hardware.axis_sizes["fsdp"], hardware.axis_sizes["tensor"]
  ideal = 4 * 12_310_001_152 / (fsdp * tensor)
  memory = plan.stages[0].memory
  assert ideal <= memory["params"] <= 1.1 * ideal
  assert abs(memory["opt_state"] - 2 * memory["params"]) < 1e6
  # The bf16 teacher: half, but for the TPU's 16-row bf16 tiles (8 rows of fp32) on its small leaves.
  assert memory["params"] / 2 <= memory["teacher"] <= 1.01 * memory["params"] / 2
  # 4 model forwards' worth of FLOPs per token (student train pass 3, teacher 1) over the whole batch.
  assert plan.stages[0].flops_per_step > 4 * 2 * 12e9 * 1536 * 8192 * 0.9


def test_mesh_not_matching_the_claimed_device_count_is_refused():
  config = small_run_config(mesh_shape=(2, 2, 2), num_devices=16)
  with pytest.raises(ValueError, match=r"config.mesh.shape=\(2, 2, 2\) spans 8 devices but "
                                       r"config.plan.num_devices=16"):
    plan_lib.make_plan(config)


def test_unknown_device_is_refused():
  with pytest.raises(ValueError, match=r"unknown device 'tpu9'; choose one of \['a100', 'cpu', 'h100'"):
    plan_lib.make_plan(small_run_config(), device="tpu9")


def test_accumulation_must_divide_the_batch():
  config = small_run_config(batch=6)
  config.memory = dict(grad_accum_steps=4)
  with pytest.raises(ValueError, match=r"stage 'stage1': batch_size=6 is not divisible by "
                                       r"config.memory.grad_accum_steps=4"):
    plan_lib.make_plan(config)


def test_remat_and_accumulation_shrink_the_activations():
  """More recomputation keeps less; more micro-batches keep less per micro-batch (same shapes otherwise)."""
  def activations(**memory):
    config = small_run_config(batch=8, seq_len=128)
    config.memory = memory
    return plan_lib.make_plan(config).stages[0].memory["activations"]

  none, dots, full = (activations(remat=dict(mamba=policy, attention=policy, mlp=policy))
                      for policy in ("none", "dots", "full"))
  assert none > dots > full
  assert activations(grad_accum_steps=4) < activations(grad_accum_steps=1)


def test_proxy_fits_one_80gb_gpu():
  config = load_config("proxy_1b")
  plan = plan_lib.make_plan(config, "proxy_1b")
  assert 1.0e9 < param_count(plan.config) < 1.3e9
  assert plan.hardware.num_devices == 1 and plan.hardware.device.hbm_bytes == 80e9
  assert plan.fits and [s.seq_len for s in plan.stages][0] == 4096


def test_cli_prints_json_with_overrides():
  result = subprocess.run([sys.executable, "-m", "elastic_jax.plan", "--config", "configs/proxy_1b.py", "--json",
                           "--device", "h200", "--config.memory.grad_accum_steps=8"], env=_subprocess_env(1),
                          capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout)
  assert out["device"]["name"] == "h200" and out["num_devices"] == 1 and out["fits"]
  assert out["memory_settings"]["grad_accum_steps"] == 8
  assert [phase["name"] for phase in out["phases"]] == list(plan_lib.PHASES) and out["peak_phase"] == "training"
  proxy = load_config("proxy_1b")
  assert [s["micro_batch"] for s in out["stages"]] == [stage["batch_size"] // 8 for stage in proxy.stages]


def test_per_device_bytes_round_uneven_shards_up():
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel
  sizes = {"data": 2, "fsdp": 2, "tensor": 4, "context": 1}
  # [7, 6] fp32 over fsdp x tensor: rows ceil(7/2) = 4, columns ceil(6/4) = 2 -> 4 * 2 * 4 bytes (XLA pads).
  assert plan_lib.per_device_bytes((7, 6), 4, P("fsdp", "tensor"), sizes) == 32
  # A dimension over two mesh axes, a trailing unsharded one, bf16: ceil(10 / 4) * 3 * 2 bytes.
  assert plan_lib.per_device_bytes((10, 3), 2, P(("data", "fsdp")), sizes) == 18


@pytest.mark.parametrize("shape,itemsize,padded_bytes", [
    # Buffers of the tiny elastic step in libtpu's memory-usage report (compiled for v5p, b = 3 per chip).
    ((3, 4, 2, 4, 32, 32), 4, 1.5 * 2**20),  # [32, 32] SSD tiles: the minor 32 pads to 128, 4x
    ((3, 128, 8, 32), 4, 384 * 2**10),  # a layout with 128 minor and 8 second-minor: no padding
    ((3, 4, 32, 2, 32, 1), 2, 192 * 2**10),  # bf16: 16 rows of 128; the best pair still pads 32 to 128, 4x
    ((3, 128, 128, 1), 4, 192 * 2**10),
    ((100,), 4, 512),  # a vector pads to 128
])
def test_tpu_tile_padding_matches_libtpu_buffers(shape, itemsize, padded_bytes):
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel
  assert plan_lib.tiled_elements(shape, itemsize) * itemsize == padded_bytes
  assert plan_lib.per_device_bytes(shape, itemsize, P(), {}, tiled=True) == padded_bytes
  assert plan_lib.per_device_bytes(shape, itemsize, P(), {}) == math.prod(shape) * itemsize  # GPU, CPU: no tiles


# ------------------------------------------------------------------------------------------------ every phase
def small_phase_config(mesh_shape=(), num_devices=None) -> ml_collections.ConfigDict:
  """``small_run_config`` with calibration and evaluation shapes that divide over every mesh used below."""
  config = small_run_config(batch=4, seq_len=128, mesh_shape=mesh_shape, num_devices=num_devices)
  config.importance = dict(batches=2, batch_size=8, seq_len=128, depth_batches=1)
  config.eval = dict(ppl_batches=2, batch_size=8, seq_len=128, examples=4, max_new_tokens=8, decode_batch=4)
  return config


@pytest.mark.parametrize("name, peak", [("tiny", "evaluation"), ("nano_v2_12b", "training")])
def test_every_phase_of_the_main_job_is_planned(name, peak):
  plan = plan_lib.make_plan(load_config(name), name)
  assert [phase.name for phase in plan.phases] == list(plan_lib.PHASES) == [
      "import", "importance", "permutation", "training", "extraction", "evaluation"]
  phases = {phase.name: phase for phase in plan.phases}
  params = plan.stages[0].memory["params"]
  for phase in plan.phases:
    assert phase.memory["params"] == params, phase.name  # every phase holds the parent in its shardings
    assert phase.memory["total"] >= params and phase.host_bytes > 0 and phase.seconds > 0, phase.name
  assert phases["permutation"].memory["total"] == 2 * params  # params in + params out
  assert phases["extraction"].memory["total"] == 2 * params  # parent + the largest budget's child (100%)
  # Each phase peaks in its largest program: the depth ranking holds one more logits array than calibration, the
  # cached prefill of a whole prompt batch more than a one-token decode step.
  for phase in ("importance", "evaluation"):
    assert phases[phase].memory["total"] == pytest.approx(max(phases[phase].programs.values()))
  assert phases["importance"].programs["depth ranking"] > phases["importance"].programs["calibration"]
  assert phases["evaluation"].programs["prefill"] > phases["evaluation"].programs["decode"]
  for name_ in ("importance", "training", "evaluation"):
    assert phases[name_].flops > 0 and phases[name_].memory["activations"] > 0
  # The training phase peaks in its largest stage. The verdict is the largest peak over the phases: tiny's
  # generation (32 prompts of 512 assumed tokens, prefilled at once) holds more than its training step.
  assert phases["training"].memory["total"] == max(stage.memory["total"] for stage in plan.stages)
  assert plan.fits and plan.peak.name == peak
  text = plan_lib.format_plan(plan)
  assert all(phase in text for phase in plan_lib.PHASES) and "FITS: the largest per-device peak" in text


def test_depth_ranking_runs_l_plus_l_l_plus_1_over_2_forwards_per_batch():
  """L steps, each one reference forward plus one per block still kept: L + (L + ... + 1), counted by hand."""
  assert plan_lib.depth_ranking_forwards(6) == 6 + (6 + 5 + 4 + 3 + 2 + 1) == 27
  assert plan_lib.depth_ranking_forwards(62) == 62 + 62 * 63 // 2 == 2015
  for name, layers, depth_batches, calibration, forwards_per_batch in (("tiny", 6, 2, 8, 27),
                                                                      ("nano_v2_12b", 62, 4, 128, 2015)):
    config = load_config(name)
    importance = next(p for p in plan_lib.make_plan(config).phases if p.name == "importance")
    assert ModelConfig.from_dict(config.model).num_layers == layers
    assert importance.counts == {"calibration_forwards": calibration, "depth_forwards": depth_batches *
                                 forwards_per_batch, "depth_forwards_per_batch": forwards_per_batch}
  # Nano: (128 + 4 x 2015) forwards of 8 x 8192 tokens at more than 2 x 12e9 FLOPs per token (matmuls alone).
  assert importance.flops > (128 + 4 * 2015) * 8 * 8192 * 2 * 12e9


def test_nano_import_reads_each_hosts_share_not_the_whole_model():
  plan = plan_lib.make_plan(load_config("nano_v2_12b"))
  imported = plan.phases[0]
  hardware = plan.hardware
  assert hardware.devices_per_host == 4 and hardware.num_hosts == 32  # v5p: 4 chips per host
  share = imported.counts["checkpoint_bytes_per_device"]
  # bf16 over fsdp x tensor = 16 ways; the small unsplit leaves add under 10%.
  assert 2 * 12_310_001_152 / 16 <= share <= 1.1 * 2 * 12_310_001_152 / 16
  assert imported.host_bytes == share * 4 < 2 * 12_310_001_152 / 3  # a host reads about 1/4 of the bf16 model
  # fp32 shards on device, the same layout (and the chips' tile padding of the small leaves).
  assert 2 * share <= imported.memory["params"] <= 1.01 * 2 * share
  # One tensor's slice in flight: the largest, the [V, d] embedding (or LM head) in bf16 over 16 devices.
  assert imported.memory["in_flight"] == 2 * 131072 * 5120 // 16
  # Reading at the assumed 1 GB/s per host, every host at once.
  assert imported.storage_seconds == pytest.approx(imported.host_bytes / 1e9)
  faster = plan_lib.make_plan(load_config("nano_v2_12b"), storage_gb_per_s=4.0, devices_per_host=8).phases[0]
  assert faster.host_bytes == 8 * share and faster.storage_seconds == pytest.approx(8 * share / 4e9)


# XLA's memory analysis of the forward programs that ``forward_bytes`` estimates (the depth ranking's candidate
# forward with the reference logits held, the perplexity forward), compiled on 8 virtual CPU devices.
_FORWARD_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    from test_plan import small_phase_config
    from elastic_jax import plan as plan_lib

    out = []
    for mesh in ((2, 2, 2), (1, 2, 1, 4)):
      config = small_phase_config(mesh_shape=mesh, num_devices=8)
      phases = {{phase.name: phase for phase in plan_lib.make_plan(config).phases}}
      for phase, program in plan_lib.FORWARD_PHASES.items():
        out.append({{"mesh": mesh, "phase": phase, "estimate": phases[phase].programs[program],
                    "params": phases[phase].memory["params"],
                    "xla": plan_lib.compiled_phase_memory(config, phase)}})
    print(json.dumps(out))
""")


def test_forward_phase_estimates_within_factor_2_of_xla():
  """Per device on meshes (2, 2, 2) and (1, 2, 1, 4) (ring attention over context): params + forward activations
  (+ the held reference logits) against XLA's arguments + outputs - aliases + temp buffers of the compiled forward."""
  result = subprocess.run([sys.executable, "-c", _FORWARD_SCRIPT.format(tests=str(ROOT / "tests"))],
                          env=_subprocess_env(8), capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = json.loads(result.stdout.strip().splitlines()[-1])
  assert len(rows) == 4
  for row in rows:
    ratio = row["estimate"] / row["xla"]["total"]
    assert 0.5 <= ratio <= 2.0, row
    # Activations, not the params, dominate these shapes, so the check is about the activation model.
    assert row["estimate"] > 5 * row["params"], row


def test_a_phase_that_does_not_fit_decides_the_verdict():
  """Training fits easily; a perplexity batch whose [b, Hq, L, L] attention scores exceed a 16 GB v5e does not."""
  config = small_phase_config()
  config.eval = dict(ppl_batches=1, batch_size=64, seq_len=8192, examples=4, max_new_tokens=8, decode_batch=4)
  plan = plan_lib.make_plan(config, device="v5e")
  assert all(stage.fits for stage in plan.stages)
  evaluation = plan.phases[-1]
  # Scores alone: 64 x 4 heads x 8192^2 fp32 = 68.7 GB.
  assert evaluation.memory["activations"] > 64 * 4 * 8192 * 8192 * 4 and not evaluation.fits
  assert not plan.fits and plan.peak is evaluation
  assert "DOES NOT FIT" in plan_lib.format_plan(plan)


# ------------------------------------------------------------------------------------------ --compile-for a target
def _plan_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "elastic_jax.plan", *args], env=_subprocess_env(1),
                        capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False)


def _row_bytes(text: str, label: str) -> list[float]:
  """The byte figures of the first table row labelled ``label`` ("12.02 GB" / "56.00 MB" -> bytes)."""
  line = next(line for line in text.splitlines() if line[:34].strip() == label)
  return [float(n.replace(",", "")) * (1e9 if unit == "GB" else 1e6)
          for n, unit in re.findall(r"([\d,.]+) (GB|MB)", line[34:])]


def test_compile_for_a_target_whose_devices_the_mesh_does_not_span_is_refused():
  """Before any compile (no compiler needed): proxy_1b's mesh (1,) against the 4 chips of v5p:2x2x1."""
  result = _plan_cli("--config", "configs/proxy_1b.py", "--compile-for", "v5p:2x2x1")
  assert result.returncode == 1
  assert ("plan: --compile-for v5p:2x2x1: the target has 4 devices but the mesh (1,) spans 1; pick a topology of "
          "1 device(s), or set --config.mesh.shape and --config.plan.num_devices to span 4.") in result.stderr


def test_stages_of_one_shape_are_compiled_once():
  """Budget probabilities and pins are inputs of the step: a pinned tail of stage 2 reuses stage 2's compile, and
  only the stage that compiled carries compile times."""
  stages = [plan_lib.Stage("stage1", 4, 12, 128, (0.5, 0.5)), plan_lib.Stage("stage2", 3, 8, 256, (0.7, 0.3)),
            plan_lib.Stage("tail", 2, 8, 256, (0.7, 0.3), pinned=True), plan_lib.Stage("long", 2, 8, 512, (1, 0))]
  calls = []

  def compile_stage(index, stage):
    calls.append(index)
    return {"total": float(stage.batch_size * stage.seq_len), "compile_seconds": 1.0, "lower_seconds": 1.0}

  out = plan_lib.once_per_shape(stages, compile_stage)
  assert calls == [0, 1, 3]
  assert out["stage2"] == {"total": 8 * 256.0, "compile_seconds": 1.0, "lower_seconds": 1.0}
  assert out["tail"] == {"total": 8 * 256.0}
  assert [out[name]["total"] for name in ("stage1", "long")] == [12 * 128.0, 8 * 512.0]


@pytest.mark.slow
@pytest.mark.skipif(aot.unavailable_reason("v5p") is not None,
                    reason=f"compile-only v5p devices need libtpu: {aot.unavailable_reason('v5p')}")
def test_compile_for_v5p_prints_xla_beside_the_plan_within_25_percent():
  """``--compile-for v5p:2x2x1`` compiles the tiny run's stages for 4 compile-only v5p chips (mesh (4,); stage 1 at
  12 x 128, the later stages at 8 x 256 so that they split over the chips: two shapes, two compiles, the third stage
  sharing the second's) and prints libtpu's per-device memory analysis beside the plan; the planned per-device
  total is within 0.8-1.25x of XLA's for each stage (its [32, 32] SSD tiles and 32-wide heads are where TPU tile
  padding counts)."""
  shapes = [f"--config.stages[{i}].{key}={value}" for i, (batch, length) in enumerate([(12, 128), (8, 256), (8, 256)])
            for key, value in (("batch_size", batch), ("seq_len", length))]
  result = _plan_cli("--config", "configs/tiny.py", "--compile-for", "v5p:2x2x1", "--config.mesh.shape=(4,)",
                     *shapes, timeout=1200)
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert "on 4 x TPU v5p chip" in out and "compiled for v5p:2x2x1 without the hardware" in out, out
  assert any(line.startswith("  verdict (XLA total)") for line in out.splitlines()), out
  planned, xla = _row_bytes(out, "total"), _row_bytes(out, "XLA total (args+out-alias+temp)")
  arguments = _row_bytes(out, "XLA arguments")
  assert len(planned) == len(xla) == len(arguments) == 3, out
  assert xla[2] == xla[1] and arguments[2] == arguments[1], out  # one program for one shape
  seconds = next(line for line in out.splitlines() if line.startswith("  XLA lower + compile")).split()[4:]
  assert seconds[-1] == "-" and len(seconds) == 5, out  # "12 s 10 s -": the third stage compiled nothing
  for stage, (plan_bytes, xla_bytes, argument_bytes) in enumerate(zip(planned, xla, arguments)):
    assert 0 < argument_bytes < xla_bytes, out
    ratio = plan_bytes / xla_bytes
    assert 0.8 <= ratio <= 1.25, (f"stage {stage + 1}: planned {plan_bytes / 1e6:.2f} MB per device, XLA "
                                  f"{xla_bytes / 1e6:.2f} MB: ratio {ratio:.2f}")


@pytest.mark.slow
@pytest.mark.skipif(aot.unavailable_reason("v5p") is not None,
                    reason=f"compile-only v5p devices need libtpu: {aot.unavailable_reason('v5p')}")
def test_compile_for_a_step_that_does_not_compile_ends_with_one_line():
  """Stage 1's batch of 6 cannot split over 4 chips: the worker's error comes back as the last line, naming the
  stage and the target, and nothing else of the plan is printed."""
  result = _plan_cli("--config", "configs/tiny.py", "--compile-for", "v5p:2x2x1", "--config.mesh.shape=(4,)",
                     "--config.stages[0].batch_size=6")
  assert result.returncode == 1 and result.stdout == "", result.stdout
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("plan: stage1: elastic_step for v5p:2x2x1: IndivisibleError: "), last
  assert "the dimension size is 6" in last, last
