"""Will it fit? Memory and time of every phase of the main job per device and per host, planned ahead of time.

    python -m elastic_jax.plan --config configs/nano_v2_12b.py [--config.key=value ...] [--device v5p]
                               [--json] [--compile | --compile-for v5p:2x2x1] [--mfu 0.4] [--storage_gb_per_s 1]
                               [--devices_per_host 4] [--prompt_len 512]

Nothing is loaded or allocated: the train state's shapes come from ``jax.eval_shape`` and its shardings from the
run's logical-axis rules over a ``jax.sharding.AbstractMesh`` of the configured shape, so a 12B plan for 128 chips
runs on a laptop in seconds. Every phase runs as it will on the pod: params live in their shardings
(``sharding.param_shardings``), every program is sharded under the configured mesh, and each of the hosts drives
``devices_per_host`` devices.

Training (one column per stage), per device:

- student params, optimizer state (AdamW's two moments and its counters), the frozen teacher (in
  ``memory.teacher_dtype``) and the router (its params and optimizer state, with the step counter and PRNG key):
  shapes divided by the shard counts of their real ``NamedSharding`` (rounded up, as XLA pads uneven shards);
- gradients and activations of one micro-batch at the step's peak, from the analytical model below;

then their total against the device's HBM (times ``--usable_fraction``, for what the runtime reserves) with a
FITS / DOES NOT FIT verdict and the margin, the step's model FLOPs (``elastic_jax.train.flops``) and the time per
step at an assumed MFU.

Every phase (one column each; the verdict is the largest per-device peak over the phases against the usable HBM):

    import       the HF checkpoint read into shards: each process reads only its devices' slices, in the checkpoint's
                 dtype (``plan.checkpoint_dtype``, bf16), and casts on device. Per device: the fp32 shards plus one
                 tensor's slice in flight; per host: its devices' share in the checkpoint dtype; time: that share at
                 the assumed storage bandwidth per host (``plan.storage_gb_per_s``).
    importance   ``importance.batches`` calibration forwards of [batch_size, seq_len] (activation statistics), then
                 the depth ranking: L + L(L+1)/2 forwards per depth batch (``depth_ranking_forwards``), each holding
                 the reference logits while a candidate's are computed.
    permutation  a jitted gather whose outputs keep the input shardings (params in + params out), then saved.
    training     the elastic stages above: the largest stage's peak, every step's FLOPs.
    extraction   each budget's child and baseline sliced by a jitted function (the parent + the child, counted at
                 the largest budget times the parent's bytes), each saved.
    evaluation   per model (parent, children, baselines; children counted at budget x the parent's FLOPs):
                 ``eval.ppl_batches`` perplexity forwards of [batch_size, seq_len] (logits and log-softmax), and for
                 each of the two example sets ``examples`` prompts of ``plan.prompt_len`` tokens (an assumption: the
                 synthetic tasks' prompts are a few hundred tokens), ``decode_batch`` at a time: one prefill pass
                 into KV/SSM caches of prompt + ``max_new_tokens`` positions, then one decode step per new token.

Times: compute at the assumed MFU; a floor from the bytes each device must read from HBM where the work is
memory-bound (decode steps read every param shard and the caches once per token; gathers read and write the params);
checkpoint reads and writes at the storage bandwidth, hosts in parallel. Per host: what one process holds in host
memory at the phase's peak (checkpoint slices, the device-to-host copies of a save, its token batches).

Activation model (bytes per device of one micro-batch; every tensor is counted at its per-device shard size under
the rules table, e.g. ``[batch, length, embed]`` splits batch over the data-parallel axes and length over context):

    S_b = I + {none: N_b, dots: D_b, full: 0}[remat policy of block b's kind]
    W_b = (N_b - S_b + I) + N_b + I
    H   = n [B, L, V] fp32 + [B, L, d] (fp32 + compute dtype), n = 2 on GPU and CPU, 4 on TPU
    forward only (teacher, calibration, depth ranking, perplexity, prefill, decode):
    F   = I + max(max_b N_b, [B, L, d] compute dtype + k [B, L, V] fp32) + h [B, L, V] fp32
    training, the largest of three moments (G: the params' bytes; a = 1 with gradient accumulation, else 0):
      the loss        a G + sum_b S_b + H
      the backward    (1 + a) G + sum_b S_b + max_b W_b
      the teacher     a G + F with k = 1, h = 0

where I is a block's input (the fp32 residual stream [B, L, d], kept for every block under every policy); N_b is
the sum of block b's forward intermediates (``_block_tensors``: projection outputs, masked and activated copies,
attention scores [B, Hq, L, K] in fp32 and probabilities in the compute dtype (K keys: L, or the cache length when
decoding), the chunked SSD's per-chunk decay, score and state tensors in fp32, the gated norm's fp32 temporaries;
for an MoE block the router's [B, L, E] fp32 scores, the block's experts whole in the compute dtype (each shard's
grouped matmuls read every expert, gathered over the expert and fsdp axes), and the B·L·k rows sorted by expert:
gathered inputs, up-projection output, each row's neuron mask and the masked and relu^2 outputs [B·L·k, I], the fp32
outputs weighted and put back in token order, plus the shared expert and the latent projections);
D_b is the part of N_b that the "dots" policy saves (the outputs of the projections: matmuls without batch
dimensions). S_b is what the backward pass keeps of block b; W_b is the working set while block b is differentiated:
what it recomputes, about as much again for the gradients of those intermediates, and the residual stream's
gradient. H is the loss at its peak: the student's and the teacher's logits (the logits' gradient takes the place of
one of them; on GPU XLA fuses the log-softmaxes into it, on TPU it keeps about two more logits-sized arrays: n is
read off XLA's memory analysis of the compiled steps, ``Device.loss_logits``), plus the final norm's output. Gradients: the running sum of the
earlier micro-batches' (with accumulation) is alive throughout; this micro-batch's from the blocks' backward on,
not yet at the loss. A forward that keeps nothing for a backward holds one block's intermediates next to the
residual stream, or the head: the final norm's output and k logits-sized arrays (1: the logits; 2: the logits and
their log-softmax), plus h logits it holds from before (the depth ranking's reference). Token ids, masks, router
activations and importance statistics are small and not counted. On a TPU every array (state and activations) is counted
with the tile padding of its shard (``tiled_elements``: the layout's two minor dimensions pad up to 8 x 128 words).

With a context axis of C > 1 devices that splits the sequence evenly, the model counts what the context-parallel
ops (``elastic_jax.ops.context_parallel``) keep: ring attention's one [L/C, L/C] block of scores per head at a time
and the per-hop accumulators and K/V blocks, the sharded SSD's all-gathered end states; otherwise attention's full
[L, K] score matrix per head (cached prefill and decode never run the ring). Mamba is counted with the chunked SSD
(a fused kernel keeps less). ``--compile`` (when enough devices exist, e.g. virtual CPU devices) lowers and compiles
the real train step, a depth-ranking forward and a perplexity forward and prints XLA's memory analysis next to the
estimates. ``--compile-for TARGET`` (``elastic_jax.aot``: "v5p:2x2x1", "h100:1x1x8", ...) compiles every stage's
real train step for that target's compile-only devices, without the hardware, in a worker process (a compiler abort
becomes a one-line error; stages of one batch and length share one compile, as they share one step in training);
the target names the device kind and its device count must equal the mesh's. Where a stage is compiled, its verdict
and margin (and the training phase's) use XLA's per-device total instead of the estimate.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import textwrap
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, PartitionSpec

from elastic_jax import aot
from elastic_jax.elastic import importance as importance_lib
from elastic_jax.elastic.param_count import param_count
from elastic_jax.eval import metrics as metrics_lib
from elastic_jax.model import ModelConfig, init_cache, param_shapes
from elastic_jax.model.config import BlockSpec
from elastic_jax.ops.context_parallel import CONTEXT_AXIS
from elastic_jax.train import sharding as sharding_lib
from elastic_jax.train.config import (check_keys, elastic_setup_from_config, optimizers_from_config, plain, section,
                                     stages_from_config)
from elastic_jax.train.flops import elastic_step_flops, forward_flops_per_token
from elastic_jax.train.loop import ShardedTraining, Stage, abstract_boxed_state, compiled_elastic_step
from elastic_jax.train.memory import MemoryConfig
from elastic_jax.train.optim import make_optimizer
from elastic_jax.train.elastic_step import ElasticSetup, Pins

GB = 1e9
_EMBED = ("batch", "length", "embed")


# ------------------------------------------------------------------------------------------------ devices
@dataclasses.dataclass(frozen=True)
class Device:
  """One accelerator: its memory, its dense bf16 matmul peak (FLOP/s), its memory bandwidth (bytes/s: decode steps
  are bound by it, not by FLOPs) and how many of it one host drives (None: all on one host)."""

  description: str
  hbm_bytes: float
  peak_flops: float
  hbm_bandwidth: float
  devices_per_host: int | None
  tiled: bool = False  # TPU: HBM holds arrays in tiles (``tiled_elements``)
  # fp32 [B, L, V] arrays alive at the distillation loss's peak, as the compiler schedules it (XLA's memory analysis
  # of the compiled steps): GPU fuses the log-softmaxes into the logits' gradient (student logits, teacher logits);
  # TPU materialises about two more.
  loss_logits: int = 2


def _host_memory_bytes() -> float:
  return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


# Published per-chip / per-GPU figures (memory in GB = 1e9 bytes, as vendors quote it; bf16 dense peaks; HBM
# bandwidth), and the chips or GPUs of one host of a pod slice or cluster node (TPU VMs of v4/v5p/v5e slices: 4;
# HGX/DGX nodes: 8).
DEVICES: dict[str, Device] = {
    "v5p": Device("TPU v5p chip", 95 * GB, 459e12, 2765 * GB, 4, tiled=True, loss_logits=4),
    "v5e": Device("TPU v5e chip", 16 * GB, 197e12, 819 * GB, 4, tiled=True, loss_logits=4),
    "v4": Device("TPU v4 chip", 32 * GB, 275e12, 1200 * GB, 4, tiled=True, loss_logits=4),
    "v6e": Device("TPU v6e chip", 32 * GB, 918e12, 1640 * GB, 4, tiled=True, loss_logits=4),
    "h100": Device("NVIDIA H100 SXM 80GB", 80 * GB, 989e12, 3350 * GB, 8),
    "h200": Device("NVIDIA H200 141GB", 141 * GB, 989e12, 4800 * GB, 8),
    "a100": Device("NVIDIA A100 80GB", 80 * GB, 312e12, 2039 * GB, 8),
    "cpu": Device("host CPU (this machine's RAM; nominal 1e11 FLOP/s, 5e10 B/s)", _host_memory_bytes(), 1e11,
                  50 * GB, None),
}

# Checkpoint storage to one host (GB/s), when neither config.plan.storage_gb_per_s nor --storage_gb_per_s says:
# a conservative figure for network storage (a GCS bucket, NFS); local NVMe or a parallel file system reads faster.
DEFAULT_STORAGE_GB_PER_S = 1.0
# Prompt tokens per generated example, when config.plan.prompt_len does not say: the synthetic tasks' prompts
# (with distractors) are a few hundred tokens; longer prompts grow the caches and the prefill.
DEFAULT_PROMPT_LEN = 512


def device_spec(name: str) -> Device:
  if name not in DEVICES:
    raise ValueError(f"unknown device {name!r}; choose one of {sorted(DEVICES)} (--device or config.plan.device).")
  return DEVICES[name]


@dataclasses.dataclass(frozen=True)
class Hardware:
  """Where the run is planned: the device kind, the mesh over ``num_devices`` of them, the rules and the MFU, the
  devices each host (process) drives and the checkpoint storage bandwidth each host gets."""

  device_name: str
  device: Device
  mesh_shape: tuple[int, ...]  # one size per axis of ``sharding.MESH_AXES``
  rules: tuple
  mfu: float
  usable_fraction: float
  devices_per_host: int = 1
  storage_bytes_per_s: float = DEFAULT_STORAGE_GB_PER_S * GB  # per host, reading and writing checkpoints

  @property
  def num_devices(self) -> int:
    return int(np.prod(self.mesh_shape))

  @property
  def num_hosts(self) -> int:
    return math.ceil(self.num_devices / self.devices_per_host)

  @property
  def capacity(self) -> float:
    """Usable HBM bytes per device."""
    return self.device.hbm_bytes * self.usable_fraction

  def compute_seconds(self, flops: float) -> float:
    """Time of ``flops`` model FLOPs spread over every device at the assumed MFU."""
    return flops / (self.num_devices * self.device.peak_flops * self.mfu)

  @property
  def axis_sizes(self) -> dict[str, int]:
    return dict(zip(sharding_lib.MESH_AXES, self.mesh_shape))

  def abstract_mesh(self) -> AbstractMesh:
    return AbstractMesh(self.mesh_shape, tuple(sharding_lib.MESH_AXES))


PLAN_KEYS = ("device", "num_devices", "mfu", "devices_per_host", "storage_gb_per_s", "checkpoint_dtype", "prompt_len")


def hardware_from_config(config: Any, device: str | None = None, mfu: float | None = None,
                         usable_fraction: float = 0.9, storage_gb_per_s: float | None = None,
                         devices_per_host: int | None = None) -> Hardware:
  """The mesh (``config.mesh``), the device kind and count (``config.plan``: ``device``, ``num_devices``, ``mfu``,
  ``devices_per_host``, ``storage_gb_per_s``); arguments that are not None override the config.

  ``config.mesh.shape`` may name fewer axes than the mesh has (trailing axes get size 1) or be empty (every device
  on the data axis). Its product must equal ``config.plan.num_devices`` when that is given. Devices per host default
  to the device kind's (all devices on one host for ``cpu``), the storage bandwidth to ``DEFAULT_STORAGE_GB_PER_S``.
  """
  plan_cfg = plain(config.get("plan"))
  check_keys(plan_cfg, PLAN_KEYS, "config.plan")
  mesh_cfg = plain(config.get("mesh"))
  check_keys(mesh_cfg, ("shape", "rules"), "config.mesh")
  axes = tuple(sharding_lib.MESH_AXES)
  shape = tuple(int(n) for n in (mesh_cfg.get("shape") or ()))
  claimed = plan_cfg.get("num_devices")
  if len(shape) > len(axes):
    raise ValueError(f"config.mesh.shape={shape} has {len(shape)} axes but the mesh has {len(axes)} "
                     f"({', '.join(axes)}); give at most {len(axes)} sizes.")
  if any(n <= 0 for n in shape):
    raise ValueError(f"config.mesh.shape={shape} has a non-positive size; every axis needs at least 1 device.")
  if not shape:
    shape = (int(claimed) if claimed else 1,)
  if claimed is not None and int(np.prod(shape)) != int(claimed):
    raise ValueError(f"config.mesh.shape={shape} spans {int(np.prod(shape))} devices but config.plan.num_devices="
                     f"{claimed}; make the product of the mesh shape equal the device count.")
  shape = shape + (1,) * (len(axes) - len(shape))
  rules = sharding_lib.rules_from_config(mesh_cfg.get("rules"))
  name = device or plan_cfg.get("device") or "cpu"
  mfu = float(mfu if mfu is not None else plan_cfg.get("mfu") or 0.4)  # None in the schema: 0.4
  if not 0.0 < mfu <= 1.0:
    raise ValueError(f"mfu={mfu} must be in (0, 1] (a fraction of the device's peak FLOP/s).")
  if not 0.0 < usable_fraction <= 1.0:
    raise ValueError(f"usable_fraction={usable_fraction} must be in (0, 1].")
  spec = device_spec(name)
  num_devices = int(np.prod(shape))
  per_host = int(devices_per_host or plan_cfg.get("devices_per_host") or spec.devices_per_host or num_devices)
  if per_host < 1:
    raise ValueError(f"devices_per_host={per_host} must be >= 1.")
  per_host = min(per_host, num_devices)
  storage = float(storage_gb_per_s if storage_gb_per_s is not None
                  else plan_cfg.get("storage_gb_per_s") or DEFAULT_STORAGE_GB_PER_S)
  if storage <= 0:
    raise ValueError(f"storage_gb_per_s={storage} must be > 0 (GB/s of checkpoint storage per host).")
  return Hardware(name, spec, shape, rules, mfu, usable_fraction, per_host, storage * GB)


# ------------------------------------------------------------------------------------------------ state bytes
def tiled_elements(shape: Sequence[int], itemsize: int) -> int:
  """Elements a TPU allocates for an array of ``shape``. HBM holds arrays in tiles of 8 x 128 32-bit words: the
  layout's minor dimension pads up to a multiple of 128 and its second-minor one to 8 rows of 32-bit words (16 of
  bf16, 32 of int8); a vector pads to 128. XLA picks layouts; counted with the two dimensions that pad least (a
  [.., 128, 8, 32] array is not padded, a [.., 32, 32] fp32 one takes 4x its bytes)."""
  shape = [int(n) for n in shape]
  if len(shape) < 2:
    return -(-shape[0] // 128) * 128 if shape else 1
  rows = 8 * max(1, 4 // itemsize)
  whole = math.prod(shape)
  best = None
  for minor, dim in enumerate(shape):
    for second, other in enumerate(shape):
      if second != minor:
        padded = whole // (dim * other) * (-(-dim // 128) * 128) * (-(-other // rows) * rows) if dim * other else 0
        best = padded if best is None else min(best, padded)
  return best


def per_device_bytes(shape: Sequence[int], itemsize: int, spec: PartitionSpec, axis_sizes: Mapping[str, int],
                     tiled: bool = False) -> int:
  """Bytes one device holds of an array of ``shape`` sharded by ``spec`` (uneven shards round up, as XLA pads;
  ``tiled``: a TPU's tile padding of the shard, see ``tiled_elements``)."""
  entries = tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))
  local = []
  for dim, entry in zip(shape, entries):
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    local.append(math.ceil(dim / int(np.prod([axis_sizes[n] for n in names], dtype=np.int64))))
  return int(tiled_elements(local, itemsize) if tiled else math.prod(local)) * int(itemsize)


