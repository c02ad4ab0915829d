"""``python -m elastic_jax.serve --family DIR --port N``: serve every member of a family over HTTP.

``DIR`` is a family export (``python -m elastic_jax.extract --workdir W --family --out DIR``) or a main-job workdir
(its finished run, or with ``--step N`` / while training runs, an elastic checkpoint). Members are named
``{--name}-{budget}`` (``family-75pct``); ``GET /v1/models`` lists them. Any budget in the trained range
(``family-60pct``) and budget-control pairs (``family-50pct+100pct``) are served by name too. A folder that holds no family, or a tokenizer
that does not fit, ends with one line naming it and exit status 2 (``--verbosity 1`` adds the traceback).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from elastic_jax import cli
from elastic_jax.data.tasks import ANSWER_MARK
from elastic_jax.serve.engine import DEFAULT_MAX_BATCH, DEFAULT_MAX_CONTEXT, DEFAULT_PREFIX, ServedFamily, Slicing
from elastic_jax.serve.family import read_family

_PROG = "python -m elastic_jax.serve"


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog=_PROG, description="Serve every member of an elastic family from one loaded "
                                   "checkpoint with an OpenAI-compatible /v1/completions endpoint.")
  parser.add_argument("--family", required=True, metavar="DIR",
                      help="a family export (extract --family) or a main-job workdir (python -m elastic_jax.train).")
  parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1).")
  parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0: any free port).")
  parser.add_argument("--name", default=DEFAULT_PREFIX, help="member names are NAME-<budget> (default 'family').")
  parser.add_argument("--step", type=int, default=None, metavar="N",
                      help="a workdir's elastic checkpoint N (default: the finished run, else its latest checkpoint).")
  parser.add_argument("--max-context", type=int, default=DEFAULT_MAX_CONTEXT, metavar="TOKENS",
                      help=f"longest prompt + max_tokens a request may ask for (default {DEFAULT_MAX_CONTEXT}).")
  parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, metavar="ROWS",
                      help=f"most rows (prompts x n) one program call runs (default {DEFAULT_MAX_BATCH}).")
  parser.add_argument("--batch-window-ms", type=float, default=5.0, metavar="MS",
                      help="how long a member's queue waits for more requests before running a batch (default 5).")
  parser.add_argument("--answer-marker", default=ANSWER_MARK, metavar="TEXT",
                      help=f"where a budget-control pair (NAME-50pct+100pct) hands over to its answer member "
                           f"(default {ANSWER_MARK!r}, the line that starts our tasks' final answer).")
  parser.add_argument("--slicing", default=Slicing.IN_PROGRAM.value, choices=[s.value for s in Slicing],
                      help="in_program (default): each member's program slices the shared weights (resident: the "
                           "parent once); resident: slices made once and kept (parent + every member's slices).")
  parser.add_argument("--verbosity", type=int, default=0, metavar="N",
                      help="1: print the traceback with an error message (default 0: the message only).")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    if args.max_context < 2 or args.max_batch < 1:
      raise cli.InputError(f"--max-context {args.max_context} must be >= 2 and --max-batch {args.max_batch} >= 1.")
    if not args.answer_marker:
      raise cli.InputError("--answer-marker must be a non-empty string (e.g. '####').")
    family = ServedFamily(read_family(args.family, args.step), prefix=args.name, max_context=args.max_context,
                          max_batch=args.max_batch, slicing=Slicing(args.slicing), answer_marker=args.answer_marker)
  except cli.refused_errors() as error:
    return cli.refuse(error, args.verbosity >= 1)
  import uvicorn  # pylint: disable=import-outside-toplevel
  from elastic_jax.serve.server import create_app  # pylint: disable=import-outside-toplevel
  memory = family.memory()
  print(f"serving {', '.join(family.members)} from {family.family.source}: weights held "
        f"{memory['held_param_bytes']:,} bytes (parent {memory['parent_param_bytes']:,}; the members as separate "
        f"children {memory['children_param_bytes']:,})", flush=True)
  uvicorn.run(create_app(family, batch_window_ms=args.batch_window_ms), host=args.host, port=args.port,
              log_level="info")
  return 0


if __name__ == "__main__":
  sys.exit(main())
