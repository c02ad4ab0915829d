"""Evaluate one standalone model: held-out perplexity and generated-answer accuracy per task family.

The model is a folder written by ``python -m elastic_jax.extract`` in either format (detected): an HF NemotronH
checkpoint (``config.json`` + safetensors) or our Orbax standalone model (``DIR/model``, or the Orbax folder itself,
e.g. a main job's ``W/children/<name>``). It is measured on the synthetic tasks' evaluation split, which shares no
prompt with the training split:

- perplexity: ``--ppl-batches`` packed batches of ``--batch-size`` x ``--seq-len`` tokens of evaluation-split
  documents of the chosen families (every next-token target counts, document separators included, as in training);
- accuracy: ``--examples`` prompts per family, greedy cached decoding (one compile for every prompt length), graded
  by exact match of the number after ``####``.

The measurement is the main job's (``elastic_jax.eval.measure``); its report's "short" tasks are the defaults here,
its "long" ones ``--difficulty 2 --distractors 40``.

CLI::

  python -m elastic_jax.evaluate --model DIR [--tasks NAME ...] [--examples N] [--ppl-batches N]
      [--tokenizer PATH] [--json OUT] [--verbosity 1]

Unusable input (a missing or unreadable model folder, a tokenizer that does not fit, an unwritable ``--json``,
checked before any work) ends with one line naming it and exit status 2; ``--verbosity 1`` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from elastic_jax import cli
from elastic_jax.data import tasks
from elastic_jax.data.tokenizer import Tokenizer, check_vocab_fits, describe, load_tokenizer
from elastic_jax.elastic.param_count import param_count
from elastic_jax.eval.measure import eval_split_batches, measure_model
from elastic_jax.model import ModelConfig
from elastic_jax.train.checkpoint import load_model

Params = Any
_PROG = "python -m elastic_jax.evaluate"


class EvaluateError(cli.InputError):
  """The model folder, tokenizer or settings cannot be evaluated."""


# ---------------------------------------------------------------------------------------------------- loading
def model_format(path: str) -> tuple[str, str]:
  """``("hf", path)`` or ``("orbax", the Orbax folder)`` for a model folder; raises EvaluateError otherwise."""
  if not os.path.isdir(path):
    raise EvaluateError(f"--model {path!r} does not exist or is not a folder; give a folder written by "
                        "python -m elastic_jax.extract (or a main job's W/children/<name>).")
  if os.path.isfile(os.path.join(path, "config.json")):
    return "hf", path
  if os.path.isdir(os.path.join(path, "model")):
    return "orbax", os.path.join(path, "model")
  if any(name.isdigit() and os.path.isdir(os.path.join(path, name)) for name in os.listdir(path)):
    return "orbax", path  # the Orbax folder itself: one step folder per save
  raise EvaluateError(f"--model {path!r} holds no model: expected config.json (an HF NemotronH checkpoint), a "
                      "model/ folder, or Orbax step folders (our format), as python -m elastic_jax.extract writes.")


def load_standalone_model(path: str) -> tuple[ModelConfig, Params, str]:
  """``(config, params, format)`` of a model folder in either format (see :func:`model_format`)."""
  fmt, location = model_format(path)
  if fmt == "hf":
    from elastic_jax.interop import hf  # pylint: disable=import-outside-toplevel  (safetensors only when needed)
    config, params = hf.load(location)
    return config, params, fmt
  try:
    metadata, params = load_model(location)
  except Exception as error:  # pylint: disable=broad-except  (whatever Orbax raises, the folder is named)
    raise cli.unreadable_checkpoint(location, error) from error
  if "config" not in metadata:
    raise EvaluateError(f"{location} is an Orbax checkpoint without a model config in its metadata; it was not "
                        "written by save_model (python -m elastic_jax.extract --format orbax writes one).")
  return ModelConfig.from_dict(metadata["config"]), params, fmt


def model_tokenizer(model_dir: str, tokenizer_path: str | None, vocab_size: int) -> Tokenizer:
  """``--tokenizer``, else the model folder's own ``tokenizer.json`` when it has one, else UTF-8 bytes; refused
  when its ids do not fit the model's vocabulary."""
  where = f"--tokenizer {tokenizer_path}" if tokenizer_path else "the default byte tokenizer"
  if not tokenizer_path and os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
    tokenizer_path = os.path.join(model_dir, "tokenizer.json")
    where = f"the model folder's {tokenizer_path}"
  try:
    tokenizer = load_tokenizer(tokenizer_path)
    check_vocab_fits(tokenizer, vocab_size)
  except (FileNotFoundError, ValueError) as error:
    raise EvaluateError(f"{where}: {error}") from error
  return tokenizer


