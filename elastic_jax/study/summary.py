"""The study's results: ``study.json``, ``study.md`` and plots, gathered from the finished arms' own reports.

Every number comes from an arm x seed's ``report.json`` (the main job's report: perplexity and short / long answer
accuracy of the parent, of each member's model and of the zero-shot pruned baseline of its size) and its
``study/arm.json`` (training tokens, wall time). Two reference arms are read off the elastic arm's report: ``parent``
(the teacher, at 100%) and ``pruned`` (the pruned baselines, no training).

Statistics (``eval.stats``): per arm and member, the mean over seeds with its 95% Student-t interval; per comparison,
the per-seed difference (the arms of one seed share the parent, the data and the evaluation problems, so the
difference is paired by seed) with its 95% t interval over seeds, and a verdict that says "not distinguishable" when
that interval contains 0. With one seed there is no spread to estimate: accuracies are then compared problem by
problem (a paired bootstrap over that seed's problems) and said so.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position

from elastic_jax.eval.stats import (  # pylint: disable=wrong-import-position
    NOT_DISTINGUISHABLE, difference_verdict, mean_interval, paired_bootstrap, wilson_interval)
from elastic_jax.study.arms import ARMS  # pylint: disable=wrong-import-position
from elastic_jax.study.config import StudyConfig  # pylint: disable=wrong-import-position
from elastic_jax.study.run import ARM_FILE, RECORD_FOLDER, seed_folder  # pylint: disable=wrong-import-position
from elastic_jax.train.config import section  # pylint: disable=wrong-import-position
from elastic_jax.train.loop import (read_json, write_atomically,  # pylint: disable=wrong-import-position
                                    write_json_atomically)
from elastic_jax.train.result import member_name  # pylint: disable=wrong-import-position

ACCURACY_KEYS = ("accuracy_short", "accuracy_long")
METRICS = {"accuracy_short": "accuracy, short tasks", "accuracy_long": "accuracy, long-context tasks",
           "ppl": "perplexity (per byte, held out)"}
HIGHER_IS_BETTER = {"accuracy_short": True, "accuracy_long": True, "ppl": False}
PARENT, PRUNED = "parent", "pruned"
REFERENCE_ARMS = {PARENT: "the parent (the frozen teacher of every arm), read off the elastic arm's report",
                  PRUNED: "the zero-shot pruned baselines of the elastic children's sizes (same ranking, no training), "
                          "read off the elastic arm's report"}
PAPER_TOKEN_RATIO = 750 / 110  # Minitron-SSM vs Nemotron Elastic, tokens to get the 6B and 9B (spec §8, Table 1)


@dataclasses.dataclass(frozen=True)
class Comparison:
  """``arm`` against ``reference`` on each member (``smaller``: the members below 100% only) and metric; the paper's
  direction per member (``expected``: "better" or "not worse" for ``arm``; absent: the paper does not say)."""

  section: str
  title: str
  arm: str
  reference: str
  metrics: tuple[str, ...]
  smaller: bool
  paper: str
  expected: Mapping[str, str] | str | None = None

  def expectation(self, member: str) -> str | None:
    if isinstance(self.expected, Mapping):
      return self.expected.get(member)
    return self.expected


_TABLE1 = "Table 1: Elastic-9B 75.95 vs NanoV2-9B (Minitron-SSM, ~7x the tokens) 75.59: as good at fewer tokens"
COMPARISONS = (
    Comparison("a", "Elastic family vs sequential compression (equal total tokens)", "elastic", "sequential_equal",
               ("accuracy_short", "accuracy_long", "ppl"), True, _TABLE1, "not worse"),
    Comparison("a", "Elastic family vs sequential compression (T tokens per member)", "elastic", "sequential_full",
               ("accuracy_short", "accuracy_long", "ppl"), True, _TABLE1, "not worse"),
    Comparison("a", "Elastic family vs the same architectures trained from scratch (T tokens each)", "elastic",
               "scratch", ("accuracy_short", "accuracy_long", "ppl"), True,
               "Table 1: pretraining the family from scratch takes ~360x the elastic run's tokens", "better"),
    Comparison("a", "Elastic family vs zero-shot pruning (no training)", "elastic", PRUNED,
               ("accuracy_short", "accuracy_long", "ppl"), True,
               "pruning alone is the starting point that distillation recovers from", "better"),
    Comparison("b", "Stage 2 on vs off (long-context accuracy per budget)", "elastic", "elastic_stage1_only",
               ("accuracy_long", "accuracy_short", "ppl"), False,
               "§6: stage 2 recovers reasoning, most for the smallest member (6B AIME-25 56.9 -> 68.1)", "better"),
    Comparison("c", "Weighted vs uniform stage-2 budget sampling (full-size member first)", "elastic",
               "elastic_uniform", ("accuracy_short", "accuracy_long", "ppl"), False,
               "§6: uniform stage-2 sampling hurt the full-size member (12B AIME-25 72.3 vs 75.8 weighted); the "
               "paper says nothing of the smaller ones", {member_name(1.0): "better"}),
)


# ------------------------------------------------------------------------------------------------ reading the arms
def _measurement(row: Mapping[str, Any], prefix: str, examples: int) -> dict[str, Any]:
  """One model's numbers from a report row (``prefix`` "baseline_" for the pruned baseline beside a child), with each
  accuracy's problem count, correct count and 95% Wilson interval, and the per-problem results when the report has
  them (kept apart: ``_per_problem``)."""
  out: dict[str, Any] = {"params": row.get(f"{prefix}params"), "ppl": row.get(f"{prefix}ppl")}
  per_problem = {}
  for key in ACCURACY_KEYS:
    value = row.get(f"{prefix}{key}")
    out[key] = value
    if value is None:
      continue
    problems = row.get(f"{prefix}{key}_per_problem")
    if problems is not None:
      per_problem[key] = [int(x) for x in problems]
      n, correct = len(problems), int(sum(problems))
    else:
      n = int(row.get(f"{prefix}{key}_n") or examples)
      correct = int(round(float(value) * n))
    out[f"{key}_n"], out[f"{key}_correct"] = n, correct
    out[f"{key}_interval"] = list(wilson_interval(correct, n))
  out["_per_problem"] = per_problem
  return out


def collect_runs(study: StudyConfig, workdir: str) -> dict[str, dict[int, dict[str, Any]]]:
  """{arm: {seed: run}} for every finished arm x seed, plus the ``parent`` and ``pruned`` reference arms. A run:
  {"folder", "tokens", "wall_s", "members": {member: measurement}} (and the arm record's other fields)."""
  examples = int(section(study.run, "eval")["examples"])
  parent = section(study.run, "parent")
  parent_tokens = (None if parent["hf_path"] else
                   int(parent["pretrain_steps"]) * int(parent["batch_size"]) * int(parent["seq_len"]))
  runs: dict[str, dict[int, dict[str, Any]]] = {name: {} for name in (*study.arms, PARENT, PRUNED)}
  for seed in study.seeds:
    for name in study.arms:
      folder = os.path.join(seed_folder(workdir, seed), name)
      record_path, report_path = os.path.join(folder, RECORD_FOLDER, ARM_FILE), os.path.join(folder, "report.json")
      if not (os.path.exists(record_path) and os.path.exists(report_path)):
        continue
      record, report = read_json(record_path), read_json(report_path)
      rows = report["rows"] if isinstance(report, Mapping) else report
      members, pruned, parent_row = {}, {}, None
      for row in rows:
        if row.get("role") == "parent" or row["budget"] == "parent":
          parent_row = row
          continue
        members[str(row["budget"])] = _measurement(row, "", examples)
        if row.get("baseline_params") is not None:
          pruned[str(row["budget"])] = _measurement(row, "baseline_", examples)
      relative = os.path.relpath(folder, workdir)
      runs[name][seed] = {**{k: v for k, v in record.items() if k not in ("arm", "seed")}, "folder": relative,
                          "members": members}
      if name == "elastic":
        if parent_row is not None:
          runs[PARENT][seed] = {"folder": relative, "tokens": parent_tokens, "wall_s": record.get("shared_phases_s"),
                                "members": {member_name(1.0): _measurement(parent_row, "", examples)}}
        runs[PRUNED][seed] = {"folder": relative, "tokens": 0, "wall_s": None, "members": pruned}
  return {name: by_seed for name, by_seed in runs.items() if by_seed}


def _public(measurement: Mapping[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in measurement.items() if not k.startswith("_")}


# ------------------------------------------------------------------------------------------------ statistics
def _interval(values: Sequence[float], bounds: tuple[float, float] | None = None) -> dict[str, Any]:
  """Mean and 95% t interval over seeds; ``bounds`` clips the interval to the metric's range (an accuracy's t
  interval over three seeds can reach past 0 or 100%, which no accuracy can)."""
  mean, low, high = mean_interval(values)
  if bounds is not None:
    low, high = max(low, bounds[0]), min(high, bounds[1])
  return {"mean": mean, "low": low, "high": high, "n_seeds": len(values)}


def _range(metric: str, difference: bool = False) -> tuple[float, float] | None:
  """The values ``metric`` can take (accuracies 0-1, their differences -1-1); None when unbounded."""
  if metric not in ACCURACY_KEYS:
    return None
  return (-1.0, 1.0) if difference else (0.0, 1.0)


def summarize(runs: Mapping[str, Mapping[int, Mapping[str, Any]]]) -> dict[str, Any]:
  """Per arm: tokens and wall time, and per member and metric the mean and 95% interval over the seeds it has."""
  out = {}
  for arm, by_seed in runs.items():
    members: dict[str, dict[str, Any]] = {}
    for name in _member_order(runs):
      entry = {}
      for key in ("params", *METRICS):
        values = [float(run["members"][name][key]) for run in by_seed.values()
                  if name in run["members"] and run["members"][name].get(key) is not None]
        if values:
          entry[key] = _interval(values, _range(key))
      if entry:
        members[name] = entry
    tokens = [run["tokens"] for run in by_seed.values() if run.get("tokens") is not None]
    walls = [run["wall_s"] for run in by_seed.values() if run.get("wall_s") is not None]
    out[arm] = {"seeds": sorted(by_seed), "tokens": (sum(tokens) / len(tokens)) if tokens else None,
                "wall_s": _interval(walls) if walls else None, "members": members}
  return out


def _member_order(runs: Mapping[str, Mapping[int, Mapping[str, Any]]]) -> list[str]:
  """Member names, largest budget first (``100pct``, ``75pct``, ...)."""
  names = {name for by_seed in runs.values() for run in by_seed.values() for name in run["members"]}
  return sorted(names, key=lambda name: -float(name.removesuffix("pct")) if name.endswith("pct") else 0.0)


def compare(runs: Mapping[str, Mapping[int, Mapping[str, Any]]], arm: str, reference: str, member: str,
            metric: str) -> dict[str, Any] | None:
  """``arm`` minus ``reference`` on one member and metric, paired by seed; None when no seed has both."""
  pairs = []
  for seed in sorted(set(runs.get(arm, {})) & set(runs.get(reference, {}))):
    a = runs[arm][seed]["members"].get(member)
    b = runs[reference][seed]["members"].get(member)
    if a is not None and b is not None and a.get(metric) is not None and b.get(metric) is not None:
      pairs.append((seed, a, b))
  if not pairs:
    return None
  diffs = [float(a[metric]) - float(b[metric]) for _, a, b in pairs]
  entry: dict[str, Any] = {"arm": arm, "reference": reference, "member": member, "metric": metric,
                           "seeds": [seed for seed, _, _ in pairs], "per_seed": diffs}
  problems = [(a["_per_problem"].get(metric), b["_per_problem"].get(metric)) for _, a, b in pairs]
  if len(pairs) >= 2:
    interval = _interval(diffs, _range(metric, difference=True))
    mean, low, high = interval["mean"], interval["low"], interval["high"]
    entry["method"] = f"95% t interval over {len(pairs)} seeds"
  elif problems[0][0] is not None and problems[0][1] is not None and len(problems[0][0]) == len(problems[0][1]):
    boot = paired_bootstrap(problems[0][0], problems[0][1])
    mean, low, high = boot["diff"], boot["low"], boot["high"]
    entry["method"] = "one seed: 95% paired bootstrap over its problems (no spread over seeds)"
  else:
    mean = low = high = diffs[0]
    entry["method"] = "one seed: no interval"
  arm_better, reference_better = f"{arm} better", f"{reference} better"
  better, worse = (arm_better, reference_better) if HIGHER_IS_BETTER[metric] else (reference_better, arm_better)
  entry.update(diff=mean, low=low, high=high,
               verdict=NOT_DISTINGUISHABLE if entry["method"] == "one seed: no interval"
               else difference_verdict(low, high, better, worse))
  return entry


def _agreement(verdict: str, expected: str | None, arm: str, reference: str) -> str | None:
  if expected is None:
    return None
  if verdict == f"{reference} better":
    return "no"
  if expected == "not worse" or verdict == f"{arm} better":
    return "yes"
  return "inconclusive"


def comparisons(runs: Mapping[str, Mapping[int, Mapping[str, Any]]]) -> list[dict[str, Any]]:
  """Every comparison of ``COMPARISONS`` whose two arms have results, member by member (largest first) and metric by
  metric, each with the paper's direction and whether the verdict agrees with it (accuracies only)."""
  out = []
  for spec in COMPARISONS:
    if spec.arm not in runs or spec.reference not in runs:
      continue
    for member in _member_order(runs):
      if spec.smaller and member == member_name(1.0):
        continue
      for metric in spec.metrics:
        entry = compare(runs, spec.arm, spec.reference, member, metric)
        if entry is None:
          continue
        expected = spec.expectation(member) if metric in ACCURACY_KEYS else None
        entry.update(section=spec.section, title=spec.title, paper=spec.paper if metric in ACCURACY_KEYS else None,
                     paper_direction=expected,
                     agrees_with_paper=_agreement(entry["verdict"], expected, spec.arm, spec.reference))
        out.append(entry)
  return out


def token_costs(summary: Mapping[str, Any]) -> dict[str, Any]:
  """(d): training tokens per arm (one seed's; the same for every seed) and each arm's total over the elastic
  run's; the paper's cost ratio is sequential compression's total over the elastic run's."""
  elastic = summary.get("elastic", {}).get("tokens")
  per_arm = {arm: entry["tokens"] for arm, entry in summary.items() if entry.get("tokens") is not None}
  ratios = {arm: tokens / elastic for arm, tokens in per_arm.items() if elastic and arm not in (PARENT, PRUNED)}
  return {"per_arm": per_arm, "ratio_to_elastic": ratios, "paper_ratio_sequential_to_elastic": PAPER_TOKEN_RATIO}


# ------------------------------------------------------------------------------------------------ writing
def _percent(value: float | None) -> str:
  return "—" if value is None else f"{100 * value:.1f}"


def _cell(entry: Mapping[str, Any] | None, metric: str) -> str:
  if entry is None:
    return "—"
  if metric in ACCURACY_KEYS:
    text = f"{_percent(entry['mean'])}%"
    return text if entry["n_seeds"] < 2 else f"{text} [{_percent(entry['low'])}, {_percent(entry['high'])}]"
  if metric == "params":
    return f"{entry['mean']:,.0f}"
  text = f"{entry['mean']:.3f}"
  return text if entry["n_seeds"] < 2 else f"{text} [{entry['low']:.3f}, {entry['high']:.3f}]"


def _difference(entry: Mapping[str, Any]) -> str:
  scale, unit = (100, " pt") if entry["metric"] in ACCURACY_KEYS else (1, "")
  fmt = ".1f" if entry["metric"] in ACCURACY_KEYS else ".3f"
  text = f"{scale * entry['diff']:+{fmt}}{unit}"
  if entry["method"] != "one seed: no interval":
    text += f" [{scale * entry['low']:+{fmt}}, {scale * entry['high']:+{fmt}}]"
  return text


def _tokens(value: float | None) -> str:
  return "—" if value is None else f"{value:,.0f}"


def _curriculum(by_seed: Mapping[int, Mapping[str, Any]]) -> str:
  """An arm's stages as its record lists them (per member for the standalone arms), e.g. ``stage1 400x12x128``."""
  stages = next((run["stages"] for run in by_seed.values() if run.get("stages")), None)
  if not stages:
    return "—"
  return ", ".join(f"{s['name']} {s['steps']}x{s['batch_size']}x{s['seq_len']}"
                   + (" (pinned)" if s.get("pinned") else "") for s in stages)


def _findings(entries: Sequence[Mapping[str, Any]], arm: str, reference: str) -> str:
  """One sentence: how the verdicts of one comparison fall."""
  counts = {f"{arm} better": [], f"{reference} better": [], NOT_DISTINGUISHABLE: []}
  for entry in entries:
    counts[entry["verdict"]].append(f"{entry['member']} {entry['metric'].replace('_', ' ')}")
  parts = [f"{verdict} in {len(items)} of {len(entries)} ({', '.join(items)})" if items else
           f"{verdict} in none" for verdict, items in counts.items()]
  agreeing = [e["agrees_with_paper"] for e in entries if e.get("agrees_with_paper") is not None]
  paper = ""
  if agreeing:
    paper = (f" Against the paper's direction (accuracies): {agreeing.count('yes')} agree, {agreeing.count('no')} "
             f"disagree, {agreeing.count('inconclusive')} inconclusive.")
  return "; ".join(parts) + "." + paper


def markdown(study: StudyConfig, runs: Mapping[str, Any], summary: Mapping[str, Any],
             entries: Sequence[Mapping[str, Any]], tokens: Mapping[str, Any], plots: Mapping[str, str],
             config_name: str) -> str:
  members = _member_order(runs)
  arms = [arm for arm in (*study.arms, PARENT, PRUNED) if arm in summary]
  seeds_done = sorted({seed for by_seed in runs.values() for seed in by_seed})
  examples = section(study.run, "eval")["examples"]
  lines = ["# Study: the elastic family against sequential compression and training from scratch", "",
           f"Config `{config_name}`, seeds {list(study.seeds)} (finished: {seeds_done}), {examples} held-out problems "
           "per accuracy set and seed. Each cell: the mean over seeds and its 95% t interval; each comparison: the "
           "per-seed difference (first arm minus second), its 95% t interval over seeds and the verdict, "
           '"not distinguishable" when the interval contains 0.', ""]
  if len(study.seeds) < 3:
    lines += [f"**{len(study.seeds)} seed{'s' if len(study.seeds) > 1 else ''} only**: the spread over seeds is "
              "estimated from fewer than 3 runs" + (" (one seed: none at all; accuracies are then compared problem by "
                                                   "problem)" if len(study.seeds) == 1 else "") + ".", ""]
  missing = [f"{arm} ({len(study.seeds) - len(runs.get(arm, {}))} of {len(study.seeds)} seeds)" for arm in study.arms
             if len(runs.get(arm, {})) < len(study.seeds)]
  if missing:
    lines += [f"**Unfinished**: {', '.join(missing)}: their numbers are over the seeds finished so far.", ""]
  lines += ["## Arms", "", "| arm | what it is | curriculum (steps x batch x length) | training tokens per seed | "
            "x elastic | wall time per seed (s) |", "|---|---|---|---|---|---|"]
  for arm in arms:
    what = ARMS[arm].description if arm in ARMS else REFERENCE_ARMS[arm]
    what += f" | {_curriculum(runs[arm])}"
    wall = summary[arm]["wall_s"]
    ratio = tokens["ratio_to_elastic"].get(arm)
    ratio_text = "—" if ratio is None else f"{ratio:.2f}"
    wall_text = "—" if wall is None else f"{wall['mean']:.0f}"
    lines.append(f"| `{arm}` | {what} | {_tokens(summary[arm]['tokens'])} | {ratio_text} | {wall_text} |")
  lines += ["", "The parent's row counts its pretraining tokens (shared by every arm of a seed, in none of their "
            "totals) and the time of the shared phases (parent, importance, permutation), which the elastic arm's wall "
            "time includes.", ""]
  for metric in (*METRICS, "params"):
    lines += [f"## {METRICS.get(metric, 'parameters (mean over seeds)').capitalize()}", "",
              "| arm | " + " | ".join(members) + " |", "|---|" + "---|" * len(members)]
    for arm in arms:
      cells = [_cell(summary[arm]["members"].get(member, {}).get(metric), metric) for member in members]
      if any(cell != "—" for cell in cells):
        lines.append(f"| `{arm}` | " + " | ".join(cells) + " |")
    lines.append("")
  lines += ["## Comparisons", ""]
  for section_id in ("a", "b", "c"):
    specs = [spec for spec in COMPARISONS if spec.section == section_id]
    for spec in specs:
      chosen = [e for e in entries if e["section"] == section_id and e["reference"] == spec.reference]
      if not chosen:
        continue
      lines += [f"### ({section_id}) {spec.title}: `{spec.arm}` vs `{spec.reference}`", "",
                f"Paper: {spec.paper}.", "",
                "| member | metric | difference [95%] | verdict | paper's direction | agrees |",
                "|---|---|---|---|---|---|"]
      for e in chosen:
        lines.append(f"| {e['member']} | {e['metric'].replace('_', ' ')} | {_difference(e)} | {e['verdict']} | "
                     f"{e['paper_direction'] or '—'} | {e['agrees_with_paper'] or '—'} |")
      methods = sorted({e["method"] for e in chosen})
      lines += ["", f"What it shows: {_findings(chosen, spec.arm, spec.reference)} ({'; '.join(methods)})", ""]
  lines += ["### (d) Training tokens", "", "| arm | tokens per seed | over the elastic run's |", "|---|---|---|"]
  for arm, value in tokens["per_arm"].items():
    ratio = tokens["ratio_to_elastic"].get(arm)
    ratio_text = "—" if ratio is None else f"{ratio:.2f}x"
    lines.append(f"| `{arm}` | {_tokens(value)} | {ratio_text} |")
  sequential = tokens["ratio_to_elastic"].get("sequential_full")
  lines += ["", "The paper's cost ratio, sequential compression (Minitron-SSM) over the elastic run, is "
            f"{PAPER_TOKEN_RATIO:.1f}x (750B vs 110B tokens for the 6B and 9B)"
            + (f"; here, with T tokens per smaller member, {sequential:.2f}x: it grows with the number of members "
               "(n - 1 distillations of T each against one run of T)." if sequential else ".")]
  for title, name in plots.items():
    lines += ["", f"## {title}", "", f"![{title}]({name})"]
  return "\n".join(lines) + "\n"


def plot_accuracy_vs_params(summary: Mapping[str, Any], path: str) -> bool:
  """Accuracy (short, long) against parameters, one line per arm, interval bars over seeds."""
  panels = [key for key in ACCURACY_KEYS if any(key in m for entry in summary.values()
                                                    for m in entry["members"].values())]
  if not panels:
    return False
  figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
  markers = "osD^v<>ph*"
  for panel, key in zip(axes[0], panels):
    for index, (arm, entry) in enumerate(summary.items()):
      points = sorted((m["params"]["mean"], m[key]) for m in entry["members"].values() if key in m and "params" in m)
      if not points:
        continue
      # Arms of (nearly) the same sizes side by side rather than on top of each other: a shift of 0.6% per arm.
      x = [p * (1 + 0.006 * (index - (len(summary) - 1) / 2)) for p, _ in points]
      y = [m["mean"] for _, m in points]
      errors = [[max(0.0, m["mean"] - m["low"]) for _, m in points],
                [max(0.0, m["high"] - m["mean"]) for _, m in points]]
      style = "*" if arm == PARENT else markers[index % len(markers)]
      panel.errorbar(x, y, yerr=errors, fmt=f"-{style}" if len(x) > 1 else style, capsize=3, label=arm,
                     markersize=10 if arm == PARENT else 6)
    panel.set_title(METRICS[key])
    panel.set_xlabel("parameters")
    panel.set_ylabel("answer accuracy (mean over seeds, 95% interval)")
    panel.set_ylim(-0.02, 1.02)
    panel.grid(alpha=0.3)
  axes[0][-1].legend(fontsize=8)
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)
  return True


def plot_tokens(tokens: Mapping[str, Any], path: str) -> bool:
  """Training tokens per arm (per seed), the parent's shared pretraining apart."""
  items = [(arm, value) for arm, value in tokens["per_arm"].items() if value]
  if not items:
    return False
  figure, axes = plt.subplots(figsize=(7, 0.5 * len(items) + 1.5))
  names = [arm for arm, _ in items]
  bars = axes.barh(names, [value for _, value in items],
                   color=["tab:gray" if arm == PARENT else "tab:blue" if arm.startswith("elastic") else "tab:orange"
                          for arm in names])
  for bar, (_, value) in zip(bars, items):
    axes.annotate(f" {value:,.0f}", (bar.get_width(), bar.get_y() + bar.get_height() / 2), va="center", fontsize=8)
  axes.invert_yaxis()
  axes.set_xlabel("training tokens per seed (parent: its pretraining, shared by every arm)")
  axes.set_xlim(0, 1.3 * max(value for _, value in items))
  axes.grid(axis="x", alpha=0.3)
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)
  return True