def state_bytes(setup: ElasticSetup, tx, router_tx, hardware: Hardware) -> dict[str, int]:
  """Per-device bytes of the train state's parts (student params, optimizer state, router incl. step and PRNG key)
  and of the frozen teacher (in ``setup.memory.teacher_dtype``), from the real shardings of the rules table over an
  abstract mesh."""
  boxed = abstract_boxed_state(setup, tx, router_tx)
  shardings = sharding_lib.logical_shardings(boxed, hardware.abstract_mesh(), hardware.rules)
  shapes = nn.meta.unbox(boxed)
  sizes = hardware.axis_sizes

  def total(tree_shapes, tree_shardings, dtype=None) -> int:
    leaves = jax.tree.map(
        lambda x, s: per_device_bytes(x.shape, jnp.dtype(dtype or x.dtype).itemsize, s.spec, sizes,
                                      hardware.device.tiled),
        tree_shapes, tree_shardings)
    return int(sum(jax.tree.leaves(leaves)))

  router = (total(shapes.router_params, shardings.router_params)
            + total(shapes.router_opt_state, shardings.router_opt_state)
            + total(shapes.step, shardings.step) + total(shapes.rng, shardings.rng))
  return {"params": total(shapes.params, shardings.params),
          "opt_state": total(shapes.opt_state, shardings.opt_state),
          "router": router,
          "teacher": total(shapes.params, shardings.params, dtype=setup.memory.teacher_dtype)}


# ------------------------------------------------------------------------------------------------ activations
@dataclasses.dataclass(frozen=True)
class _Tensor:
  shape: tuple[int, ...]
  axes: tuple[str | None, ...]  # logical axis names
  itemsize: int
  saved_by_dots: bool = False  # a projection output: what the "dots" remat policy keeps


