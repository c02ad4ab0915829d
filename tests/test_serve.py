"""Serving a family from one loaded checkpoint (``elastic_jax.serve``): the Python API, the HTTP server, the export.

Reference: every member's tokens against ``generate`` on that member's child as ``elastic.extract`` slices it (a
separate model, no serving code involved); the resident weights against the parent's and the children's bytes; the
server through the real ``openai`` client and plain HTTP.

The family is made by hand, fast: a small random-weight parent (byte vocabulary) written as a finished main-job
workdir (student, deployed choices, depth order) with three hand-made choices: the parent, a narrower member and a
narrower and shallower one.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import gc
import json
import os
import re
import shutil

import httpx
import jax
import numpy as np
import openai
import pytest

from conftest import random_params, small_config
from elastic_jax import extract as extract_cli
from elastic_jax import serve
from elastic_jax.data.tokenizer import ByteTokenizer
from elastic_jax.elastic.extract import extract
from elastic_jax.elastic.space import Choice
from elastic_jax.eval.generate import generate
from elastic_jax.serve import __main__ as serve_cli
from elastic_jax.serve.server import create_app, running_in_thread
from elastic_jax.train.checkpoint import save_model

CONFIG = small_config("M-*M-", vocab_size=256)  # byte vocabulary: the run's default tokenizer fits
DEPTH_ORDER = [3, 0, 2, 1, 4]  # most important first; the 50% member keeps the first four
CHOICES = {1.0: Choice.full(CONFIG),
           0.75: Choice.homogeneous(CONFIG, hidden=24, mlp=32, mamba_heads=2),
           0.5: Choice.homogeneous(CONFIG, hidden=16, mlp=24, attention_heads=2, mamba_heads=2, depth=4)}
NAMES = {1.0: "family-100pct", 0.75: "family-75pct", 0.5: "family-50pct"}
NEW_TOKENS = 12
EOS = ByteTokenizer.eos_id
_PROMPT_RNG = np.random.default_rng(11)
# Two prompt lengths (one reference compile each per member), served together as one ragged batch.
PROMPTS = [tuple(int(t) for t in _PROMPT_RNG.integers(1, 128, n)) for n in (5, 5, 11, 11)]


@pytest.fixture(scope="module")
def parent():
  return random_params(CONFIG, seed=3)


@pytest.fixture(scope="module")
def workdir(parent, tmp_path_factory) -> str:
  """A finished main-job workdir as the extraction reads it: the student, the deployed choices, the depth order."""
  path = tmp_path_factory.mktemp("serve") / "run"
  os.makedirs(path / "elastic" / "student")
  os.makedirs(path / "importance")
  save_model(str(path / "elastic" / "student" / "model"), CONFIG.to_dict(), parent)
  (path / "elastic" / "student" / "DONE").write_text("")
  (path / "importance" / "rankings.json").write_text(json.dumps({"depth": DEPTH_ORDER}))
  records = [{"budget": b, "params": 0, "fraction": b, "choice": c.to_dict()} for b, c in CHOICES.items()]
  (path / "elastic" / "deployed_choices.json").write_text(json.dumps(records))
  return str(path)


@pytest.fixture(scope="module")
def references(parent) -> dict[str, list[list[int]]]:
  """Per member, each prompt's greedy continuation by ``generate`` on the extracted child, cut before the first
  end-of-document token (the server stops there)."""
  out = {}
  for budget, choice in CHOICES.items():
    config, params = extract(CONFIG, parent, choice, np.asarray(DEPTH_ORDER))
    rows = []
    for length in sorted({len(p) for p in PROMPTS}):
      same = [p for p in PROMPTS if len(p) == length]
      new = np.asarray(generate(config, params, np.asarray(same, np.int32), max_new_tokens=NEW_TOKENS))[:, length:]
      rows += [(p, row.tolist()) for p, row in zip(same, new)]
    by_prompt = dict(rows)
    out[NAMES[budget]] = [_cut(by_prompt[p]) for p in PROMPTS]
  return out


def _cut(tokens: list[int]) -> list[int]:
  return tokens[:tokens.index(EOS)] if EOS in tokens else tokens


@pytest.fixture(scope="module")
def family(workdir) -> serve.ServedFamily:
  return serve.load(workdir, max_batch=4)


@pytest.fixture(scope="module")
def server(family):
  """The HTTP server; its batch window is long enough that concurrent requests meet in it."""
  app = create_app(family, batch_window_ms=200)
  with running_in_thread(app) as (url, _):
    yield {"url": url, "app": app}


# ---------------------------------------------------------------------------------------------------- Python API
def test_every_member_serves_the_greedy_tokens_of_its_extracted_child(family, references):
  assert sorted(family.members) == sorted(NAMES.values())
  for name, expected in references.items():
    served = family.continue_rows(name, [serve.Row(p, NEW_TOKENS) for p in PROMPTS])  # one ragged batch
    assert [c.tokens for c in served] == expected, name
    assert [c.eos for c in served] == [len(e) < NEW_TOKENS for e in expected]
  # The members differ (otherwise the comparison would not tell them apart).
  assert len({json.dumps(r) for r in references.values()}) == len(references)


def test_text_completion_decodes_the_same_tokens_and_cuts_at_stop_strings(family, references):
  tokenizer = family.tokenizer
  name = "family-75pct"
  text_prompts = [tokenizer.decode(p) for p in PROMPTS]
  done = serve.complete(family, name, text_prompts, max_tokens=NEW_TOKENS)
  assert [c.text for c in done] == [tokenizer.decode(e) for e in references[name]]
  assert [c.prompt_tokens for c in done] == [len(p) for p in PROMPTS]
  assert [c.finish_reason for c in done] == ["length" if len(e) == NEW_TOKENS else "stop" for e in references[name]]
  # A stop string: the text up to it, the tokens up to the one that completed it.
  full = references[name][2]
  stop = tokenizer.decode(full[3:5])
  [cut] = serve.complete(family, name, [text_prompts[2]], max_tokens=NEW_TOKENS, stop=[stop])
  assert cut.finish_reason == "stop" and cut.text == tokenizer.decode(full)[:tokenizer.decode(full).find(stop)]
  assert stop in tokenizer.decode(cut.tokens) and stop not in tokenizer.decode(cut.tokens[:-1])


def test_sampling_is_seeded_per_row_and_top_k_one_is_greedy(family, references):
  name = "family-50pct"
  rows = lambda sampling: [serve.Row(p, NEW_TOKENS, sampling) for p in PROMPTS]
  hot = serve.Sampling(temperature=2.0, seed=5)
  a = [c.tokens for c in family.continue_rows(name, rows(hot))]
  b = [c.tokens for c in family.continue_rows(name, rows(hot))]
  assert a == b and a != references[name]
  # A row's draw depends on its own seed, not on its batchmates.
  alone = family.continue_rows(name, [serve.Row(PROMPTS[1], NEW_TOKENS, hot)] + rows(serve.Sampling())[2:])
  assert alone[0].tokens == a[1]
  for narrow in (serve.Sampling(temperature=2.0, top_k=1, seed=1), serve.Sampling(temperature=2.0, top_p=1e-6)):
    assert [c.tokens for c in family.continue_rows(name, rows(narrow))] == references[name]


def test_bad_rows_are_refused_naming_the_field(family):
  cases = [("family-200pct", serve.Row((1,), 4), "model", "family-100pct"),
           ("family-50pct", serve.Row((1,), -1), "max_tokens", "-1 must be >= 1"),
           ("family-50pct", serve.Row((1,) * 2040, 16), "prompt", "exceed this server's context of 2048"),
           ("family-50pct", serve.Row((), 4), "prompt", "empty"),
           ("family-50pct", serve.Row((300,), 4), "prompt", "token id 300"),
           ("family-50pct", serve.Row((1,), 4, serve.Sampling(top_p=0.0)), "top_p", "(0, 1]")]
  for member, row, param, text in cases:
    with pytest.raises(serve.RequestError, match=re.escape(text)) as error:
      family.continue_rows(member, [row])
    assert error.value.param == param


# ---------------------------------------------------------------------------------------------------- memory
def _live_bytes() -> int:
  gc.collect()
  return sum(a.nbytes for a in jax.live_arrays())


def test_the_weights_are_held_once_and_members_slice_them_inside_their_programs(workdir, tmp_path, parent,
                                                                                 references):
  """``extract --family`` writes an export that serves the workdir's tokens; loading it and running every member
  adds the parent's bytes to the live device arrays, not the sum of the children's."""
  out = str(tmp_path / "family")
  assert extract_cli.main(["--workdir", workdir, "--family", "--out", out]) == 0
  record = json.loads(open(os.path.join(out, "family.json"), encoding="utf-8").read())
  assert [(m["name"], m["choice"]) for m in record["members"]] == [
      (NAMES[b][len("family-"):], CHOICES[b].to_dict()) for b in (1.0, 0.75, 0.5)]
  assert record["depth_order"] == DEPTH_ORDER and record["tokenizer"]["file"] is None

  parent_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(parent))
  children = sum(sum(leaf.nbytes for leaf in jax.tree.leaves(extract(CONFIG, parent, c, np.asarray(DEPTH_ORDER))[1]))
                 for c in CHOICES.values())
  before = _live_bytes()
  exported = serve.load(out, max_batch=4)
  for name, expected in references.items():
    assert [c.tokens for c in exported.continue_rows(name, [serve.Row(p, NEW_TOKENS) for p in PROMPTS])] == expected
  resident = _live_bytes() - before
  memory = exported.memory()
  print(f"\nresident after loading and running every member: {resident:,} bytes; parent params {parent_bytes:,}; "
        f"the three extracted children {children:,}")
  assert memory == {"parent_param_bytes": parent_bytes, "held_param_bytes": parent_bytes,
                    "children_param_bytes": children}
  assert resident <= 1.05 * parent_bytes and children > 2 * parent_bytes

  # The decode loop carries the 50% member's sliced embedding (made once per call, before the loop), never the
  # parent's.
  hlo = exported.program_hlo("family-50pct", batch=4, max_new_tokens=16)
  decode_loops = [line for line in hlo.splitlines() if " while(" in line and "s32[4,16]" in line.split(" while(")[0]]
  assert len(decode_loops) == 1, "no single decode loop carrying the [4, 16] new tokens in the program"
  carried = decode_loops[0].split(" while(")[0]
  assert "f32[256,16]" in carried and "f32[256,32]" not in carried


# ---------------------------------------------------------------------------------------------------- HTTP
def test_openai_client_completes_with_two_members_lists_them_and_names_an_unknown_one(server, family, references):
  client = openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0)
  listed = client.models.list()
  assert sorted(m.id for m in listed.data) == sorted(NAMES.values())
  tokenizer = family.tokenizer
  for name in ("family-100pct", "family-50pct"):
    response = client.completions.create(model=name, prompt=list(PROMPTS[2]), max_tokens=NEW_TOKENS, temperature=0)
    assert response.model == name and len(response.choices) == 1
    assert response.choices[0].text == tokenizer.decode(references[name][2])
    assert response.usage.prompt_tokens == len(PROMPTS[2])
    assert response.usage.completion_tokens == len(references[name][2])
  with pytest.raises(openai.NotFoundError, match="family-100pct"):
    client.completions.create(model="family-10pct", prompt="12+7=", max_tokens=4)


def test_bad_requests_get_a_4xx_naming_the_problem_and_the_server_keeps_serving(server, references, family):
  url = server["url"] + "/v1/completions"
  good = {"model": "family-75pct", "prompt": list(PROMPTS[0]), "max_tokens": NEW_TOKENS, "temperature": 0}
  cases = [(b'{"model": "family-75pct", "prompt": ', 400, "not valid JSON"),
           (json.dumps({**good, "max_tokens": -3}), 400, "max_tokens -3 must be >= 1"),
           (json.dumps({**good, "prompt": "x" * 3000}), 400, "exceed this server's context of 2048"),
           (json.dumps({**good, "model": "family-33pct"}), 404, "not a member of this family"),
           (json.dumps({**good, "max_tokens": "many"}), 400, "max_tokens"),
           (json.dumps({"prompt": "hi"}), 400, "model"),
           (json.dumps({**good, "stream": True}), 400, "stream is not supported"),
           (json.dumps([good]), 400, "must be a JSON object")]
  with httpx.Client(timeout=60) as http:
    for body, status, message in cases:
      response = http.post(url, content=body, headers={"content-type": "application/json"})
      assert response.status_code == status, (body, response.text)
      assert message in response.json()["error"]["message"], response.text
    assert http.get(server["url"] + "/health").json()["status"] == "ok"
    response = http.post(url, json=good)
    assert response.status_code == 200
    assert response.json()["choices"][0]["text"] == family.tokenizer.decode(references["family-75pct"][0])


def test_concurrent_requests_for_one_member_run_as_one_batch(server, references, family):
  batcher = server["app"].state.batcher
  before = len(batcher.batches)
  url = server["url"] + "/v1/completions"

  def ask(prompt):
    body = {"model": "family-100pct", "prompt": list(prompt), "max_tokens": NEW_TOKENS, "temperature": 0}
    return httpx.post(url, json=body, timeout=60).json()["choices"][0]["text"]

  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    texts = list(pool.map(ask, PROMPTS))
  assert texts == [family.tokenizer.decode(r) for r in references["family-100pct"]]
  sizes = [rows for member, rows in batcher.batches[before:] if member == "family-100pct"]
  assert sum(sizes) == 4 and max(sizes) >= 2, sizes


def test_serve_cli_refuses_a_folder_without_a_family(tmp_path, capsys):
  assert serve_cli.main(["--family", str(tmp_path), "--port", "0"]) == 2
  message = capsys.readouterr().err
  assert "neither a family export" in message and "extract --workdir W --family" in message


def test_resident_slices_serve_the_same_tokens_and_are_counted_once(workdir, parent, references):
  """The alternative layout (each member's slices made once and kept) gives the same tokens and holds the parent plus
  every member's sliced tensors (those a choice keeps whole are shared, not copied)."""
  family = serve.ServedFamily(serve.read_family(workdir), slicing=serve.Slicing.RESIDENT, max_batch=4)
  name = "family-50pct"
  assert [c.tokens for c in family.continue_rows(name, [serve.Row(p, NEW_TOKENS) for p in PROMPTS])] == \
      references[name]
  parent_leaves = {leaf.shape for leaf in jax.tree.leaves(parent)}
  sliced = sum(leaf.nbytes for c in CHOICES.values()
               for leaf in jax.tree.leaves(extract(CONFIG, parent, c, np.asarray(DEPTH_ORDER))[1])
               if leaf.shape not in parent_leaves)
  parent_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(parent))
  assert family.memory()["held_param_bytes"] == parent_bytes + sliced


