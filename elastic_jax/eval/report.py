"""The run's report: a JSON dump, a Markdown table with one verdict per budget, and PNG plots.

:func:`evaluate_and_report` builds it from what the main job produced (``train.result.PipelineResult``): it
measures the parent and every member's child and pruned baseline (:func:`family_rows`), then writes the files
(:func:`write_report`). The CLI only calls it.

How sure each number is (``eval.stats``): every accuracy carries its 95% Wilson interval; a child is compared with
its pruned baseline (the full-size member with the parent) problem by problem, since both answered the same
problems: the difference of their accuracies with the 95% interval of a paired bootstrap over problems, and a
verdict that says "not distinguishable" when that interval contains 0. Perplexity is one held-out number per model,
compared without an interval.

``rows`` are plain dicts, one per budget, with these keys (``None`` or absent = not measured):

  - ``budget`` (str): the budget's label, e.g. ``"6B"`` or ``"0.5"``; ``role`` "parent" marks the parent's row and
    ``full_size`` true the family's full-size member (no pruned baseline: the parent is its reference).
  - ``params`` (int): parameter count of the elastic child at this budget.
  - ``ppl`` (float): its held-out perplexity.
  - ``accuracy_short`` / ``accuracy_long`` (float in [0, 1]): its answer accuracy on short-context and long-context
    (distractor) task examples.
  - ``accuracy_short_per_problem`` / ``accuracy_long_per_problem`` (list of 0/1, in problem order): which problems
    it answered right; with them the report gives intervals and paired comparisons. ``accuracy_short_n`` (int)
    alone gives the interval only.
  - ``decode_tokens_per_s`` (float): its greedy decode speed, tokens per second (``eval.metrics.decode_speed``:
    the same batch of prompts and the same number of new tokens for every model of the report), and
    ``decode_timing``: how it was measured (``tokens``, ``seconds``, ``batch``, ``prompt_width``, ``new_tokens``,
    ``reps``). A wall-clock measurement: unlike the other keys, it differs from run to run.
  - ``baseline_params`` (int): parameter count of the pruned baseline of the same size.
  - ``baseline_ppl``, ``baseline_accuracy_short``, ``baseline_accuracy_long`` and their ``_per_problem`` lists,
    ``baseline_decode_tokens_per_s`` and ``baseline_decode_timing``: the same for it.

:func:`add_statistics` (run by :func:`write_report`) adds, where the data allow:

  - ``<accuracy key>_n`` and ``<accuracy key>_interval`` ([low, high], 95% Wilson) beside every accuracy;
  - ``accuracy_difference``: {"reference": "pruned baseline" or "parent", "all_sets": {...}, "short": {...},
    "long": {...}}, each entry {"diff", "low", "high", "verdict", "n"}: child minus reference accuracy over the
    problems of that set (``all_sets``: every set both measured, pooled), its 95% paired-bootstrap interval and
    "better" / "worse" / "not distinguishable";
  - ``retention`` (and ``baseline_retention``): {"ratio", "low", "high"}: its accuracy over every set measured as a
    fraction of the parent's, with a 95% paired-bootstrap interval (``high`` None: unbounded).

Other keys are kept in ``report.json`` only.

``curves`` is the training log: the path of a ``metrics.jsonl`` or its records (dicts with ``step`` and
``kd_per_budget``, a list with one KD loss per budget in ``rows`` order; an optional ``samples_per_budget`` marks
steps where a budget drew no sample, whose logged 0 is not a loss).

``router_choices`` maps each budget label to ``{axis: [kept width / parent width, one per block of that kind]}``,
``hidden`` with one value and ``depth`` with one value per parent layer (1 kept, 0 dropped);
:func:`choice_fractions` builds it from a deployed ``Choice``.

``stale`` lists the phases whose results were kept although the config changed since they ran (the main job's
``--reuse-stale``), each ``{"phase": name, "changes": ["key: old -> new", ...]}``: the report then says so first.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display, no GUI toolkit
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position
from matplotlib import ticker, transforms  # pylint: disable=wrong-import-position

import numpy as np  # pylint: disable=wrong-import-position

from elastic_jax.data import tasks  # pylint: disable=wrong-import-position
from elastic_jax.data.pipeline import data_factory, source_tokenizer  # pylint: disable=wrong-import-position
from elastic_jax.elastic import axes as axes_lib  # pylint: disable=wrong-import-position
from elastic_jax.elastic.importance import Rankings  # pylint: disable=wrong-import-position
from elastic_jax.elastic.masks import kept_blocks  # pylint: disable=wrong-import-position
from elastic_jax.elastic.param_count import param_count  # pylint: disable=wrong-import-position
from elastic_jax.elastic.space import Choice  # pylint: disable=wrong-import-position
from elastic_jax.eval.measure import eval_split_batches, measure_model  # pylint: disable=wrong-import-position
from elastic_jax.eval.stats import (difference_verdict, paired_bootstrap,  # pylint: disable=wrong-import-position
                                    paired_ratio_bootstrap, wilson_interval)
from elastic_jax.model import ModelConfig  # pylint: disable=wrong-import-position
from elastic_jax.model.config import BLOCK_KINDS, KINDS  # pylint: disable=wrong-import-position
from elastic_jax.train import distributed  # pylint: disable=wrong-import-position
from elastic_jax.train.config import section  # pylint: disable=wrong-import-position
from elastic_jax.train.loop import Stage, read_metrics_rows  # pylint: disable=wrong-import-position
from elastic_jax.train.result import PipelineResult  # pylint: disable=wrong-import-position

ROW_KEYS = ("budget", "params", "ppl", "accuracy_short", "accuracy_long", "decode_tokens_per_s", "baseline_params",
            "baseline_ppl", "baseline_accuracy_short", "baseline_accuracy_long")
_ACCURACY_KEYS = ("accuracy_short", "accuracy_long")
_DASH = "—"
# Every comparison resamples with the same seed, so a report is a function of the measurements alone.
_BOOTSTRAP = dict(samples=2000, seed=0)


def choice_fractions(config: ModelConfig, choice: Choice, depth_order: Sequence[int] | None = None
                     ) -> dict[str, list[float]]:
  """A deployed choice -> {axis: [kept / parent width per block of that kind]}, plus ``hidden`` as one value and
  ``depth`` as one value per parent layer: 1.0 kept, 0.0 dropped.

  ``depth_order`` (block indices, most important first: the importance phase's depth ranking) says which blocks a
  depth below the parent's drops; without it such a choice gets no ``depth`` entry.
  """
  full = Choice.full(config)
  fractions = {"hidden": [choice.hidden / full.hidden]}
  for axis in axes_lib.block_axis_names():
    kept, parent = getattr(choice, axis), getattr(full, axis)
    if parent:
      fractions[axis] = [k / p for k, p in zip(kept, parent)]
  if choice.depth >= config.num_layers or depth_order is not None:
    kept = set(kept_blocks(choice.depth, depth_order, config.num_layers).tolist())
    fractions["depth"] = [float(layer in kept) for layer in range(config.num_layers)]
  return fractions


def _number(value: Any) -> float | None:
  return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


# ------------------------------------------------------------------------------------------------ statistics
def _set_name(key: str) -> str:
  """``"accuracy_short"`` -> ``"short"``."""
  return key.split("_", 1)[1]


def _counts(row: Mapping[str, Any], key: str) -> tuple[int, int] | None:
  """(correct, n) of accuracy ``key`` (e.g. ``"baseline_accuracy_long"``): from its per-problem list, else from its
  ``_n``; None when neither is there."""
  per_problem = row.get(f"{key}_per_problem")
  if per_problem is not None:
    return sum(bool(x) for x in per_problem), len(per_problem)
  n, accuracy = row.get(f"{key}_n"), _number(row.get(key))
  if n is None or accuracy is None:
    return None
  return round(accuracy * int(n)), int(n)


def _paired_sets(row: Mapping[str, Any], prefix: str, reference: Mapping[str, Any], reference_prefix: str
                 ) -> list[tuple[str, list, list]]:
  """(set name, row's per-problem list, reference's) for every accuracy set both have per-problem results of the
  same problems for."""
  paired = []
  for key in _ACCURACY_KEYS:
    ours, theirs = row.get(f"{prefix}{key}_per_problem"), reference.get(f"{reference_prefix}{key}_per_problem")
    if ours is not None and theirs is not None and len(ours) == len(theirs) and len(ours):
      paired.append((_set_name(key), list(ours), list(theirs)))
  return paired


def _difference(paired: Sequence[tuple[str, list, list]]) -> dict[str, Any]:
  """Per set and pooled over the sets: mean(row) - mean(reference), its paired-bootstrap interval, the verdict."""
  def entry(ours: list, theirs: list) -> dict[str, Any]:
    result = paired_bootstrap(ours, theirs, **_BOOTSTRAP)
    return {**result, "verdict": difference_verdict(result["low"], result["high"]), "n": len(ours)}
  pooled = entry([x for _, ours, _ in paired for x in ours], [x for _, _, theirs in paired for x in theirs])
  return {"all_sets": pooled, **{name: entry(ours, theirs) for name, ours, theirs in paired}}


def _retention(row: Mapping[str, Any], prefix: str, parent: Mapping[str, Any]) -> dict[str, Any] | None:
  """Accuracy over every set both measured as a fraction of the parent's, with its paired-bootstrap interval (a
  point value when per-problem results are missing)."""
  paired = _paired_sets(row, prefix, parent, "")
  if paired:
    return paired_ratio_bootstrap([x for _, ours, _ in paired for x in ours],
                                  [x for _, _, theirs in paired for x in theirs], **_BOOTSTRAP)
  shared = [key for key in _ACCURACY_KEYS
            if _number(row.get(f"{prefix}{key}")) is not None and _number(parent.get(key)) is not None]
  if not shared:
    return None
  ours = sum(float(row[f"{prefix}{key}"]) for key in shared)
  theirs = sum(float(parent[key]) for key in shared)
  return {"ratio": ours / theirs if theirs else None, "low": None, "high": None}


def add_statistics(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Copies of ``rows`` with the derived keys of the module docstring: Wilson intervals, the paired difference of
  each child from its pruned baseline (the full-size member: from the parent) and the retention of the parent's
  accuracy. Deterministic: the same rows give the same numbers."""
  rows = [dict(row) for row in rows]
  parent = next((row for row in rows if row.get("role") == "parent"), None)
  for row in rows:
    for prefix in ("", "baseline_"):
      for key in _ACCURACY_KEYS:
        counts = _counts(row, f"{prefix}{key}")
        if counts is not None:
          row[f"{prefix}{key}_n"] = counts[1]
          row[f"{prefix}{key}_interval"] = list(wilson_interval(*counts))
    if row is parent:
      continue
    if row.get("full_size"):
      reference, reference_prefix, name = parent, "", "parent"
    else:
      reference, reference_prefix, name = row, "baseline_", "pruned baseline"
    paired = [] if reference is None else _paired_sets(row, "", reference, reference_prefix)
    if paired:
      row["accuracy_difference"] = {"reference": name, **_difference(paired)}
    if parent is not None:
      for prefix in ("", "baseline_"):
        retention = _retention(row, prefix, parent)
        if retention is not None:
          row[f"{prefix}retention"] = retention
  return rows