def _block_tensors(config: ModelConfig, spec: BlockSpec, b: int, l: int, context: int = 1,
                   keys: int | None = None) -> list[_Tensor]:
  """The forward intermediates of one block on a micro-batch of b sequences of l tokens (N_b's terms).

  ``keys``: the positions each query attends over when it differs from l (a cached prefill or decode step reads the
  whole cache, masked). ``context`` > 1 (a context axis that splits l evenly) counts the context-parallel paths of
  ``elastic_jax.ops.context_parallel``: ring attention holds one [l/C, l/C] score block per head at a time plus the
  per-hop softmax accumulators and K/V blocks the ring's scan keeps for its backward, and the sharded SSD the
  all-gathered [C, h, p, n] end states.
  """
  c = jnp.dtype(config.dtype).itemsize
  d, f32 = config.hidden_size, 4
  out = [_Tensor((b, l, d), _EMBED, f32),  # pre-norm output (fp32, masked)
         _Tensor((b, l, d), _EMBED, c),  # its cast to the compute dtype: the projections' input
         _Tensor((b, l, d), _EMBED, f32)]  # mixer output in fp32 (masked, depth-gated) before the residual add
  if spec.kind == "mlp":
    mlp = ("batch", "length", "mlp")
    shape = (b, l, spec.intermediate_size)
    out += [_Tensor(shape, mlp, c, True),  # up_proj output
            _Tensor(shape, mlp, c), _Tensor(shape, mlp, c),  # masked, relu^2
            _Tensor((b, l, d), _EMBED, c, True)]  # down_proj output
  elif spec.kind == "attention":
    hq, hkv, hd = spec.num_attention_heads, config.num_key_value_heads, config.head_dim
    q_axes, kv_axes = ("batch", "length", "heads", "head_dim"), ("batch", "length", "kv_heads", "head_dim")
    out += [_Tensor((b, l, hq, hd), q_axes, c, True),
            _Tensor((b, l, hkv, hd), kv_axes, c, True), _Tensor((b, l, hkv, hd), kv_axes, c, True)]
    if context > 1:  # ring attention: one [l/C, l/C] block of scores and of probabilities (fp32) at a time
      block, per_hop = math.ceil(l / context), ("batch", None, "heads", "head_dim")
      out += [_Tensor((b, hq, block, block), ("batch", "heads", None, None), f32)] * 2
      out += [_Tensor((b, l, hq, hd), per_hop, f32),  # the running accumulator, kept for each of the C hops
              _Tensor((b, l, hkv, hd), ("batch", None, "kv_heads", "head_dim"), c),  # the K and V blocks of
              _Tensor((b, l, hkv, hd), ("batch", None, "kv_heads", "head_dim"), c)]  # every hop
    else:  # the full core: every query against every key
      scores, k = ("batch", "heads", "length", None), l if keys is None else keys
      out += [_Tensor((b, hq, l, k), scores, f32),  # masked scores
              _Tensor((b, hq, l, k), scores, c)]  # probabilities in the compute dtype (the PV matmul's operand)
    out += [_Tensor((b, l, hq, hd), q_axes, c), _Tensor((b, l, hq, hd), q_axes, c),  # core output, head-masked
            _Tensor((b, l, d), _EMBED, c, True)]  # o_proj output
  elif spec.kind == "moe":
    # The T = b·l tokens' k expert assignments sorted by expert: T·k rows, counted as [b, l·k, ...] (each device
    # sorts the rows of its own tokens; the experts' grouped matmuls run on them whatever the expert axis holds).
    k, experts, inner = config.num_experts_per_tok, spec.n_routed_experts, spec.moe_intermediate_size
    latent, width = config.moe_latent_size is not None, config.expert_input_size
    expert_in = ("batch", "length", "moe_latent" if latent else "embed")
    rows, hidden = (b, l * k, width), ("batch", "length", "expert_mlp")
    out += [_Tensor((b, l, experts), ("batch", "length", None), f32)] * 3  # router logits, scores, choice
    # Every expert of the block, whole, in the compute dtype (up and down): what each shard's grouped matmuls read
    # (gathered over the expert and fsdp axes), and in the backward their gradients before the reduce-scatter.
    out += [_Tensor((experts, width, inner), (None, None, None), c)] * 2
    if latent:
      out += [_Tensor((b, l, width), expert_in, c, True)]  # fc1_latent_proj output
    out += [_Tensor(rows, expert_in, c),  # the rows gathered in expert order
            _Tensor((b, l * k, inner), hidden, c, True),  # up output
            _Tensor((b, l * k, inner), hidden, c), _Tensor((b, l * k, inner), hidden, c),  # each row's mask, masked
            _Tensor((b, l * k, inner), hidden, c),  # relu^2
            _Tensor(rows, expert_in, f32, True), _Tensor(rows, expert_in, f32),  # down output (fp32), weighted
            _Tensor(rows, expert_in, f32),  # back in assignment order
            _Tensor((b, l, width), expert_in, f32)]  # summed per token
    if latent:
      out += [_Tensor((b, l, d), _EMBED, c, True)]  # fc2_latent_proj output
    if spec.moe_shared_expert_intermediate_size:
      shared = (b, l, spec.moe_shared_expert_intermediate_size)
      out += [_Tensor(shared, ("batch", "length", "shared_mlp"), c, True),  # the shared expert's up_proj output
              _Tensor(shared, ("batch", "length", "shared_mlp"), c),  # relu^2
              _Tensor((b, l, d), _EMBED, c, True)]  # its down_proj output
  else:
    h, p = spec.mamba_num_heads, spec.mamba_head_dim
    g, n, q = config.n_groups, config.ssm_state_size, config.chunk_size
    heads, groups = ("batch", "length", "ssm_heads", "mamba_head_dim"), ("batch", "length", "ssm_groups", "ssm_state")
    per_head = ("batch", "length", "ssm_heads")
    chunks = math.ceil(l / q)
    out += [_Tensor((b, l, h, p), heads, c, True), _Tensor((b, l, h, p), heads, c, True),  # z, x
            _Tensor((b, l, g, n), groups, c, True), _Tensor((b, l, g, n), groups, c, True),  # B, C
            _Tensor((b, l, h), per_head, c, True)]  # dt
    out += [_Tensor((b, l, h, p), heads, c)] * 3  # x: conv output, SiLU output, channel-masked
    out += [_Tensor((b, l, g, n), groups, c)] * 4  # B and C: conv and SiLU outputs
    out += [_Tensor((b, l, h), per_head, f32)]  # dt after softplus, fp32
    # Chunked SSD, fp32: C.B^T scores per group, segment decays and weights per head ([q, q] per chunk, counted as
    # such: a TPU pads small [q, q] tiles), decay-weighted x, chunk states and chunk-start states ([p, n] per head
    # and chunk), y and y_from_start.
    out += [_Tensor((b, chunks, g, q, q), ("batch", "length", "ssm_groups", None, None), f32)]
    out += [_Tensor((b, chunks, h, q, q), ("batch", "length", "ssm_heads", None, None), f32)] * 2
    out += [_Tensor((b, l, h, p), heads, f32)]
    out += [_Tensor((b, chunks, h, p, n), ("batch", "length", "ssm_heads", "mamba_head_dim", "ssm_state"), f32)] * 2
    out += [_Tensor((b, l, h, p), heads, f32)] * 2
    if context > 1:  # every shard's end state, all-gathered
      out += [_Tensor((b, context, h, p, n), ("batch", None, "ssm_heads", "mamba_head_dim", "ssm_state"), f32)]
    out += [_Tensor((b, l, h, p), heads, f32)] * 2 + [_Tensor((b, l, h, p), heads, c)]  # gated norm: gated, normed
    out += [_Tensor((b, l, d), _EMBED, c, True)]  # out_proj output
  return out


def _tensor_bytes(t: _Tensor, hardware: Hardware) -> int:
  """Per-device bytes of an activation, its logical axes mapped to mesh axes by the run's rules."""
  return per_device_bytes(t.shape, t.itemsize, nn.logical_to_mesh_axes(t.axes, hardware.rules), hardware.axis_sizes,
                          hardware.device.tiled)


@dataclasses.dataclass(frozen=True)
class BlockBytes:
  """Per-device bytes of one block's forward intermediates: all of them (N_b) and the projection outputs (D_b)."""

  kind: str
  forward: int
  dots: int


def block_bytes(config: ModelConfig, b: int, l: int, hardware: Hardware, keys: int | None = None
                ) -> list[BlockBytes]:
  """N_b and D_b of every block on b sequences of l tokens, per device. Without ``keys`` (a whole sequence, no cache)
  a context axis that divides l runs the context-parallel ops; with ``keys`` (a cached prefill or decode step over a
  cache of that many positions) the single-device core runs."""
  context = hardware.axis_sizes.get(CONTEXT_AXIS, 1)
  context = context if keys is None and context > 1 and l % context == 0 else 1  # else the single-device path
  out = []
  for spec in config.block_specs():
    tensors = _block_tensors(config, spec, b, l, context, keys)
    out.append(BlockBytes(spec.kind, sum(_tensor_bytes(t, hardware) for t in tensors),
                          sum(_tensor_bytes(t, hardware) for t in tensors if t.saved_by_dots)))
  return out


def _stream_bytes(config: ModelConfig, b: int, l: int, hardware: Hardware) -> dict[str, int]:
  """Per-device bytes of the tensors around the blocks: the fp32 residual stream [b, l, d], the final norm's output
  in the compute dtype and the fp32 logits [b, l, V]."""
  d, c = config.hidden_size, jnp.dtype(config.dtype).itemsize
  return {"residual": _tensor_bytes(_Tensor((b, l, d), _EMBED, 4), hardware),
          "normed": _tensor_bytes(_Tensor((b, l, d), _EMBED, c), hardware),
          "logits": _tensor_bytes(_Tensor((b, l, config.vocab_size), ("batch", "length", "vocab"), 4), hardware)}