def test_the_family_speaks_the_runs_tokenizer_and_its_export_carries_it(workdir, parent, tmp_path):
  """A run trained with an HF tokenizer (its phases record data.tokenizer): the export copies the file, and prompts and
  completions go through it."""
  from test_data import write_word_tokenizer  # pylint: disable=import-outside-toplevel
  run = tmp_path / "run"
  shutil.copytree(workdir, run)
  words = tmp_path / "words"
  words.mkdir()
  file = write_word_tokenizer(words, 254)  # 256 ids: every id the model emits decodes
  (run / "elastic" / "phase_config.json").write_text(json.dumps({"data.tokenizer": file, "data.eos_token": ""}))
  out = tmp_path / "family"
  assert extract_cli.main(["--workdir", str(run), "--family", "--out", str(out)]) == 0
  shutil.rmtree(words)  # the export serves from its own copy
  family = serve.load(str(out), max_batch=4)
  tokenizer = family.tokenizer
  assert tokenizer.path == str(out / "tokenizer.json") and tokenizer.encode("w1 w2 w3") == [3, 4, 5]
  config, params = extract(CONFIG, parent, CHOICES[0.5], np.asarray(DEPTH_ORDER))
  expected = np.asarray(generate(config, params, np.asarray([[3, 4, 5]], np.int32), max_new_tokens=NEW_TOKENS))[0, 3:]
  [done] = serve.complete(family, "family-50pct", ["w1 w2 w3"], max_tokens=NEW_TOKENS)
  assert done.tokens == _cut(expected.tolist()) and done.text == tokenizer.decode(expected.tolist())