def write_summary(study: StudyConfig, workdir: str, config_name: str = "study") -> dict[str, str]:
  """Writes ``study.json``, ``study.md`` and the plots into ``workdir`` from the arms finished so far; returns the
  files."""
  runs = collect_runs(study, workdir)
  summary = summarize(runs)
  entries = comparisons(runs)
  tokens = token_costs(summary)
  files = {"json": os.path.join(workdir, "study.json"), "markdown": os.path.join(workdir, "study.md")}
  plots = {}
  if plot_accuracy_vs_params(summary, os.path.join(workdir, "accuracy_vs_params.png")):
    plots["Accuracy vs parameters"] = "accuracy_vs_params.png"
  if plot_tokens(tokens, os.path.join(workdir, "tokens_per_arm.png")):
    plots["Training tokens per arm"] = "tokens_per_arm.png"
  files.update({name.removesuffix(".png"): os.path.join(workdir, name) for name in plots.values()})
  record = {
      "config": config_name, "seeds": list(study.seeds), "arms": list(study.arms),
      "descriptions": {**{arm: ARMS[arm].description for arm in study.arms}, **REFERENCE_ARMS},
      "examples_per_set": int(section(study.run, "eval")["examples"]),
      "runs": {arm: {str(seed): {**run, "members": {m: _public(v) for m, v in run["members"].items()}}
                     for seed, run in by_seed.items()} for arm, by_seed in runs.items()},
      "summary": summary, "comparisons": entries, "tokens": tokens, "plots": plots,
  }
  _write_json(files["json"], record)
  text = markdown(study, runs, summary, entries, tokens, plots, config_name)
  write_atomically(files["markdown"], lambda f: f.write(text))
  return files


def _write_json(path: str, value: Any) -> None:
  def clean(x: Any) -> Any:  # NaN and inf are not JSON
    if isinstance(x, float) and not math.isfinite(x):
      return None
    if isinstance(x, Mapping):
      return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return [clean(v) for v in x]
    return x
  write_json_atomically(path, clean(value), indent=1)
