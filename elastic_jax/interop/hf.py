"""Reading and writing Hugging Face NemotronH checkpoints (``config.json`` + safetensors).

The checkpoint stores fused torch tensors (``in_proj`` rows ``z|x|B|C|dt``, one depthwise ``conv1d`` over the
channels ``x|B|C``, torch ``Linear`` weights as ``[out, in]``); our Flax tree keeps one array per role, shaped by
heads (``[d, H, P]``), so that elastic masks can index heads and channels directly. Every checkpoint tensor is
described once, by an ``_Entry`` in a per-block table: which of our arrays it splits into, in which order, and with
which ``_Layout``. Loading and saving both walk the same tables, so the two directions cannot drift apart.

Sharded import (``load(path, mesh=...)``): the same tables say which rows and columns of which checkpoint tensor
hold any box of one of our arrays, so each process reads, through safetensors slices, only the boxes its own devices
hold and builds global ``jax.Array``s in the run's param shardings; no process holds the whole model, and the cast
to the params' dtype runs on the devices. The host load (no mesh) reads through the same mapping, whole tensors.

Streamed export (``save``): the safetensors header needs only shapes and dtypes, so it is written first; then each
checkpoint tensor in turn is gathered from its shards (params may be global arrays over several processes), joined
by the same tables, appended by process 0 and released. Host memory stays at about one tensor, whatever the model.

Mixture-of-experts (``E``) blocks: on disk, as transformers 5.23 saves them, every routed expert is two tensors of
its own (``mixer.experts.{j}.up_proj.weight`` [I, c], ``...down_proj.weight`` [c, I]); transformers stacks them into
``mixer.experts.up_proj`` [E, I, c] / ``down_proj`` [E, c, I] in memory, and a file holding the stacked names loads
as well. Our tree stacks them too (``experts/up_proj`` [E, c, I]): each per-expert tensor is an ``_Entry`` for one
row of the stacked array (``_Entry.expert``). ``save`` writes the per-expert form.

Only safetensors files are read (never pickles). Anything this model cannot represent (tied embeddings, biases,
another activation) is refused with an ``UnsupportedCheckpointError`` naming the config key;
a malformed checkpoint (missing, extra or misshapen tensors, a missing shard) raises a ``CheckpointError`` naming
the tensor and what was expected.

dt clamp: NVIDIA's kernels clamp ``dt`` to ``config.time_step_limit`` (``(0, inf)`` in released checkpoints),
whereas transformers >= 5.15 clamps from below at ``time_step_min``. ``load`` follows the checkpoint's
``time_step_limit`` unless asked otherwise (``load(..., time_step_limit=(hf_config["time_step_min"], inf))`` gives
the transformers behaviour); ``save`` writes ``time_step_min`` equal to a positive lower limit, so that
transformers then computes what we compute.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import math
import os
import pathlib
import re
import struct
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_dtypes
import numpy as np
import safetensors
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from elastic_jax.model.config import DTYPES, KINDS, PER_LAYER_FIELDS, ConfigError, ModelConfig
from elastic_jax.train.distributed import barrier
from elastic_jax.train.sharding import DEFAULT_RULES, LogicalRules, param_shardings

Params = dict[str, Any]
PathLike = str | os.PathLike

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# HF layer type names <-> our pattern characters (the block-kind table).
_LAYER_TYPE_TO_CHAR = {kind.hf_layer_type: kind.char for kind in KINDS}
_CHAR_TO_LAYER_TYPE = {c: t for t, c in _LAYER_TYPE_TO_CHAR.items()}
_KIND_NAMES = {kind.char: kind.title for kind in KINDS}
# A stacked expert tensor as transformers holds it in memory (``...mixer.experts.up_proj`` [E, out, in]).
_STACKED_EXPERTS = re.compile(r"^(backbone\.layers\.\d+\.mixer\.experts)\.(up_proj|down_proj)$")

# Keys transformers itself skips when loading (multi-token-prediction heads); we skip them too.
_IGNORED_KEY_PREFIXES = ("mtp.",)

# NemotronHConfig's defaults (transformers 5.23) for the keys a config.json may omit, so that a sparse config means
# what it means to transformers.
_HF_DEFAULTS: dict[str, Any] = {
    "intermediate_size": 21504,
    "num_attention_heads": 32,
    "num_key_value_heads": None,  # None means num_attention_heads (plain multi-head attention)
    "head_dim": 128,
    "mamba_num_heads": 128,
    "mamba_head_dim": 64,
    "n_groups": 8,
    "ssm_state_size": 128,
    "conv_kernel": 4,
    "chunk_size": 128,
    "layer_norm_epsilon": 1e-5,
    "initializer_range": 0.02,
    "time_step_min": 1e-3,
    "time_step_limit": (0.0, math.inf),
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
# The MoE keys (read and written only for patterns with E blocks), with NemotronHConfig's defaults.
_HF_MOE_DEFAULTS: dict[str, Any] = {
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 7688,
    "moe_shared_expert_intermediate_size": 7688,
    "n_shared_experts": 1,
    "moe_latent_size": None,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 1.0,
}
# Older config.json files use these names; as in transformers, the old name wins when present.
_LEGACY_NAMES = {
    "n_groups": "mamba_n_groups",
    "conv_kernel": "mamba_d_conv",
    "time_step_min": "mamba_dt_min",
    "time_step_limit": "mamba_dt_limit",
    "use_conv_bias": "mamba_conv_bias",
    "chunk_size": "mamba_chunk_size",
}
# Architecture switches this model hard-codes: key -> (the only value we implement, what it controls).
_REQUIRED_VALUES: dict[str, tuple[Any, str]] = {
    "tie_word_embeddings": (False, "the LM head is a separate matrix (untied embeddings)"),
    "use_bias": (False, "Mamba in_proj/out_proj have no bias"),
    "mlp_bias": (False, "MLP projections have no bias"),
    "attention_bias": (False, "attention projections have no bias"),
    "use_conv_bias": (True, "the Mamba depthwise conv has a bias"),
    "mlp_hidden_act": ("relu2", "the MLP activation is squared ReLU"),
    "mamba_hidden_act": ("silu", "the Mamba conv activation is SiLU"),
}


class CheckpointError(ValueError):
  """A checkpoint is malformed or does not match its config; the message names the key and what was expected."""


class UnsupportedCheckpointError(CheckpointError):
  """A checkpoint uses an architecture feature this model does not implement (MoE, tied embeddings, biases...)."""


# ---------------------------------------------------------------------------------------------------- layouts
@dataclasses.dataclass(frozen=True)
class _Layout:
  """How a checkpoint tensor relates to our arrays, as the order of their axes.

  A checkpoint tensor has one *feature* axis ``f`` that may concatenate several of our arrays, each of which
  unfolds that axis into its own feature shape ``F`` (e.g. ``d_inner`` -> ``[H, P]``), at most one *other* axis
  ``o`` (the model width ``d`` of a linear, the kernel size ``K`` of the conv) shared by all pieces, and possibly
  singleton axes ``1``. Every conversion (shapes, both directions, and which part of the checkpoint tensor holds
  a given box of our array) follows from the two axis strings, so no layout has code of its own.
  """

  name: str
  hf_axes: str  # checkpoint axes in order: "f" features, "o" the other axis, "1" a singleton
  our_axes: str  # our axes in order: "F" the piece's feature shape (one or more axes), "o" the other axis

  @property
  def split_axis(self) -> int:
    """The checkpoint axis that concatenates the pieces."""
    return self.hf_axes.index("f")

  def hf_shape(self, features: int, other: int) -> tuple[int, ...]:
    return tuple({"f": features, "o": other, "1": 1}[axis] for axis in self.hf_axes)

  def our_shape(self, shape: Sequence[int], other: int) -> tuple[int, ...]:
    return tuple(n for axis in self.our_axes for n in (tuple(shape) if axis == "F" else (other,)))

  def to_ours(self, block: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """A checkpoint block (all or part of a piece: ``prod(shape)`` features, any extent of the other axis) -> ours.

    Drops the singleton axes, orders the rest as ours and unfolds the feature axis into ``shape``.
    """
    kept = self.hf_axes.replace("1", "")
    block = block.reshape([n for axis, n in zip(self.hf_axes, block.shape) if axis != "1"])
    ours_flat = self.our_axes.lower()
    block = block.transpose([kept.index(axis) for axis in ours_flat])
    other = block.shape[ours_flat.index("o")] if "o" in ours_flat else 0
    return block.reshape(self.our_shape(shape, other))

  def to_hf(self, array: np.ndarray) -> np.ndarray:
    """Our array -> its piece of the checkpoint tensor (the inverse of ``to_ours``)."""
    num_features = array.ndim - self.our_axes.count("o")
    flat_shape, axis_start = [], 0
    for axis in self.our_axes:
      width = num_features if axis == "F" else 1
      flat_shape.append(math.prod(array.shape[axis_start:axis_start + width]))
      axis_start += width
    ours_flat = self.our_axes.lower()
    flat = array.reshape(flat_shape).transpose([ours_flat.index(axis) for axis in self.hf_axes.replace("1", "")])
    sizes = dict(zip(self.hf_axes.replace("1", ""), flat.shape))
    return flat.reshape([sizes.get(axis, 1) for axis in self.hf_axes])

  def split_box(self, box: Sequence[tuple[int, int]]) -> tuple[tuple[tuple[int, int], ...], tuple[int, int] | None]:
    """A box of our array ([start, stop) per axis) -> (its box over the feature shape, its range of the other axis)."""
    box = tuple(box)
    if "o" not in self.our_axes:
      return box, None
    if self.our_axes.startswith("o"):
      return box[1:], box[0]
    return box[:-1], box[-1]

  def hf_index(self, rows: tuple[int, int], other: tuple[int, int] | None) -> tuple[slice, ...]:
    """The checkpoint index of feature rows [start, stop) and the other axis' range (None: all of it)."""
    ranges = {"f": slice(*rows), "o": slice(None) if other is None else slice(*other), "1": slice(None)}
    return tuple(ranges[axis] for axis in self.hf_axes)