# ---------------------------------------------------------------------------------------------------- masked members
def test_masked_members_serve_the_tokens_of_their_extracted_children(workdir, references):
  """The full-width parent under a member's masks (the training path, kept to measure what slicing saves) decodes
  what the sliced child decodes."""
  family = serve.ServedFamily(serve.read_family(workdir), slicing=serve.Slicing.MASKED, max_batch=4)
  for name in ("family-75pct", "family-50pct"):
    assert [c.tokens for c in family.continue_rows(name, [serve.Row(p, NEW_TOKENS) for p in PROMPTS])] == \
        references[name], name
  assert family.memory()["held_param_bytes"] == family.memory()["parent_param_bytes"]


# ---------------------------------------------------------------------------------------------------- interpolation
# The hand-made family's elastic setup as the training loop records it: a space holding its three choices, a router.
ELASTIC = {"space": {"hidden": [16, 24, 32], "mlp": [24, 32, 48], "attention_heads": [2, 4], "mamba_heads": [2, 4],
                     "depth": [4, 5]},
           "elastic": {"budgets": [1.0, 0.75, 0.5], "depth_order": DEPTH_ORDER, "router_width": 16, "dead_zone": 0.05}}


@pytest.fixture(scope="module")
def router_params():
  """A router with spread-out random weights (an initial router scores every choice alike)."""
  setup = serve.FamilyRouter(ELASTIC, None).setup(CONFIG)
  params = setup.router.init(jax.random.key(0), np.zeros((1,), np.int32))["params"]
  keys = iter(jax.random.split(jax.random.key(4), 64))
  return jax.tree.map(lambda x: np.asarray(jax.random.normal(next(keys), x.shape)), params)


