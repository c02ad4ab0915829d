"""Evaluation: perplexity against a numpy log-softmax, answer grading with controlled generations, decode timing
against a clock the test controls, report files."""

from __future__ import annotations

import json
import math
import os
import types

import jax.numpy as jnp
import numpy as np
import pytest

from elastic_jax.data.tasks import TaskConfig, generate_examples
from elastic_jax.data.tokenizer import ByteTokenizer
from elastic_jax.elastic.masks import choice_masks
from elastic_jax.elastic.param_count import param_count
from elastic_jax.elastic.space import Choice
from elastic_jax.eval import metrics, report
from elastic_jax.eval.generate import generate
from elastic_jax.model import HybridLM
from elastic_jax.train.result import ExtractedModel, FamilyMember, PipelineResult
from tests.conftest import random_params, small_config
from tests.test_stats import _wilson_roots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _numpy_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """Per-token NLL from a float64 log-softmax written out by hand."""
  logits = logits.astype(np.float64)
  shifted = logits - logits.max(axis=-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
  return -np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def test_perplexity_matches_numpy_log_softmax():
  config = small_config()
  params = random_params(config, seed=1)
  rng = np.random.default_rng(0)
  batches = [rng.integers(0, config.vocab_size, (2, 9)), rng.integers(0, config.vocab_size, (3, 9))]
  model = HybridLM(config)
  nll = np.concatenate([_numpy_nll(np.asarray(model.apply({"params": params}, jnp.asarray(b[:, :-1]))), b[:, 1:])
                        .ravel() for b in batches])
  # Mean over all targets (not a mean of per-batch means: the batches have different sizes).
  assert metrics.perplexity(config, params, batches) == pytest.approx(math.exp(nll.mean()), rel=1e-5)


def test_perplexity_with_masks_evaluates_the_masked_child():
  config = small_config()
  params = random_params(config, seed=2)
  tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, 9))
  full = choice_masks(config, [Choice.full(config)] * 2)
  child_choice = Choice.homogeneous(config, mlp=24, mamba_heads=2)
  child = choice_masks(config, [child_choice] * 2)
  assert metrics.perplexity(config, params, [tokens], masks=full) == pytest.approx(
      metrics.perplexity(config, params, [tokens]), rel=1e-5)
  logits = np.asarray(HybridLM(config).apply({"params": params}, jnp.asarray(tokens[:, :-1]), masks=child))
  expected = math.exp(_numpy_nll(logits, tokens[:, 1:]).mean())
  assert metrics.perplexity(config, params, [tokens], masks=child) == pytest.approx(expected, rel=1e-5)
  assert abs(expected - metrics.perplexity(config, params, [tokens])) > 1e-3  # the masks did change the model


def _examples():
  """Every family, a few long prompts, and three prompts of one length (a full batch of two and a partial one)."""
  short = generate_examples(TaskConfig(), seed=0, split="eval", count=9)
  long = generate_examples(TaskConfig(families=("variables",), distractors=2), seed=0, split="eval", count=3)
  length = len(short[0].prompt)
  missing = 3 - sum(len(e.prompt) == length for e in short + long)
  same = [e for e in generate_examples(TaskConfig(families=("arithmetic",)), seed=1, split="eval", count=60)
          if len(e.prompt) == length]
  return short + long + same[:max(missing, 0)]


def _fake_generate(solutions: dict[tuple[int, ...], str], calls: list[tuple[int, int]]):
  """A stand-in for ``generate`` that continues each known prompt with the given text, then end-of-document."""
  tokenizer = ByteTokenizer()

  def fake(config, params, prompts, *, max_new_tokens, temperature, eos_id, rng=None):
    del config, params, temperature, rng
    prompts = np.asarray(prompts)
    calls.append(prompts.shape)
    rows = []
    for prompt in prompts:
      new = tokenizer.encode(solutions[tuple(int(t) for t in prompt)]) + [eos_id] * max_new_tokens
      rows.append(list(prompt) + new[:max_new_tokens])
    return jnp.asarray(rows, jnp.int32)

  return fake