# torch Linear weight [out, in] whose *outputs* are our features; our kernel is [in, *features].
_LINEAR_OUT = _Layout("linear (outputs split)", hf_axes="fo", our_axes="oF")
# torch Linear weight [out, in] whose *inputs* are our features; our kernel is [*features, out].
_LINEAR_IN = _Layout("linear (inputs split)", hf_axes="of", our_axes="Fo")
# torch depthwise Conv1d weight [C, 1, K]; our kernel is [K, *features] with kernel[k] = weight[c, 0, k].
_DEPTHWISE_CONV = _Layout("depthwise conv", hf_axes="f1o", our_axes="oF")
# A vector [C]; ours is [*features].
_VECTOR = _Layout("vector", hf_axes="f", our_axes="F")
# A lookup table [rows, other] stored the same way by both sides (the token embedding).
_TABLE = _Layout("table", hf_axes="fo", our_axes="Fo")


def _flat_runs(box: Sequence[tuple[int, int]], shape: Sequence[int]) -> list[tuple[int, int]]:
  """The runs [start, stop) of row-major flat indices that hold ``box`` of an array of ``shape``, in order.

  The axes after the box's last partial axis are whole, so they are contiguous with it: a box that splits only the
  leading axis (heads split across devices, each head whole) is one run. Each index of the axes before the last
  partial one starts another run.
  """
  last = len(shape) - 1
  while last > 0 and tuple(box[last]) == (0, shape[last]):
    last -= 1
  strides = [math.prod(shape[axis + 1:]) for axis in range(len(shape))]
  start, stop = box[last]
  runs = []
  for outer in itertools.product(*(range(a, b) for a, b in box[:last])):
    base = sum(i * stride for i, stride in zip(outer, strides))
    runs.append((base + start * strides[last], base + stop * strides[last]))
  return runs


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One checkpoint tensor and the arrays of ours it holds, in checkpoint order along the layout's feature axis."""

  hf_key: str
  layout: _Layout
  other: int  # size of the non-feature axis (d or K); unused by vectors
  pieces: tuple[tuple[tuple[str, ...], tuple[int, ...]], ...]  # (our path, our feature shape)
  where: str  # for messages: "pattern index 3 (Mamba)"
  # A routed expert's tensor: its pieces are row ``expert`` of our stacked arrays ([E, ...]); None for all others.
  expert: int | None = None

  @property
  def hf_shape(self) -> tuple[int, ...]:
    return self.layout.hf_shape(sum(math.prod(shape) for _, shape in self.pieces), self.other)

  def our_shape(self, piece: int) -> tuple[int, ...]:
    """The shape of what this tensor holds of our array ``pieces[piece]`` (one expert's row of a stacked array)."""
    return self.layout.our_shape(self.pieces[piece][1], self.other)

  def stacked_shape(self, piece: int, config: ModelConfig) -> tuple[int, ...]:
    """The shape of our whole array ``pieces[piece]``: with the expert axis in front for a routed expert's tensor."""
    shape = self.our_shape(piece)
    return shape if self.expert is None else (config.n_routed_experts, *shape)

  def read(self, read_hf: Callable[[tuple[slice, ...]], np.ndarray], piece: int,
           box: Sequence[tuple[int, int]] | None = None) -> np.ndarray:
    """Our array ``pieces[piece]``, or only its ``box`` ([start, stop) per axis of ours), from the checkpoint tensor.

    ``read_hf(index)`` returns the checkpoint tensor at a tuple of slices; it is asked only for the feature rows
    and the range of the other axis that the box holds (one call per contiguous run of rows), so a reader of
    safetensors slices touches nothing else.
    """
    shape = self.pieces[piece][1]
    offset = sum(math.prod(s) for _, s in self.pieces[:piece])
    box = tuple((0, n) for n in self.our_shape(piece)) if box is None else tuple(box)
    features, other = self.layout.split_box(box)
    parts = [read_hf(self.layout.hf_index((offset + start, offset + stop), other))
             for start, stop in _flat_runs(features, shape)]
    block = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=self.layout.split_axis)
    return np.ascontiguousarray(self.layout.to_ours(block, [stop - start for start, stop in features]))

  def split(self, tensor: np.ndarray) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """Checkpoint tensor -> (our path, our array) for each piece."""
    for piece, (path, _) in enumerate(self.pieces):
      yield path, self.read(tensor.__getitem__, piece)

  def join(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Our arrays (one per piece, in order) -> the checkpoint tensor, a new C-order array.

    Written straight into a C-order buffer: concatenating transposed views (every linear weight) would otherwise
    follow their Fortran order and need a second full copy, twice the tensor on the host while exporting.
    """
    parts = [self.layout.to_hf(np.asarray(a)) for a in arrays]
    axis = self.layout.split_axis
    shape = list(parts[0].shape)
    shape[axis] = sum(part.shape[axis] for part in parts)
    return np.concatenate(parts, axis=axis, out=np.empty(shape, np.result_type(*parts)))


def _entry(hf_key: str, layout: _Layout, other: int, where: str, our_prefix: tuple[str, ...],
           pieces: Sequence[tuple[str, tuple[int, ...]]], expert: int | None = None) -> _Entry:
  """Builds an entry from a table row; our paths are written "z_proj.kernel" relative to ``our_prefix``."""
  return _Entry(hf_key, layout, other,
                tuple((our_prefix + tuple(path.split(".")), tuple(shape)) for path, shape in pieces), where, expert)


# ---------------------------------------------------------------------------------------------------- tables
def _mamba_rows(config: ModelConfig, num_heads: int, head_dim: int) -> list[tuple]:
  """(checkpoint name, layout, other axis, [(our path, feature shape), ...]) for one Mamba-2 mixer."""
  d, h, p = config.hidden_size, num_heads, head_dim
  g, n, k = config.n_groups, config.ssm_state_size, config.conv_kernel
  return [
      ("in_proj.weight", _LINEAR_OUT, d, [("z_proj.kernel", (h, p)), ("x_proj.kernel", (h, p)),
                                          ("B_proj.kernel", (g, n)), ("C_proj.kernel", (g, n)),
                                          ("dt_proj.kernel", (h,))]),
      ("conv1d.weight", _DEPTHWISE_CONV, k, [("conv_x.kernel", (h, p)), ("conv_B.kernel", (g, n)),
                                             ("conv_C.kernel", (g, n))]),
      ("conv1d.bias", _VECTOR, 0, [("conv_x.bias", (h, p)), ("conv_B.bias", (g, n)), ("conv_C.bias", (g, n))]),
      ("A_log", _VECTOR, 0, [("A_log", (h,))]),
      ("D", _VECTOR, 0, [("D", (h,))]),
      ("dt_bias", _VECTOR, 0, [("dt_bias", (h,))]),
      ("norm.weight", _VECTOR, 0, [("norm.scale", (h, p))]),
      ("out_proj.weight", _LINEAR_IN, d, [("out_proj.kernel", (h, p))]),
  ]


def _attention_rows(config: ModelConfig, num_heads: int) -> list[tuple]:
  d, hkv, hd = config.hidden_size, config.num_key_value_heads, config.head_dim
  return [
      ("q_proj.weight", _LINEAR_OUT, d, [("q_proj.kernel", (num_heads, hd))]),
      ("k_proj.weight", _LINEAR_OUT, d, [("k_proj.kernel", (hkv, hd))]),
      ("v_proj.weight", _LINEAR_OUT, d, [("v_proj.kernel", (hkv, hd))]),
      ("o_proj.weight", _LINEAR_IN, d, [("o_proj.kernel", (num_heads, hd))]),
  ]


def _mlp_rows(config: ModelConfig, intermediate_size: int) -> list[tuple]:
  d = config.hidden_size
  return [
      ("up_proj.weight", _LINEAR_OUT, d, [("up_proj.kernel", (intermediate_size,))]),
      ("down_proj.weight", _LINEAR_IN, d, [("down_proj.kernel", (intermediate_size,))]),
  ]


def _moe_rows(config: ModelConfig) -> list[tuple]:
  """The rows of one MoE block; a routed expert's rows carry its index (a 5th element), the others None."""
  d, e, i = config.hidden_size, config.n_routed_experts, config.moe_intermediate_size
  c, s = config.expert_input_size, config.moe_shared_expert_intermediate_size
  rows = [
      ("gate.weight", _LINEAR_OUT, d, [("gate.kernel", (e,))], None),
      ("gate.e_score_correction_bias", _VECTOR, 0, [("gate.e_score_correction_bias", (e,))], None),
  ]
  for j in range(e):
    rows += [(f"experts.{j}.up_proj.weight", _LINEAR_OUT, c, [("experts.up_proj", (i,))], j),
             (f"experts.{j}.down_proj.weight", _LINEAR_IN, c, [("experts.down_proj", (i,))], j)]
  if s:
    rows += [("shared_experts.up_proj.weight", _LINEAR_OUT, d, [("shared_experts.up_proj.kernel", (s,))], None),
             ("shared_experts.down_proj.weight", _LINEAR_IN, d, [("shared_experts.down_proj.kernel", (s,))], None)]
  if config.moe_latent_size is not None:
    rows += [("fc1_latent_proj.weight", _LINEAR_OUT, d, [("fc1_latent_proj.kernel", (c,))], None),
             ("fc2_latent_proj.weight", _LINEAR_IN, d, [("fc2_latent_proj.kernel", (c,))], None)]
  return rows


def _checkpoint_entries(config: ModelConfig) -> list[_Entry]:
  """Every tensor of the checkpoint for ``config``, in checkpoint order, with per-layer widths from block_specs."""
  d, v = config.hidden_size, config.vocab_size
  entries = [_entry("backbone.embeddings.weight", _TABLE, d, "the token embedding", (),
                    [("embed.embedding", (v,))])]
  for spec in config.block_specs():
    i, char = spec.index, config.pattern[spec.index]
    where = f"pattern index {i} ({_KIND_NAMES[char]})"
    layer = (f"layers_{i}",)
    entries.append(_entry(f"backbone.layers.{i}.norm.weight", _VECTOR, 0, where, layer, [("norm.scale", (d,))]))
    if char == "M":
      rows = _mamba_rows(config, spec.mamba_num_heads, spec.mamba_head_dim)
    elif char == "*":
      rows = _attention_rows(config, spec.num_attention_heads)
    elif char == "-":
      rows = _mlp_rows(config, spec.intermediate_size)
    else:
      rows = _moe_rows(config)
    for name, layout, other, pieces, *expert in rows:
      entries.append(_entry(f"backbone.layers.{i}.mixer.{name}", layout, other, where, layer + ("mixer",), pieces,
                            *expert))
  entries.append(_entry("backbone.norm_f.weight", _VECTOR, 0, "the final norm", (), [("norm_f.scale", (d,))]))
  entries.append(_entry("lm_head.weight", _LINEAR_OUT, d, "the LM head", (), [("lm_head.kernel", (v,))]))
  return entries


# ---------------------------------------------------------------------------------------------------- weights
def params_from_hf(tensors: Mapping[str, np.ndarray], config: ModelConfig) -> Params:
  """Maps checkpoint tensors (keys as on disk, ``backbone.`` or ``model.`` prefix) onto our param tree.

  Arrays keep their dtype. Raises ``CheckpointError`` on a missing, extra or misshapen tensor.
  """
  tensors = _normalize_keys(tensors)
  params: Params = {}
  expert_rows: dict[tuple[str, ...], dict[int, np.ndarray]] = {}
  for e in _checked_entries({key: np.shape(value) for key, value in tensors.items()}, config):
    for path, array in e.split(np.asarray(tensors[e.hf_key])):
      if e.expert is None:
        _set_path(params, path, array)
      else:
        expert_rows.setdefault(path, {})[e.expert] = array
  for path, rows in expert_rows.items():
    _set_path(params, path, np.stack([rows[j] for j in range(len(rows))]))
  return params


def _checked_entries(shapes: Mapping[str, tuple[int, ...]], config: ModelConfig) -> list[_Entry]:
  """The checkpoint entries of ``config``, after checking the checkpoint's tensor names and shapes against them.

  ``shapes`` maps every tensor of the checkpoint (normalized keys) to its shape, so that both loaders can check a
  checkpoint before reading any weight. Raises ``CheckpointError`` on a missing, extra or misshapen tensor.
  """
  entries = _checkpoint_entries(config)
  expected = {e.hf_key: e for e in entries}
  missing = [k for k in expected if k not in shapes]
  if missing:
    e = expected[missing[0]]
    more = f" (and {len(missing) - 1} more: {missing[1:4]}...)" if len(missing) > 1 else ""
    raise CheckpointError(f"missing tensor {e.hf_key}, expected shape {e.hf_shape} for {e.where}{more}.")
  extra = sorted(k for k in shapes if k not in expected and not k.startswith(_IGNORED_KEY_PREFIXES))
  if extra:
    more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
    raise CheckpointError(
        f"unexpected tensor {extra[0]}{more} for pattern={config.pattern!r}; a NemotronH checkpoint of this config "
        "holds only the embedding, per-layer norm and mixer weights, norm_f and lm_head (no biases).")
  for e in entries:
    shape = tuple(shapes[e.hf_key])
    if shape != e.hf_shape:
      raise CheckpointError(f"{e.hf_key} has shape {shape}, expected {e.hf_shape} for {e.where}.")
  return entries


def params_to_hf(params: Mapping[str, Any], config: ModelConfig) -> dict[str, np.ndarray]:
  """Our param tree -> checkpoint tensors (keys with the on-disk ``backbone.`` prefix), keeping each dtype.

  Holds the whole model on the host; ``save`` goes over the same conversion one tensor at a time. Raises
  ``CheckpointError`` when the tree misses, adds or misshapes an array relative to ``config``.
  """
  return {e.hf_key: e.join([_to_host(a) for a in arrays]) for e, arrays in _export_plan(params, config)}


def _export_plan(params: Mapping[str, Any], config: ModelConfig) -> list[tuple[_Entry, list[Any]]]:
  """Every checkpoint entry with our arrays for its pieces, as given (numpy, or ``jax.Array``s that may span other
  processes' devices), after checking the whole tree against ``config``.

  Nothing is converted or copied: the checks and the safetensors header need only shapes and dtypes, so an exporter
  can refuse a bad tree before writing anything and then convert one tensor at a time.
  """
  plan, expected_paths = [], set()
  for e in _checkpoint_entries(config):
    arrays = []
    for piece, (path, _) in enumerate(e.pieces):
      expected_paths.add(path)
      array = _get_path(params, path, e)
      want = e.stacked_shape(piece, config)
      if tuple(array.shape) != want:
        raise CheckpointError(
            f"param {'/'.join(path)} has shape {tuple(array.shape)}, expected {want} for {e.where}.")
      arrays.append(array if e.expert is None else _ExpertRow(array, e.expert))
    plan.append((e, arrays))
  extra = sorted("/".join(p) for p in _leaf_paths(params) if p not in expected_paths)
  if extra:
    raise CheckpointError(
        f"param {extra[0]} has no place in a NemotronH checkpoint of pattern={config.pattern!r}"
        + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "") + ".")
  return plan