def test_a_budget_between_the_trained_ones_serves_the_child_its_interpolated_router_deploys(workdir, parent,
                                                                                            router_params, tmp_path):
  """``family-60pct``: its tokens are ``generate``'s on the child ``extract`` slices for the interpolated router's
  choice (``deploy.interpolated_choice``, checked against a brute force in test_elastic_step), whose size is within
  the dead zone of 60%; the family export carries the router; a budget outside the trained range is refused with it."""
  from elastic_jax.elastic.deploy import interpolated_choice  # pylint: disable=import-outside-toplevel
  from elastic_jax.elastic.param_count import param_count  # pylint: disable=import-outside-toplevel
  routed = dataclasses.replace(serve.read_family(workdir), router=serve.FamilyRouter(ELASTIC, router_params))
  family = serve.ServedFamily(routed, max_batch=4)
  assert family.budget_range == (0.5, 1.0)
  choice = interpolated_choice(routed.router.setup(CONFIG), router_params, 0.6)
  config, params = extract(CONFIG, parent, choice, np.asarray(DEPTH_ORDER))
  assert abs(param_count(config) / param_count(CONFIG) - 0.6) <= 0.6 * ELASTIC["elastic"]["dead_zone"]
  assert choice not in CHOICES.values()  # a member of its own
  expected = []
  for prompt in PROMPTS:
    row = np.asarray(generate(config, params, np.asarray([prompt], np.int32), max_new_tokens=NEW_TOKENS))[0]
    expected.append(_cut(row[len(prompt):].tolist()))
  served = family.continue_rows("family-60pct", [serve.Row(p, NEW_TOKENS) for p in PROMPTS])
  assert [c.tokens for c in served] == expected
  member = family.members["family-60pct"]
  assert member.interpolated and member.spec.choice == choice and member.spec.params == param_count(config)
  assert family.memory()["held_param_bytes"] == family.memory()["parent_param_bytes"]
  with pytest.raises(serve.UnknownMember, match=r"outside the trained range \[0.5, 1\]"):
    family.continue_rows("family-40pct", [serve.Row(PROMPTS[0], 4)])

  out = str(tmp_path / "family")
  serve.write_family(out, routed)
  exported = serve.load(out, max_batch=4)
  assert [c.tokens for c in exported.continue_rows("family-60pct", [serve.Row(p, NEW_TOKENS) for p in PROMPTS])] \
      == expected


