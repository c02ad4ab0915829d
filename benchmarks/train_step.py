"""Wall time and CPU MFU of the elastic train step against plain training steps of the same model.

Three jitted steps of one parent, each donating its train state, timed side by side in one run:

- ``lm``: the parent trained alone with next-token cross-entropy (``make_lm_step``): student forward + backward.
- ``kd``: plain distillation, written here: frozen-teacher forward, then student forward + backward on the forward
  KL, AdamW update. No router, no masks: the same work as the elastic step minus what elasticity adds.
- ``elastic``: ``make_elastic_step``: ``kd`` plus budget sampling, the router (Gumbel-softmax per axis), nested
  masks on every axis and depth, the masked student, the expected-parameter router loss and the router's update.

``elastic / kd`` is the apples-to-apples ratio (the cost of elasticity itself) and the one the 1.5x target refers
to; ``elastic / lm`` also includes the teacher's forward and the KL, and is printed too.

The machine is shared and noisy, so repetitions are interleaved: each round runs every step once, in an order
rotated from round to round, with one large fp32 matmul (the CPU's achievable FLOP/s under the same load) between
consecutive calls. Times are medians over rounds; the ``vs`` ratios are medians over rounds of the two steps' times
within a round; MFU is the median over calls of model FLOPs / call time / the FLOP/s of the matmuls just before and
after that call. Model FLOPs come from ``elastic_jax.train.flops.forward_flops_per_token``; XLA's own count
(``compiled.cost_analysis()["flops"]``) is printed beside them.

``--breakdown`` splits the elastic overhead with two more variants of plain KD whose student runs with fixed masks
fed in as an input (rows cycling through the smallest, middle and full sizes): ``kd+masks`` (masks as constants: the
cost of the masked model itself) and ``kd+mask grads`` (the same, also differentiating the loss with respect to the
masks, as the straight-through router gradient requires). ``elastic - kd+mask grads`` is then what is left: budget
sampling, the router MLPs and Gumbel-softmax, mask building, the expected-count loss and the router's update.

Usage:
  python benchmarks/train_step.py [--config tiny|medium|all] [--reps 5] [--breakdown]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib.util
import os
import pathlib
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from elastic_jax.elastic.masks import choice_masks
from elastic_jax.elastic.param_count import param_count
from elastic_jax.elastic.router import RouterSchedule
from elastic_jax.elastic.space import Choice, ElasticSpace
from elastic_jax.model import HybridLM, ModelConfig, init_params
from elastic_jax.train.flops import forward_flops_per_token
from elastic_jax.train.losses import forward_kl
from elastic_jax.train.optim import OptimizerConfig, default_router_optimizer_config, make_optimizer
from elastic_jax.train.elastic_step import ElasticSetup, init_elastic_state, make_elastic_step
from elastic_jax.train.lm_step import make_lm_step, split_batch
from elastic_jax.train.state import TrainState

Params = Any
MATMUL_SIZE = 2048  # [n, n] @ [n, n] fp32: large enough to run at the CPU's sustained matmul rate
BUDGETS = (1.0, 0.75, 0.5)
FRACTIONS = (0.5, 0.75, 1.0)


@dataclasses.dataclass(frozen=True)
class BenchmarkModel:
  """A parent and the batch shape its steps are timed at."""

  name: str
  config: ModelConfig
  batch: int
  length: int  # tokens per sample fed to the model (the batch holds length + 1 for the shifted targets)


def tiny_model(batch: int = 8, length: int = 256) -> BenchmarkModel:
  """The parent of ``configs/tiny.py`` (its ``model`` block), at 8 x 256 tokens per step."""
  path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.py"
  spec = importlib.util.spec_from_file_location("tiny_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return BenchmarkModel("tiny", ModelConfig.from_dict(module.get_config().model), batch, length)


# A 26M-parameter parent whose train steps take seconds on 2 cores: 12 blocks (6 Mamba, 4 MLP, 2 attention),
# d=512 and an 8192-token vocabulary (the LM head is ~19% of the matmul work, the embedding a third of the params).
MEDIUM = BenchmarkModel("medium", ModelConfig(
    pattern="M-M*M-M-M*M-", vocab_size=8192, hidden_size=512, intermediate_size=1536, num_attention_heads=8,
    num_key_value_heads=2, head_dim=64, mamba_num_heads=16, mamba_head_dim=64, n_groups=2, ssm_state_size=64,
    conv_kernel=4, chunk_size=64, dtype="float32", param_dtype="float32"), batch=4, length=256)


# ------------------------------------------------------------------------------------------------ FLOP model
# Forward passes per token of each step: a student's train pass counts 3, a frozen teacher's forward 1.
FORWARDS_PER_STEP = {"lm": 3, "kd": 4, "kd+masks": 4, "kd+mask grads": 4, "elastic": 4}


def step_flops(model: BenchmarkModel, step_name: str) -> float:
  """Model FLOPs of one step over the whole batch."""
  per_token = sum(forward_flops_per_token(model.config, model.length).values())
  return FORWARDS_PER_STEP[step_name] * per_token * model.batch * model.length


# ------------------------------------------------------------------------------------------------ steps
def make_kd_step(config: ModelConfig, tx: optax.GradientTransformation, *, mask_grads: bool = False,
                 temperature: float = 1.0) -> Callable:
  """Plain distillation: ``step(state, teacher_params, tokens [b, l+1], masks) -> (state, metrics)``.

  The frozen teacher's forward, then the student's forward and backward on the forward KL and one optimizer
  update: the elastic step without the router. ``masks`` (fixed, an input) is None for plain KD, or a masks dict
  for the breakdown's masked student; ``mask_grads`` also differentiates the loss with respect to the masks (their
  norm is returned so that the gradient is not dead code).
  """
  model = HybridLM(config)

  def step(state: TrainState, teacher_params: Params, tokens: jax.Array, masks: dict | None
           ) -> tuple[TrainState, dict[str, jax.Array]]:
    inputs, _ = split_batch(tokens)
    teacher_logits = jax.lax.stop_gradient(model.apply({"params": teacher_params}, inputs))

    def loss_fn(params, masks):
      logits = model.apply({"params": params}, inputs, masks=masks)
      return jnp.mean(forward_kl(logits, teacher_logits, temperature=temperature))

    mask_grad = None
    if mask_grads:
      loss, (grads, mask_grad) = jax.value_and_grad(loss_fn, argnums=(0, 1))(state.params, masks)
    else:
      loss, grads = jax.value_and_grad(loss_fn)(state.params, masks)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    if mask_grad is not None:
      metrics["mask_grad_norm"] = optax.tree.norm(mask_grad)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step


def elastic_setup(config: ModelConfig) -> ElasticSetup:
  """Fractions (0.5, 0.75, 1.0) on every width axis, depth candidates [L - 2, L], identity depth order."""
  widths = ElasticSpace.from_fractions(config, FRACTIONS).to_dict()
  widths["depth"] = [config.num_layers - 2, config.num_layers]
  space = ElasticSpace.from_dict(widths, config)
  return ElasticSetup(config, space, BUDGETS, depth_order=tuple(range(config.num_layers)),
                      schedule=RouterSchedule(total_steps=1000))


def mixed_budget_masks(setup: ElasticSetup, batch: int) -> dict:
  """Masks with rows cycling through the smallest, middle and full candidates of every axis (for ``kd+masks``)."""
  space, config = setup.space, setup.config

  def row_choice(row: int) -> Choice:
    level = row % 3  # 0 smallest, 1 middle, 2 full (axes with fewer candidates stop at their largest)
    pick = lambda axis: space.candidates(axis)[min(level, len(space.candidates(axis)) - 1)]
    return Choice.homogeneous(config, hidden=pick("hidden"), mlp=pick("mlp"), attention_heads=pick("attention_heads"),
                              mamba_heads=pick("mamba_heads"), mamba_head_dim=pick("mamba_head_dim"),
                              depth=space.depth[0] if level == 0 else config.num_layers)

  return choice_masks(config, [row_choice(row) for row in range(batch)], setup.depth_order)


@dataclasses.dataclass
class CompiledStep:
  """One compiled step, its live state and its fixed extra arguments; ``run`` advances the state once."""

  executable: Any
  state: Any
  args: tuple
  xla_flops: float

  def run(self) -> None:
    self.state, metrics = self.executable(self.state, *self.args)
    jax.block_until_ready((self.state, metrics))


@dataclasses.dataclass
class LoweredStep:
  """A traced step waiting to be compiled, with the state and arguments it will run on."""

  lowered: Any
  state: Any
  args: tuple


def lower_step(fn: Callable, state: Any, *args: Any) -> LoweredStep:
  """Traces ``fn(state, *args)`` for an ahead-of-time compile with the state donated."""
  return LoweredStep(jax.jit(fn, donate_argnums=(0,)).lower(state, *args), state, args)


def compile_steps(lowered: dict[str, LoweredStep]) -> dict[str, CompiledStep]:
  """Compiles every program; XLA's FLOP count comes from the executable that is timed.

  XLA releases the GIL while compiling, so one thread per core compiles that many programs at once (compiling, not
  running, dominates this script's wall time).
  """
  with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
    executables = dict(zip(lowered, pool.map(lambda step: step.lowered.compile(), lowered.values())))
  steps = {}
  for name, step in lowered.items():
    cost = executables[name].cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    steps[name] = CompiledStep(executables[name], step.state, step.args, float(cost.get("flops", float("nan"))))
  return steps


def lower_matmul() -> LoweredStep:
  """A large fp32 matmul; its "state" is the left operand, replaced by the product each call (donated)."""
  rng = np.random.default_rng(0)
  scale = MATMUL_SIZE ** -0.5  # entries of variance 1/n keep repeated products at that variance
  a = jnp.asarray(rng.standard_normal((MATMUL_SIZE, MATMUL_SIZE)) * scale, jnp.float32)
  b = jnp.asarray(rng.standard_normal((MATMUL_SIZE, MATMUL_SIZE)) * scale, jnp.float32)
  matmul = lambda a, b: (jnp.dot(a, b), jnp.zeros(()))
  return lower_step(matmul, a, b)


def build_steps(model: BenchmarkModel, breakdown: bool) -> tuple[dict[str, CompiledStep], float]:
  """Compiles every step (and the matmul) for ``model``; returns them and the setup time in seconds."""
  config = model.config
  start = time.perf_counter()
  tx = make_optimizer(OptimizerConfig(), total_steps=1000)
  router_tx = make_optimizer(default_router_optimizer_config(), total_steps=1000)
  teacher = init_params(config, jax.random.key(0))
  copy = lambda: jax.tree.map(jnp.copy, teacher)  # each step's student starts as the parent; states are donated
  plain_state = lambda: TrainState(step=jnp.zeros((), jnp.int32), params=(p := copy()), opt_state=tx.init(p),
                                   rng=jax.random.key_data(jax.random.key(1)))
  tokens = jax.random.randint(jax.random.key(2), (model.batch, model.length + 1), 0, config.vocab_size)
  setup = elastic_setup(config)
  budget_probs = jnp.full((len(BUDGETS),), 1 / len(BUDGETS), jnp.float32)

  lowered = {
      "matmul": lower_matmul(),
      "lm": lower_step(make_lm_step(config, tx), plain_state(), tokens),
      "kd": lower_step(make_kd_step(config, tx), plain_state(), teacher, tokens, None),
      "elastic": lower_step(make_elastic_step(setup, tx, router_tx),
                            init_elastic_state(setup, copy(), tx, router_tx, seed=3), teacher, tokens, budget_probs),
  }
  if breakdown:
    masks = mixed_budget_masks(setup, model.batch)
    lowered["kd+masks"] = lower_step(make_kd_step(config, tx), plain_state(), teacher, tokens, masks)
    lowered["kd+mask grads"] = lower_step(make_kd_step(config, tx, mask_grads=True), plain_state(), teacher, tokens,
                                          masks)
  steps = compile_steps(lowered)
  for step in steps.values():  # first calls allocate and page in; not timed
    step.run()
  return steps, time.perf_counter() - start


@dataclasses.dataclass
class Timings:
  """Per step: seconds of each call, and the matmul FLOP/s measured just around that call (mean of the matmul
  before and the one after). Index r of every list is round r."""

  seconds: dict[str, list[float]]
  local_peak: dict[str, list[float]]
  matmul_seconds: list[float]


def time_interleaved(steps: dict[str, CompiledStep], matmul: CompiledStep, reps: int) -> Timings:
  """``reps`` rounds; each runs every step once, in an order rotated by one position per round, with the matmul
  between consecutive calls so that each call's load is matched by a peak measured next to it."""

  def timed(step: CompiledStep) -> float:
    start = time.perf_counter()
    step.run()
    return time.perf_counter() - start

  names = list(steps)
  seconds: dict[str, list[float]] = {name: [] for name in names}
  local_peak: dict[str, list[float]] = {name: [] for name in names}
  matmul_seconds = [timed(matmul)]
  for rep in range(reps):
    for name in names[rep % len(names):] + names[:rep % len(names)]:
      seconds[name].append(timed(steps[name]))
      matmul_seconds.append(timed(matmul))
      local_peak[name].append(matmul_flops() / statistics.mean(matmul_seconds[-2:]))
  return Timings(seconds, local_peak, matmul_seconds)


def matmul_flops() -> float:
  return 2.0 * MATMUL_SIZE ** 3


def paired_ratio(timings: Timings, name: str, reference: str) -> float:
  """Median over rounds of time(name) / time(reference) within the round: the load drifts more between rounds
  than within one."""
  return statistics.median(a / b for a, b in zip(timings.seconds[name], timings.seconds[reference]))


# ------------------------------------------------------------------------------------------------ report
def benchmark(model: BenchmarkModel, reps: int, breakdown: bool) -> None:
  config = model.config
  per_token = forward_flops_per_token(config, model.length)
  tokens = model.batch * model.length
  print(f"\n== {model.name}: {param_count(config):,} params, pattern {config.pattern}, d={config.hidden_size}, "
        f"V={config.vocab_size}, batch {model.batch} x {model.length} tokens, fp32")
  print("forward FLOPs per token: " + ", ".join(f"{kind} {value / 1e6:.2f}M" for kind, value in per_token.items())
        + f" (total {sum(per_token.values()) / 1e6:.2f}M)")
  steps, compile_seconds = build_steps(model, breakdown)
  matmul = steps.pop("matmul")
  print(f"compiled and warmed up {len(steps) + 1} programs in {compile_seconds:.1f} s; load average "
        f"{os.getloadavg()[0]:.1f}; timing {reps} interleaved reps")
  timings = time_interleaved(steps, matmul, reps)
  matmul_median = statistics.median(timings.matmul_seconds)
  print(f"fp32 matmul {MATMUL_SIZE}^3 ({len(timings.matmul_seconds)} calls between the steps): median "
        f"{1e3 * matmul_median:.1f} ms -> {matmul_flops() / matmul_median / 1e9:.1f} GFLOP/s, best "
        f"{matmul_flops() / min(timings.matmul_seconds) / 1e9:.1f} GFLOP/s (XLA count "
        f"{matmul.xla_flops / 1e9:.2f} GFLOP)")
  print(f"{'step':>13}  {'median':>10}  {'min-max':>17}  {'tokens/s':>9}  {'vs lm':>6}  {'vs kd':>6}  "
        f"{'model GFLOP':>11}  {'XLA GFLOP':>9}  {'XLA/model':>9}  {'MFU':>6}")
  for name in steps:
    flops, times = step_flops(model, name), timings.seconds[name]
    median = statistics.median(times)
    mfu = statistics.median(flops / t / peak for t, peak in zip(times, timings.local_peak[name]))
    spread = f"{1e3 * min(times):.0f}-{1e3 * max(times):.0f} ms"
    print(f"{name:>13}  {1e3 * median:7.1f} ms  {spread:>17}  {tokens / median:9,.0f}  "
          f"{paired_ratio(timings, name, 'lm'):5.2f}x  {paired_ratio(timings, name, 'kd'):5.2f}x  "
          f"{flops / 1e9:11.2f}  {steps[name].xla_flops / 1e9:9.2f}  {steps[name].xla_flops / flops:9.2f}  "
          f"{100 * mfu:5.1f}%", flush=True)
  ratio = paired_ratio(timings, "elastic", "kd")
  print(f"elastic / plain KD = {ratio:.2f}x (target <= 1.5x: {'holds' if ratio <= 1.5 else 'does not hold'}); "
        f"elastic / plain LM = {paired_ratio(timings, 'elastic', 'lm'):.2f}x")
  if breakdown:
    masked, mask_grads = (paired_ratio(timings, name, "kd") for name in ("kd+masks", "kd+mask grads"))
    print(f"elastic overhead, in % of the KD step: {100 * (ratio - 1):+.1f}% = masked student "
          f"{100 * (masked - 1):+.1f}% + gradients to the masks {100 * (mask_grads - masked):+.1f}% + router, "
          f"sampling, mask building and router loss/update {100 * (ratio - mask_grads):+.1f}%")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", choices=("tiny", "medium", "all"), default="all")
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--breakdown", action="store_true",
                      help="also time plain KD with fixed masks, with and without mask gradients")
  args = parser.parse_args()
  print(f"jax {jax.__version__}, devices {jax.devices()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f} at start")
  models = {"tiny": [tiny_model()], "medium": [MEDIUM], "all": [tiny_model(), MEDIUM]}[args.config]
  for model in models:
    benchmark(model, args.reps, args.breakdown)


if __name__ == "__main__":
  main()