@dataclasses.dataclass(frozen=True)
class _ExpertRow:
  """Row ``index`` of a stacked expert array, taken only when exported (so a plan holds no copies)."""

  array: Any
  index: int

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.array.shape[1:])

  @property
  def dtype(self) -> Any:
    return self.array.dtype


def _to_host(array: Any) -> np.ndarray:
  """One of our arrays, whole, as numpy on this process.

  An array spanning devices of other processes is gathered (a collective: every process must ask for the same
  arrays in the same order); anything else (numpy, an array on this process's devices) is read in place. An
  ``_ExpertRow`` is its row alone (sliced where the array lives, then brought over).
  """
  if isinstance(array, _ExpertRow):
    array = array.array[array.index]
  if isinstance(array, jax.Array) and not array.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
  return np.asarray(array)


def _normalize_keys(tensors: Mapping[str, Any]) -> dict[str, Any]:
  """transformers names the backbone ``model.`` in memory and ``backbone.`` on disk and reads both; so do we."""
  out: dict[str, Any] = {}
  for key, value in tensors.items():
    name = "backbone." + key[len("model."):] if key.startswith("model.") else key
    stacked = _STACKED_EXPERTS.match(name)
    if stacked:  # transformers' in-memory form: one [E, out, in] tensor per projection -> one per expert
      rows = {f"{stacked.group(1)}.{j}.{stacked.group(2)}.weight": _ExpertSlice(value, j)
              for j in range(_shape_of(value)[0])}
    else:
      rows = {name: value}
    for row_name, row in rows.items():
      if row_name in out:
        raise CheckpointError(f"tensor {row_name} appears twice (once as {key}).")
      out[row_name] = row
  return out