# ---------------------------------------------------------------------------------------------------- budget control
@pytest.fixture(scope="module")
def handoff(parent) -> dict:
  """A budget-control case worked out by hand with ``generate`` on the two extracted children (no serving code): a
  prompt, a marker (a printable byte the 50% member writes a few tokens in, not before: random weights), the 50%
  member's tokens through the marker, and the 100% member's continuation of the whole context."""
  children = {b: extract(CONFIG, parent, CHOICES[b], np.asarray(DEPTH_ORDER)) for b in (0.5, 1.0)}
  budget = 2 * NEW_TOKENS

  def greedy(b, prompt, n):
    config, params = children[b]
    return np.asarray(generate(config, params, np.asarray([prompt], np.int32), max_new_tokens=n))[0, len(prompt):]

  for candidate in PROMPTS + [tuple(int(t) for t in np.random.default_rng(s).integers(1, 128, 7)) for s in range(40)]:
    small = greedy(0.5, candidate, budget).tolist()
    for k in range(2, 8):
      if 32 <= small[k] < 127 and small[k] not in small[:k]:
        reasoning = small[:k + 1]
        answer = _cut(greedy(1.0, candidate + tuple(reasoning), budget - len(reasoning)).tolist())
        return {"prompt": candidate, "marker": chr(small[k]), "reasoning": reasoning, "answer": answer,
                "budget": budget, "small_alone": _cut(small), "small_8": _cut(small[:8])}
  raise AssertionError("no prompt whose small-member continuation holds a printable marker")