def test_answer_accuracy_grades_controlled_generations(monkeypatch):
  tokenizer = ByteTokenizer()
  examples = _examples()
  # The right worked solution for arithmetic and variables; modular answers off by one.
  solutions = {}
  for example in examples:
    text = example.solution
    if example.family == "modular":
      text = f" x=? #### {int(example.answer) + 1}\n"
    solutions[tuple(tokenizer.encode(example.prompt))] = text
  calls: list[tuple[int, int]] = []
  monkeypatch.setattr(metrics, "generate", _fake_generate(solutions, calls))
  longest = max(len(tokenizer.encode(e.solution)) for e in examples)
  result = metrics.answer_accuracy(None, None, examples, tokenizer, max_new_tokens=longest + 4, batch_size=2,
                                   return_generations=True)
  families = [e.family for e in examples]
  assert result["n"] == len(examples)
  assert result["per_family"]["arithmetic"] == {"accuracy": 1.0, "n": families.count("arithmetic")}
  assert result["per_family"]["variables"] == {"accuracy": 1.0, "n": families.count("variables")}
  assert result["per_family"]["modular"] == {"accuracy": 0.0, "n": families.count("modular")}
  assert result["accuracy"] == pytest.approx(1 - families.count("modular") / len(examples))
  assert result["per_problem"] == [family != "modular" for family in families]  # in example order
  # Generations come back in example order, cut at the end-of-document id.
  assert result["generations"][0] == solutions[tuple(tokenizer.encode(examples[0].prompt))]
  # Pad-free batches: each call holds prompts of one length, at most batch_size of them, and one batch size per
  # length (a partial batch is filled up, not compiled again).
  lengths = sorted(len(tokenizer.encode(e.prompt)) for e in examples)
  assert len(calls) == sum(math.ceil(lengths.count(n) / 2) for n in set(lengths))
  assert any(lengths.count(n) == 3 for n in set(lengths))  # a length whose last batch is partial
  assert all(batch <= 2 for batch, _ in calls)
  for length in set(lengths):
    assert len({batch for batch, l in calls if l == length}) == 1

  # Too few new tokens to reach "####": every answer counts as wrong.
  short = metrics.answer_accuracy(None, None, examples, tokenizer, max_new_tokens=3, batch_size=4)
  assert short["accuracy"] == 0.0


def test_answer_accuracy_of_a_random_model_is_zero_and_batching_changes_nothing():
  config = small_config(vocab_size=256)
  params = random_params(config, seed=3)
  tokenizer = ByteTokenizer()
  examples = generate_examples(TaskConfig(families=("arithmetic",)), seed=1, split="eval", count=5)
  result = metrics.answer_accuracy(config, params, examples, tokenizer, max_new_tokens=6, batch_size=4,
                                   return_generations=True)
  assert result["n"] == 5 and result["accuracy"] == 0.0
  assert all(result["generations"])  # non-empty texts, so the comparisons below carry signal
  # Decoding example 0 alone gives the text it got inside its length bucket (no padding, no cross-row effects).
  prompt = jnp.asarray([tokenizer.encode(examples[0].prompt)], jnp.int32)
  alone = generate(config, params, prompt, max_new_tokens=6, temperature=0.0, eos_id=tokenizer.eos_id)
  assert result["generations"][0] == tokenizer.decode(np.asarray(alone)[0, prompt.shape[1]:].tolist())
  # Mixed-length batches through the ragged decoder (one compile) give the same texts as the length buckets.
  ragged = metrics.answer_accuracy(config, params, examples, tokenizer, max_new_tokens=6, batch_size=4,
                                   ragged=True, return_generations=True)
  assert len({len(e.prompt) for e in examples}) > 1
  assert ragged["generations"] == result["generations"]


