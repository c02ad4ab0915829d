"""One-line config errors, ``<key>: <what> (<fix>)``, and the value checks that raise them.

Shared by the run config (``train.config``) and the dataclasses that validate their own fields the same way
(``train.memory.MemoryConfig``), which the config module imports and so cannot import it back.
"""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from elastic_jax.model.config import ConfigError


def config_error(key: str, what: str, fix: str | None = None) -> ConfigError:
  """``<key>: <what> (<fix>)``, the one line a CLI prints after ``config error:``."""
  return ConfigError(f"{key}: {what}" + (f" ({fix})" if fix else ""))


def key_path(where: str, name: Any) -> str:
  """The dotted key of entry ``name`` of section ``where`` (``stages[1]``, ``memory.remat``)."""
  where = where.removeprefix("config").removeprefix(".")
  return f"{where}[{name}]" if isinstance(name, int) else f"{where}.{name}" if where else str(name)


def check_keys(values: Mapping[str, Any], known: Sequence[str], where: str) -> None:
  """Refuses the first key of ``values`` not in ``known``, suggesting the closest known one."""
  for name in values:
    if name not in known:
      match = difflib.get_close_matches(str(name), [str(k) for k in known], n=1, cutoff=0.6)
      fix = f"did you mean {match[0]}?" if match else f"known keys: {', '.join(sorted(map(str, known)))}"
      raise config_error(key_path(where, name), "unknown key", fix)


def check_integer(key: str, value: Any, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    raise config_error(key, f"{value!r} must be an integer >= {minimum}",
                       "0 skips it" if minimum == 0 else None)


def check_number(key: str, value: Any, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise config_error(key, f"{value!r} must be a number")
  below = low is not None and (value <= low if low_open else value < low)
  above = high is not None and (value >= high if high_open else value > high)
  if below or above:
    left = "" if low is None else f"{'(' if low_open else '['}{low:g}, "
    right = "" if high is None else f"{high:g}{')' if high_open else ']'}"
    interval = f"{left}{right}" if low is not None and high is not None else (
        f"{'>' if low_open else '>='} {low:g}" if low is not None else f"{'<' if high_open else '<='} {high:g}")
    raise config_error(key, f"{value!r} is outside {interval}" if low is not None and high is not None
                       else f"{value!r} must be {interval}")


def check_one_of(key: str, value: Any, options: Sequence[str]) -> None:
  if value not in options:
    match = difflib.get_close_matches(str(value), list(options), n=1, cutoff=0.6)
    raise config_error(key, f"{value!r} is not one of {', '.join(map(str, options))}",
                       f"did you mean {match[0]}?" if match else None)


def check_boolean(key: str, value: Any) -> None:
  if not isinstance(value, bool):
    raise config_error(key, f"{value!r} must be True or False")


def check_string(key: str, value: Any) -> None:
  if not isinstance(value, str):
    raise config_error(key, f"{value!r} must be a string", "empty for the default")


def check_sequence(key: str, value: Any) -> list[Any]:
  if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
    raise config_error(key, f"{value!r} must be a list")
  return list(value)