# ------------------------------------------------------------------------------------------------ formatting
def format_params(value: Any) -> str:
  return _DASH if value is None else f"{int(value):,}"


def format_ppl(value: Any) -> str:
  return _DASH if _number(value) is None else f"{float(value):.3f}"


def format_speed(value: Any) -> str:
  """Tokens per second: ``1234.5`` -> ``"1,234"``."""
  return _DASH if _number(value) is None else f"{float(value):,.0f}"


def format_accuracy(value: Any, interval: Sequence[float] | None = None) -> str:
  """``0.613`` -> ``"61.3%"``; with its interval ``"61.3% [55.2, 67.1]"`` (percent)."""
  if _number(value) is None:
    return _DASH
  text = f"{100 * float(value):.1f}%"
  return text if interval is None else f"{text} [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def format_retention(retention: Mapping[str, Any] | None) -> str:
  """``{"ratio": 1.04, "low": 0.85, "high": 1.25}`` -> ``"104% [85, 125]"``."""
  if not retention or retention.get("ratio") is None:
    return _DASH
  text = f"{100 * retention['ratio']:.0f}%"
  if retention.get("low") is None:
    return text
  high = "unbounded" if retention.get("high") is None else f"{100 * retention['high']:.0f}"
  return f"{text} [{100 * retention['low']:.0f}, {high}]"