def test_decode_speed_times_one_program_with_n_and_with_1_new_tokens(monkeypatch):
  config = small_config(vocab_size=256)
  params = random_params(config, seed=3)
  prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]  # the batch is the first two, padded to the longest (4)
  # A clock the test advances: each call of the program takes the next of these durations (the first call of each
  # length is the untimed warm-up); the timing must come out of them, whatever the real calls took.
  durations = iter([10.0, 20.0, 1.0, 2.5, 0.9, 2.6, 1.1, 2.4])
  clock = types.SimpleNamespace(now=0.0)
  monkeypatch.setattr(metrics, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))
  calls = []
  real = metrics.generate_ragged

  def timed_program(*args, **kwargs):
    out = real(*args, **kwargs)
    calls.append((np.asarray(args[2]).shape, kwargs["eos_id"], np.asarray(kwargs["limits"]).tolist(), np.asarray(out)))
    clock.now += next(durations)
    return out

  monkeypatch.setattr(metrics, "generate_ragged", timed_program)
  speed = metrics.decode_speed(config, params, prompts, max_new_tokens=6, batch_size=2, reps=3)

  # One batch of 2 rows padded to 4 tokens, the end-of-document id off, alternately 1 and 6 new tokens per row.
  assert [(shape, eos, limits) for shape, eos, limits, _ in calls] == [((2, 4), -1, [1, 1]), ((2, 4), -1, [6, 6])] * 4
  # The fastest timed call of each length, the warm-ups left out: 0.9 s and 2.4 s.
  assert speed["seconds"] == pytest.approx(2.4 - 0.9)
  assert speed["tokens"] == 2 * (6 - 1)  # batch x (n - 1): the tokens the longer calls decoded beyond the first
  assert speed["tokens_per_s"] == pytest.approx(10 / 1.5)
  assert (speed["batch"], speed["prompt_width"], speed["new_tokens"], speed["reps"]) == (2, 4, 6, 3)
  # What was timed is real greedy decoding: each row's 6 tokens are what generate gives its prompt alone, and the
  # 1-token calls stop after the first of them.
  for row, prompt in enumerate(prompts[:2]):
    alone = np.asarray(generate(config, params, jnp.asarray([prompt], jnp.int32), max_new_tokens=6))[0, len(prompt):]
    np.testing.assert_array_equal(calls[1][3][row], alone)
    np.testing.assert_array_equal(calls[0][3][row], [alone[0]] + [-1] * 5)


def test_decode_speed_of_a_timing_without_decode_time_is_none(monkeypatch):
  config = small_config(vocab_size=256)
  # A clock that never moves: T(n) - T(1) = 0, no speed to report (rather than a division by zero).
  monkeypatch.setattr(metrics, "time", types.SimpleNamespace(perf_counter=lambda: 0.0))
  speed = metrics.decode_speed(config, random_params(config, seed=3), [[5, 6]], max_new_tokens=3, batch_size=4,
                               reps=1)
  assert speed["tokens_per_s"] is None and speed["seconds"] == 0.0 and speed["tokens"] == 1 * (3 - 1)
  with pytest.raises(ValueError):
    metrics.decode_speed(config, None, [[5, 6]], max_new_tokens=1, batch_size=4)


def test_grade_rejects_mismatched_lengths():
  with pytest.raises(ValueError):
    metrics.grade(_examples()[:2], ["#### 1"])


ROWS = [
    dict(budget="full", params=1234567, ppl=3.14159, accuracy_short=0.625, accuracy_long=0.5, full_size=True),
    dict(budget="0.66", params=814000, ppl=4.5678, accuracy_short=0.5, accuracy_long=0.25, baseline_params=812345,
         baseline_ppl=5.25, baseline_accuracy_short=0.375, baseline_accuracy_long=0.125),
    dict(budget="0.5", params=617000, ppl=6.0, accuracy_short=0.125, accuracy_long=0.0, baseline_params=616999,
         baseline_ppl=5.5, baseline_accuracy_short=0.25, baseline_accuracy_long=0.0),
]


def _check_png(path: str):
  with open(path, "rb") as f:
    data = f.read()
  assert data[:8] == PNG_MAGIC
  assert len(data) > 5000  # axes, lines and labels, not an empty canvas


