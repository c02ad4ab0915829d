"""The run's report: a JSON dump, a Markdown table with one verdict per budget, and PNG plots.

:func:`evaluate_and_report` builds it from what the main job produced (``train.result.PipelineResult``): it
measures the parent and every member's child and pruned baseline (:func:`family_rows`), then writes the files
(:func:`write_report`). The CLI only calls it.

``rows`` are plain dicts, one per budget, with these keys (``None`` or absent = not measured):

  - ``budget`` (str): the budget's label, e.g. ``"6B"`` or ``"0.5"``.
  - ``params`` (int): parameter count of the elastic child at this budget.
  - ``ppl`` (float): its held-out perplexity.
  - ``accuracy_short`` / ``accuracy_long`` (float in [0, 1]): its answer accuracy on short-context and long-context
    (distractor) task examples.
  - ``baseline_params`` (int): parameter count of the pruned baseline of the same size.
  - ``baseline_ppl``, ``baseline_accuracy_short``, ``baseline_accuracy_long`` (float): the same metrics for it.

Other keys are kept in ``report.json`` only.

``curves`` is the training log: the path of a ``metrics.jsonl`` or its records (dicts with ``step`` and
``kd_per_budget``, a list with one KD loss per budget in ``rows`` order; an optional ``samples_per_budget`` marks
steps where a budget drew no sample, whose logged 0 is not a loss).

``router_choices`` maps each budget label to ``{axis: [kept width / parent width, one per block of that kind]}``;
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

import numpy as np  # pylint: disable=wrong-import-position

from elastic_jax.data import tasks  # pylint: disable=wrong-import-position
from elastic_jax.data.pipeline import data_factory, source_tokenizer  # pylint: disable=wrong-import-position
from elastic_jax.elastic import axes as axes_lib  # pylint: disable=wrong-import-position
from elastic_jax.elastic.param_count import param_count  # pylint: disable=wrong-import-position
from elastic_jax.elastic.space import Choice  # pylint: disable=wrong-import-position
from elastic_jax.eval.measure import eval_split_batches, measure_model  # pylint: disable=wrong-import-position
from elastic_jax.model import ModelConfig  # pylint: disable=wrong-import-position
from elastic_jax.train import distributed  # pylint: disable=wrong-import-position
from elastic_jax.train.config import section  # pylint: disable=wrong-import-position
from elastic_jax.train.loop import Stage  # pylint: disable=wrong-import-position
from elastic_jax.train.result import PipelineResult  # pylint: disable=wrong-import-position

ROW_KEYS = ("budget", "params", "ppl", "accuracy_short", "accuracy_long", "baseline_params", "baseline_ppl",
            "baseline_accuracy_short", "baseline_accuracy_long")
_ACCURACY_KEYS = ("accuracy_short", "accuracy_long")
_DASH = "—"


def choice_fractions(config: ModelConfig, choice: Choice) -> dict[str, list[float]]:
  """A deployed choice -> {axis: [kept / parent width per block of that kind]}, plus ``hidden`` as one value."""
  full = Choice.full(config)
  fractions = {"hidden": [choice.hidden / full.hidden]}
  for axis in axes_lib.block_axis_names():
    kept, parent = getattr(choice, axis), getattr(full, axis)
    if parent:
      fractions[axis] = [k / p for k, p in zip(kept, parent)]
  return fractions


def _number(value: Any) -> float | None:
  return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def format_params(value: Any) -> str:
  return _DASH if value is None else f"{int(value):,}"


def format_ppl(value: Any) -> str:
  return _DASH if _number(value) is None else f"{float(value):.3f}"


def format_accuracy(value: Any) -> str:
  return _DASH if _number(value) is None else f"{100 * float(value):.1f}%"


def verdict(row: Mapping[str, Any]) -> str:
  """One sentence per budget: is the elastic child better than the pruned baseline of its size, in mean accuracy
  (over the task sets both were measured on) and in perplexity, each judged on its own?

  A row with ``role`` "parent" is the parent (described, not compared). A row with ``full_size`` true is the
  family's full-size member: nothing is pruned at that size, so it has no
  pruned baseline and the parent row is its reference.
  """
  budget = row["budget"]
  if row.get("role") == "parent":
    measured = [f"{key.replace('_', ' ')} {format_accuracy(row[key])}" for key in _ACCURACY_KEYS
                if _number(row.get(key)) is not None]
    if _number(row.get("ppl")) is not None:
      measured.append(f"perplexity {format_ppl(row['ppl'])}")
    return f"The parent, the frozen teacher of every child: {', '.join(measured) or 'not measured'}."
  if row.get("full_size"):
    return (f"Budget {budget}: the full-size member; nothing is pruned at this size, so the parent row is its "
            "reference.")
  shared = [key for key in _ACCURACY_KEYS
            if _number(row.get(key)) is not None and _number(row.get(f"baseline_{key}")) is not None]
  has_ppl = _number(row.get("ppl")) is not None and _number(row.get("baseline_ppl")) is not None
  if not shared and not has_ppl:
    return f"Budget {budget}: no pruned baseline measured at this size, so no comparison."
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
  return f"Budget {budget}: the elastic child {summary} ({', '.join(details)})."


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
  header = ("| budget | params | ppl | accuracy short | accuracy long | pruned params | pruned ppl "
            "| pruned accuracy short | pruned accuracy long |")
  lines = [header, "|" + "---|" * 9]
  for row in rows:
    cells = [str(row["budget"]), format_params(row.get("params")), format_ppl(row.get("ppl")),
             format_accuracy(row.get("accuracy_short")), format_accuracy(row.get("accuracy_long")),
             format_params(row.get("baseline_params")), format_ppl(row.get("baseline_ppl")),
             format_accuracy(row.get("baseline_accuracy_short")), format_accuracy(row.get("baseline_accuracy_long"))]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def read_metrics(curves: str | os.PathLike | Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """The training records from a ``metrics.jsonl`` path, or the given records as a list."""
  if isinstance(curves, (str, os.PathLike)):
    with open(curves, encoding="utf-8") as f:
      return [json.loads(line) for line in f if line.strip()]
  return [dict(record) for record in curves]


def plot_accuracy_vs_params(rows: Sequence[Mapping[str, Any]], path: str) -> bool:
  """Accuracy against parameter count, elastic children vs pruned baselines; False when nothing to plot."""
  figure, axes = plt.subplots(figsize=(6, 4))
  plotted = False
  for prefix, name, color in (("", "elastic", "tab:blue"), ("baseline_", "pruned", "tab:orange")):
    for key, style in zip(_ACCURACY_KEYS, ("-o", "--s")):
      points = sorted((float(row[f"{prefix}params"]), float(row[f"{prefix}{key}"])) for row in rows
                      if row.get(f"{prefix}params") is not None and _number(row.get(f"{prefix}{key}")) is not None)
      if points:
        axes.plot(*zip(*points), style, color=color, label=f"{name}, {key.split('_')[1]}")
        plotted = True
  if plotted:
    axes.set_xlabel("parameters")
    axes.set_ylabel("answer accuracy")
    axes.set_ylim(-0.02, 1.02)
    axes.grid(alpha=0.3)
    axes.legend()
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


def plot_router_choices(router_choices: Mapping[str, Mapping[str, Sequence[float]]], path: str) -> bool:
  """One panel per axis: each budget's kept width per block, as a fraction of the parent."""
  axis_names = [a for a in ("hidden", *axes_lib.block_axis_names()) if any(a in c for c in router_choices.values())]
  axis_names += sorted({a for c in router_choices.values() for a in c} - set(axis_names))
  if not axis_names:
    return False
  figure, panels = plt.subplots(1, len(axis_names), figsize=(3.5 * len(axis_names), 3.5), squeeze=False)
  for panel, axis in zip(panels[0], axis_names):
    for budget, choice in router_choices.items():
      if axis in choice:
        fractions = list(choice[axis])
        panel.plot(range(len(fractions)), fractions, "-o", label=str(budget))
    panel.set_title(axis)
    panel.set_xlabel("block of this kind")
    panel.set_ylim(-0.02, 1.05)
    panel.grid(alpha=0.3)
  panels[0][0].set_ylabel("kept / parent width")
  panels[0][-1].legend(title="budget")
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)
  return True