def format_difference(entry: Mapping[str, Any]) -> str:
  """``{"diff": 0.25, "low": 0.141, "high": 0.359}`` -> ``"+25.0 points [+14.1, +35.9]"``."""
  return f"{100 * entry['diff']:+.1f} points [{100 * entry['low']:+.1f}, {100 * entry['high']:+.1f}]"


def _accuracy_cell(row: Mapping[str, Any], key: str) -> str:
  return format_accuracy(row.get(key), row.get(f"{key}_interval"))


def _sets_phrase(names: Sequence[str]) -> str:
  return f"the {names[0]} set" if len(names) == 1 else f"the {', '.join(names[:-1])} and {names[-1]} sets"


def _difference_sentence(difference: Mapping[str, Any], subject: str, short_subject: str) -> str:
  """"in accuracy <subject> is better than the <reference>: ..." (or "is worse than", or "and the <reference> are
  not distinguishable"), judged by the interval pooled over the sets, each set's difference listed after it."""
  reference = difference["reference"]
  pooled = difference["all_sets"]
  names = [name for name in (_set_name(key) for key in _ACCURACY_KEYS) if name in difference]
  verdict_word = pooled["verdict"]
  if verdict_word == "better":
    head = f"in accuracy {subject} is better than the {reference}"
  elif verdict_word == "worse":
    head = f"in accuracy {subject} is worse than the {reference}"
  else:
    head = f"in accuracy {subject} and the {reference} are {verdict_word}"
  reference_word = reference.split()[-1]
  text = (f"{head}: {short_subject} minus {reference_word} {format_difference(pooled)} (95% paired-bootstrap "
          f"interval) over the {pooled['n']} problems of {_sets_phrase(names)}")
  if len(names) > 1:
    text += "; " + ", ".join(f"{name} {format_difference(difference[name]).replace(' points', '')}"
                             for name in names)
  return text + "."


def _retention_sentence(row: Mapping[str, Any], subject: str) -> str | None:
  if format_retention(row.get("retention")) == _DASH:
    return None
  text = f"{subject} keeps {format_retention(row['retention'])} of the parent's accuracy"
  if format_retention(row.get("baseline_retention")) != _DASH:
    text += f" (the pruned baseline {format_retention(row['baseline_retention'])})"
  return text + "."


def _point_comparison(row: Mapping[str, Any], shared: Sequence[str], has_ppl: bool) -> str:
  """The verdict from point values alone, for rows without per-problem results."""
  wins, details = [], []
  if shared:
    elastic = sum(float(row[key]) for key in shared) / len(shared)
    baseline = sum(float(row[f"baseline_{key}"]) for key in shared) / len(shared)
    wins.append(("accuracy", elastic > baseline))
    details.append(f"mean accuracy {format_accuracy(elastic)} vs {format_accuracy(baseline)}")
  if has_ppl:
    wins.append(("perplexity", float(row["ppl"]) < float(row["baseline_ppl"])))
    details.append(f"perplexity {format_ppl(row['ppl'])} vs {format_ppl(row['baseline_ppl'])}")
  better = [name for name, won in wins if won]
  worse = [name for name, won in wins if not won]
  if not worse:
    summary = f"is better than the pruned baseline in {' and '.join(better)}"
  elif not better:
    summary = f"is not better than the pruned baseline in {' or '.join(worse)}"
  else:
    summary = f"is better than the pruned baseline in {better[0]} but not in {worse[0]}"
  return (f"the elastic child {summary} ({', '.join(details)}). Point values only: no per-problem results, so no "
          "interval.")


