"""Zero-shot pruning baseline (Minitron-style one-shot): importance -> permutation -> choice -> extraction.

No training: the child is sliced out of the parent right after ranking, which is the baseline that elastic training
improves on. The choice is homogeneous (one size per axis, so the child exports as a stock NemotronH checkpoint) and
found by a deterministic descent over the search space's candidates:

  start from the largest candidate of every axis; while the count is above ``target · (1 + tolerance)``, step one
  axis down to its next smaller candidate. Axes take turns in ``PRIORITY`` order (round robin), except that a step
  landing inside the tolerance band ends the search at once (first such axis in priority order), and a turn whose
  step would fall below the band passes to the next axis in turn whose step stays above it. When every possible
  step falls below the band, the largest of them is taken and a warning says so.

``PRIORITY`` puts first the axes whose removal costs least per parameter in NVIDIA's ablations: MLP neurons and
Mamba heads (Minitron, Minitron-SSM), then embedding channels, attention heads (few parameters each), Mamba head
channels (Minitron-SSM found them costlier than whole heads) and depth last (one-shot depth pruning hurts most).

CLI::

  python -m elastic_jax.prune --hf PATH --target 0.5 --calib data.jsonl --out DIR [--format hf|orbax]
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from elastic_jax import cli
from elastic_jax.elastic.extract import extract
from elastic_jax.elastic.importance import estimate_importance, rankings
from elastic_jax.elastic.param_count import choice_param_count, param_count
from elastic_jax.elastic.permute import permute_params
from elastic_jax.elastic import axes as axes_lib
from elastic_jax.elastic.space import Choice, ElasticSpace
from elastic_jax.model.config import ModelConfig

Params = dict[str, Any]
# The axis order of the descent: each axis' ``prune_rank`` in the registry.
PRIORITY = tuple(a.name for a in sorted(axes_lib.AXES, key=lambda a: a.prune_rank))
DEFAULT_FRACTIONS = (0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
_log = logging.getLogger(__name__)


class PruneError(cli.InputError):
  """The target cannot be met with the given space, or the inputs are unusable."""


# ---------------------------------------------------------------------------------------------------- choice
def _choice_at(config: ModelConfig, space: ElasticSpace, index: dict[str, int]) -> Choice:
  """The homogeneous choice taking candidate ``index[axis]`` on every axis."""
  sizes = {axis: space.candidates(axis)[i] for axis, i in index.items()}
  fields = {}
  for axis in axes_lib.AXES:
    if axis.per_layer:
      fields[axis.name] = (sizes[axis.name],) * axes_lib.kind_count(config, axis.kind) if axis.name in sizes else ()
    else:
      fields[axis.name] = sizes.get(axis.name, getattr(config, axis.config_field))
  return Choice(**fields)


def select_choice(config: ModelConfig, space: ElasticSpace, target_params: float, *, tolerance: float = 0.02,
                  depth_order: Any = None, priority: Sequence[str] = PRIORITY) -> Choice:
  """The homogeneous choice the module docstring's descent finds for ``target_params`` (deterministic).

  Raises ``PruneError`` when even the smallest candidates exceed the band's upper edge.
  """
  if sorted(priority) != sorted(axes_lib.names()):
    raise PruneError(f"priority {list(priority)} must order every axis exactly once: {list(axes_lib.names())}.")
  axes = [axis for axis in priority if space.candidates(axis)]
  index = {axis: len(space.candidates(axis)) - 1 for axis in axes}
  low, high = target_params * (1 - tolerance), target_params * (1 + tolerance)
  count = lambda idx: choice_param_count(config, _choice_at(config, space, idx), depth_order)
  turn = 0
  while count(index) > high:
    steps = [(axis, {**index, axis: index[axis] - 1}) for axis in axes if index[axis] > 0]
    if not steps:
      raise PruneError(f"target {target_params:,.0f} parameters (±{tolerance:.0%}) is out of reach: the smallest "
                       f"sub-network of the space has {count(index):,} parameters. Add smaller candidates.")
    counts = [count(idx) for _, idx in steps]
    inside = [i for i, c in enumerate(counts) if low <= c <= high]
    if inside:
      index = steps[inside[0]][1]
      break
    # Round robin: the first axis at or after this turn's position that can still step down.
    order = sorted(range(len(steps)), key=lambda i: (axes.index(steps[i][0]) - turn) % len(axes))
    above = [i for i in order if counts[i] > high]
    if above:
      pick = above[0]
    else:
      pick = max(range(len(steps)), key=lambda i: counts[i])
      _log.warning("no single step lands within ±%.0f%% of %s parameters; stopping at %s (%.1f%% of the target). "
                   "Finer candidates would get closer.", 100 * tolerance, f"{target_params:,.0f}",
                   f"{counts[pick]:,}", 100 * counts[pick] / target_params)
      index = steps[pick][1]
      break
    index = steps[pick][1]
    turn = axes.index(steps[pick][0]) + 1
  return _choice_at(config, space, index)


# ---------------------------------------------------------------------------------------------------- prune
def prune(config: ModelConfig, params: Params, calibration_batches: Iterable[Any], *,
          target_params: float | None = None, target_fraction: float | None = None,
          space: ElasticSpace | None = None, tolerance: float = 0.02, priority: Sequence[str] = PRIORITY,
          progress: bool = False) -> tuple[ModelConfig, Params, Choice]:
  """One-shot pruning of ``params`` to ``target_params`` (or ``target_fraction`` of the parent), no training.

  Args:
    config, params: the parent.
    calibration_batches: int32 token arrays [b, l] for the importance forward passes.
    target_params / target_fraction: exactly one of them.
    space: candidate sizes per axis; default ``ElasticSpace.from_fractions(config, DEFAULT_FRACTIONS)`` on every
      width axis, depth fixed. Depth importance (about num_layers²/2 forwards per batch) runs only when the space
      lets depth shrink.
    tolerance: accepted relative distance to the target.

  Returns:
    ``(child_config, child_params, choice)``; ``choice`` indexes the importance-permuted parent.
  """
  if (target_params is None) == (target_fraction is None):
    raise PruneError("give exactly one of target_params and target_fraction.")
  parent_count = param_count(config)
  if target_params is None:
    if not 0.0 < target_fraction <= 1.0:
      raise PruneError(f"target_fraction={target_fraction} must be in (0, 1].")
    target_params = target_fraction * parent_count
  if not 0 < target_params <= parent_count * (1 + tolerance):
    raise PruneError(f"target_params={target_params:,.0f} must be positive and at most the parent's "
                     f"{parent_count:,} parameters.")
  space = space if space is not None else ElasticSpace.from_fractions(config, DEFAULT_FRACTIONS)
  space.validate(config)
  prune_depth = min(space.depth) < config.num_layers

  importance = estimate_importance(config, params, calibration_batches, depth=prune_depth, progress=progress)
  order = rankings(importance, config)
  permuted = permute_params(config, params, order)
  depth_order = None if order.depth is None else [int(i) for i in order.depth]
  choice = select_choice(config, space, target_params, tolerance=tolerance, depth_order=depth_order,
                         priority=priority)
  child_config, child_params = extract(config, permuted, choice, depth_order)
  return child_config, child_params, choice


# ---------------------------------------------------------------------------------------------------- calibration
def calibration_tokens(source: str, vocab_size: int, *, samples: int, seq_len: int, seed: int = 0,
                       tokenizer: str | None = None) -> np.ndarray:
  """int32 [samples, seq_len] calibration tokens.

  ``source="random"``: uniform random tokens (a smoke test of the pipeline; the resulting ranking is meaningless).
  A ``.jsonl`` file: the ``"text"`` field of each line; any other file: its whole text. Text becomes UTF-8 bytes
  (token = byte value, right for byte-level models such as ``configs/tiny.py``) or, with ``tokenizer`` (a Hugging
  Face tokenizer directory), that tokenizer's ids. Documents are concatenated and cut into windows of ``seq_len``
  at evenly spaced offsets.
  """
  rng = np.random.default_rng(seed)
  if source == "random":
    return rng.integers(0, vocab_size, (samples, seq_len)).astype(np.int32)
  path = pathlib.Path(source)
  if not path.is_file():
    raise PruneError(f"--calib {source!r} is neither 'random' nor an existing file.")
  if path.suffix == ".jsonl":
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
      if line.strip():
        record = json.loads(line)
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
          raise PruneError(f"{path}:{number} has no string field 'text'.")
        texts.append(record["text"])
  else:
    texts = [path.read_text(encoding="utf-8")]
  if tokenizer is None:
    if vocab_size < 256:
      raise PruneError(f"byte tokens need vocab_size >= 256 (the model has {vocab_size}); pass --tokenizer.")
    ids = np.frombuffer("\n".join(texts).encode("utf-8"), np.uint8).astype(np.int32)
  else:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tokenizer)
    ids = np.asarray([i for text in texts for i in tok(text)["input_ids"]], np.int32)
    if ids.size and ids.max() >= vocab_size:
      raise PruneError(f"tokenizer {tokenizer} produced id {ids.max()} >= the model's vocab_size {vocab_size}.")
  if ids.size < seq_len:
    raise PruneError(f"{path} gives {ids.size} tokens, fewer than --seq-len {seq_len}.")
  starts = np.linspace(0, ids.size - seq_len, samples).astype(np.int64)
  return np.stack([ids[s:s + seq_len] for s in starts])


# ---------------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m elastic_jax.prune",
      description="Zero-shot (one-shot, no training) structured pruning of a NemotronH checkpoint: activation "
                  "importance on calibration data, importance permutation, a homogeneous sub-network meeting the "
                  "parameter target (see elastic_jax/prune.py for the search rule), extraction.")
  parser.add_argument("--hf", required=True, metavar="PATH",
                      help="the parent: a NemotronH checkpoint directory (config.json + safetensors).")
  parser.add_argument("--target", required=True, type=float,
                      help="parameter target: a fraction of the parent's count if <= 1 (e.g. 0.5), else an "
                           "absolute count (e.g. 6e9).")
  parser.add_argument("--calib", default="random", metavar="FILE|random",
                      help="calibration text: a .jsonl file (field 'text' per line) or any text file; 'random' "
                           "uses random tokens (pipeline smoke test only, the ranking is then meaningless). "
                           "Default: random.")
  parser.add_argument("--tokenizer", default=None, metavar="PATH",
                      help="Hugging Face tokenizer directory for --calib text; without it text is read as UTF-8 "
                           "byte tokens (right only for byte-level models such as configs/tiny.py).")
  parser.add_argument("--samples", type=int, default=64, help="calibration sequences (default 64).")
  parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence (default 512).")
  parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8).")
  parser.add_argument("--space", default=None, metavar="JSON",
                      help="elastic search space as a JSON file or inline JSON ({'hidden': [...], 'mlp': [...], "
                           "'depth': [...], ...}); default: fractions 1/4, 3/8, ..., 1 of every width axis, depth "
                           "fixed.")
  parser.add_argument("--tolerance", type=float, default=0.02,
                      help="accepted relative distance to the target (default 0.02).")
  parser.add_argument("--out", required=True, metavar="DIR", help="output directory for the pruned child.")
  parser.add_argument("--format", choices=("hf", "orbax"), default="hf",
                      help="hf: a NemotronH checkpoint transformers loads; orbax: an Orbax checkpoint (step 0) of "
                           "the params with the config in its metadata. Either way DIR/prune.json records the "
                           "choice and counts. Default: hf.")
  parser.add_argument("--seed", type=int, default=0, help="seed for random calibration tokens (default 0).")
  parser.add_argument("--progress", action="store_true", help="show progress bars.")
  parser.add_argument("--verbosity", type=int, default=0, metavar="N",
                      help="1: print the traceback with an error message (default 0: the message only).")
  return parser


def _load_space(text: str | None, config: ModelConfig) -> ElasticSpace | None:
  if text is None:
    return None
  path = pathlib.Path(text)
  try:
    values = json.loads(path.read_text() if path.is_file() else text)
    return ElasticSpace.from_dict(values, config)
  except ValueError as error:  # not JSON, or not a space of this parent
    raise PruneError(f"--space {text}: {error}") from error


def main(argv: Sequence[str] | None = None) -> int:
  """The CLI; unusable input (checkpoint, calibration data, space, an unwritable ``--out``, checked first) ends with
  one line naming it and exit status 2."""
  args = _parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  try:
    cli.check_writable_dir(args.out, "--out")
    return _prune_to(args)
  except cli.refused_errors() as error:
    return cli.refuse(error, args.verbosity >= 1)


def _prune_to(args: argparse.Namespace) -> int:
  from elastic_jax.interop import hf  # pylint: disable=import-outside-toplevel

  config, params = hf.load(args.hf)
  space = _load_space(args.space, config)
  tokens = calibration_tokens(args.calib, config.vocab_size, samples=args.samples, seq_len=args.seq_len,
                              seed=args.seed, tokenizer=args.tokenizer)
  batches = [tokens[i:i + args.batch_size] for i in range(0, len(tokens), args.batch_size)]
  parent_count = param_count(config)
  target = args.target * parent_count if args.target <= 1 else args.target
  child_config, child_params, choice = prune(config, params, batches, target_params=target, space=space,
                                             tolerance=args.tolerance, progress=args.progress)
  child_count = param_count(child_config)
  out = pathlib.Path(args.out)
  if args.format == "hf":
    hf.save(out, child_config, child_params)
  else:
    from elastic_jax.train.checkpoint import save_model
    save_model(out / "checkpoint", child_config.to_dict(), child_params, {"choice": choice.to_dict()})
  report = {"parent": args.hf, "parent_params": parent_count, "target_params": target, "child_params": child_count,
            "child_fraction": child_count / parent_count, "choice": choice.to_dict(), "calibration": args.calib,
            "calibration_tokens": int(tokens.size), "format": args.format, "pattern": child_config.pattern}
  out.mkdir(parents=True, exist_ok=True)
  (out / "prune.json").write_text(json.dumps(report, indent=2) + "\n")
  _log.info("pruned %s -> %s: %s -> %s parameters (%.1f%% of the parent, target %.1f%%); pattern %s",
            args.hf, out, f"{parent_count:,}", f"{child_count:,}", 100 * child_count / parent_count,
            100 * target / parent_count, child_config.pattern)
  return 0


if __name__ == "__main__":
  sys.exit(main())