def forward_bytes(config: ModelConfig, b: int, l: int, hardware: Hardware, logits_made: int = 1,
                  logits_held: int = 0, keys: int | None = None) -> dict[str, float]:
  """Peak per-device activation bytes of a forward pass that keeps nothing for a backward (the module docstring's F):
  the teacher's, the calibration and depth-ranking forwards, perplexity, a cached prefill or decode step.

  logits_made: logits-sized fp32 arrays the head makes (1: the logits; 2: the logits and their log-softmax).
  logits_held: logits-sized fp32 arrays held from before (the depth ranking's reference logits).
  keys: attention keys per query when they are not the l tokens themselves (a cache of that many positions).
  """
  stream = _stream_bytes(config, b, l, hardware)
  blocks = max(block.forward for block in block_bytes(config, b, l, hardware, keys))
  head = stream["normed"] + logits_made * stream["logits"]
  total = stream["residual"] + max(blocks, head) + logits_held * stream["logits"]
  return {"total": float(total), "one_block": float(blocks), "head": float(head),
          "held_logits": float(logits_held * stream["logits"])}


def activation_bytes(config: ModelConfig, micro_batch: int, seq_len: int, memory: MemoryConfig,
                     hardware: Hardware, param_bytes: float = 0.0) -> dict[str, float]:
  """Per-device gradient and activation bytes of one training micro-batch at the step's peak (the module docstring's
  formula), with its terms; ``param_bytes``: the student params' per-device bytes (the gradients' size)."""
  b, l = micro_batch, seq_len
  stream = _stream_bytes(config, b, l, hardware)
  saved_total, working_max = 0, 0
  for block in block_bytes(config, b, l, hardware):
    kept = {"none": block.forward, "dots": block.dots, "full": 0}[memory.policy(block.kind)]
    saved_total += stream["residual"] + kept
    working_max = max(working_max, (block.forward - kept) + block.forward + stream["residual"])
  head = hardware.device.loss_logits * stream["logits"] + stream["residual"] + stream["normed"]
  teacher = forward_bytes(config, b, l, hardware)["total"]
  accumulating = memory.grad_accum_steps > 1
  # Gradients alive at each moment: the running sum of earlier micro-batches' (with accumulation) from the start;
  # this micro-batch's only from the blocks' backward on (the head's moment has made none of them yet).
  moments = {"loss": (param_bytes if accumulating else 0.0, saved_total + head),
             "blocks' backward": (param_bytes * (2 if accumulating else 1), saved_total + working_max),
             "teacher forward": (param_bytes if accumulating else 0.0, teacher)}
  peak = max(moments, key=lambda moment: sum(moments[moment]))
  gradients, activations = moments[peak]
  return {"total": float(gradients + activations), "gradients": float(gradients),
          "activations": float(activations), "peak_moment": peak, "saved_by_blocks": float(saved_total),
          "block_backward_working_set": float(working_max), "logits_and_loss": float(head),
          "teacher_forward": float(teacher)}


def cache_bytes(config: ModelConfig, batch: int, max_len: int, hardware: Hardware) -> float:
  """Per-device bytes of the decode caches of ``batch`` sequences of up to ``max_len`` positions: the model's own
  ``init_cache`` shapes (KV caches [b, T, Hkv, hd], Mamba conv windows and SSM states [b, H, P, N] in fp32), batch
  split over the data-parallel axes and heads over the tensor axis, the cache's positions whole."""
  shapes = jax.eval_shape(lambda: init_cache(config, batch, max_len))
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    axes = _CACHE_AXES.get(getattr(path[-1], "key", None), (None,) * leaf.ndim)
    total += _tensor_bytes(_Tensor(tuple(leaf.shape), axes, leaf.dtype.itemsize), hardware)
  return float(total)


_CACHE_AXES = {"k": ("batch", None, "kv_heads", "head_dim"), "v": ("batch", None, "kv_heads", "head_dim"),
               "conv_x": ("batch", None, "ssm_heads", "mamba_head_dim"),
               "conv_B": ("batch", None, "ssm_groups", "ssm_state"),
               "conv_C": ("batch", None, "ssm_groups", "ssm_state"),
               "ssm": ("batch", "ssm_heads", "mamba_head_dim", "ssm_state"), "start": ("batch",), "position": ()}


# ------------------------------------------------------------------------------------------------ the plan
class _Verdict:
  """The verdict of a plan entry with ``memory["total"]``, ``xla_total`` and ``capacity`` (bytes per device)."""

  @property
  def peak(self) -> float:
    """The per-device bytes the verdict reads: XLA's total where compiled, else the estimate."""
    return self.memory["total"] if self.xla_total is None else self.xla_total

  @property
  def fits(self) -> bool:
    return self.peak <= self.capacity

  @property
  def margin(self) -> float:
    return self.capacity - self.peak


@dataclasses.dataclass
class StagePlan(_Verdict):
  """One stage's per-device memory (bytes), FLOPs and time."""

  name: str
  batch_size: int
  seq_len: int
  micro_batch: int  # sequences per micro-batch (global)
  tokens_per_device: float  # tokens of one micro-batch on one device
  memory: dict[str, float]  # params, opt_state, teacher, router, gradients, activations, total
  activation_terms: dict[str, float]
  capacity: float  # usable HBM bytes per device
  flops_per_step: float
  seconds_per_step: float
  notes: list[str] = dataclasses.field(default_factory=list)
  xla_total: float | None = None  # XLA's per-device total of the compiled step, once compiled (``with_compiled``)



# ------------------------------------------------------------------------------------------------ the phases
PHASES = ("import", "importance", "permutation", "training", "extraction", "evaluation")

# Per-device memory terms of a phase, in the order the table prints them.
PHASE_TERMS = {"params": "model params (fp32)", "output": "output params (gather / child)",
               "teacher": "teacher", "optimizer": "optimizer, gradients, router",
               "in_flight": "checkpoint slice in flight", "caches": "KV / SSM caches", "activations": "activations"}


@dataclasses.dataclass(frozen=True)
class PhaseSettings:
  """What the phases around training run (``config.importance``, ``config.eval``, ``config.elastic.budgets``, read
  with the main job's defaults) and the planner's assumptions about them (``config.plan``)."""

  calibration_batches: int
  calibration_batch_size: int
  calibration_seq_len: int
  depth_batches: int
  budgets: tuple[float, ...]
  ppl_batches: int
  eval_batch_size: int
  eval_seq_len: int
  examples: int  # per example set
  example_sets: int  # the report's short and long task sets
  prompt_len: int  # assumed
  max_new_tokens: int
  decode_batch: int
  checkpoint_dtype: str  # assumed: the dtype the HF checkpoint stores


def phase_settings(config: Any, budgets: Sequence[float], prompt_len: int | None = None) -> PhaseSettings:
  """``config.importance`` and ``config.eval`` as the main job reads them (same defaults), ``config.plan``'s
  ``prompt_len`` and ``checkpoint_dtype`` (or ``prompt_len`` given here)."""
  importance, evaluation, plan_cfg = (section(config, key) for key in ("importance", "eval", "plan"))
  batches = int(importance["batches"])
  settings = PhaseSettings(
      calibration_batches=batches, calibration_batch_size=int(importance["batch_size"]),
      calibration_seq_len=int(importance["seq_len"]),
      depth_batches=min(batches, int(importance["depth_batches"])), budgets=tuple(float(b) for b in budgets),
      ppl_batches=int(evaluation["ppl_batches"]), eval_batch_size=int(evaluation["batch_size"]),
      eval_seq_len=int(evaluation["seq_len"]), examples=int(evaluation["examples"]),
      example_sets=2, prompt_len=int(prompt_len or plan_cfg["prompt_len"] or DEFAULT_PROMPT_LEN),
      max_new_tokens=int(evaluation["max_new_tokens"]), decode_batch=int(evaluation["decode_batch"]),
      checkpoint_dtype=str(plan_cfg["checkpoint_dtype"] or "bfloat16"))
  fields = {"calibration_batches": "config.importance.batches",
            "calibration_batch_size": "config.importance.batch_size",
            "calibration_seq_len": "config.importance.seq_len", "depth_batches": "config.importance.depth_batches",
            "eval_batch_size": "config.eval.batch_size", "eval_seq_len": "config.eval.seq_len",
            "prompt_len": "config.plan.prompt_len", "max_new_tokens": "config.eval.max_new_tokens",
            "decode_batch": "config.eval.decode_batch"}
  for name, key in fields.items():
    if getattr(settings, name) < 1:
      raise ValueError(f"{key}={getattr(settings, name)} must be >= 1.")
  return settings


def depth_ranking_forwards(num_layers: int) -> int:
  """Forwards per depth batch of the iterative depth ranking (``importance._depth_importance``): each of its L steps
  runs the full model once (the reference) and once per block still kept (L - step candidates), so
  L + (L + (L - 1) + ... + 1) = L + L(L+1)/2."""
  return num_layers + num_layers * (num_layers + 1) // 2


ParamLayout = list[tuple[tuple[int, ...], Any, PartitionSpec]]  # (shape, dtype, spec) of every parameter


def param_layout(config: ModelConfig, hardware: Hardware) -> ParamLayout:
  """Every parameter's shape, dtype and ``PartitionSpec`` under ``sharding.param_shardings`` over the abstract mesh:
  where the params live in every phase, whichever made them."""
  shardings = sharding_lib.param_shardings(config, hardware.abstract_mesh(), hardware.rules)
  pairs = jax.tree.map(lambda x, s: (tuple(x.shape), x.dtype, s.spec), param_shapes(config), shardings)
  return jax.tree.leaves(pairs, is_leaf=lambda leaf: isinstance(leaf, tuple))


def param_bytes(layout: ParamLayout, hardware: Hardware, dtype: str | None = None, on_device: bool = True
                ) -> tuple[int, int]:
  """(all params, the largest param) per device, in ``dtype`` (default: the params' own); ``on_device=False``: as
  stored and read by the host (no TPU tiles)."""
  tiled = hardware.device.tiled and on_device
  leaves = [per_device_bytes(shape, jnp.dtype(dtype or own).itemsize, spec, hardware.axis_sizes, tiled)
            for shape, own, spec in layout]
  return int(sum(leaves)), int(max(leaves))