def test_write_report(tmp_path):
  config = small_config()
  metrics_path = tmp_path / "metrics.jsonl"
  with open(metrics_path, "w", encoding="utf-8") as f:
    for step in range(1, 21):
      f.write(json.dumps({"step": step, "loss": 1.0, "kd_per_budget": [2 / step, 3 / step, 4 / step],
                          "samples_per_budget": [1, 0 if step % 5 == 0 else 1, 1]}) + "\n")
  router_choices = {row["budget"]: report.choice_fractions(config, choice) for row, choice in zip(ROWS, [
      Choice.full(config), Choice.homogeneous(config, mlp=24, mamba_heads=2),
      Choice.homogeneous(config, mlp=12, mamba_heads=2, attention_heads=2)])}
  assert router_choices["0.66"]["mlp"] == [0.5]
  assert router_choices["0.66"]["mamba_heads"] == [0.5, 0.5]

  paths = report.write_report(tmp_path / "out", ROWS, curves=str(metrics_path), router_choices=router_choices)

  markdown = open(paths["markdown"], encoding="utf-8").read()
  table = [line for line in markdown.splitlines() if line.startswith("| ")]
  assert len(table) == 1 + len(ROWS)  # header + one row per budget
  full, mid, small = table[1:]
  for text in ("| full |", "1,234,567", "3.142", "62.5%", "50.0%"):
    assert text in full
  for text in ("814,000", "4.568", "812,345", "5.250", "37.5%", "12.5%", "25.0%"):
    assert text in mid
  for text in ("616,999", "6.000", "5.500", "12.5%", "0.0%"):
    assert text in small
  assert "Budget full: the full-size member; nothing is pruned" in markdown
  assert ("Budget 0.66: the elastic child is better than the pruned baseline in accuracy and perplexity (mean "
          "accuracy 37.5% vs 25.0%, perplexity 4.568 vs 5.250)") in markdown
  assert ("Budget 0.5: the elastic child is not better than the pruned baseline in accuracy or perplexity (mean "
          "accuracy 6.2% vs 12.5%, perplexity 6.000 vs 5.500)") in markdown

  saved = json.load(open(paths["json"], encoding="utf-8"))
  assert [row["budget"] for row in saved["rows"]] == ["full", "0.66", "0.5"]
  assert saved["rows"][1]["baseline_ppl"] == 5.25
  for key in ("accuracy_plot", "loss_plot", "router_plot"):
    _check_png(paths[key])
    assert f"({os.path.basename(paths[key])})" in markdown


def test_report_has_a_decode_speed_column(tmp_path):
  timing = {"tokens_per_s": 12345.6, "tokens": 62, "seconds": 62 / 12345.6, "batch": 2, "prompt_width": 9,
            "new_tokens": 32, "reps": 3}
  rows = [dict(ROWS[0], decode_tokens_per_s=12345.6, decode_timing=timing), dict(ROWS[1], decode_tokens_per_s=None),
          ROWS[2]]
  paths = report.write_report(tmp_path, rows)
  markdown = open(paths["markdown"], encoding="utf-8").read()
  table = [line.strip("|").split(" | ") for line in markdown.splitlines() if line.startswith("| ")]
  header = [cell.strip() for cell in table[0]]
  assert header[5:8] == ["retention", "decode tok/s", "pruned params"]
  assert [cells[6].strip() for cells in table[1:]] == ["12,346", "—", "—"]
  assert ("Decode tok/s: greedy decoding of a batch of 2 prompts (padded to 9 tokens), batch x (32 - 1) tokens over "
          "T(32) - T(1)") in markdown
  saved = json.load(open(paths["json"], encoding="utf-8"))["rows"]
  assert saved[0]["decode_timing"] == timing and saved[1]["decode_tokens_per_s"] is None
  assert "Decode tok/s" not in open(report.write_report(tmp_path / "none", ROWS)["markdown"], encoding="utf-8").read()