def write_report(workdir: str | os.PathLike, rows: Sequence[Mapping[str, Any]],
                 curves: str | os.PathLike | Iterable[Mapping[str, Any]] | None = None,
                 router_choices: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
                 curve_labels: Sequence[str] | None = None,
                 stale: Sequence[Mapping[str, Any]] = ()) -> dict[str, str]:
  """Writes ``report.json``, ``report.md`` and the plots that have data into ``workdir``.

  Args:
    workdir: output folder (created if missing).
    rows: one dict per budget (keys in the module docstring); ``budget`` is required.
    curves: a ``metrics.jsonl`` path or its records, for the loss curves.
    router_choices: {budget: {axis: [fraction per block]}}, for the router-choice plot.
    curve_labels: names of the ``kd_per_budget`` entries, in order (default: the rows' budgets, for when the rows
      are exactly the trained budgets; pass them when the table has extra rows such as the parent).
    stale: phases kept under older config values (module docstring); listed in ``report.json`` under
      ``stale_phases`` and as a warning at the top of ``report.md``.

  Returns:
    {"json", "markdown", and each plot written: "accuracy_plot", "loss_plot", "router_plot"}: file paths.
  """
  workdir = os.fspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  rows = [dict(row) for row in rows]
  for index, row in enumerate(rows):
    if "budget" not in row:
      raise ValueError(f"report row {index} has no 'budget' label: {row}")
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
  if router_choices and plot_router_choices(router_choices, os.path.join(workdir, "router_choices.png")):
    paths["router_plot"] = os.path.join(workdir, "router_choices.png")
    plots.append(("Router choices per layer", "router_choices.png"))

  verdicts = [verdict(row) for row in rows]
  stale = [{"phase": str(note["phase"]), "changes": [str(c) for c in note["changes"]]} for note in stale]
  with open(paths["json"], "w", encoding="utf-8") as f:
    json.dump({"rows": rows, "verdicts": verdicts, **({"stale_phases": stale} if stale else {}),
               "router_choices": {str(k): {a: list(map(float, v)) for a, v in c.items()}
                                  for k, c in (router_choices or {}).items()},
               "plots": {key: os.path.basename(p) for key, p in paths.items() if key.endswith("_plot")}},
              f, indent=2, default=float)
  markdown = ["# Elastic evaluation report", ""]
  if stale:
    markdown += ["**Stale results**: these phases were kept (`--reuse-stale`) although the config changed since "
                 "they ran, so this report does not describe the current config:", "",
                 *[f"- {note['phase']}: {'; '.join(note['changes'])}" for note in stale], ""]
  markdown += [markdown_table(rows), "", *[f"- {v}" for v in verdicts]]
  for title, name in plots:
    markdown += ["", f"## {title}", "", f"![{title}]({name})"]
  with open(paths["markdown"], "w", encoding="utf-8") as f:
    f.write("\n".join(markdown) + "\n")
  return paths