@dataclasses.dataclass
class PhasePlan(_Verdict):
  """One phase of the main job: per-device peak bytes (by what holds them), per-host peak bytes, model FLOPs and
  time (compute at the assumed MFU, or the HBM-bandwidth floor where larger, plus checkpoint storage I/O)."""

  name: str
  memory: dict[str, float]  # per device: some of PHASE_TERMS, and "total"
  host_bytes: float
  host_holds: str  # what a host holds at that peak
  flops: float
  compute_seconds: float
  hbm_seconds: float
  storage_seconds: float
  capacity: float
  work: str  # what the phase runs
  programs: dict[str, float] = dataclasses.field(default_factory=dict)  # per-device peak of each of its programs
  counts: dict[str, int] = dataclasses.field(default_factory=dict)
  notes: list[str] = dataclasses.field(default_factory=list)
  xla_total: float | None = None  # training: the largest compiled stage's XLA total, once every stage is compiled

  @property
  def seconds(self) -> float:
    return max(self.compute_seconds, self.hbm_seconds) + self.storage_seconds


def _phase(name: str, memory: dict[str, float], hardware: Hardware, **fields) -> PhasePlan:
  memory = {key: float(value) for key, value in memory.items()}
  memory["total"] = float(sum(memory.values()))
  fields.setdefault("compute_seconds", hardware.compute_seconds(fields.get("flops", 0.0)))
  for key in ("flops", "hbm_seconds", "storage_seconds"):
    fields.setdefault(key, 0.0)
  return PhasePlan(name, memory, capacity=hardware.capacity, **fields)


def _saving(total_bytes: float, hardware: Hardware) -> float:
  """Seconds to write ``total_bytes`` of sharded arrays: every shard once (Orbax writes one replica), the hosts in
  parallel at the storage bandwidth."""
  return total_bytes / hardware.num_hosts / hardware.storage_bytes_per_s


def _token_bytes(batches: int, batch_size: int, seq_len: int) -> float:
  """Host bytes of int32 token batches [batch_size, seq_len + 1], as the data pipeline packs them."""
  return 4.0 * batches * batch_size * (seq_len + 1)


def plan_phases(config: ModelConfig, hardware: Hardware, phases: PhaseSettings, stages: Sequence[StagePlan],
                stage_steps: Sequence[int], hf_path: str = "") -> list[PhasePlan]:
  """Every phase of the main job (``PHASES``) on ``hardware``; ``stages`` are the training stages' plans."""
  per_host, bandwidth = hardware.devices_per_host, hardware.device.hbm_bandwidth
  layout = param_layout(config, hardware)
  params, _ = param_bytes(layout, hardware)
  model_bytes = 4.0 * param_count(config)  # the whole model in fp32, as saved
  flops_at = lambda length: sum(forward_flops_per_token(config, length).values())
  out = []

  # import: fp32 shards, plus one tensor's slice read in the checkpoint dtype and cast on device.
  share, largest = param_bytes(layout, hardware, phases.checkpoint_dtype, on_device=False)
  notes = [] if hf_path else ["config.parent.hf_path is empty (set it to import a checkpoint, else the parent is "
                              "pretrained): planned as the import of a checkpoint of this architecture"]
  out.append(_phase("import", {"params": params, "in_flight": largest}, hardware,
                    host_bytes=per_host * share, host_holds=f"its devices' {phases.checkpoint_dtype} slices",
                    storage_seconds=per_host * share / hardware.storage_bytes_per_s,
                    work=f"read {format_bytes(share)} {phases.checkpoint_dtype} per device", notes=notes,
                    counts={"checkpoint_bytes_per_device": share, "devices_per_host": per_host}))

  # importance: calibration forwards, then the depth ranking (reference logits held while a candidate runs).
  b, l = phases.calibration_batch_size, phases.calibration_seq_len
  depth_forwards = phases.depth_batches * depth_ranking_forwards(config.num_layers)
  forwards = phases.calibration_batches + depth_forwards
  calibration = forward_bytes(config, b, l, hardware)["total"]
  depth = forward_bytes(config, b, l, hardware, logits_held=1)["total"]
  out.append(_phase("importance", {"params": params, "activations": max(calibration, depth)}, hardware,
                    host_bytes=_token_bytes(phases.calibration_batches, b, l), host_holds="calibration tokens",
                    flops=forwards * b * l * flops_at(l),
                    work=f"{forwards:,} forwards of {b} x {l}",
                    programs={"calibration": params + calibration, "depth ranking": params + depth},
                    counts={"calibration_forwards": phases.calibration_batches, "depth_forwards": depth_forwards,
                            "depth_forwards_per_batch": depth_ranking_forwards(config.num_layers)},
                    notes=[f"{phases.calibration_batches} calibration forwards + {phases.depth_batches} depth batches "
                           f"x (L + L(L+1)/2 = {depth_ranking_forwards(config.num_layers):,}) forwards (L = "
                           f"{config.num_layers}); peak in the depth ranking (reference and candidate logits)"]))

  # permutation: a jitted gather, outputs in the input shardings; then saved.
  out.append(_phase("permutation", {"params": params, "output": params}, hardware,
                    host_bytes=per_host * params, host_holds="its devices' shards, saving",
                    hbm_seconds=2 * params / bandwidth, storage_seconds=_saving(model_bytes, hardware),
                    work="gather + save"))

  # training: the largest stage; every step of every stage.
  peak = max(stages, key=lambda stage: stage.memory["total"])
  state = peak.memory["params"] + peak.memory["opt_state"] + peak.memory["router"]
  out.append(_phase("training", {"params": peak.memory["params"], "teacher": peak.memory["teacher"],
                                 "optimizer": peak.memory["opt_state"] + peak.memory["gradients"]
                                 + peak.memory["router"], "activations": peak.memory["activations"]},
                    hardware, host_bytes=per_host * state, host_holds="its devices' train state, checkpointing",
                    flops=sum(n * stage.flops_per_step for n, stage in zip(stage_steps, stages)),
                    work=f"{sum(stage_steps):,} steps", notes=[f"peak in {peak.name}"]))

  # extraction: each budget's child and baseline sliced from a parent by a jitted function, then saved.
  largest_budget = max(phases.budgets)
  child = largest_budget * params
  saved = 2 * sum(phases.budgets) * model_bytes  # a child and a baseline per budget
  out.append(_phase("extraction", {"params": params, "output": child}, hardware,
                    host_bytes=per_host * child, host_holds="its devices' child shards, saving",
                    hbm_seconds=2 * (len(phases.budgets) + sum(phases.budgets)) * params / bandwidth,
                    storage_seconds=_saving(saved, hardware), work=f"{2 * len(phases.budgets)} models sliced",
                    notes=["children counted at budget x the parent's bytes (the router picks their shapes)"]))

  # evaluation: perplexity forwards and cached generation, per model.
  # Parent, children, baselines (the full-size budget's baseline is the parent: not measured again).
  sizes = [1.0] + list(phases.budgets) + [budget for budget in phases.budgets if budget < 1.0]
  eb, el = phases.eval_batch_size, phases.eval_seq_len
  rows = min(phases.decode_batch, phases.examples)  # a last partial batch is filled up to the batch size
  decode_batches = phases.example_sets * math.ceil(phases.examples / phases.decode_batch)
  cache_len = phases.prompt_len + phases.max_new_tokens
  caches = cache_bytes(config, rows, cache_len, hardware)
  ppl = forward_bytes(config, eb, el, hardware, logits_made=2)["total"]
  prefill = forward_bytes(config, rows, phases.prompt_len, hardware, keys=cache_len)["total"]
  decode = forward_bytes(config, rows, 1, hardware, keys=cache_len)["total"]
  per_model = (phases.ppl_batches * eb * el * flops_at(el)
               + decode_batches * rows * cache_len * flops_at(cache_len))
  decode_steps = decode_batches * phases.max_new_tokens
  generation = caches + max(prefill, decode)
  memory = ({"params": params, "activations": ppl} if ppl > generation
            else {"params": params, "caches": caches, "activations": max(prefill, decode)})
  out.append(_phase("evaluation", memory, hardware,
                    host_bytes=_token_bytes(phases.ppl_batches, eb, el)
                    + 4.0 * phases.example_sets * phases.examples * phases.prompt_len, host_holds="evaluation tokens",
                    flops=sum(sizes) * per_model, hbm_seconds=sum(sizes) * decode_steps * (params + caches) / bandwidth,
                    work=f"{len(sizes)} models", counts={"models": len(sizes), "decode_steps_per_model": decode_steps},
                    programs={"perplexity": params + ppl, "prefill": params + caches + prefill,
                              "decode": params + caches + decode},
                    notes=[f"per model: {phases.ppl_batches} perplexity forwards of {eb} x {el} (peak "
                           f"{format_bytes(params + ppl)}); {decode_batches} batches of {rows} prompts ("
                           f"{phases.example_sets} sets of {phases.examples}): prefill {phases.prompt_len} tokens "
                           f"(assumed), decode {phases.max_new_tokens}, caches of {cache_len:,} positions (peak "
                           f"{format_bytes(params + generation)}); {len(sizes)} models (parent, children, baselines),"
                           " children at budget x the parent's FLOPs"]))
  return out


