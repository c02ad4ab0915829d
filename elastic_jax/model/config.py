"""The hybrid model's configuration: one frozen dataclass, validated on construction.

Field names follow the Hugging Face NemotronH config (``hidden_size``, ``intermediate_size``, ``mamba_num_heads``...)
so that a reader can map a ``config.json`` onto it line by line. The block pattern is a string of

    ``M`` Mamba-2 mixer,  ``*`` attention,  ``-`` MLP,  ``E`` mixture of experts (Nemotron 3)

(one row each of ``KINDS``, the block-kind table). Widths are homogeneous by default. Heterogeneous models (children
extracted with per-layer widths) set the optional ``*_per_layer`` tuples: one entry per block *of that kind*, in
pattern order (the i-th ``-`` block uses ``intermediate_size_per_layer[i]``). A child is therefore the same
``HybridLM`` class with a different config.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

# How an E block multiplies its tokens by their experts' weights (see elastic_jax.ops.grouped_matmul).
from elastic_jax.ops.grouped_matmul import IMPLS as MOE_IMPLS
from elastic_jax.ops.ssd import IMPLS as SSD_IMPLS
from elastic_jax.ops.ssd import INTER_CHUNK_MODES

DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class BlockKind:
  """One kind of block: its pattern character, its name (``BlockSpec.kind``, remat keys, parameter-count and
  FLOP tables), its name in messages and transformers' ``layers_block_type`` entry for it."""

  char: str
  name: str
  title: str
  hf_layer_type: str


# The block-kind table. A new kind is a row here plus its mixer (``model.hybrid.MIXERS``), its checkpoint rows
# (``interop.hf``), its parameter count (``elastic.param_count``) and its FLOPs (``train.flops``).
KINDS: tuple[BlockKind, ...] = (
    BlockKind("M", "mamba", "Mamba", "linear_attention"),
    BlockKind("*", "attention", "attention", "full_attention"),
    BlockKind("-", "mlp", "MLP", "mlp"),
    BlockKind("E", "moe", "MoE", "moe"),
)
BLOCK_KINDS = {kind.char: kind.name for kind in KINDS}  # pattern character -> kind name


# Every per-layer width: the ``*_per_layer`` field -> (its block kind, the scalar field and ``BlockSpec`` field it
# overrides block by block).
PER_LAYER_FIELDS = {
    "intermediate_size_per_layer": ("mlp", "intermediate_size"),
    "num_attention_heads_per_layer": ("attention", "num_attention_heads"),
    "mamba_num_heads_per_layer": ("mamba", "mamba_num_heads"),
    "mamba_head_dim_per_layer": ("mamba", "mamba_head_dim"),
    "n_routed_experts_per_layer": ("moe", "n_routed_experts"),
    "moe_intermediate_size_per_layer": ("moe", "moe_intermediate_size"),
    "moe_shared_expert_intermediate_size_per_layer": ("moe", "moe_shared_expert_intermediate_size"),
}


