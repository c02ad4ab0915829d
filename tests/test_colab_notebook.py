"""The Colab notebook runs top to bottom on CPU (install cell skipped, tiny step counts through its environment
settings) and leaves the report with one row per budget."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile

import pytest

ROOT = pathlib.Path(__file__).parent.parent
NOTEBOOK = ROOT / "launch" / "colab.ipynb"
BUDGETS = [1.0, 0.5]
# Everything small: a few steps of short, narrow batches and a handful of short evaluation examples. The model stays
# the tiny config's.
OVERRIDES = {
    "parent.batch_size": 2, "parent.seq_len": 32, "parent.warmup_steps": 1,
    "importance.batches": 1, "importance.batch_size": 2, "importance.seq_len": 32, "importance.depth_batches": 1,
    "elastic.budgets": BUDGETS,
    "stages.0.batch_size": 2, "stages.0.seq_len": 32, "stages.0.budget_probs": [0.5, 0.5],
    "stages.1.batch_size": 2, "stages.1.seq_len": 32, "stages.1.budget_probs": [0.7, 0.3],
    "stages.2.batch_size": 2, "stages.2.seq_len": 32,  # its budget_probs: the notebook copies stage 2's
    "optimizer.warmup_steps": 1, "router_optimizer.warmup_steps": 1,
    "eval.ppl_batches": 1, "eval.batch_size": 2, "eval.seq_len": 32, "eval.max_new_tokens": 8,
    "eval.decode_batch": 2,
}


def _code_cells() -> list[dict]:
  notebook = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
  assert notebook["nbformat"] == 4
  return [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]


def _source(cell: dict) -> str:
  return "".join(cell["source"])


def test_install_cell_is_tagged_and_the_rest_is_plain_python():
  cells = _code_cells()
  install = [cell for cell in cells if "install" in cell["metadata"].get("tags", [])]
  assert len(install) == 1 and "pip install" in _source(install[0])
  for cell in cells:
    if cell not in install:
      compile(_source(cell), "<cell>", "exec")  # no shell escapes or magics outside the install cell


@pytest.mark.slow
def test_notebook_runs_top_to_bottom_and_writes_the_report(tmp_path):
  cells = [_source(cell) for cell in _code_cells() if "install" not in cell["metadata"].get("tags", [])]
  script = tmp_path / "notebook.py"
  # Each cell runs in one shared namespace, in order, as Jupyter would.
  script.write_text("namespace = {'__name__': '__main__'}\n" + "".join(
      f"exec(compile({cell!r}, 'cell {i}', 'exec'), namespace)\n" for i, cell in enumerate(cells)))
  workdir = tmp_path / "run"
  env = dict(os.environ)
  flags = env.get("XLA_FLAGS", "")
  if "xla_backend_optimization_level" not in flags:
    flags += " --xla_backend_optimization_level=0"
  env.update(XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu", ELASTIC_JAX_DISTRIBUTED="off",
             JAX_COMPILATION_CACHE_DIR=os.path.join(tempfile.gettempdir(), "elastic_jax_test_xla_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
             ELASTIC_JAX_REPO=str(ROOT), ELASTIC_JAX_NB_WORKDIR=str(workdir), ELASTIC_JAX_NB_PARENT_STEPS="4",
             ELASTIC_JAX_NB_STAGE1_STEPS="3", ELASTIC_JAX_NB_STAGE2_STEPS="2", ELASTIC_JAX_NB_PINNED_STEPS="2",
             ELASTIC_JAX_NB_EVAL_EXAMPLES="2",
             ELASTIC_JAX_NB_OVERRIDES=json.dumps(OVERRIDES))
  result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=400)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]

  for name in ("report.md", "report.json", "accuracy_vs_params.png", "elastic/metrics.jsonl"):
    assert (workdir / name).exists(), name
  report = json.loads((workdir / "report.json").read_text())
  rows = report["rows"] if isinstance(report, dict) else report
  budget_names = [f"{int(round(100 * b))}pct" for b in BUDGETS]
  assert [row["budget"] for row in rows] == ["parent"] + budget_names
  table = (workdir / "report.md").read_text()
  assert all(f"| {name} " in table for name in budget_names)
  # The step counts came from the notebook's settings: stage 1 + stage 2 + its pinned tail's steps of elastic
  # training. The tail ran pinned, with stage 2's two budget probabilities (tiny's three would have been refused).
  steps = [json.loads(line)["step"] for line in (workdir / "elastic" / "metrics.jsonl").read_text().splitlines()]
  assert steps == [1, 2, 3, 4, 5, 6, 7]
  assert "(stage 3 of 3, steps 6-7)" in result.stdout and "router frozen" in result.stdout
  assert "'budget': '50pct'" in result.stdout  # the last cell printed the rows
