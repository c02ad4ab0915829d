"""What every command line does with input it cannot use: one line that names the key or the file, exit status 2,
no traceback (``--verbosity=1`` adds it, for a bug report).

  config error: eval.exampels: unknown key (did you mean examples?)
  error: --json /data/out/x.json: cannot write there ([Errno 20] Not a directory: '/data/out') (choose ...)

Refused inputs are the errors whose message names what to fix: ``ConfigError`` (a config value), ``InputError``
(an argument or an output path), ``DataError`` (a data file or tokenizer), ``CheckpointError`` (an HF checkpoint)
and ``OSError`` (the file system's own, which names the path). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import traceback
from collections.abc import Iterator, Sequence

from elastic_jax.data import DataError
from elastic_jax.model.config import ConfigError

EXIT_REFUSED = 2


class InputError(ValueError):
  """An argument, input file or output path a command cannot use; the message names it and says what to do."""


def refused_errors() -> tuple[type[BaseException], ...]:
  """The exception types that are refused inputs (see the module docstring)."""
  from elastic_jax.interop.hf import CheckpointError  # pylint: disable=import-outside-toplevel
  return ConfigError, InputError, DataError, CheckpointError, OSError


def refusal_line(error: BaseException) -> str:
  """The one line printed for a refused input (newlines of a wrapped message joined)."""
  text = " | ".join(line.strip() for line in str(error).splitlines() if line.strip())
  return f"config error: {text}" if isinstance(error, ConfigError) else f"error: {text}"


def verbose(argv: Sequence[str] | None = None) -> bool:
  """Whether ``--verbosity`` (or ``-v``) >= 1 is among the arguments: tracebacks are then printed too."""
  args = list(sys.argv[1:] if argv is None else argv)
  for i, arg in enumerate(args):
    for flag in ("--verbosity", "-v"):
      value = arg[len(flag) + 1:] if arg.startswith(flag + "=") else (
          args[i + 1] if arg == flag and i + 1 < len(args) else None)
      if value is not None:
        try:
          return int(value) >= 1
        except ValueError:
          return False
  return False


def refuse(error: BaseException, show_traceback: bool = False) -> int:
  """Prints ``error`` as one line on stderr (after its traceback when asked); returns the exit status, 2."""
  if show_traceback:
    traceback.print_exception(error, file=sys.stderr)
  print(refusal_line(error), file=sys.stderr, flush=True)
  return EXIT_REFUSED


def exit_status(stop: SystemExit) -> int:
  """The exit status of a ``SystemExit`` caught by a ``main`` that returns one (callable in-process), as Python would
  give it: its integer code, 0 for none, else 1 after printing the code (e.g. "stopped by SIGTERM ...") on stderr."""
  if stop.code is None or isinstance(stop.code, int):
    return int(stop.code or 0)
  print(stop.code, file=sys.stderr, flush=True)
  return 1


@contextlib.contextmanager
def refusals(argv: Sequence[str] | None = None) -> Iterator[None]:
  """Turns a refused input raised inside into one line and ``SystemExit(2)``; bugs propagate unchanged."""
  try:
    yield
  except refused_errors() as error:
    raise SystemExit(refuse(error, verbose(argv))) from None


def unreadable_checkpoint(folder: str, error: BaseException) -> InputError:
  """The refusal of an Orbax checkpoint that cannot be read: its folder and the error's first line (Orbax and
  TensorStore name no folder, over dozens of frames)."""
  first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
  return InputError(f"{folder}: cannot read this Orbax checkpoint ({first}); is it complete? Write it again.")


def check_writable_dir(path: str, flag: str) -> None:
  """Refuses output folder ``path`` (``InputError`` naming ``flag`` and the path) unless it is a folder this process
  can write, or can be created in one; nothing is created."""
  _check_folder(path, flag, path)


def check_writable_file(path: str, flag: str) -> None:
  """Like :func:`check_writable_dir` for output file ``path``, which may exist if it can be overwritten."""
  if os.path.isdir(path):
    raise InputError(f"{flag} {path}: is a folder (give a file name)")
  if os.path.exists(path) and not os.access(path, os.W_OK):
    raise InputError(f"{flag} {path}: the file exists and cannot be overwritten (choose another name)")
  _check_folder(os.path.dirname(os.path.abspath(path)), flag, path)


def _check_folder(folder: str, flag: str, named: str) -> None:
  existing = os.path.abspath(folder)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise InputError(f"{flag} {named}: {existing} is a file, not a folder (choose a folder you can write to)")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise InputError(f"{flag} {named}: {existing} is not writable (choose a folder you can write to)")


def parse_config_flags(argv: list[str], flag_values=None) -> list[str]:
  """absl's flag parsing for a CLI with ``--config`` (``app.run(main, flags_parser=parse_config_flags)``): a bad
  flag (an override of the wrong type, or of a section or list entry the config does not have) is refused in one
  line instead of absl's usage text or a traceback. ``flag_values``: the CLI's own ``FlagValues`` (default: absl's
  global ``FLAGS``), for a command whose ``main`` can be called more than once in a process."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  try:
    return (flags.FLAGS if flag_values is None else flag_values)(argv)
  except flags.Error as error:  # e.g. "flag --config.eval.examples=abc: invalid literal for int() ..."
    message = str(error)
    if message.startswith("flag --"):
      key, _, what = message.removeprefix("flag --").removeprefix("config.").partition(": ")
      message = f"{key.partition('=')[0]}: {what}"
    refused = ConfigError(f"{message} (see --helpfull)")
  except (KeyError, AttributeError, IndexError) as error:  # ml_collections' own, over a long traceback
    text = str(error).replace("\\n", " ").replace("\\", "").strip("'")
    typo = re.search(r"(\w+)'?\s*Did you mean \"(\w+)\"", text)
    overrides = [arg.partition("=")[0].removeprefix("--config.") for arg in argv if arg.startswith("--config.")]
    refused = ConfigError(f"{typo[1]}: unknown key (did you mean {typo[2]}?)" if typo else
                          f"{', '.join(overrides)}: {text} (an override names a section or list entry the config "
                          "does not have)")
  sys.exit(refuse(refused, verbose(argv[1:])))