# ------------------------------------------------------------------------------------------------ from a run
Measure = Callable[[ModelConfig, Any], Mapping[str, Any]]


def family_rows(result: PipelineResult, measure: Measure) -> list[dict[str, Any]]:
  """The report's rows: the parent, then one per family member with its pruned baseline's metrics beside it.

  ``measure(config, params)`` gives a model's metrics (``ppl``, ``accuracy_short``, ``accuracy_long``); it is called
  for the parent, then for each member's child and, unless the member is full-size, its baseline, in that order.
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
  """Perplexity and answer accuracy (short and long tasks) of the parent and of every child and baseline under
  ``cfg.eval``; writes the report into ``result.workdir`` (:func:`write_report`) and returns its files (empty on
  every process but process 0)."""
  eval_cfg = section(cfg, "eval")
  source = result.source
  tokenizer = result.tokenizer or source_tokenizer(source)  # the one the data was tokenized with
  # Every process reads the same full batches and examples; each batch is split over the mesh's data-parallel
  # devices and the results gathered, so every process computes the same report (process 0 writes it).
  stage = Stage("eval", 1, eval_cfg["batch_size"], eval_cfg["seq_len"], (1.0,))
  num_batches = eval_cfg["ppl_batches"]
  if source.kind == "tasks":  # the tasks' evaluation split: it never shares a prompt with the training split
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
                             mesh=result.mesh, rules=result.rules)
    return {"ppl": measured["ppl"],
            **{f"accuracy_{label}": graded["accuracy"] for label, graded in measured["accuracy"].items()}}

  rows = family_rows(result, measure)
  router_choices = {member.name: choice_fractions(result.config, member.child.choice) for member in result.members}
  if not distributed.is_primary():  # the report is written once, by process 0
    return {}
  return write_report(result.workdir, rows, result.metrics_path, router_choices, curve_labels=list(router_choices),
                      stale=result.stale)