def test_verdict_judges_accuracy_and_perplexity_separately():
  row = dict(budget="b", accuracy_short=0.5, baseline_accuracy_short=0.5, ppl=3.0, baseline_ppl=4.0)
  assert "better than the pruned baseline in perplexity but not in accuracy" in report.verdict(row)  # a tie is no win
  row["accuracy_short"] = 0.75
  assert "better than the pruned baseline in accuracy and perplexity" in report.verdict(row)
  row["ppl"] = 5.0
  assert "better than the pruned baseline in accuracy but not in perplexity" in report.verdict(row)
  assert "no pruned baseline" in report.verdict(dict(budget="c", ppl=2.0))
  parent = dict(budget="parent", role="parent", accuracy_short=0.5, ppl=1.5)
  assert report.verdict(parent) == ("The parent, the frozen teacher of every child: accuracy short 50.0%, "
                                    "perplexity 1.500.")


def test_report_without_curves_or_choices(tmp_path):
  paths = report.write_report(tmp_path, [dict(budget="x", params=10)])
  assert set(paths) == {"json", "markdown"}
  assert "| x | 10 | — |" in open(paths["markdown"], encoding="utf-8").read()


def test_family_rows_pair_each_child_with_its_baseline_and_measure_in_order():
  parent_config = small_config("M*-", hidden_size=32, intermediate_size=48)
  parent_count = param_count(parent_config)
  choice = Choice.full(parent_config)

  def model(tag: str, count: int) -> ExtractedModel:
    return ExtractedModel(parent_config, tag, choice, count, f"/w/{tag}")  # params: a tag the fake measure reads

  members = (FamilyMember(1.0, model("child100", parent_count), model("base100", parent_count)),
             FamilyMember(0.5, model("child50", 500), model("base50", 510)))
  result = PipelineResult(workdir="/w", config=parent_config, parent="parent", members=members, source=None,
                          tokenizer=None, mesh=None, rules=())
  calls = []

  def measure(config, params):
    calls.append(params)
    return {"ppl": float(len(calls)), "accuracy_short": 0.5}

  rows = report.family_rows(result, measure)
  assert calls == ["parent", "child100", "child50", "base50"]  # a full-size member's baseline is not measured
  assert rows == [
      {"budget": "parent", "role": "parent", "params": parent_count, "ppl": 1.0, "accuracy_short": 0.5},
      {"budget": "100pct", "params": parent_count, "ppl": 2.0, "accuracy_short": 0.5, "full_size": True},
      {"budget": "50pct", "params": 500, "ppl": 3.0, "accuracy_short": 0.5, "baseline_params": 510,
       "baseline_ppl": 4.0, "baseline_accuracy_short": 0.5}]
  assert result.metrics_path == os.path.join("/w", "elastic", "metrics.jsonl")


def _right(count: int, offset: int = 0, n: int = 64) -> list[int]:
  """A per-problem list: problems ``offset`` to ``offset + count - 1`` answered right."""
  return [int(offset <= i < offset + count) for i in range(n)]


def _measured(**values) -> dict:
  """A row whose accuracies come from per-problem lists given as ``<key>=list``."""
  row = {}
  for key, value in values.items():
    if isinstance(value, list):
      row[key], row[f"{key}_per_problem"] = sum(value) / len(value), value
    else:
      row[key] = value
  return row


PAIRED_ROWS = [
    _measured(budget="parent", role="parent", params=1000, ppl=1.5, accuracy_short=_right(32),
              accuracy_long=_right(32, 16)),
    _measured(budget="100pct", params=1000, ppl=1.5, accuracy_short=_right(32), accuracy_long=_right(32, 16),
              full_size=True),
    # 75pct: right on problems 8-39 (short) and 6-29 (long) where its baseline is not, never the other way round.
    _measured(budget="75pct", params=750, ppl=1.6, accuracy_short=_right(40), accuracy_long=_right(30),
              baseline_params=740, baseline_ppl=3.0, baseline_accuracy_short=_right(8),
              baseline_accuracy_long=_right(6)),
    # 50pct: the same count as its baseline, two problems each way per set.
    _measured(budget="50pct", params=500, ppl=2.0, accuracy_short=_right(20), accuracy_long=_right(20),
              baseline_params=505, baseline_ppl=1.9, baseline_accuracy_short=_right(20, 2),
              baseline_accuracy_long=_right(20, 2)),
]