def verdict(row: Mapping[str, Any]) -> str:
  """One paragraph per row, from the keys :func:`add_statistics` adds.

  - The parent (``role`` "parent"): its accuracies with their intervals and its perplexity.
  - The full-size member (``full_size``): nothing is pruned at that size, so it has no pruned baseline and the
    parent row is its reference: its paired accuracy difference from the parent.
  - Every other child: its paired accuracy difference from the pruned baseline of its size, judged by the pooled
    interval (better / worse / not distinguishable), and its perplexity against the baseline's (one held-out number
    each, no interval: lower is better).
  - Children: the share of the parent's accuracy they keep.

  Without per-problem results the accuracy comparison falls back to point values, and says so.
  """
  budget = row["budget"]
  if row.get("role") == "parent":
    measured = [f"{key.replace('_', ' ')} {_accuracy_cell(row, key)}" for key in _ACCURACY_KEYS
                if _number(row.get(key)) is not None]
    if _number(row.get("ppl")) is not None:
      measured.append(f"perplexity {format_ppl(row['ppl'])}")
    return f"The parent, the frozen teacher of every child: {', '.join(measured) or 'not measured'}."
  if row.get("full_size"):
    sentences = [f"Budget {budget}: the full-size member; nothing is pruned at this size, so the parent row is its "
                 "reference."]
    if "accuracy_difference" in row:
      sentence = _difference_sentence(row["accuracy_difference"], "the full-size member", "member")
      sentences.append(sentence[0].upper() + sentence[1:])
    sentences.append(_retention_sentence(row, "It"))
    return " ".join(s for s in sentences if s)
  shared = [key for key in _ACCURACY_KEYS
            if _number(row.get(key)) is not None and _number(row.get(f"baseline_{key}")) is not None]
  has_ppl = _number(row.get("ppl")) is not None and _number(row.get("baseline_ppl")) is not None
  if not shared and not has_ppl:
    return f"Budget {budget}: no pruned baseline measured at this size, so no comparison."
  if "accuracy_difference" not in row:
    sentences = [_point_comparison(row, shared, has_ppl)]
  else:
    sentences = [_difference_sentence(row["accuracy_difference"], "the elastic child", "child")]
    if has_ppl:
      lower = float(row["ppl"]) < float(row["baseline_ppl"])
      sentences.append(f"In perplexity it is {'better' if lower else 'not better'}: {format_ppl(row['ppl'])} vs "
                       f"{format_ppl(row['baseline_ppl'])} (one held-out number each, no interval).")
  sentences.append(_retention_sentence(row, "It"))
  return f"Budget {budget}: " + " ".join(s for s in sentences if s)


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
  header = ("| budget | params | ppl | accuracy short | accuracy long | retention | decode tok/s | pruned params "
            "| pruned ppl | pruned accuracy short | pruned accuracy long |")
  lines = [header, "|" + "---|" * 11]
  for row in rows:
    cells = [str(row["budget"]), format_params(row.get("params")), format_ppl(row.get("ppl")),
             _accuracy_cell(row, "accuracy_short"), _accuracy_cell(row, "accuracy_long"),
             format_retention(row.get("retention")), format_speed(row.get("decode_tokens_per_s")),
             format_params(row.get("baseline_params")), format_ppl(row.get("baseline_ppl")),
             _accuracy_cell(row, "baseline_accuracy_short"), _accuracy_cell(row, "baseline_accuracy_long")]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


_TABLE_NOTE = ("Accuracy: exact match of the final answer, with its 95% Wilson interval in brackets (percent). "
               "Retention: the child's accuracy over every set as a share of the parent's, with its 95% "
               "paired-bootstrap interval.")


def table_note(rows: Sequence[Mapping[str, Any]]) -> str:
  """The note under the table: what its columns mean, the decode timing's settings when the rows have one."""
  timing = next((row["decode_timing"] for row in rows if row.get("decode_timing")), None)
  if timing is None:
    return _TABLE_NOTE
  n = timing["new_tokens"]
  return (f"{_TABLE_NOTE} Decode tok/s: greedy decoding of a batch of {timing['batch']} prompts (padded to "
          f"{timing['prompt_width']} tokens), batch x ({n} - 1) tokens over T({n}) - T(1), the time of a {n}-token "
          f"call less that of a 1-token call (its prefill), the fastest of {timing['reps']} calls each after a "
          "compiled warm-up; the same batch for every row, timed on this run's machine (it changes from run to run).")


