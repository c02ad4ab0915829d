"""A served family on the run's held-out tasks: members, budgets between them, and budget control, side by side.

For each model served by one ``elastic_jax.serve.ServedFamily`` (a deployed member such as ``family-50pct``, a budget
between the trained ones such as ``family-60pct``, deployed from the interpolated router, or a budget-control pair
such as ``family-50pct+100pct``: the 50% member writes the worked solution up to the answer marker ``####``, the
100% member prefills the whole context and writes the answer), greedy decoding of the same held-out problems as the
main job's report (``configs/tiny.py``'s tasks: 3-digit arithmetic, the short set and the long set behind 8 filler
notes, seeds ``seed`` and ``seed + 1``) prints:

- accuracy on each set with its 95% Wilson interval, and each pair's accuracy minus its reasoning member's and minus
  its answer member's alone, with 95% paired-bootstrap intervals over the same problems;
- wall time per problem (all problems decoded in batches of ``--batch``, after an identical untimed pass that compiles
  every program), generated tokens per problem, and for a pair the share of them its reasoning member wrote;
- each member's parameter count as a fraction of the parent's.

Usage:
  python benchmarks/family_tasks.py --family workdir/tiny [--models family-100pct,family-60pct,...]
      [--examples 256] [--batch 32] [--seed 0] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time


from elastic_jax import serve
from elastic_jax.data import tasks
from elastic_jax.eval.metrics import grade
from elastic_jax.eval.stats import paired_bootstrap, wilson_interval

DEFAULT_MODELS = ("family-100pct", "family-75pct", "family-60pct", "family-50pct", "family-50pct+100pct",
                  "family-75pct+100pct", "family-100pct+50pct")


def problem_sets(seed: int, examples: int, difficulty: int, long_distractors: int) -> dict[str, list[tasks.Example]]:
  """The report's held-out sets (``eval.report.evaluate_and_report``) for a run of ``configs/tiny.py``'s tasks."""
  short = tasks.TaskConfig(families=("arithmetic",), difficulty=difficulty, distractors=0)
  long = tasks.TaskConfig(families=("arithmetic",), difficulty=difficulty, distractors=long_distractors)
  return {"short": tasks.generate_examples(short, seed, "eval", examples),
          "long": tasks.generate_examples(long, seed + 1, "eval", examples)}


def run(family: serve.ServedFamily, model: str, examples: list[tasks.Example], max_new_tokens: int) -> dict:
  """Greedy completions of every problem: texts, seconds, generated tokens, tokens the reasoning member wrote."""
  rows = [serve.Row(tuple(family.tokenizer.encode(e.prompt)), max_new_tokens) for e in examples]
  start = time.perf_counter()
  done = family.continue_rows(model, rows)
  seconds = time.perf_counter() - start
  return {"texts": [family.tokenizer.decode(c.tokens) for c in done], "seconds": seconds,
          "tokens": sum(len(c.tokens) for c in done),
          "reasoning_tokens": sum(c.handoff for c in done if c.handoff is not None)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--family", required=True, help="a family export or a main-job workdir")
  parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
  parser.add_argument("--examples", type=int, default=256, help="problems per set (the report's eval.examples)")
  parser.add_argument("--batch", type=int, default=32, help="rows per program call (the report's decode_batch)")
  parser.add_argument("--max-new-tokens", type=int, default=96)
  parser.add_argument("--seed", type=int, default=0, help="the run's seed (short set: seed, long set: seed + 1)")
  parser.add_argument("--difficulty", type=int, default=1)
  parser.add_argument("--long-distractors", type=int, default=8)
  parser.add_argument("--json", default=None, help="also write every number (and per-problem results) here")
  args = parser.parse_args()

  family = serve.load(args.family, max_batch=args.batch, max_context=4096)
  sets = problem_sets(args.seed, args.examples, args.difficulty, args.long_distractors)
  models = [m.strip() for m in args.models.split(",") if m.strip()]
  for model in models:  # warm-up: the same pass untimed, so that every shape the timed pass meets is compiled (a
    for examples in sets.values():  # pair's answer step has a prompt width and length that depend on its reasoning)
      run(family, model, examples, args.max_new_tokens)

  results: dict[str, dict] = {}
  for model in models:
    target = family.resolve(model)
    members = [target.reason, target.answer] if isinstance(target, serve.Pair) else [target.name]
    result = {"members": members, "sets": {}}
    for label, examples in sets.items():
      measured = run(family, model, examples, args.max_new_tokens)
      graded = grade(examples, measured["texts"])
      low, high = wilson_interval(graded["correct"], graded["n"])
      result["sets"][label] = {"accuracy": graded["accuracy"], "low": low, "high": high, "n": graded["n"],
                               "per_problem": [int(x) for x in graded["per_problem"]],
                               "ms_per_problem": 1e3 * measured["seconds"] / len(examples),
                               "tokens_per_problem": measured["tokens"] / len(examples),
                               "reasoning_share": measured["reasoning_tokens"] / max(1, measured["tokens"])}
    member = family.member(members[0]) if len(members) == 1 else None
    result["fraction"] = member.spec.fraction if member else None
    result["interpolated"] = bool(member and member.interpolated)
    results[model] = result

  for model, result in results.items():  # a pair against each of its members alone, on the same problems
    if len(result["members"]) == 2:
      for role, member in zip(("reason", "answer"), result["members"]):
        if member in results:
          result[f"vs_{role}"] = {label: paired_bootstrap(s["per_problem"], results[member]["sets"][label]["per_problem"])
                                  for label, s in result["sets"].items()}

  print(f"{args.family}: {args.examples} problems per set, greedy, {args.max_new_tokens} new tokens at most, batches "
        f"of {args.batch}, seed {args.seed}")
  print("| model | params | short: accuracy [95% CI] | long: accuracy [95% CI] | ms / problem (short, long) | "
        "tokens / problem | by the reasoning member |")
  print("|---|---:|---|---|---:|---:|---:|")
  for model, result in results.items():
    s, l = result["sets"]["short"], result["sets"]["long"]
    size = "pair" if result["fraction"] is None else f"{100 * result['fraction']:.1f}%" + (
        " (interpolated)" if result["interpolated"] else "")
    share = "-" if result["fraction"] is not None else f"{100 * s['reasoning_share']:.0f}%, {100 * l['reasoning_share']:.0f}%"
    print(f"| {model} | {size} | {100 * s['accuracy']:.1f} [{100 * s['low']:.1f}, {100 * s['high']:.1f}] | "
          f"{100 * l['accuracy']:.1f} [{100 * l['low']:.1f}, {100 * l['high']:.1f}] | {s['ms_per_problem']:.1f}, "
          f"{l['ms_per_problem']:.1f} | {s['tokens_per_problem']:.1f}, {l['tokens_per_problem']:.1f} | {share} |")
  for model, result in results.items():
    for role in ("reason", "answer"):
      if f"vs_{role}" in result:
        parts = [f"{label} {100 * d['diff']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"
                 for label, d in result[f"vs_{role}"].items()]
        member = result["members"][0 if role == "reason" else 1]
        print(f"{model} minus {member} alone (points, paired bootstrap 95%): " + "; ".join(parts))
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"settings": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
  main()