@dataclasses.dataclass
class Plan:
  name: str
  config: ModelConfig
  hardware: Hardware
  memory_config: MemoryConfig  # the levers (config.memory); each stage's and phase's .memory holds its bytes
  stages: list[StagePlan]
  phases: list[PhasePlan] = dataclasses.field(default_factory=list)
  phase_settings: PhaseSettings | None = None

  @property
  def peak(self) -> PhasePlan:
    """The phase with the largest per-device peak."""
    return max(self.phases, key=lambda phase: phase.peak)

  @property
  def fits(self) -> bool:
    return all(stage.fits for stage in self.stages) and all(phase.fits for phase in self.phases)

  def to_json(self) -> dict[str, Any]:
    hw = self.hardware
    return {
        "config": self.name, "params": param_count(self.config),
        "device": {"name": hw.device_name, "description": hw.device.description, "hbm_bytes": hw.device.hbm_bytes,
                   "peak_flops": hw.device.peak_flops, "hbm_bandwidth": hw.device.hbm_bandwidth,
                   "usable_fraction": hw.usable_fraction},
        "num_devices": hw.num_devices, "mesh": hw.axis_sizes, "mfu": hw.mfu,
        "devices_per_host": hw.devices_per_host, "num_hosts": hw.num_hosts,
        "storage_bytes_per_s": hw.storage_bytes_per_s,
        "memory_settings": {**self.memory_config.to_json(),
                            "remat": self.memory_config.policies(self.config.pattern)},
        "phase_settings": None if self.phase_settings is None else dataclasses.asdict(self.phase_settings),
        "fits": self.fits,
        "peak_phase": self.peak.name if self.phases else None,
        "stages": [{"name": s.name, "batch_size": s.batch_size, "seq_len": s.seq_len, "micro_batch": s.micro_batch,
                    "tokens_per_device": s.tokens_per_device, "memory_bytes": s.memory,
                    "activation_terms_bytes": s.activation_terms, "xla_total_bytes": s.xla_total,
                    "capacity_bytes": s.capacity, "fits": s.fits, "margin_bytes": s.margin,
                    "flops_per_step": s.flops_per_step, "seconds_per_step": s.seconds_per_step, "notes": s.notes}
                   for s in self.stages],
        "phases": [{"name": p.name, "work": p.work, "memory_bytes": p.memory, "host_bytes": p.host_bytes,
                    "host_holds": p.host_holds, "xla_total_bytes": p.xla_total, "capacity_bytes": p.capacity,
                    "fits": p.fits, "margin_bytes": p.margin, "flops": p.flops, "compute_seconds": p.compute_seconds,
                    "hbm_seconds": p.hbm_seconds, "storage_seconds": p.storage_seconds, "seconds": p.seconds,
                    "counts": p.counts, "notes": p.notes} for p in self.phases],
    }


def _setup_and_optimizers(config: Any, model_config: ModelConfig, stages: Sequence[Stage]):
  total_steps = sum(stage.steps for stage in stages)
  setup = elastic_setup_from_config(config, model_config, range(model_config.num_layers), total_steps)
  optimizer, router_optimizer = optimizers_from_config(config)
  return setup, optimizer, router_optimizer, total_steps


def make_plan(config: Any, name: str = "config", device: str | None = None, mfu: float | None = None,
              usable_fraction: float = 0.9, storage_gb_per_s: float | None = None,
              devices_per_host: int | None = None, prompt_len: int | None = None) -> Plan:
  """Plans every stage and every phase of a run config (``ml_collections.ConfigDict`` or mapping) without touching a
  device; arguments that are not None override ``config.plan``."""
  model_config = ModelConfig.from_dict(config.model)
  hardware = hardware_from_config(config, device, mfu, usable_fraction, storage_gb_per_s, devices_per_host)
  stages = stages_from_config(config)
  setup, optimizer, router_optimizer, total_steps = _setup_and_optimizers(config, model_config, stages)
  levers = setup.memory  # config.memory, as the training reads it
  tx, router_tx = make_optimizer(optimizer, total_steps), make_optimizer(router_optimizer, total_steps)
  state = state_bytes(setup, tx, router_tx, hardware)
  sizes = hardware.axis_sizes
  batch_ways = math.prod(sizes[a] for a in _mesh_axes_of("batch", hardware.rules))
  length_ways = math.prod(sizes[a] for a in _mesh_axes_of("length", hardware.rules))
  plans = []
  for stage in stages:
    notes = []
    if stage.batch_size % levers.grad_accum_steps:
      raise ValueError(f"stage {stage.name!r}: batch_size={stage.batch_size} is not divisible by "
                       f"config.memory.grad_accum_steps={levers.grad_accum_steps}; make the batch size a multiple "
                       "of the number of micro-batches.")
    micro = stage.batch_size // levers.grad_accum_steps
    if micro % batch_ways:
      notes.append(f"micro-batch of {micro} sequences does not divide over the {batch_ways} data-parallel devices "
                   "(counted rounded up)")
    if stage.seq_len % length_ways:
      notes.append(f"seq_len {stage.seq_len} does not divide over context={length_ways} (counted rounded up)")
    peak = activation_bytes(model_config, micro, stage.seq_len, levers, hardware, state["params"])
    memory = {"params": float(state["params"]), "opt_state": float(state["opt_state"]),
              "teacher": float(state["teacher"]), "router": float(state["router"]),
              "gradients": peak["gradients"], "activations": peak["activations"]}
    memory["total"] = float(sum(memory.values()))
    notes.append(f"peak while {peak['peak_moment']}")
    terms = {k: v for k, v in peak.items() if k not in ("total", "gradients", "activations", "peak_moment")}
    flops = elastic_step_flops(model_config, stage.batch_size, stage.seq_len)
    seconds = hardware.compute_seconds(flops)
    tokens = math.ceil(micro / batch_ways) * math.ceil(stage.seq_len / length_ways)
    plans.append(StagePlan(stage.name, stage.batch_size, stage.seq_len, micro, tokens, memory, terms,
                           hardware.capacity, flops, seconds, notes))
  phases = phase_settings(config, setup.budgets, prompt_len)
  hf_path = str(plain(config.get("parent")).get("hf_path") or "")
  return Plan(name, model_config, hardware, levers, plans,
              plan_phases(model_config, hardware, phases, plans, [stage.steps for stage in stages], hf_path), phases)


def _mesh_axes_of(logical: str, rules: Sequence) -> tuple[str, ...]:
  """The mesh axes the first rule for ``logical`` maps to (activations put batch and length there)."""
  for name, axes in rules:
    if name == logical:
      return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  return ()


# ------------------------------------------------------------------------------------------------ XLA's view
@dataclasses.dataclass
class JittedStep:
  """The elastic train step of a run config, jitted over a real mesh by the training loop's own
  ``compiled_elastic_step``, with the abstract teacher (in ``memory.teacher_dtype``) beside it."""

  training: ShardedTraining  # step (state donated), init, state shardings, abstract state, batch sharding
  setup: ElasticSetup
  abstract_teacher: Any  # the params' shapes in memory.teacher_dtype, sharded like the params
  replicated: Any

  def abstract_inputs(self, stage: Stage) -> tuple:
    """Every argument of the step for ``stage`` as shapes: (state, teacher, tokens [b, l+1], budget probs, pins)."""
    tokens = jax.ShapeDtypeStruct((stage.batch_size, stage.seq_len + 1), jnp.int32,
                                  sharding=self.training.batch_sharding)
    probs = jax.ShapeDtypeStruct((len(self.setup.budgets),), jnp.float32, sharding=self.replicated)
    pins = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.replicated),
                        Pins.off(self.setup))
    return self.training.abstract_state, self.abstract_teacher, tokens, probs, pins

  def lower(self, stage: Stage):
    return self.training.step.lower(*self.abstract_inputs(stage))


def jit_elastic_step(config: Any, devices: Sequence[jax.Device] | None = None) -> JittedStep:
  """The training loop's elastic step for a run config (identity depth order: shapes do not depend on it) on the
  configured mesh over ``devices`` (default: the first ``num_devices`` devices)."""
  hardware = hardware_from_config(config)
  mesh = _real_mesh(hardware, devices)
  stages = stages_from_config(config)
  setup, optimizer, router_optimizer, total_steps = _setup_and_optimizers(config, ModelConfig.from_dict(config.model),
                                                                          stages)
  training = compiled_elastic_step(setup, optimizer, router_optimizer, total_steps, 0, mesh, hardware.rules)
  teacher = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(setup.memory.teacher_dtype),
                                                        sharding=x.sharding), training.abstract_state.params)
  return JittedStep(training, setup, teacher, sharding_lib.replicated(mesh))


def _real_mesh(hardware: Hardware, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """The configured mesh over ``devices`` (default: the first ``num_devices`` devices), or an error saying how to get
  that many devices."""
  devices = list(jax.devices()[:hardware.num_devices] if devices is None else devices)
  if len(devices) < hardware.num_devices:
    raise ValueError(f"the mesh {hardware.axis_sizes} needs {hardware.num_devices} devices but {len(devices)} "
                     f"exist; on CPU set XLA_FLAGS=--xla_force_host_platform_device_count={hardware.num_devices} "
                     "before starting Python, or change config.mesh.shape.")
  return sharding_lib.make_mesh(hardware.mesh_shape, devices=devices[:hardware.num_devices])


def compiled_memory(config: Any, stage_index: int = 0) -> dict[str, float]:
  """Lowers and compiles the real elastic train step of stage ``stage_index`` on the configured mesh (needs that
  many devices; virtual CPU devices work) and returns XLA's memory analysis in bytes per device."""
  jitted = jit_elastic_step(config)
  return _memory_analysis(jitted.lower(stages_from_config(config)[stage_index]).compile())


# The forward programs of the phases around training whose activations ``forward_bytes`` estimates, as XLA sees them:
# the depth ranking's candidate (the reference logits held as an input, the candidate's logits made and compared)
# and the evaluation's perplexity (logits, log-softmax, summed NLL). Params in their shardings, tokens split over the
# data-parallel axes, logits in the model's own layout [batch, length, vocab]: the very programs the phases compile
# (``elastic.importance.calibration_programs``, ``eval.metrics.evaluation_programs``) at the config's shapes.
FORWARD_PHASES = {"importance": "depth ranking", "evaluation": "perplexity"}  # phase -> its program in ``programs``


def compiled_phase_memory(config: Any, phase: str, devices: Sequence[jax.Device] | None = None) -> dict[str, float]:
  """Lowers and compiles the forward program of ``phase`` (one of ``FORWARD_PHASES``) on the configured mesh at the
  config's calibration or evaluation shapes and returns XLA's memory analysis in bytes per device."""
  if phase not in FORWARD_PHASES:
    raise ValueError(f"no forward program for phase {phase!r}; choose one of {sorted(FORWARD_PHASES)}.")
  model_config = ModelConfig.from_dict(config.model)
  hardware = hardware_from_config(config)
  mesh, rules = _real_mesh(hardware, devices), hardware.rules
  phases = phase_settings(config, (1.0,))
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), param_shapes(model_config),
                        sharding_lib.param_shardings(model_config, mesh, rules))
  rows, everywhere = sharding_lib.batch_sharding(mesh, rules), sharding_lib.replicated(mesh)
  if phase == "importance":  # one candidate of the depth ranking, as the importance phase compiles it
    b, l, v = phases.calibration_batch_size, phases.calibration_seq_len, model_config.vocab_size
    logits = nn.logical_to_mesh_sharding(PartitionSpec("batch", "length", "vocab"), mesh, rules)
    args = (params, jax.ShapeDtypeStruct((b, l), jnp.int32, sharding=rows),
            jax.ShapeDtypeStruct((b, l, v), jnp.float32, sharding=logits),
            jax.ShapeDtypeStruct((model_config.num_layers,), jnp.float32, sharding=everywhere))
    program = importance_lib.calibration_programs(model_config, mesh, rules).removal_error
  else:  # one perplexity batch, as the evaluation compiles it
    b, l = phases.eval_batch_size, phases.eval_seq_len
    args = (params, jax.ShapeDtypeStruct((b, l + 1), jnp.int32, sharding=rows))
    program = metrics_lib.evaluation_programs(model_config, mesh, rules, 1).summed_nll
  return _memory_analysis(program.lower(*args).compile())