def read_metrics(curves: str | os.PathLike | Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """The training records from a ``metrics.jsonl`` path, or the given records as a list."""
  if isinstance(curves, (str, os.PathLike)):
    return read_metrics_rows(curves)
  return [dict(record) for record in curves]


def _json_text(value: Any, depth: int = 0) -> str:
  """JSON indented by 2, except that a list of plain values (a per-problem list, an interval) stays on one line."""
  inner, outer = "  " * (depth + 1), "  " * depth
  if isinstance(value, Mapping):
    if not value:
      return "{}"
    items = [f"{inner}{json.dumps(str(k))}: {_json_text(v, depth + 1)}" for k, v in value.items()]
    return "{\n" + ",\n".join(items) + "\n" + outer + "}"
  if isinstance(value, (list, tuple)) and any(isinstance(v, (Mapping, list, tuple)) for v in value):
    return "[\n" + ",\n".join(inner + _json_text(v, depth + 1) for v in value) + "\n" + outer + "]"
  return json.dumps(list(value) if isinstance(value, tuple) else value, default=float)


# ------------------------------------------------------------------------------------------------ plots
def _count_label(value: float, _position: Any = None) -> str:
  """A parameter count on an axis: 501096 -> "501k", 12.3e9 -> "12.3B"."""
  for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
    if abs(value) >= scale:
      return f"{value / scale:.3g}{suffix}"
  return f"{value:.0f}"


def _interval_of(row: Mapping[str, Any], key: str) -> tuple[float, float]:
  """The row's interval of accuracy ``key``, or the point itself when it has none (no error bar)."""
  interval = row.get(f"{key}_interval")
  if interval is None:
    counts = _counts(row, key)
    interval = wilson_interval(*counts) if counts else (float(row[key]), float(row[key]))
  return float(interval[0]), float(interval[1])


def plot_accuracy_vs_params(rows: Sequence[Mapping[str, Any]], path: str) -> dict[str, Any]:
  """Accuracy against parameter count with 95% interval bars: one panel per task set (short, long), the elastic
  children and the pruned baselines as lines, the parent as a star and a dotted level.

  Returns:
    What was plotted, {set: {"elastic" | "pruned" | "parent": {"budgets", "params", "accuracy", "low", "high"}}}
    (fractions, not percent; points in parameter order); empty, and no file written, when nothing was measured.
  """
  sets = [key for key in _ACCURACY_KEYS
          if any(_number(row.get(f"{prefix}{key}")) is not None and row.get(f"{prefix}params") is not None
                 for row in rows for prefix in ("", "baseline_"))]
  if not sets:
    return {}
  figure, panels = plt.subplots(1, len(sets), figsize=(5.5 * len(sets), 4.3), sharey=True, squeeze=False)
  plotted: dict[str, Any] = {}
  lines = (("elastic", "", "-o", "tab:blue", -4), ("pruned", "baseline_", "--s", "tab:orange", 4),
           ("parent", "", "*", "black", 8))
  for panel, key in zip(panels[0], sets):
    series = plotted.setdefault(_set_name(key), {})
    for name, prefix, style, color, dodge in lines:
      points = sorted((float(row[f"{prefix}params"]), float(row[f"{prefix}{key}"]), *_interval_of(row, prefix + key),
                       str(row["budget"]))
                      for row in rows
                      if (row.get("role") == "parent") == (name == "parent")
                      and row.get(f"{prefix}params") is not None and _number(row.get(f"{prefix}{key}")) is not None)
      if not points:
        continue
      params, accuracy, low, high, budgets = (list(column) for column in zip(*points))
      series[name] = {"budgets": budgets, "params": params, "accuracy": accuracy, "low": low, "high": high}
      # A child, its baseline and (at full size) the parent have nearly the same size: their bars are drawn a few
      # points apart.
      shifted = transforms.offset_copy(panel.transData, fig=figure, x=dodge, units="points")
      errors = [[100 * (a - l) for a, l in zip(accuracy, low)], [100 * (h - a) for a, h in zip(accuracy, high)]]
      drawn = panel.errorbar(params, [100 * a for a in accuracy], yerr=errors, fmt=style, color=color, capsize=3,
                             markersize=12 if name == "parent" else 6, label=name)
      for artist in drawn.get_children():  # after autoscaling, which reads the unshifted data
        artist.set_transform(shifted)
      if name == "parent":
        panel.axhline(100 * accuracy[0], color=color, linestyle=":", alpha=0.5)
      elif name == "elastic":
        for x, y, budget in zip(params, accuracy, budgets):
          panel.annotate(budget, (x, 100 * y), textcoords="offset points", xytext=(-6, 8), ha="right", fontsize=8,
                         color=color)
    n = next((row.get(f"{key}_n") for row in rows if row.get(f"{key}_n") is not None), None)
    panel.set_title(f"{_set_name(key)} set" + (f" ({n} problems)" if n else ""))
    panel.set_xlabel("parameters")
    panel.xaxis.set_major_formatter(ticker.FuncFormatter(_count_label))
    panel.set_ylim(0, 100)
    panel.margins(x=0.1)
    panel.grid(alpha=0.3)
  panels[0][0].set_ylabel("answer accuracy (%), 95% interval")
  panels[0][0].legend(loc="upper left")
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)
  return plotted


def plot_loss_curves(records: Sequence[Mapping[str, Any]], labels: Sequence[str], path: str) -> bool:
  """KD loss per budget against step; False when the records hold no ``kd_per_budget``."""
  records = [r for r in records if "kd_per_budget" in r]
  if not records:
    return False
  num_budgets = len(records[0]["kd_per_budget"])
  figure, axes = plt.subplots(figsize=(6, 4))
  for budget in range(num_budgets):
    points = [(r["step"], r["kd_per_budget"][budget]) for r in records
              if "samples_per_budget" not in r or r["samples_per_budget"][budget] > 0]
    label = labels[budget] if len(labels) == num_budgets else f"budget {budget}"
    if points:
      axes.plot(*zip(*points), label=str(label))
  axes.set_xlabel("step")
  axes.set_ylabel("KD loss")
  axes.grid(alpha=0.3)
  axes.legend()
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)
  return True


def _axis_layers(axis: str, pattern: str | None, count: int) -> list[int] | None:
  """The parent layer (pattern index) of each block of ``axis``' kind, when the pattern is known and fits."""
  try:
    kind = axes_lib.get(axis).kind
  except KeyError:
    return None
  if kind is None or pattern is None:
    return None
  layers = [index for index, ch in enumerate(pattern) if BLOCK_KINDS.get(ch) == kind]
  return layers if len(layers) == count else None