# ---------------------------------------------------------------------------------------------------- measuring
def evaluate(config: ModelConfig, params: Params, tokenizer: Tokenizer, *, families: Sequence[str] = tasks.FAMILIES,
             examples: int = 32, ppl_batches: int = 4, batch_size: int = 8, seq_len: int = 256,
             difficulty: int = 1, distractors: int = 0, seed: int = 0, max_new_tokens: int = 160,
             decode_batch: int = 32) -> dict[str, Any]:
  """Perplexity and per-family accuracy of one model (the module docstring says on what).

  Returns:
    {"perplexity": float or None, "ppl_tokens": int, "accuracy": {"all": {"accuracy", "n", "correct"},
    "per_task": {family: {"accuracy", "n"}}} or None, "settings": {...}}.
  """
  unknown = [name for name in families if name not in tasks.FAMILIES]
  if unknown or not families:
    raise EvaluateError(f"unknown task name(s) {unknown}; the tasks are {list(tasks.FAMILIES)}.")
  for name, value in (("examples", examples), ("ppl_batches", ppl_batches)):
    if value < 0:
      raise EvaluateError(f"--{name.replace('_', '-')} {value} must be >= 0 (0 skips that measurement).")
  for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("max_new_tokens", max_new_tokens),
                      ("decode_batch", decode_batch)):
    if value < 1:
      raise EvaluateError(f"--{name.replace('_', '-')} {value} must be >= 1.")
  try:
    task_config = tasks.TaskConfig(families=tuple(families), difficulty=difficulty, distractors=distractors)
  except ValueError as error:
    raise EvaluateError(str(error)) from error
  batches = eval_split_batches(task_config, seed, tokenizer, batches=ppl_batches, batch_size=batch_size,
                               seq_len=seq_len)
  # Examples of each family apart (``examples`` of each), decoded together: one compile for all of them.
  prompts = [example for family in families
             for example in tasks.generate_examples(tasks.TaskConfig(families=(family,), difficulty=difficulty,
                                                                     distractors=distractors), seed, "eval",
                                                    examples)]
  measured = measure_model(config, params, batches, {"tasks": prompts} if prompts else {}, tokenizer,
                           max_new_tokens=max_new_tokens, decode_batch=decode_batch)
  graded = measured["accuracy"].get("tasks")
  accuracy = None if graded is None else {
      "all": {key: graded[key] for key in ("accuracy", "n", "correct")}, "per_task": graded["per_family"]}
  settings = {"tasks": list(families), "examples": examples, "ppl_batches": ppl_batches, "batch_size": batch_size,
              "seq_len": seq_len, "difficulty": difficulty, "distractors": distractors, "seed": seed,
              "max_new_tokens": max_new_tokens, "decode_batch": decode_batch}
  return {"perplexity": measured["ppl"], "ppl_tokens": ppl_batches * batch_size * seq_len, "accuracy": accuracy,
          "settings": settings}