class ConfigError(ValueError):
  """A configuration value is invalid; the message names the field, the value and the fix."""


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """The resolved widths of one block (what the module for block ``index`` builds)."""

  index: int
  kind: str  # a name of KINDS: "mamba" | "attention" | "mlp" | "moe"
  kind_index: int = 0  # position among the blocks of its kind (pattern order): its entry in per-layer tuples
  intermediate_size: int = 0  # MLP
  num_attention_heads: int = 0  # attention
  mamba_num_heads: int = 0  # Mamba
  mamba_head_dim: int = 0  # Mamba
  n_routed_experts: int = 0  # MoE
  moe_intermediate_size: int = 0  # MoE: each routed expert's width
  moe_shared_expert_intermediate_size: int = 0  # MoE: the shared expert's width (0: none)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A NemotronH-style hybrid LM. Frozen and hashable, so it can be a static argument of ``jax.jit``."""

  pattern: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int = 0
  num_attention_heads: int = 0
  num_key_value_heads: int = 0
  head_dim: int = 0
  mamba_num_heads: int = 0
  mamba_head_dim: int = 0
  n_groups: int = 1
  ssm_state_size: int = 0
  conv_kernel: int = 4
  chunk_size: int = 128
  layer_norm_epsilon: float = 1e-5
  # dt = clip(softplus(dt_raw + dt_bias), *time_step_limit). NVIDIA's kernels use (0, inf); transformers >= 5.15
  # clamps from below at time_step_min. Imports keep (0, inf) unless asked otherwise.
  time_step_limit: tuple[float, float] = (0.0, math.inf)
  # Heterogeneous widths: one entry per block of that kind, in pattern order; None = homogeneous.
  intermediate_size_per_layer: tuple[int, ...] | None = None
  num_attention_heads_per_layer: tuple[int, ...] | None = None
  mamba_num_heads_per_layer: tuple[int, ...] | None = None
  mamba_head_dim_per_layer: tuple[int, ...] | None = None
  n_routed_experts_per_layer: tuple[int, ...] | None = None
  moe_intermediate_size_per_layer: tuple[int, ...] | None = None
  moe_shared_expert_intermediate_size_per_layer: tuple[int, ...] | None = None
  # Numerics: params are stored in param_dtype; matmuls run in dtype; norms, softmax and SSD decays in fp32.
  dtype: str = "float32"
  param_dtype: str = "float32"
  # Mamba-2 scan implementation (see elastic_jax.ops.ssd).
  ssd_impl: str = "auto"
  ssd_inter_chunk: str = "scan"
  initializer_range: float = 0.02
  pad_token_id: int | None = 0
  bos_token_id: int | None = 1
  eos_token_id: int | None = 2
  # Mixture-of-experts (E) blocks, named as in transformers' NemotronHConfig. Each token goes to the
  # num_experts_per_tok routed experts with the highest sigmoid router scores (plus e_score_correction_bias, for the
  # choice only) among the topk_group best of n_group expert groups; their relu^2 MLP outputs (width
  # moe_intermediate_size, in moe_latent_size dims when set) are summed with the scores as weights (normalised to
  # sum 1 when norm_topk_prob, times routed_scaling_factor) and added to one shared relu^2 MLP of width
  # moe_shared_expert_intermediate_size (0: none). As in transformers 5.23, n_shared_experts does not change the
  # computation (the shared MLP's width is the whole of it); it is carried for the config's round trip. A
  # heterogeneous child gives each E block its own n_routed_experts, moe_intermediate_size and shared width through
  # the *_per_layer fields above; routing (num_experts_per_tok, n_group, topk_group) is the same in every block.
  n_routed_experts: int = 0
  num_experts_per_tok: int = 0
  moe_intermediate_size: int = 0
  moe_shared_expert_intermediate_size: int = 0
  n_shared_experts: int = 0
  moe_latent_size: int | None = None
  n_group: int = 1
  topk_group: int = 1
  norm_topk_prob: bool = True
  routed_scaling_factor: float = 1.0
  # How tokens meet their experts' weights (see elastic_jax.ops.grouped_matmul).
  moe_impl: str = "auto"

  def __post_init__(self):
    # Normalise list-valued fields (e.g. from JSON / ConfigDict) to tuples so the config stays hashable.
    for name in ("time_step_limit", *PER_LAYER_FIELDS):
      value = getattr(self, name)
      if value is not None and not isinstance(value, tuple):
        object.__setattr__(self, name, tuple(value))
    self.validate()

  # ------------------------------------------------------------------------------------------------ validation
  def validate(self) -> None:
    unknown = sorted(set(self.pattern) - set(BLOCK_KINDS))
    if not self.pattern:
      raise ConfigError("pattern is empty: give at least one block, e.g. pattern='M-*-'.")
    if unknown:
      raise ConfigError(
          f"pattern={self.pattern!r} contains unknown block character(s) {unknown}; use "
          + ", ".join(f"{k.char!r} ({k.title})" for k in KINDS) + ".")
    _positive(self, "vocab_size", "hidden_size")
    if self.layer_norm_epsilon <= 0:
      raise ConfigError(f"layer_norm_epsilon={self.layer_norm_epsilon} must be > 0.")
    lo, hi = self.time_step_limit
    if not 0.0 <= lo < hi:
      raise ConfigError(f"time_step_limit={self.time_step_limit} must satisfy 0 <= low < high.")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        raise ConfigError(f"{name}={getattr(self, name)!r} is not supported; choose one of {DTYPES}.")
    if self.ssd_impl not in SSD_IMPLS:
      raise ConfigError(f"ssd_impl={self.ssd_impl!r} is not one of {SSD_IMPLS}.")
    if self.ssd_inter_chunk not in INTER_CHUNK_MODES:
      raise ConfigError(f"ssd_inter_chunk={self.ssd_inter_chunk!r} is not one of {INTER_CHUNK_MODES}.")
    if self.moe_impl not in MOE_IMPLS:
      raise ConfigError(f"moe_impl={self.moe_impl!r} is not one of {MOE_IMPLS}.")

    counts = {kind: self.pattern.count(ch) for ch, kind in BLOCK_KINDS.items()}
    for name, (kind, _) in PER_LAYER_FIELDS.items():
      values = getattr(self, name)
      if values is None:
        continue
      if len(values) != counts[kind]:
        raise ConfigError(
            f"{name} has {len(values)} entries but pattern={self.pattern!r} has {counts[kind]} {kind} blocks; "
            f"give one entry per {kind} block, in pattern order.")
      for i, v in enumerate(values):
        if not isinstance(v, int) or v <= 0:
          raise ConfigError(f"{name}[{i}]={v!r} must be a positive integer.")

    if counts["mlp"] and self.intermediate_size_per_layer is None:
      _positive(self, "intermediate_size")
    if counts["attention"]:
      _positive(self, "num_key_value_heads", "head_dim")
      if self.num_attention_heads_per_layer is None:
        _positive(self, "num_attention_heads")
      for spec in self.block_specs():
        if spec.kind == "attention" and spec.num_attention_heads % self.num_key_value_heads:
          raise ConfigError(
              f"attention block {spec.index}: num_attention_heads={spec.num_attention_heads} is not a multiple of "
              f"num_key_value_heads={self.num_key_value_heads}; use a multiple (GQA needs whole KV groups).")
    if counts["mamba"]:
      _positive(self, "n_groups", "ssm_state_size", "conv_kernel", "chunk_size")
      if self.mamba_num_heads_per_layer is None:
        _positive(self, "mamba_num_heads")
      if self.mamba_head_dim_per_layer is None:
        _positive(self, "mamba_head_dim")
      for spec in self.block_specs():
        if spec.kind == "mamba" and spec.mamba_num_heads % self.n_groups:
          raise ConfigError(
              f"Mamba block {spec.index}: mamba_num_heads={spec.mamba_num_heads} is not a multiple of "
              f"n_groups={self.n_groups}; every group needs the same number of heads.")
    if counts["moe"]:
      self._validate_moe()

  def _validate_moe(self) -> None:
    """The E blocks' fields; each message names the field, its value and the fix. Widths are checked per E block
    (``*_per_layer`` fields may give each its own), prefixed with the block where they may differ."""
    _positive(self, "num_experts_per_tok", "n_group", "topk_group")
    for name in ("moe_shared_expert_intermediate_size", "n_shared_experts"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name}={value!r} must be an integer >= 0 (0: no shared expert).")
    if self.topk_group > self.n_group:
      raise ConfigError(f"topk_group={self.topk_group} is larger than n_group={self.n_group}; use at most "
                        f"{self.n_group}.")
    if self.moe_latent_size is not None and (isinstance(self.moe_latent_size, bool)
                                             or not isinstance(self.moe_latent_size, int)
                                             or self.moe_latent_size <= 0):
      raise ConfigError(f"moe_latent_size={self.moe_latent_size!r} must be a positive integer, or None for experts "
                        "that read the hidden size.")
    if not isinstance(self.norm_topk_prob, bool):
      raise ConfigError(f"norm_topk_prob={self.norm_topk_prob!r} must be True or False.")
    if not (isinstance(self.routed_scaling_factor, (int, float)) and math.isfinite(self.routed_scaling_factor)
            and self.routed_scaling_factor > 0):
      raise ConfigError(f"routed_scaling_factor={self.routed_scaling_factor!r} must be a finite number > 0.")
    heterogeneous = any(getattr(self, f) is not None for f, (kind, _) in PER_LAYER_FIELDS.items() if kind == "moe")
    for spec in self.block_specs():
      if spec.kind == "moe":
        where = f"MoE block {spec.index}: " if heterogeneous else ""
        _positive(spec, "n_routed_experts", "moe_intermediate_size", where=where, pattern=self.pattern)
        self._validate_moe_widths(spec, where)

  def _validate_moe_widths(self, spec: BlockSpec, where: str) -> None:
    experts, shared = spec.n_routed_experts, spec.moe_shared_expert_intermediate_size
    if (self.n_shared_experts == 0) != (shared == 0):
      raise ConfigError(
          f"{where}n_shared_experts={self.n_shared_experts} and moe_shared_expert_intermediate_size={shared} "
          "disagree; set both to 0 for no shared expert, or both > 0.")
    if experts % self.n_group:
      raise ConfigError(f"{where}n_routed_experts={experts} is not a multiple of n_group={self.n_group}; "
                        "every expert group needs the same number of experts.")
    per_group = experts // self.n_group
    if self.n_group > 1 and per_group < 2:
      raise ConfigError(f"{where}n_routed_experts={experts} over n_group={self.n_group} leaves {per_group} "
                        "expert per group; a group is scored by its two best experts, so give each group >= 2.")
    if self.num_experts_per_tok > self.topk_group * per_group:
      raise ConfigError(
          f"{where}num_experts_per_tok={self.num_experts_per_tok} is larger than the {self.topk_group * per_group} "
          f"experts of the topk_group={self.topk_group} chosen groups ({per_group} each); lower num_experts_per_tok "
          "or raise topk_group.")

  def min_routed_experts(self) -> tuple[int, str]:
    """The fewest routed experts an E block can have under the rules ``validate`` checks (a multiple of n_group,
    >= 2 per group when n_group > 1, num_experts_per_tok of them in the topk_group chosen groups), and that rule in
    words."""
    per_group = max(2 if self.n_group > 1 else 1, -(-self.num_experts_per_tok // self.topk_group))
    return self.n_group * per_group, (
        f"each of n_group={self.n_group} expert groups keeps {per_group}: "
        + ("a group is scored by its two best experts, and " if self.n_group > 1 else "")
        + f"the topk_group={self.topk_group} chosen groups must hold num_experts_per_tok={self.num_experts_per_tok}")

  # ------------------------------------------------------------------------------------------------ derived
  @property
  def num_layers(self) -> int:
    return len(self.pattern)

  def block_specs(self) -> tuple[BlockSpec, ...]:
    """Per-block resolved widths, with per-layer overrides applied."""
    specs = []
    for index, ch in enumerate(self.pattern):
      kind, k = BLOCK_KINDS[ch], self.pattern.count(ch, 0, index)
      widths = {field: _pick(getattr(self, per_layer), k, getattr(self, field))
                for per_layer, (owner, field) in PER_LAYER_FIELDS.items() if owner == kind}
      specs.append(BlockSpec(index, kind, k, **widths))
    return tuple(specs)

  @property
  def expert_input_size(self) -> int:
    """What the routed experts read and write: moe_latent_size when set (behind fc1/fc2_latent_proj), else d."""
    return self.hidden_size if self.moe_latent_size is None else self.moe_latent_size

  @property
  def is_homogeneous(self) -> bool:
    """True when every block of a kind has the same widths (exportable as a stock HF NemotronH config)."""
    specs = self.block_specs()
    return all(len({getattr(s, f) for s in specs if s.kind == kind}) <= 1 for kind, f in PER_LAYER_FIELDS.values())

  def replace(self, **changes: Any) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  # ------------------------------------------------------------------------------------------------ (de)serialise
  def to_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    for k, v in out.items():
      if isinstance(v, tuple):
        out[k] = list(v)
    out["time_step_limit"] = [float(x) if math.isfinite(x) else "inf" for x in self.time_step_limit]
    return out

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "ModelConfig":
    """Builds a config from a plain mapping (JSON, ``ml_collections.ConfigDict``); unknown keys are an error."""
    values = dict(values.to_dict() if hasattr(values, "to_dict") else values)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ConfigError(f"unknown model config key(s) {unknown}; known keys are {sorted(known)}.")
    if "time_step_limit" in values:
      values["time_step_limit"] = tuple(float(x) for x in values["time_step_limit"])
    return cls(**values)


def _pick(per_layer: tuple[int, ...] | None, k: int, default: int) -> int:
  return default if per_layer is None else per_layer[k]


def _positive(config: ModelConfig | BlockSpec, *names: str, where: str = "", pattern: str | None = None) -> None:
  for name in names:
    value = getattr(config, name)
    if not isinstance(value, int) or value <= 0:
      raise ConfigError(f"{where}{name}={value!r} must be a positive integer for pattern="
                        f"{config.pattern if pattern is None else pattern!r}.")