def _memory_analysis(compiled: Any) -> dict[str, float]:
  """XLA's memory analysis of a compiled program (bytes per device), with the total it holds at once."""
  return aot.memory_figures(compiled.memory_analysis())


def target_device_count(target: str) -> int:
  """Devices of a compile target: the product of its topology ("v5p:2x2x1": 4 chips, one device each; "h100:1x1x8":
  8 GPUs)."""
  return math.prod(int(n) for n in aot.parse(target).topology.split("x"))


def compiled_for_target(config: Any, target: str, timeout: float = 1800.0) -> dict[str, dict[str, float]]:
  """Compiles every stage's real elastic step (``aot.programs.elastic_step``, the step ``jit_elastic_step`` builds)
  under the config's mesh for ``target``'s compile-only devices, one worker process per distinct stage shape
  (``once_per_shape``), and returns per stage XLA's memory analysis in bytes per device, with the worker's
  ``lower_seconds`` and ``compile_seconds`` for the stage that compiled.

  Raises:
    aot.TargetError: an unknown target name.
    ValueError: the mesh does not span the target's devices.
    aot.CompileFailed: the compiler is not installed, aborted, raised or timed out (``reason`` says which).
  """
  name = aot.parse(target).name
  hardware = hardware_from_config(config)
  shape = tuple(int(n) for n in (plain(config.get("mesh")).get("shape") or ())) or (hardware.num_devices,)
  count = target_device_count(name)
  if count != hardware.num_devices:
    raise ValueError(f"--compile-for {name}: the target has {count} devices but the mesh {shape} spans "
                     f"{hardware.num_devices}; pick a topology of {hardware.num_devices} device(s), or set "
                     f"--config.mesh.shape and --config.plan.num_devices to span {count}.")
  def compile_stage(index: int, stage: Stage) -> dict[str, float]:
    try:
      result = aot.compile_in_subprocess("elastic_step", name, timeout=timeout, config=config.to_dict(), stage=index)
    except aot.CompileFailed as error:
      raise aot.CompileFailed(f"{stage.name}: {error}", error.reason, error.log) from None
    return {**result.memory, "lower_seconds": result.lower_seconds, "compile_seconds": result.compile_seconds}

  return once_per_shape(stages_from_config(config), compile_stage)


def once_per_shape(stages: Sequence[Stage], compile_stage: Callable[[int, Stage], dict[str, float]]
                   ) -> dict[str, dict[str, float]]:
  """``compile_stage(index, stage)`` by stage name, called once per distinct (batch_size, seq_len): the step's
  program depends only on those (budget probabilities and pins are inputs), as in training, where stages of one
  shape run one compiled step. A later stage of an earlier one's shape gets its memory figures without the compile
  times, which belong to the stage that compiled."""
  compiled: dict[tuple[int, int], dict[str, float]] = {}
  out = {}
  for index, stage in enumerate(stages):
    shape = (stage.batch_size, stage.seq_len)
    if shape in compiled:
      out[stage.name] = {k: v for k, v in compiled[shape].items() if k not in ("lower_seconds", "compile_seconds")}
    else:
      out[stage.name] = compiled[shape] = compile_stage(index, stage)
  return out


def with_compiled(plan: Plan, compiled: Mapping[str, Mapping[str, float]]) -> Plan:
  """Records XLA's per-device totals of the compiled stages in ``plan`` (``compiled_memory`` or
  ``compiled_for_target`` results by stage name), so that their verdicts and margins, and once every stage is
  compiled the training phase's, read XLA's figure instead of the estimate."""
  for stage in plan.stages:
    if stage.name in compiled:
      stage.xla_total = float(compiled[stage.name]["total"])
  if plan.stages and all(stage.xla_total is not None for stage in plan.stages):
    for phase in plan.phases:
      if phase.name == "training":
        phase.xla_total = max(stage.xla_total for stage in plan.stages)
  return plan


def detect_device(device: jax.Device | None = None) -> str:
  """The ``DEVICES`` key of a JAX device from its ``device_kind`` (e.g. "NVIDIA H100 80GB HBM3" -> "h100")."""
  device = device or jax.devices()[0]
  kind = device.device_kind.lower()
  if device.platform == "cpu":
    return "cpu"
  for pattern, name in (("h200", "h200"), ("h100", "h100"), ("a100", "a100"), ("v6", "v6e"), ("v5p", "v5p"),
                        ("v5 lite", "v5e"), ("v5e", "v5e"), ("v5", "v5p"), ("v4", "v4")):
    if pattern in kind:
      return name
  raise ValueError(f"no peak FLOP/s known for device kind {device.device_kind!r}; pass the device name (one of "
                   f"{sorted(DEVICES)}) explicitly.")


# ------------------------------------------------------------------------------------------------ report
def format_bytes(x: float) -> str:
  """GB (1e9 bytes) from 0.1 GB up, MB below: the table stays readable for 12B and tiny runs alike."""
  return f"{x / GB:,.2f} GB" if abs(x) >= 0.1 * GB else f"{x / 1e6:,.2f} MB"


def format_plan(plan: Plan, compiled: Mapping[str, Mapping[str, float]] | None = None, target: str | None = None
                ) -> str:
  """The plan as a readable table (one column per stage); ``compiled``: XLA's memory analysis by stage name (and
  ``phase:<name>`` for the forward phases), printed beside the estimates; ``target``: what it was compiled for."""
  hw, levers = plan.hardware, plan.memory_config
  flops_model = forward_flops_per_token(plan.config, plan.stages[0].seq_len)
  lines = [
      f"{plan.name}: {param_count(plan.config):,} params, pattern {plan.config.pattern} ({plan.config.num_layers} "
      f"blocks), params {plan.config.param_dtype}, compute {plan.config.dtype}",
      f"on {hw.num_devices} x {hw.device.description} ({format_bytes(hw.device.hbm_bytes)} each, "
      f"{hw.usable_fraction:.0%} usable = {format_bytes(hw.device.hbm_bytes * hw.usable_fraction)}), mesh "
      + " ".join(f"{k}={v}" for k, v in hw.axis_sizes.items()),
      f"memory: remat {', '.join(f'{k}={v}' for k, v in levers.policies(plan.config.pattern).items())}; "
      f"grad_accum_steps {levers.grad_accum_steps}; teacher {levers.teacher_dtype}",
      f"forward FLOPs per token at seq {plan.stages[0].seq_len}: "
      + ", ".join(f"{k} {v / 1e9:.3g} G" for k, v in flops_model.items()),
      "",
  ]
  width = max(14, *(len(st.name) + 2 for st in plan.stages))
  row = lambda label, values: f"{label:<34}" + "".join(f"{v:>{width}}" for v in values)
  stages = plan.stages
  lines.append(row("per device", [st.name for st in stages]))
  lines.append(row("  global batch x seq", [f"{st.batch_size} x {st.seq_len}" for st in stages]))
  lines.append(row("  micro-batch (global sequences)", [str(st.micro_batch) for st in stages]))
  lines.append(row("  tokens per device per micro-batch", [f"{st.tokens_per_device:,.0f}" for st in stages]))
  labels = {"params": "student params", "opt_state": "optimizer state (mu, nu)", "teacher": "teacher",
            "router": "router (+ step, PRNG)", "gradients": "gradients", "activations": "activations (micro-batch)"}
  for key, label in labels.items():
    lines.append(row(f"  {label}", [format_bytes(st.memory[key]) for st in stages]))
  terms = {"saved_by_blocks": "saved by the blocks", "block_backward_working_set": "one block's backward",
           "logits_and_loss": "logits and KD loss", "teacher_forward": "teacher forward (peak)"}
  for key, label in terms.items():
    lines.append(row(f"    {label}", [format_bytes(st.activation_terms[key]) for st in stages]))
  lines.append(row("  total", [format_bytes(st.memory["total"]) for st in stages]))
  xla = {st.name: compiled[st.name] for st in stages if st.name in (compiled or {})}
  if xla:
    for key, label in (("argument_size_in_bytes", "XLA arguments"), ("temp_size_in_bytes", "XLA temp"),
                       ("total", "XLA total (args+out-alias+temp)")):
      lines.append(row(f"  {label}", [format_bytes(xla[st.name][key]) if st.name in xla else "-" for st in stages]))
    lines.append(row("  planned total / XLA total", [f"{st.memory['total'] / st.xla_total:.2f}x"
                                                     if st.xla_total else "-" for st in stages]))
    if any("compile_seconds" in figures for figures in xla.values()):
      seconds = {name: figures["lower_seconds"] + figures["compile_seconds"] for name, figures in xla.items()
                 if "compile_seconds" in figures}  # a stage sharing an earlier one's compile: "-"
      lines.append(row("  XLA lower + compile", [f"{seconds[st.name]:,.0f} s" if st.name in seconds else "-"
                                                 for st in stages]))
  lines.append(row("  usable HBM", [format_bytes(st.capacity) for st in stages]))
  verdict_on = " (XLA total)" if xla else ""
  lines.append(row(f"  verdict{verdict_on}", ["FITS" if st.fits else "DOES NOT FIT" for st in stages]))
  lines.append(row(f"  margin{verdict_on}", [format_bytes(st.margin) for st in stages]))
  lines.append(row("model FLOPs per step", [f"{st.flops_per_step:.3e}" for st in stages]))
  lines.append(row(f"time per step at {hw.mfu:.0%} MFU", [f"{st.seconds_per_step:,.2f} s" for st in stages]))
  for st in stages:
    lines.extend(f"note ({st.name}): {note}" for note in st.notes)
  if xla:
    where = f"for {target} without the hardware (compile-only devices)" if target else "on this machine's devices"
    lines += textwrap.wrap(f"XLA: the real elastic step of {len(xla)} stage(s) compiled {where}; a stage's verdict "
                           "and margin read XLA's total", 118, subsequent_indent="    ")
  if plan.phases:
    lines += [""] + _format_phases(plan, compiled)
  lines.append("")
  if plan.fits:
    lines.append(f"FITS: the largest per-device peak is {format_bytes(plan.peak.peak)} ({plan.peak.name})"
                 if plan.phases else "FITS")
  else:
    lines.append("DOES NOT FIT: see the stages and phases marked above (raise grad_accum_steps, remat more block "
                 "kinds, shard more: tensor/context axes, lower the evaluation's batches, or use a device with more "
                 "HBM).")
  return "\n".join(lines)