def _cell(correct: int, n: int = 64) -> str:
  low, high = _wilson_roots(correct, n, 1.96)
  return f"{100 * correct / n:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"


def test_report_gives_intervals_paired_verdicts_and_retention(tmp_path):
  paths = report.write_report(tmp_path, PAIRED_ROWS)
  markdown = open(paths["markdown"], encoding="utf-8").read()
  table = {line.split(" | ")[0][2:]: line for line in markdown.splitlines() if line.startswith("| ")}
  assert "| retention |" in table["budget"]
  assert f"| {_cell(32)} | {_cell(32)} | — |" in table["parent"]
  assert f"| {_cell(40)} | {_cell(30)} | 109% [" in table["75pct"]  # (40 + 30) / (32 + 32) of the parent's
  assert f"| {_cell(8)} | {_cell(6)} |" in table["75pct"]
  assert "| 100% [100, 100] |" in table["100pct"]  # the same answers as the parent: every resample agrees

  saved = {row["budget"]: row for row in json.load(open(paths["json"], encoding="utf-8"))["rows"]}
  assert saved["75pct"]["accuracy_short_per_problem"] == _right(40)  # the per-problem lists are kept
  assert saved["75pct"]["accuracy_short_n"] == 64
  assert saved["75pct"]["accuracy_short_interval"] == pytest.approx(_wilson_roots(40, 64, 1.96))
  assert saved["75pct"]["baseline_accuracy_long_interval"] == pytest.approx(_wilson_roots(6, 64, 1.96))
  difference = saved["75pct"]["accuracy_difference"]
  assert difference["reference"] == "pruned baseline"
  assert difference["short"]["diff"] == pytest.approx(0.5) and difference["long"]["diff"] == pytest.approx(0.375)
  pooled = difference["all_sets"]
  assert pooled["n"] == 128 and pooled["diff"] == pytest.approx(56 / 128) and pooled["verdict"] == "better"
  # The pooled per-problem differences are 56 ones and 72 zeros: standard error sqrt(p (1 - p) / 128).
  half = 1.96 * math.sqrt(56 / 128 * 72 / 128 / 128)
  assert pooled["low"] == pytest.approx(56 / 128 - half, abs=0.02)
  assert pooled["high"] == pytest.approx(56 / 128 + half, abs=0.02)
  assert saved["75pct"]["retention"]["ratio"] == pytest.approx(70 / 64)
  assert saved["75pct"]["baseline_retention"]["ratio"] == pytest.approx(14 / 64)
  assert saved["50pct"]["accuracy_difference"]["all_sets"]["verdict"] == "not distinguishable"
  assert saved["100pct"]["accuracy_difference"]["reference"] == "parent"
  assert saved["100pct"]["accuracy_difference"]["all_sets"] == {"diff": 0.0, "low": 0.0, "high": 0.0,
                                                                "verdict": "not distinguishable", "n": 128}

  verdicts = [line[2:] for line in markdown.splitlines() if line.startswith("- ")]
  assert verdicts[0] == f"The parent, the frozen teacher of every child: accuracy short {_cell(32)}, accuracy long " \
                        f"{_cell(32)}, perplexity 1.500."
  assert verdicts[1].startswith("Budget 100pct: the full-size member; nothing is pruned at this size, so the parent "
                                "row is its reference. In accuracy the full-size member and the parent are not "
                                "distinguishable: member minus parent +0.0 points [+0.0, +0.0] (95% paired-bootstrap "
                                "interval) over the 128 problems of the short and long sets;")
  assert verdicts[2].startswith("Budget 75pct: in accuracy the elastic child is better than the pruned baseline: "
                                "child minus baseline +43.8 points [")
  assert "; short +50.0 [" in verdicts[2] and ", long +37.5 [" in verdicts[2]
  assert "In perplexity it is better: 1.600 vs 3.000 (one held-out number each, no interval)." in verdicts[2]
  assert "It keeps 109% [" in verdicts[2] and "(the pruned baseline 22% [" in verdicts[2]
  assert verdicts[3].startswith("Budget 50pct: in accuracy the elastic child and the pruned baseline are not "
                                "distinguishable: child minus baseline +0.0 points [-")
  assert "In perplexity it is not better: 2.000 vs 1.900" in verdicts[3]