def _axis_title(axis: str) -> str:
  try:
    return f"{axis}\nkept {axes_lib.get(axis).unit}s / parent"
  except KeyError:
    return f"{axis}\nkept / parent"


_MAX_LABELLED_COLUMNS = 24  # beyond this, cells lose their numbers and every few columns their tick label


def _cell_grid(panel: Any, budgets: Sequence[str], labels: Sequence[str]) -> None:
  """Budget rows and labelled columns, with white lines between the cells."""
  step = max(1, math.ceil(len(labels) / _MAX_LABELLED_COLUMNS))
  panel.set_xticks(range(0, len(labels), step), list(labels)[::step], fontsize=8)
  panel.set_yticks(range(len(budgets)), budgets)
  panel.set_xticks(np.arange(-0.5, len(labels)), minor=True)
  panel.set_yticks(np.arange(-0.5, len(budgets)), minor=True)
  panel.grid(which="minor", color="white", linewidth=2)
  panel.tick_params(which="minor", length=0)
  panel.set_ylabel("budget")


def _bar_panel(panel: Any, budgets: Sequence[str], values: Sequence[float | None]) -> None:
  """One bar per budget (an axis with a single value per budget); a dropped block gets no bar, its label says so."""
  bars = panel.bar(range(len(budgets)), [0.0 if v is None else v for v in values], color="tab:blue", width=0.6)
  for bar, value in zip(bars, values):
    panel.annotate("dropped" if value is None else f"{value:.2f}", (bar.get_x() + bar.get_width() / 2,
                                                                    bar.get_height()),
                   textcoords="offset points", xytext=(0, 3), ha="center", fontsize=9)
  panel.set_xticks(range(len(budgets)), budgets)
  panel.set_xlabel("budget")
  panel.set_ylim(0, 1.15)
  panel.grid(axis="y", alpha=0.3)


def _width_panel(panel: Any, budgets: Sequence[str], labels: Sequence[str], values: Sequence[Sequence[float | None]]
                 ) -> Any:
  """Budgets x blocks, each cell the kept fraction, dropped blocks hatched grey; returns the image (colorbar)."""
  grid = np.ma.masked_invalid(np.asarray([[np.nan if v is None else v for v in row] for row in values], float))
  panel.set_facecolor("0.88")  # masked (dropped) cells show the face
  image = panel.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto")
  for i, row in enumerate(values):
    for j, value in enumerate(row):
      if value is None:
        panel.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="//", edgecolor="0.6", lw=0))
        if len(labels) <= _MAX_LABELLED_COLUMNS:
          panel.text(j, i, "dropped", ha="center", va="center", fontsize=7, color="0.3")
      elif len(labels) <= _MAX_LABELLED_COLUMNS:
        panel.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                   color="white" if value < 0.6 else "black")
  _cell_grid(panel, budgets, labels)
  return image


def _depth_panel(panel: Any, budgets: Sequence[str], kept: Sequence[Sequence[bool]], pattern: str | None) -> None:
  """Budgets x every parent layer: kept layers filled, dropped ones grey with a red cross."""
  length = len(kept[0])
  panel.imshow(np.asarray(kept, float), cmap=matplotlib.colors.ListedColormap(["0.9", "tab:blue"]), vmin=0, vmax=1,
               aspect="auto")
  for i, row in enumerate(kept):
    for j, value in enumerate(row):
      if not value:
        panel.text(j, i, "×", ha="center", va="center", fontsize=12, color="tab:red")
  kinds = pattern is not None and len(pattern) == length
  _cell_grid(panel, budgets, [f"{j}\n{pattern[j]}" if kinds else str(j) for j in range(length)])
  legend = ", ".join(f"{kind.char} {kind.title}" for kind in KINDS if kind.char in (pattern or ""))
  panel.set_xlabel("parent layer" + (f" and its block kind ({legend})" if kinds else ""))
  panel.set_title("depth: kept layers (blue), dropped layers (×): "
                  + ", ".join(f"{b} keeps {sum(row)} of {length}" for b, row in zip(budgets, kept)))