def _format_seconds(seconds: float) -> str:
  if seconds >= 3600:
    return f"{seconds / 3600:,.1f} h"
  return f"{seconds / 60:,.1f} min" if seconds >= 60 else f"{seconds:,.2f} s"


def _format_phases(plan: Plan, compiled: Mapping[str, Mapping[str, float]] | None) -> list[str]:
  """One column per phase of the main job: per-device memory by what holds it, the verdict, per-host bytes, FLOPs
  and time; then what each phase runs."""
  hw, phases = plan.hardware, plan.phases
  width = max(14, *(len(phase.name) + 2 for phase in phases))
  row = lambda label, values: f"{label:<34}" + "".join(f"{v:>{width}}" for v in values)
  lines = [f"every phase: {hw.num_hosts} host(s) x {hw.devices_per_host} device(s), checkpoint storage "
           f"{hw.storage_bytes_per_s / GB:g} GB/s per host (assumed), HBM {hw.device.hbm_bandwidth / GB:,.0f} GB/s "
           "per device", row("per device", [phase.name for phase in phases])]
  for key, label in PHASE_TERMS.items():
    if any(key in phase.memory for phase in phases):
      lines.append(row(f"  {label}", [format_bytes(phase.memory[key]) if key in phase.memory else "-"
                                      for phase in phases]))
  lines.append(row("  peak", [format_bytes(phase.memory["total"]) for phase in phases]))
  compiled_phases = any(phase.xla_total is not None for phase in phases)
  if compiled_phases:
    lines.append(row("  peak (XLA, compiled)", [format_bytes(phase.xla_total) if phase.xla_total is not None else "-"
                                                for phase in phases]))
  lines.append(row("  verdict", ["FITS" if phase.fits else "DOES NOT FIT" for phase in phases]))
  lines.append(row("  margin", [format_bytes(phase.margin) for phase in phases]))
  devices = f"{hw.devices_per_host} device{'s' if hw.devices_per_host > 1 else ''}"
  lines.append(row(f"per host ({devices})", [format_bytes(phase.host_bytes) for phase in phases]))
  lines.append(row("model FLOPs", [f"{phase.flops:.3e}" if phase.flops else "-" for phase in phases]))
  lines.append(row(f"compute at {hw.mfu:.0%} MFU", [_format_seconds(phase.compute_seconds) if phase.flops else "-"
                                                    for phase in phases]))
  lines.append(row("HBM-bandwidth floor", [_format_seconds(phase.hbm_seconds) if phase.hbm_seconds else "-"
                                           for phase in phases]))
  lines.append(row("checkpoint storage", [_format_seconds(phase.storage_seconds) if phase.storage_seconds else "-"
                                          for phase in phases]))
  lines.append(row("phase time", [_format_seconds(phase.seconds) for phase in phases]))
  lines.append(f"total: {_format_seconds(sum(phase.seconds for phase in phases))}")
  for phase in phases:
    text = f"{phase.name}: {phase.work}; host holds {phase.host_holds}" + "".join(f"; {n}" for n in phase.notes)
    lines += textwrap.wrap(text, 118, subsequent_indent="    ")
    program, xla = FORWARD_PHASES.get(phase.name), (compiled or {}).get(f"phase:{phase.name}")
    if program and xla:
      lines.append(f"    XLA: the compiled {program} forward holds {format_bytes(xla['total'])} per device "
                   f"(args+out-alias+temp; estimate {format_bytes(phase.programs[program])})")
  return lines


# ------------------------------------------------------------------------------------------------ CLI
def _cli() -> None:
  """Defines the flags (only when run as a program: another CLI in the same process may own ``--config``) and runs."""
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  from elastic_jax import cli  # pylint: disable=import-outside-toplevel
  from elastic_jax.train.config import validate_run_config  # pylint: disable=import-outside-toplevel

  # Overrides may set any key of the run config's schema; validate_run_config refuses unknown ones.
  config_flag = config_flags.DEFINE_config_file("config", None, "Path to a Python config file (get_config()).",
                                                lock_config=False, accept_new_attributes=True)
  device = flags.DEFINE_string("device", None, f"Device kind, one of {sorted(DEVICES)} (default: "
                               "config.plan.device, else cpu).")
  mfu = flags.DEFINE_float("mfu", None, "Assumed model FLOP utilisation for the time per step (default: "
                           "config.plan.mfu, else 0.4).")
  usable = flags.DEFINE_float("usable_fraction", 0.9, "Fraction of the device's HBM the run may use (the rest is "
                              "the runtime's; on GPUs set XLA_PYTHON_CLIENT_MEM_FRACTION to match).")
  as_json = flags.DEFINE_bool("json", False, "Print the plan as JSON.")
  compile_ = flags.DEFINE_bool("compile", False, "Also lower and compile the real step of every stage and the "
                               "importance and perplexity forwards (needs the mesh's device count) and print XLA's "
                               "memory analysis beside the estimates.")
  compile_for = flags.DEFINE_string("compile_for", None, "Compile every stage's real step for a target without the "
                                    "hardware (elastic_jax.aot: v5p:2x2x1, v5e:4x4, v6e:2x2, h100:1x1x8, ...; its "
                                    "device count must equal the mesh's), print XLA's memory analysis beside the "
                                    "estimates and judge the stages by it. The target names the device kind.")
  flags.DEFINE_alias("compile-for", "compile_for")
  compile_timeout = flags.DEFINE_float("compile_timeout_s", 1800.0, "Seconds one stage's --compile-for compile may "
                                       "take before its worker is stopped.")
  storage = flags.DEFINE_float("storage_gb_per_s", None, "Assumed checkpoint storage bandwidth per host in GB/s "
                               f"(default: config.plan.storage_gb_per_s, else {DEFAULT_STORAGE_GB_PER_S:g}).")
  per_host = flags.DEFINE_integer("devices_per_host", None, "Devices each host drives (default: "
                                  "config.plan.devices_per_host, else the device kind's).")
  prompt_len = flags.DEFINE_integer("prompt_len", None, "Assumed prompt tokens per generated example (default: "
                                    f"config.plan.prompt_len, else {DEFAULT_PROMPT_LEN}).")

  def main(argv: Sequence[str]) -> None:
    del argv
    cfg = config_flag.value
    if cfg is None:
      raise app.UsageError("--config is required, e.g. --config configs/nano_v2_12b.py")
    with cli.refusals():  # every key and value first, in one line (the planned mesh is not this machine's)
      cfg = validate_run_config(cfg, inputs=False, shapes=False)
    name = os.path.splitext(os.path.basename(config_flags.get_config_filename(flags.FLAGS["config"])))[0]
    target, device_name = None, device.value
    if compile_for.value:
      if compile_.value:
        raise app.UsageError("give --compile (this machine's devices) or --compile-for TARGET, not both.")
      try:
        target = aot.parse(compile_for.value)
      except aot.TargetError as error:
        raise SystemExit(f"plan: {error}") from None
      if device_name and device_name != target.kind:
        raise app.UsageError(f"--device {device_name} contradicts --compile-for {target.name}; the target names the "
                             "device kind.")
      device_name = target.kind
    plan = make_plan(cfg, name, device_name, mfu.value, usable.value, storage.value, per_host.value,
                     prompt_len.value)
    compiled = None
    if target is not None:
      try:
        compiled = compiled_for_target(cfg, target.name, compile_timeout.value)
      except (ValueError, aot.CompileFailed) as error:  # one line: what failed, and the compiler's own words
        raise SystemExit("plan: " + " | ".join(line.strip() for line in str(error).splitlines() if line.strip())
                         ) from None
    elif compile_.value and jax.device_count() < plan.hardware.num_devices:
      print(f"--compile skipped: the mesh needs {plan.hardware.num_devices} devices and {jax.device_count()} exist "
            f"(on CPU: XLA_FLAGS=--xla_force_host_platform_device_count={plan.hardware.num_devices}).",
            file=sys.stderr)
    elif compile_.value:
      compiled = once_per_shape(stages_from_config(cfg), lambda index, _: compiled_memory(cfg, index))
      compiled.update({f"phase:{phase}": compiled_phase_memory(cfg, phase) for phase in FORWARD_PHASES})
    if compiled is not None:
      with_compiled(plan, compiled)
    if as_json.value:
      out = plan.to_json()
      if compiled is not None:
        out["compiled"] = compiled
      print(json.dumps(out, indent=1))
    else:
      print(format_plan(plan, compiled, target.name if target else None))

  app.run(main, flags_parser=cli.parse_config_flags)


if __name__ == "__main__":
  _cli()