def test_accuracy_plot_draws_the_rows_with_their_intervals(tmp_path):
  rows = report.add_statistics(PAIRED_ROWS)
  path = str(tmp_path / "accuracy.png")
  plotted = report.plot_accuracy_vs_params(rows, path)
  _check_png(path)
  assert set(plotted) == {"short", "long"}
  short = plotted["short"]
  assert short["elastic"]["budgets"] == ["50pct", "75pct", "100pct"]  # in parameter order; the parent on its own
  assert short["elastic"]["params"] == [500, 750, 1000]
  assert short["elastic"]["accuracy"] == pytest.approx([20 / 64, 40 / 64, 32 / 64])
  assert short["elastic"]["low"] == pytest.approx([_wilson_roots(c, 64, 1.96)[0] for c in (20, 40, 32)])
  assert short["elastic"]["high"] == pytest.approx([_wilson_roots(c, 64, 1.96)[1] for c in (20, 40, 32)])
  assert short["pruned"]["params"] == [505, 740] and short["pruned"]["accuracy"] == pytest.approx([20 / 64, 8 / 64])
  assert plotted["long"]["pruned"]["high"][1] == pytest.approx(_wilson_roots(6, 64, 1.96)[1])
  assert short["parent"] == {"budgets": ["parent"], "params": [1000], "accuracy": [0.5],
                             "low": [pytest.approx(_wilson_roots(32, 64, 1.96)[0])],
                             "high": [pytest.approx(_wilson_roots(32, 64, 1.96)[1])]}
  assert report.plot_accuracy_vs_params([dict(budget="x", params=10)], str(tmp_path / "none.png")) == {}
  assert not os.path.exists(tmp_path / "none.png")


def test_router_plot_shows_each_axis_and_the_dropped_layers(tmp_path):
  config = small_config("M-*M")  # layers 0 Mamba, 1 MLP, 2 attention, 3 Mamba
  depth_order = [3, 0, 2, 1]  # most important first: a depth of 3 drops layer 1, the MLP
  small = Choice(hidden=16, mlp=(24,), attention_heads=(2,), mamba_heads=(2, 4), mamba_head_dim=(4, 8), depth=3)
  choices = {"full": report.choice_fractions(config, Choice.full(config)),
             "small": report.choice_fractions(config, small, depth_order)}
  assert choices["full"]["depth"] == [1.0] * 4
  assert choices["small"]["depth"] == [1.0, 0.0, 1.0, 1.0]
  assert "depth" not in report.choice_fractions(config, small)  # which layers are dropped is unknown without order

  path = str(tmp_path / "router.png")
  plotted = report.plot_router_choices(choices, path, pattern=config.pattern)
  _check_png(path)
  # Axes with one value per budget: a bar per budget (the MLP's only block is dropped at "small").
  assert plotted["hidden"] == {"kind": "bars", "budgets": ["full", "small"], "values": [1.0, 0.5]}
  assert plotted["mlp"] == {"kind": "bars", "budgets": ["full", "small"], "values": [1.0, None]}
  assert plotted["attention_heads"] == {"kind": "bars", "budgets": ["full", "small"], "values": [1.0, 0.5]}
  # Per-block axes: budgets x the blocks of the kind, named by their layer.
  assert plotted["mamba_heads"] == {"kind": "grid", "budgets": ["full", "small"], "layers": [0, 3],
                                    "values": [[1.0, 1.0], [0.5, 1.0]]}
  assert plotted["mamba_head_dim"]["values"] == [[1.0, 1.0], [0.5, 1.0]]
  assert plotted["depth"] == {"kind": "depth", "budgets": ["full", "small"], "layers": [0, 1, 2, 3],
                              "kept": [[True] * 4, [True, False, True, True]]}
  assert report.plot_router_choices({}, str(tmp_path / "none.png")) == {}