def _shape_of(tensor: Any) -> tuple[int, ...]:
  return tuple(tensor.get_shape()) if hasattr(tensor, "get_shape") else tuple(np.shape(tensor))


class _ExpertSlice:
  """Expert ``index`` of a stacked [E, out, in] tensor (numpy or a safetensors slice), read lazily."""

  def __init__(self, tensor: Any, index: int):
    self._tensor, self._index = tensor, index

  def get_shape(self) -> list[int]:
    return list(_shape_of(self._tensor)[1:])

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.get_shape())

  def __getitem__(self, index: Any) -> np.ndarray:
    index = index if isinstance(index, tuple) else (index,)
    return np.asarray(self._tensor[(slice(self._index, self._index + 1), *index)])[0]

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    array = self[(slice(None),) * len(self.get_shape())]
    return array if dtype is None else array.astype(dtype)


def _set_path(tree: Params, path: tuple[str, ...], value: Any) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def _get_path(tree: Mapping[str, Any], path: tuple[str, ...], entry: _Entry) -> Any:
  """The leaf at ``path``, left where it is (a sharded ``jax.Array`` is not gathered); array-likes without a shape
  and dtype become numpy."""
  node: Any = tree
  for name in path:
    if not isinstance(node, Mapping) or name not in node:
      raise CheckpointError(f"param {'/'.join(path)} is missing; {entry.where} needs it for {entry.hf_key}.")
    node = node[name]
  return node if hasattr(node, "shape") and hasattr(node, "dtype") else np.asarray(node)