def format_table(result: dict[str, Any]) -> str:
  """The CLI's printed summary of an :func:`evaluate` result (plus the model fields ``main`` adds)."""
  lines = [f"model       {result['model']} ({result['format']}; {result['params']:,} parameters; pattern "
           f"{result['pattern']!r})", f"tokenizer   {result['tokenizer']}"]
  settings = result["settings"]
  if result["perplexity"] is not None:
    lines.append(f"perplexity  {result['perplexity']:.4f}   (evaluation split: {settings['ppl_batches']} batches of "
                 f"{settings['batch_size']} x {settings['seq_len']} tokens)")
  if result["accuracy"] is not None:
    lines += ["", f"{'task':<12}{'accuracy':>10}{'correct':>9}{'n':>6}"]
    for family, graded in result["accuracy"]["per_task"].items():
      lines.append(f"{family:<12}{graded['accuracy']:>10.3f}{round(graded['accuracy'] * graded['n']):>9}"
                   f"{graded['n']:>6}")
    overall = result["accuracy"]["all"]
    lines.append(f"{'all':<12}{overall['accuracy']:>10.3f}{overall['correct']:>9}{overall['n']:>6}")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
  families = ", ".join(tasks.FAMILIES)
  parser = argparse.ArgumentParser(
      prog=_PROG,
      description="Held-out perplexity and generated-answer accuracy per task family of one model written by "
                  f"python -m elastic_jax.extract (HF or Orbax format, detected). Tasks: {families}.")
  parser.add_argument("--model", required=True, metavar="DIR",
                      help="the model folder: an HF NemotronH checkpoint (config.json + safetensors) or our Orbax "
                           "format (DIR/model, or the Orbax folder itself, e.g. a main job's W/children/75pct).")
  parser.add_argument("--tasks", nargs="+", default=list(tasks.FAMILIES), choices=tasks.FAMILIES, metavar="NAME",
                      help=f"task families to measure, any of: {families} (default: all).")
  parser.add_argument("--examples", type=int, default=32, metavar="N",
                      help="evaluation prompts per task family for accuracy (default 32; 0 skips accuracy).")
  parser.add_argument("--ppl-batches", type=int, default=4, metavar="N",
                      help="packed batches for perplexity (default 4; 0 skips perplexity).")
  parser.add_argument("--batch-size", type=int, default=8, metavar="B",
                      help="sequences per perplexity batch (default 8).")
  parser.add_argument("--seq-len", type=int, default=256, metavar="L",
                      help="tokens per perplexity sequence (default 256).")
  parser.add_argument("--difficulty", type=int, default=1, metavar="D",
                      help="task difficulty, >= 1 (default 1; the main job's long-context tasks use 2).")
  parser.add_argument("--distractors", type=int, default=0, metavar="K",
                      help="irrelevant lines per modular/variables problem (default 0; the main job's long-context "
                           "tasks use 40).")
  parser.add_argument("--seed", type=int, default=0, help="seed of the evaluation examples (default 0).")
  parser.add_argument("--max-new-tokens", type=int, default=160, metavar="T",
                      help="tokens generated per prompt; an answer not reached by then is wrong (default 160).")
  parser.add_argument("--decode-batch", type=int, default=32, metavar="B",
                      help="prompts decoded together (default 32).")
  parser.add_argument("--tokenizer", default=None, metavar="PATH",
                      help="the model's tokenizer: a tokenizer.json or a folder holding one (default: the model "
                           "folder's tokenizer.json if it has one, else UTF-8 bytes, right for byte-level models "
                           "such as configs/tiny.py). Refused when its ids exceed the model's vocabulary.")
  parser.add_argument("--json", default=None, metavar="OUT", help="also write the results to this JSON file "
                      "(its folder is checked writable before any work).")
  parser.add_argument("--verbosity", type=int, default=0, metavar="N",
                      help="1: print the traceback with an error message (default 0: the message only).")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    if args.json:
      cli.check_writable_file(args.json, "--json")
    config, params, fmt = load_standalone_model(args.model)
    tokenizer = model_tokenizer(args.model, args.tokenizer, config.vocab_size)
    result = evaluate(config, params, tokenizer, families=args.tasks, examples=args.examples,
                      ppl_batches=args.ppl_batches, batch_size=args.batch_size, seq_len=args.seq_len,
                      difficulty=args.difficulty, distractors=args.distractors, seed=args.seed,
                      max_new_tokens=args.max_new_tokens, decode_batch=args.decode_batch)
  except cli.refused_errors() as error:
    return cli.refuse(error, args.verbosity >= 1)
  result = {"model": os.path.abspath(args.model), "format": fmt, "params": param_count(config),
            "pattern": config.pattern, "tokenizer": describe(tokenizer), **result}
  print(format_table(result))
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
      f.write("\n")
    print(f"wrote {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