def plot_router_choices(router_choices: Mapping[str, Mapping[str, Sequence[float]]], path: str,
                        pattern: str | None = None) -> dict[str, Any]:
  """The deployed choices, one panel per axis, readable at a glance.

  - An axis with one value per budget (``hidden``, or a kind with a single block): a bar per budget.
  - A per-block axis: a grid of budgets x the blocks of its kind (labelled with their parent layer when
    ``pattern``, the parent's block pattern, is given), each cell the kept fraction; blocks that depth drops are
    hatched and marked "dropped".
  - ``depth``: a full-width grid of budgets x every parent layer, kept layers filled, dropped ones crossed out.

  Returns:
    What was plotted, {axis: {"kind": "bars", "budgets", "values"} | {"kind": "grid", "budgets", "layers",
    "values"} | {"kind": "depth", "budgets", "layers", "kept"}}; a dropped block's value is None, ``layers`` the
    parent layer of each column (None when unknown). Empty, and no file written, when there is nothing to plot.
  """
  budgets = [str(b) for b in router_choices]
  choices = list(router_choices.values())
  width_axes = [a for a in ("hidden", *axes_lib.block_axis_names()) if any(a in c for c in choices)]
  width_axes += sorted({a for c in choices for a in c} - {*width_axes, "depth"})
  has_depth = any("depth" in c for c in choices)
  if not width_axes and not has_depth:
    return {}
  plotted: dict[str, Any] = {}
  if has_depth:
    length = max(len(c.get("depth", ())) for c in choices)
    kept = [[bool(v) for v in c["depth"]] if "depth" in c else [True] * length for c in choices]
    plotted["depth"] = {"kind": "depth", "budgets": budgets, "layers": list(range(length)), "kept": kept}
  dropped = [None if "depth" not in c else [not v for v in c["depth"]] for c in choices]
  for axis in width_axes:
    count = max(len(c.get(axis, ())) for c in choices)
    layers = _axis_layers(axis, pattern, count)
    values = []
    for choice, drops in zip(choices, dropped):
      row = [float(v) for v in choice.get(axis, ())] + [None] * (count - len(choice.get(axis, ())))
      if layers is not None and drops is not None:
        row = [None if drops[layer] else v for v, layer in zip(row, layers)]
      values.append(row)
    if count == 1:
      plotted[axis] = {"kind": "bars", "budgets": budgets, "values": [row[0] for row in values]}
    else:
      plotted[axis] = {"kind": "grid", "budgets": budgets, "layers": layers, "values": values}

  columns = min(3, max(1, len(width_axes)))
  width_rows = math.ceil(len(width_axes) / columns)
  row_height = 2.4 + 0.35 * len(budgets)
  figure = plt.figure(figsize=(5.0 * columns, row_height * (width_rows + 0.8 * has_depth)))
  spec = figure.add_gridspec(width_rows + has_depth, columns, height_ratios=[1] * width_rows + [0.8] * has_depth)
  for index, axis in enumerate(width_axes):
    panel = figure.add_subplot(spec[index // columns, index % columns])
    series = plotted[axis]
    if series["kind"] == "bars":
      _bar_panel(panel, budgets, series["values"])
      layers = _axis_layers(axis, pattern, 1)
      panel.set_title(_axis_title(axis) + (f" (layer {layers[0]})" if layers else ""))
    else:
      layers = series["layers"]
      labels = [f"layer {l}" for l in layers] if layers else [f"block {j}" for j in range(len(series["values"][0]))]
      image = _width_panel(panel, budgets, labels, series["values"])
      figure.colorbar(image, ax=panel, fraction=0.05, pad=0.03)
      panel.set_title(_axis_title(axis))
  if has_depth:
    _depth_panel(figure.add_subplot(spec[width_rows, :]), budgets, plotted["depth"]["kept"], pattern)
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)
  return plotted


def write_report(workdir: str | os.PathLike, rows: Sequence[Mapping[str, Any]],
                 curves: str | os.PathLike | Iterable[Mapping[str, Any]] | None = None,
                 router_choices: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
                 curve_labels: Sequence[str] | None = None,
                 stale: Sequence[Mapping[str, Any]] = (), pattern: str | None = None) -> dict[str, str]:
  """Writes ``report.json``, ``report.md`` and the plots that have data into ``workdir``.

  Args:
    workdir: output folder (created if missing).
    rows: one dict per budget (keys in the module docstring); ``budget`` is required. The report holds them with
      the keys :func:`add_statistics` derives.
    curves: a ``metrics.jsonl`` path or its records, for the loss curves.
    router_choices: {budget: {axis: [fraction per block]}} (:func:`choice_fractions`), for the router-choice plot.
    curve_labels: names of the ``kd_per_budget`` entries, in order (default: the rows' budgets, for when the rows
      are exactly the trained budgets; pass them when the table has extra rows such as the parent).
    stale: phases kept under older config values (module docstring); listed in ``report.json`` under
      ``stale_phases`` and as a warning at the top of ``report.md``.
    pattern: the parent's block pattern (e.g. ``"M-M*M-"``): the router plot then names each block's layer.

  Returns:
    {"json", "markdown", and each plot written: "accuracy_plot", "loss_plot", "router_plot"}: file paths.
  """
  workdir = os.fspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  for index, row in enumerate(rows):
    if "budget" not in row:
      raise ValueError(f"report row {index} has no 'budget' label: {row}")
  rows = add_statistics(rows)
  paths = {"json": os.path.join(workdir, "report.json"), "markdown": os.path.join(workdir, "report.md")}
  plots = []
  if plot_accuracy_vs_params(rows, os.path.join(workdir, "accuracy_vs_params.png")):
    paths["accuracy_plot"] = os.path.join(workdir, "accuracy_vs_params.png")
    plots.append(("Accuracy vs parameters", "accuracy_vs_params.png"))
  if curves is not None:
    records = read_metrics(curves)
    labels = list(curve_labels) if curve_labels is not None else [str(row["budget"]) for row in rows]
    if plot_loss_curves(records, labels, os.path.join(workdir, "loss_curves.png")):
      paths["loss_plot"] = os.path.join(workdir, "loss_curves.png")
      plots.append(("KD loss per budget", "loss_curves.png"))
  if router_choices and plot_router_choices(router_choices, os.path.join(workdir, "router_choices.png"), pattern):
    paths["router_plot"] = os.path.join(workdir, "router_choices.png")
    plots.append(("Router choices per layer", "router_choices.png"))

  verdicts = [verdict(row) for row in rows]
  stale = [{"phase": str(note["phase"]), "changes": [str(c) for c in note["changes"]]} for note in stale]
  report = {"rows": rows, "verdicts": verdicts, **({"stale_phases": stale} if stale else {}),
            "router_choices": {str(k): {a: list(map(float, v)) for a, v in c.items()}
                               for k, c in (router_choices or {}).items()},
            "plots": {key: os.path.basename(p) for key, p in paths.items() if key.endswith("_plot")}}
  with open(paths["json"], "w", encoding="utf-8") as f:
    f.write(_json_text(report) + "\n")
  markdown = ["# Elastic evaluation report", ""]
  if stale:
    markdown += ["**Stale results**: these phases were kept (`--reuse-stale`) although the config changed since "
                 "they ran, so this report does not describe the current config:", "",
                 *[f"- {note['phase']}: {'; '.join(note['changes'])}" for note in stale], ""]
  markdown += [markdown_table(rows), "", table_note(rows), "", *[f"- {v}" for v in verdicts]]
  for title, name in plots:
    markdown += ["", f"## {title}", "", f"![{title}]({name})"]
  with open(paths["markdown"], "w", encoding="utf-8") as f:
    f.write("\n".join(markdown) + "\n")
  return paths


# ------------------------------------------------------------------------------------------------ from a run
Measure = Callable[[ModelConfig, Any], Mapping[str, Any]]


def family_rows(result: PipelineResult, measure: Measure) -> list[dict[str, Any]]:
  """The report's rows: the parent, then one per family member with its pruned baseline's metrics beside it.

  ``measure(config, params)`` gives a model's metrics (``ppl``, ``accuracy_short``, ``accuracy_long`` and their
  ``_per_problem`` lists; a baseline's get the ``baseline_`` prefix). It is called for the parent, then for each
  member's child and, unless the member is full-size, its baseline, in that order.
  """
  parent_params = param_count(result.config)
  rows = [{"budget": "parent", "role": "parent", "params": parent_params, **measure(result.config, result.parent)}]
  for member in result.members:
    child, baseline = member.child, member.baseline
    row = {"budget": member.name, "params": child.param_count, **measure(child.config, child.params)}
    if baseline.param_count == parent_params:  # nothing pruned: the parent row is the reference
      row["full_size"] = True
    else:
      row["baseline_params"] = baseline.param_count
      row.update({f"baseline_{k}": v for k, v in measure(baseline.config, baseline.params).items()})
    rows.append(row)
  return rows


def evaluate_and_report(cfg: Any, result: PipelineResult) -> dict[str, str]:
  """Perplexity, answer accuracy (short and long tasks, with which problems each model got right) and greedy decode
  speed of the parent and of every child and baseline under ``cfg.eval``; writes the report into ``result.workdir``
  (:func:`write_report`: intervals, paired comparisons, retention, plots) and returns its files (empty on every
  process but process 0)."""
  eval_cfg = section(cfg, "eval")
  source = result.source
  tokenizer = result.tokenizer or source_tokenizer(source)  # the one the data was tokenized with
  # Every process reads the same full batches and examples; each batch is split over the mesh's data-parallel
  # devices and the results gathered, so every process computes the same report (process 0 writes it).
  stage = Stage("eval", 1, eval_cfg["batch_size"], eval_cfg["seq_len"], (1.0,))
  num_batches = eval_cfg["ppl_batches"]
  if source.kind == "tasks":  # the tasks' evaluation split: it never shares a problem with the training split
    ppl_batches = eval_split_batches(source.stage_tasks[0], int(cfg.seed), tokenizer, batches=num_batches,
                                     batch_size=stage.batch_size, seq_len=stage.seq_len)
  else:  # a file corpus has no split of its own: its documents in another order than training's (not held out)
    other_order = data_factory(source, seed=int(cfg.seed) + 104729, tokenizer=tokenizer,
                               vocab_size=result.config.vocab_size, process_index=0, process_count=1)
    ppl_batches = [np.asarray(next(other_order(stage, 0))) for _ in range(num_batches)]
  n = eval_cfg["examples"]
  short = tasks.generate_examples(source.stage_tasks[0], int(cfg.seed), "eval", n)
  long = tasks.generate_examples(source.stage_tasks[-1], int(cfg.seed) + 1, "eval", n)

  def measure(config: ModelConfig, params: Any) -> dict[str, Any]:
    measured = measure_model(config, params, ppl_batches, {"short": short, "long": long}, tokenizer,
                             max_new_tokens=eval_cfg["max_new_tokens"], decode_batch=eval_cfg["decode_batch"],
                             time_decode=True, mesh=result.mesh, rules=result.rules)
    row = {"ppl": measured["ppl"]}
    for label, graded in measured["accuracy"].items():
      row[f"accuracy_{label}"] = graded["accuracy"]
      row[f"accuracy_{label}_per_problem"] = [int(right) for right in graded["per_problem"]]
    if measured["decode"] is not None:
      row["decode_tokens_per_s"] = measured["decode"]["tokens_per_s"]
      row["decode_timing"] = measured["decode"]
    return row

  rows = family_rows(result, measure)
  depth_order = _depth_order(result.workdir)
  router_choices = {member.name: choice_fractions(result.config, member.child.choice, depth_order)
                    for member in result.members}
  if not distributed.is_primary():  # the report is written once, by process 0
    return {}
  return write_report(result.workdir, rows, result.metrics_path, router_choices, curve_labels=list(router_choices),
                      stale=result.stale, pattern=result.config.pattern)


def _depth_order(workdir: str) -> list[int] | None:
  """The importance phase's depth ranking (which blocks a smaller depth drops), None when the run has none."""
  path = os.path.join(workdir, "importance", "rankings.json")
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    depth = Rankings.from_json(json.load(f), path).depth
  return None if depth is None else [int(i) for i in depth]