def _leaf_paths(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
  for name, node in tree.items():
    if isinstance(node, Mapping):
      yield from _leaf_paths(node, prefix + (name,))
    else:
      yield prefix + (name,)


# ---------------------------------------------------------------------------------------------------- config
def config_from_hf(hf_config: Mapping[str, Any]) -> ModelConfig:
  """Maps a NemotronH ``config.json`` (as a dict) onto our ``ModelConfig``.

  Accepts ``layers_block_type`` or the legacy ``hybrid_override_pattern``, the legacy ``mamba_*`` key names and
  transformers' JSON encoding of infinity. Raises ``UnsupportedCheckpointError`` for features we do not implement.
  """
  hf = _decode_special_floats(dict(hf_config))
  for new, old in _LEGACY_NAMES.items():
    if old in hf:
      hf[new] = hf.pop(old)

  model_type = hf.get("model_type", "nemotron_h")
  if model_type != "nemotron_h":
    raise UnsupportedCheckpointError(f"config.json model_type is {model_type!r}, expected 'nemotron_h'.")
  for key, (required, meaning) in _REQUIRED_VALUES.items():
    if key in hf and hf[key] != required:
      raise UnsupportedCheckpointError(
          f"config.json {key} is {hf[key]!r}; only {required!r} is supported ({meaning}).")
  for key in ("vocab_size", "hidden_size"):
    if not isinstance(hf.get(key), int):
      raise CheckpointError(f"config.json {key} is {hf.get(key)!r}, expected a positive integer.")

  def get(key: str) -> Any:
    value = hf.get(key)
    return _HF_DEFAULTS[key] if value is None else value

  num_attention_heads = get("num_attention_heads")
  kv_heads = get("num_key_value_heads")
  head_dim = hf.get("head_dim")
  if head_dim is None:  # older configs name it attention_head_dim
    head_dim = hf.get("attention_head_dim") or _HF_DEFAULTS["head_dim"]
  pattern = _pattern_from_hf(hf)
  try:
    return ModelConfig(
        pattern=pattern,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=get("intermediate_size"),
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads if kv_heads is None else kv_heads,
        head_dim=head_dim,
        mamba_num_heads=get("mamba_num_heads"),
        mamba_head_dim=get("mamba_head_dim"),
        n_groups=get("n_groups"),
        ssm_state_size=get("ssm_state_size"),
        conv_kernel=get("conv_kernel"),
        chunk_size=get("chunk_size"),
        layer_norm_epsilon=float(get("layer_norm_epsilon")),
        time_step_limit=_time_step_limit_from_hf(get("time_step_limit")),
        initializer_range=float(get("initializer_range")),
        pad_token_id=_first_token_id(hf, "pad_token_id"),
        bos_token_id=_first_token_id(hf, "bos_token_id"),
        eos_token_id=_first_token_id(hf, "eos_token_id"),
        **(_moe_fields_from_hf(hf) if "E" in pattern else {}),
    )
  except ConfigError as err:
    raise CheckpointError(f"config.json describes an invalid model: {err}") from err


def _moe_fields_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
  """Our MoE fields from a config.json with E blocks (NemotronHConfig's defaults for absent keys)."""
  get = lambda key: hf.get(key, _HF_MOE_DEFAULTS[key])
  fields = {key: get(key) for key in _HF_MOE_DEFAULTS}
  # transformers 5.23 always builds the shared expert: a width of 0 (or none) means intermediate_size there, and
  # n_shared_experts is not read. Our config says "no shared expert" with 0, so take what transformers builds.
  if not fields["moe_shared_expert_intermediate_size"]:
    fields["moe_shared_expert_intermediate_size"] = hf.get("intermediate_size") or _HF_DEFAULTS["intermediate_size"]
  if not fields["n_shared_experts"]:
    fields["n_shared_experts"] = 1
  fields["routed_scaling_factor"] = float(fields["routed_scaling_factor"])
  return fields


def _moe_fields_to_hf(config: ModelConfig) -> dict[str, Any]:
  if not config.moe_shared_expert_intermediate_size:
    raise CheckpointError(
        "cannot export MoE blocks without a shared expert (moe_shared_expert_intermediate_size=0): transformers 5.23 "
        "always builds one (a width of 0 there means intermediate_size), so a NemotronH checkpoint cannot say 'none'.")
  return {key: getattr(config, key) for key in _HF_MOE_DEFAULTS}


def config_to_hf(config: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
  """Our (homogeneous) ``ModelConfig`` -> a NemotronH ``config.json`` dict, JSON-ready."""
  _check_exportable(config)
  widths = _homogeneous_widths(config)
  time_step_min = config.time_step_limit[0] if config.time_step_limit[0] > 0 else _HF_DEFAULTS["time_step_min"]
  return {
      "architectures": ["NemotronHForCausalLM"],
      "model_type": "nemotron_h",
      "layers_block_type": [_CHAR_TO_LAYER_TYPE[c] for c in config.pattern],
      # Read by transformers < 5, which predates layers_block_type; transformers 5 prefers layers_block_type.
      "hybrid_override_pattern": config.pattern,
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "intermediate_size": widths["intermediate_size"],
      "num_attention_heads": widths["num_attention_heads"],
      "num_key_value_heads": config.num_key_value_heads,
      "head_dim": config.head_dim,
      "mamba_num_heads": widths["mamba_num_heads"],
      "mamba_head_dim": widths["mamba_head_dim"],
      "n_groups": config.n_groups,
      "ssm_state_size": config.ssm_state_size,
      "conv_kernel": config.conv_kernel,
      "chunk_size": config.chunk_size,
      "layer_norm_epsilon": config.layer_norm_epsilon,
      # NVIDIA's code clamps dt to time_step_limit; transformers clamps from below at time_step_min.
      "time_step_limit": [_encode_float(x) for x in config.time_step_limit],
      "time_step_min": time_step_min,
      "initializer_range": config.initializer_range,
      "pad_token_id": config.pad_token_id,
      "bos_token_id": config.bos_token_id,
      "eos_token_id": config.eos_token_id,
      **{key: required for key, (required, _) in _REQUIRED_VALUES.items()},
      **(_moe_fields_to_hf(config) if "E" in config.pattern else {}),
      "dtype": dtype,
  }


def _pattern_from_hf(hf: Mapping[str, Any]) -> str:
  layer_types = hf.get("layers_block_type", hf.get("layer_types"))
  if layer_types is not None:
    key = "layers_block_type" if "layers_block_type" in hf else "layer_types"
    if not isinstance(layer_types, list) or not layer_types:
      raise CheckpointError(f"config.json {key} is {layer_types!r}, expected a non-empty list of layer types.")
    chars = []
    for i, layer_type in enumerate(layer_types):
      if layer_type not in _LAYER_TYPE_TO_CHAR:
        raise CheckpointError(f"config.json {key}[{i}] is {layer_type!r}; expected one of "
                              f"{sorted(_LAYER_TYPE_TO_CHAR)}.")
      chars.append(_LAYER_TYPE_TO_CHAR[layer_type])
    return "".join(chars)
  pattern = hf.get("hybrid_override_pattern")
  if not isinstance(pattern, str) or not pattern:
    raise CheckpointError("config.json has neither layers_block_type nor hybrid_override_pattern; expected one "
                          "of them to give the block pattern.")
  for i, char in enumerate(pattern):
    if char not in _CHAR_TO_LAYER_TYPE:
      raise CheckpointError(f"config.json hybrid_override_pattern[{i}] is {char!r}; expected "
                            + ", ".join(f"{c!r} ({title})" for c, title in _KIND_NAMES.items()) + ".")
  return pattern


def _time_step_limit_from_hf(value: Any) -> tuple[float, float]:
  if not isinstance(value, (list, tuple)) or len(value) != 2:
    raise CheckpointError(f"config.json time_step_limit is {value!r}, expected [low, high].")
  return tuple(math.inf if x is None else _decode_float(x, "time_step_limit") for x in value)


def _decode_float(value: Any, key: str) -> float:
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return float(value)
  if isinstance(value, str) and value.strip().lower() in ("inf", "+inf", "infinity", "+infinity", "-inf",
                                                          "-infinity", "nan"):
    return float(value.strip().lower().replace("infinity", "inf"))
  raise CheckpointError(f"config.json {key} contains {value!r}, expected a number.")


def _decode_special_floats(obj: Any) -> Any:
  """Undoes transformers' JSON encoding of non-finite floats: ``{"__float__": "Infinity"}`` -> ``inf``."""
  if isinstance(obj, dict):
    if set(obj) == {"__float__"} and isinstance(obj["__float__"], str):
      return _decode_float(obj["__float__"], "__float__")
    return {k: _decode_special_floats(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return [_decode_special_floats(v) for v in obj]
  return obj


def _encode_float(x: float) -> float | dict[str, str]:
  """Non-finite floats the way transformers writes them, so that the file stays strict JSON."""
  if math.isnan(x):
    return {"__float__": "NaN"}
  if math.isinf(x):
    return {"__float__": "Infinity" if x > 0 else "-Infinity"}
  return float(x)


def _first_token_id(hf: Mapping[str, Any], key: str) -> int | None:
  # transformers allows a list of eos ids; our config holds one (the first is the canonical one).
  value = hf.get(key, _HF_DEFAULTS[key])
  if isinstance(value, list):
    value = value[0] if value else None
  return value


def _check_exportable(config: ModelConfig) -> None:
  if not config.is_homogeneous:
    differing = {name: getattr(config, name) for name in PER_LAYER_FIELDS if getattr(config, name) is not None}
    raise CheckpointError(
        "cannot export a heterogeneous config (per-layer widths differ within a block kind: "
        + ", ".join(f"{name}={value}" for name, value in differing.items()) + "); a stock NemotronH config.json has "
        "one width per field (" + ", ".join(field for _, field in PER_LAYER_FIELDS.values()) + ") for all layers.")


def _homogeneous_widths(config: ModelConfig) -> dict[str, int]:
  """The one width per kind (from the blocks, so per-layer tuples with equal entries export too)."""
  widths = {"intermediate_size": config.intermediate_size, "num_attention_heads": config.num_attention_heads,
            "mamba_num_heads": config.mamba_num_heads, "mamba_head_dim": config.mamba_head_dim}
  for spec in config.block_specs():
    if spec.kind == "mlp":
      widths["intermediate_size"] = spec.intermediate_size
    elif spec.kind == "attention":
      widths["num_attention_heads"] = spec.num_attention_heads
    elif spec.kind == "mamba":
      widths["mamba_num_heads"] = spec.mamba_num_heads
      widths["mamba_head_dim"] = spec.mamba_head_dim
  return widths


# ---------------------------------------------------------------------------------------------------- files
def _resolve_dtype(dtype: Any) -> np.dtype:
  if isinstance(dtype, str) and hasattr(ml_dtypes, dtype):  # "bfloat16" is not a numpy name
    return np.dtype(getattr(ml_dtypes, dtype))
  return np.dtype(dtype)


def _read_json(file: pathlib.Path) -> dict[str, Any]:
  if not file.is_file():
    raise CheckpointError(f"{file} does not exist; a NemotronH checkpoint directory needs {file.name}.")
  try:
    with open(file, encoding="utf-8") as f:
      return json.load(f)
  except ValueError as error:  # not JSON (or not UTF-8): the decoder's message names no file
    raise CheckpointError(f"{file} is not valid JSON ({error}).") from error


@contextlib.contextmanager
def _open_safetensors(file: pathlib.Path) -> Iterator[Any]:
  """``safetensors.safe_open`` of ``file``; a file it cannot read (truncated, not safetensors) is refused naming it
  (the library's own error names no file)."""
  try:
    handle = safetensors.safe_open(str(file), framework="numpy")
  except Exception as error:  # safetensors raises its own SafetensorError, or OSError
    raise CheckpointError(f"{file} is not a readable safetensors file ({error}); it may be truncated or "
                          "corrupt: download or export it again.") from error
  with handle as f:
    yield f


def _tensor_files(path: pathlib.Path) -> dict[str, pathlib.Path]:
  """Which file holds each tensor of a single-file or sharded safetensors checkpoint (keys as on disk).

  Reads only the files' headers; checks that the index names existing shards and that every shard holds what the
  index places in it.
  """
  index_file, single_file = path / INDEX_FILE, path / SINGLE_FILE
  if index_file.is_file():
    weight_map = _read_json(index_file).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise CheckpointError(f"{index_file} has no weight_map, expected a mapping from tensor name to shard file.")
    shard_keys: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
      shard_keys.setdefault(shard, []).append(key)
    for shard, keys in shard_keys.items():
      if not (path / shard).is_file():
        raise CheckpointError(f"shard {shard} named in {INDEX_FILE} (for {keys[0]} and {len(keys) - 1} other "
                              f"tensors) is missing from {path}.")
    files: dict[str, pathlib.Path] = {}
    for shard, keys in shard_keys.items():
      with _open_safetensors(path / shard) as f:
        shard_tensors = list(f.keys())
      for key in keys:
        if key not in shard_tensors:
          raise CheckpointError(f"{INDEX_FILE} places {key} in {shard}, but that shard does not contain it.")
      for key in shard_tensors:
        if key in files:
          raise CheckpointError(f"tensor {key} appears in more than one shard (again in {shard}).")
        files[key] = path / shard
    return files
  if single_file.is_file():
    with _open_safetensors(single_file) as f:
      return {key: single_file for key in f.keys()}
  found = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
  raise CheckpointError(
      f"no {SINGLE_FILE} or {INDEX_FILE} in {path} (found {found}); only safetensors checkpoints are read, "
      "pickled ones (pytorch_model.bin) are refused.")


def _read_tensors(path: pathlib.Path, dtype: np.dtype) -> dict[str, np.ndarray]:
  """Reads every tensor of a single-file or sharded safetensors checkpoint, cast to ``dtype``."""
  files = _tensor_files(path)
  tensors = {}
  for file in dict.fromkeys(files.values()):
    with _open_safetensors(file) as f:
      for key in f.keys():
        tensors[key] = f.get_tensor(key).astype(dtype, copy=False)
  return tensors


def _load_into_shards(path: pathlib.Path, config: ModelConfig, mesh: Mesh, rules: LogicalRules,
                      dtype: np.dtype) -> Params:
  """Reads a checkpoint straight into global arrays in the run's param shardings.

  Each process reads, through safetensors slices, only the boxes of each param that its own devices hold (once per
  distinct box, however many local devices hold it), in the checkpoint's dtype; the cast to ``dtype`` runs on the
  devices. No process ever holds more of the model on the host than one box at a time beyond what its devices keep
  (on a CPU backend, device memory is host memory). Every process must call this with the same arguments: the cast
  is a program over the whole mesh.
  """
  shardings = param_shardings(config, mesh, rules)
  with contextlib.ExitStack() as stack:
    files = _tensor_files(path)
    opened = {file: stack.enter_context(_open_safetensors(file))
              for file in dict.fromkeys(files.values())}
    tensors = _normalize_keys({key: opened[file].get_slice(key) for key, file in files.items()})
    entries = _checked_entries({key: tuple(t.get_shape()) for key, t in tensors.items()}, config)
    # Each of our arrays with the entries that hold it: one, or one per expert row of a stacked expert array.
    sources: dict[tuple[str, ...], list[tuple[_Entry, int]]] = {}
    for e in entries:
      for piece, (our_path, _) in enumerate(e.pieces):
        sources.setdefault(our_path, []).append((e, piece))
    params: Params = {}
    for our_path, held_by in sources.items():
      shape, sharding = held_by[0][0].stacked_shape(held_by[0][1], config), _lookup(shardings, our_path)
      rows = {e.expert: (e, piece) for e, piece in held_by}

      def read(box: tuple[tuple[int, int], ...]) -> np.ndarray:
        if None in rows:
          e, piece = rows[None]
          return e.read(tensors[e.hf_key].__getitem__, piece, box)
        return np.stack([rows[j][0].read(tensors[rows[j][0].hf_key].__getitem__, rows[j][1], box[1:])
                         for j in range(*box[0])])

      devices_by_box: dict[tuple[tuple[int, int], ...], list[jax.Device]] = {}
      for device, index in sharding.addressable_devices_indices_map(shape).items():
        devices_by_box.setdefault(_index_box(index, shape), []).append(device)
      arrays = []
      for box, devices in devices_by_box.items():
        block = read(box)
        arrays.extend(jax.device_put(block, device) for device in devices)
        del block  # the next box is read only once this one is on its devices
      array = jax.make_array_from_single_device_arrays(shape, sharding, arrays)
      del arrays
      _set_path(params, our_path, array if array.dtype == dtype else _device_cast()(array, dtype))
  return params


@functools.cache
def _device_cast() -> Callable[[jax.Array, np.dtype], jax.Array]:
  """A global array cast on its own devices, keeping its sharding (one program per shape, sharding and dtype)."""
  return jax.jit(lambda array, dtype: array.astype(dtype), static_argnums=1)


def _index_box(index: tuple[slice, ...], shape: Sequence[int]) -> tuple[tuple[int, int], ...]:
  """A device's index into a global array (slices, possibly open) -> its box, [start, stop) per axis."""
  box = []
  for axis_slice, size in zip(index, shape):
    start, stop, step = axis_slice.indices(size)
    assert step == 1, f"a shard index with step {step}"
    box.append((start, stop))
  return tuple(box)


def _lookup(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
  for name in path:
    tree = tree[name]
  return tree


# ---------------------------------------------------------------------------------------------------- public
def load(path: PathLike, *, time_step_limit: tuple[float, float] | None = None, dtype: Any = None,
         mesh: Mesh | None = None, rules: LogicalRules | None = None) -> tuple[ModelConfig, Params]:
  """Reads a NemotronH checkpoint directory into our config and param tree.

  Args:
    path: directory with ``config.json`` and ``model.safetensors`` (or shards + ``model.safetensors.index.json``).
    time_step_limit: the dt clamp; default the checkpoint's ``time_step_limit`` (NVIDIA's semantics, ``(0, inf)``
      in released checkpoints). Pass ``(time_step_min, inf)`` to reproduce transformers >= 5.15.
    dtype: the params' dtype (e.g. ``"bfloat16"``, ``jnp.bfloat16``); default float32.
    mesh: when given, params are global ``jax.Array``s placed in ``param_shardings(config, mesh, rules)``: each
      process reads only the parts its own devices hold, in the checkpoint's dtype, and casts on the devices, so a
      model larger than one host's memory loads. All processes must call ``load`` together.
    rules: the logical-axis rules of the sharded mode; default ``DEFAULT_RULES``.

  Returns:
    ``(config, params)``: params is a nested dict of numpy arrays (without ``mesh``) or of global ``jax.Array``s
    (with it), as ``HybridLM(config).init`` lays them out.
  """
  path = pathlib.Path(path)
  config = config_from_hf(_read_json(path / CONFIG_FILE))
  if time_step_limit is not None:
    try:
      config = config.replace(time_step_limit=tuple(float(x) for x in time_step_limit))
    except ConfigError as err:
      raise CheckpointError(f"time_step_limit={time_step_limit!r} is invalid: {err}") from err
  param_dtype = _resolve_dtype("float32" if dtype is None else dtype)
  if param_dtype.name in DTYPES:
    config = config.replace(param_dtype=param_dtype.name)
  if mesh is not None:
    return config, _load_into_shards(path, config, mesh, DEFAULT_RULES if rules is None else rules, param_dtype)
  params = params_from_hf(_read_tensors(path, param_dtype), config)
  return config, params


def save(path: PathLike, config: ModelConfig, params: Mapping[str, Any]) -> None:
  """Writes our model as a NemotronH checkpoint directory (``config.json`` + ``model.safetensors``).

  Tensors keep the params' dtype. Refuses heterogeneous configs (a stock NemotronH config has one width per kind)
  and trees that do not match ``config``, before writing anything.

  Params may be numpy arrays or ``jax.Array``s, including global arrays sharded over several processes: then every
  process must call ``save`` with the same arguments. The file is streamed one checkpoint tensor at a time (each is
  gathered, converted to the checkpoint layout, written by process 0 and released), so no process holds more than
  about one tensor on the host, never the model. Process 0 writes everything; every process returns once the
  checkpoint is complete. ``config.json`` is written last, so a directory that has one holds the whole checkpoint.
  """
  _check_exportable(config)
  plan = _export_plan(params, config)
  specs = {e.hf_key: (np.result_type(*(a.dtype for a in arrays)), e.hf_shape) for e, arrays in plan}
  header, order = _safetensors_header(specs, metadata={"format": "pt"})  # transformers checks "format"
  entries = {e.hf_key: (e, arrays) for e, arrays in plan}
  path = pathlib.Path(path)
  primary = jax.process_index() == 0
  partial = path / (SINGLE_FILE + ".partial")
  if primary:
    path.mkdir(parents=True, exist_ok=True)
  with (open(partial, "wb") if primary else contextlib.nullcontext()) as f:
    if f is not None:
      f.write(header)
    for key in order:  # the file's order, the same on every process: the gathers are collectives
      e, arrays = entries[key]
      pieces = [_to_host(a) for a in arrays]
      if f is not None:  # only the writer converts
        tensor = e.join(pieces)
        assert (tensor.dtype, tensor.shape) == specs[key], (key, tensor.dtype, tensor.shape, specs[key])
        f.write(_little_endian_bytes(tensor))
        del tensor
      del pieces
  if primary:
    os.replace(partial, path / SINGLE_FILE)
    with open(path / CONFIG_FILE, "w") as f:
      json.dump(config_to_hf(config, specs["backbone.embeddings.weight"][0].name), f, indent=2, sort_keys=True)
      f.write("\n")
  barrier(f"elastic_jax_hf_save:{path}")


# ---------------------------------------------------------------------------------------------------- safetensors
# safetensors' dtype names, in the order of its Rust ``Dtype`` enum: a file stores tensors by descending position here
# (wider alignment first), then by name, which keeps every tensor's data aligned to its element size.
_SAFETENSORS_DTYPES = {name: tag for name, tag in (
    ("bool", "BOOL"), ("uint8", "U8"), ("int8", "I8"), ("float8_e5m2", "F8_E5M2"), ("float8_e4m3fn", "F8_E4M3"),
    ("int16", "I16"), ("uint16", "U16"), ("float16", "F16"), ("bfloat16", "BF16"), ("int32", "I32"),
    ("uint32", "U32"), ("float32", "F32"), ("float64", "F64"), ("int64", "I64"), ("uint64", "U64"))}
_SAFETENSORS_RANK = {name: rank for rank, name in enumerate(_SAFETENSORS_DTYPES)}


def _safetensors_header(specs: Mapping[str, tuple[np.dtype, tuple[int, ...]]],
                        metadata: Mapping[str, str]) -> tuple[bytes, list[str]]:
  """The start of a safetensors file holding tensors of these ``(dtype, shape)``s, and the order their data follows.

  Needs no data, so a writer can emit it first and then append each tensor's bytes in ``order``. Laid out exactly as
  the safetensors library writes (so the file is byte-identical to ``safetensors.numpy.save_file``): an 8-byte
  little-endian length, then compact JSON (``__metadata__`` first, then each tensor's dtype, shape and
  ``data_offsets`` [begin, end) relative to the end of the header, in data order), padded with spaces to a multiple
  of 8 bytes.
  """
  for key, (dtype, _) in specs.items():
    if dtype.name not in _SAFETENSORS_DTYPES:
      raise CheckpointError(f"{key} has dtype {dtype.name}, which safetensors cannot store; expected one of "
                            f"{sorted(_SAFETENSORS_DTYPES)}.")
  order = sorted(specs, key=lambda key: (-_SAFETENSORS_RANK[specs[key][0].name], key))
  header: dict[str, Any] = {"__metadata__": dict(metadata)}
  offset = 0
  for key in order:
    dtype, shape = specs[key]
    size = math.prod(shape) * dtype.itemsize
    header[key] = {"dtype": _SAFETENSORS_DTYPES[dtype.name], "shape": list(shape),
                   "data_offsets": [offset, offset + size]}
    offset += size
  text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
  text += b" " * (-len(text) % 8)
  return struct.pack("<Q", len(text)) + text, order


def _little_endian_bytes(tensor: np.ndarray) -> np.ndarray:
  """A tensor's raw bytes in C order and little-endian (what safetensors stores), as a byte view when possible."""
  tensor = np.ascontiguousarray(tensor)
  if tensor.dtype.byteorder == ">" or (tensor.dtype.byteorder == "=" and sys.byteorder == "big"):
    tensor = tensor.byteswap()
  return tensor.reshape(-1).view(np.uint8)