def test_budget_control_reasons_with_one_member_up_to_the_marker_and_answers_with_another(family, handoff):
  """``family-50pct+100pct``: the 50% member's tokens up to and including the answer marker, then the 100% member's
  continuation of the whole context."""
  case = handoff
  [served] = family.continue_rows("family-50pct+100pct", [serve.Row(case["prompt"], case["budget"])],
                                  answer_marker=case["marker"])
  assert served.tokens == case["reasoning"] + case["answer"] and served.handoff == len(case["reasoning"])
  # The answer member differs from the reasoning one after the marker (otherwise the test could not tell).
  assert served.tokens != case["small_alone"]
  # A marker never written: the small member writes the whole completion.
  [alone] = family.continue_rows("family-50pct+100pct", [serve.Row(case["prompt"], 8)], answer_marker="\x7f\x7f\x7f")
  assert alone.tokens == case["small_8"] and alone.handoff is None


def test_budget_control_over_http_batches_each_step_with_its_members_queue(server, family, handoff):
  batcher = server["app"].state.batcher
  before = len(batcher.batches)
  body = {"model": "family-50pct+100pct", "prompt": list(handoff["prompt"]), "max_tokens": handoff["budget"],
          "temperature": 0, "answer_marker": handoff["marker"]}
  response = httpx.post(server["url"] + "/v1/completions", json=body, timeout=60)
  assert response.status_code == 200, response.text
  [choice] = response.json()["choices"]
  assert choice["text"] == family.tokenizer.decode(handoff["reasoning"] + handoff["answer"])
  assert choice["reasoning_tokens"] == len(handoff["reasoning"])
  assert [member for member, _ in batcher.batches[before:]] == ["family-50pct", "family-100pct"]
  bad = httpx.post(server["url"] + "/v1/completions", json={**body, "model": "family-50pct+30pct"}, timeout=60)
  assert bad.status_code == 404 and "family-30pct" in bad.json()["error"]["message"]
