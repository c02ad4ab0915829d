"""The family server under load, and clients that go away mid-request (``elastic_jax.serve``).

Reference: each greedy request's tokens against ``generate`` on its member's child as ``elastic.extract`` slices it
(``test_serve``'s ``references``: no serving code involved); each seeded sampled request against the same request
sent alone afterwards (a row's draw depends on its own seed, not on its batch mates).

The server runs as in ``test_serve`` (uvicorn in a thread over the small hand-made family), with one addition: every
batch passes a gate (``_Gate``) that a test can hold shut, so that "while the request is queued" and "while its batch
runs" are states the test waits for, not moments it guesses with sleeps. A client that leaves is a real separate
process killed with SIGKILL, or an in-process client whose timeout expires.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from elastic_jax import serve
from elastic_jax.serve.batching import MemberBatcher
from elastic_jax.serve.server import create_app, running_in_thread
from test_serve import NAMES, NEW_TOKENS, PROMPTS, parent, references, workdir  # pylint: disable=unused-import

MEMBERS = sorted(NAMES.values())
MAX_BATCH = 8
SHORT = 4  # the other max_tokens (greedy: the first SHORT tokens of the reference)
PATIENCE_S = 120.0  # a safety net for waits that a hung server would never end; never a measured threshold
_WATCHED_LOGGERS = ("uvicorn.error", "asyncio", "fastapi")

# A client in its own process: posts one request and waits for the answer (it is killed before it comes).
_CLIENT = """
import json, sys
import httpx
httpx.post(sys.argv[1], json=json.loads(sys.argv[2]), timeout=600)
"""
# A client in its own process that sends a request's headers and the start of its body, then waits (to be killed).
_HALF_CLIENT = """
import socket, sys, time
body = sys.argv[3].encode()
connection = socket.create_connection((sys.argv[1], int(sys.argv[2])))
connection.sendall(b"POST /v1/completions HTTP/1.1\\r\\nHost: test\\r\\nContent-Type: application/json\\r\\n"
                   b"Content-Length: %d\\r\\n\\r\\n" % len(body) + body[:len(body) // 2])
time.sleep(600)
"""


class _Gate:
  """Wraps ``ServedFamily.run_member``: records every batch the server runs and, while held, keeps each one waiting
  (in the batcher's worker thread) until the test lets it through."""

  def __init__(self, run: Callable):
    self._run = run
    self._changed = threading.Condition()
    self._held = False
    self._permits = 0
    self.calls: list[tuple[str, list[serve.Row]]] = []

  def __call__(self, member: str, rows):
    with self._changed:
      self.calls.append((member, list(rows)))
      self._changed.notify_all()
      if not self._changed.wait_for(lambda: not self._held or self._permits > 0, PATIENCE_S):
        raise TimeoutError("the test never let this batch through")
      if self._held:
        self._permits -= 1
    return self._run(member, rows)

  def hold(self) -> None:
    with self._changed:
      self._held, self._permits = True, 0

  def let_through(self, batches: int = 1) -> None:
    with self._changed:
      self._permits += batches
      self._changed.notify_all()

  def open(self) -> None:
    with self._changed:
      self._held = False
      self._changed.notify_all()


class _Records(logging.Handler):
  """Every warning or error the server's loggers emit (uvicorn's errors, asyncio's, FastAPI's)."""

  def __init__(self):
    super().__init__(logging.WARNING)
    self.records: list[logging.LogRecord] = []

  def emit(self, record: logging.LogRecord) -> None:
    self.records.append(record)

  def messages(self) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" + (f" ({r.exc_info[1]!r})" if r.exc_info else "") for r in self.records]


def _wait(condition: Callable[[], bool], what: str) -> None:
  deadline = time.monotonic() + PATIENCE_S
  while not condition():
    assert time.monotonic() < deadline, f"timed out waiting for {what}"
    time.sleep(0.01)


@pytest.fixture(scope="module")
def family(workdir) -> serve.ServedFamily:
  return serve.load(workdir, max_batch=MAX_BATCH)


@pytest.fixture(scope="module")
def server(family):
  """The HTTP server on a free port, in-process (uvicorn in a thread), its batches through a ``_Gate`` and its loggers'
  warnings collected; a batch window short enough for a quick test and long enough that concurrent requests meet."""
  gate = _Gate(family.run_member)
  family.run_member = gate  # what the app's batcher runs (the family's other methods are untouched)
  app = create_app(family, batch_window_ms=20)
  started = collections.Counter()  # requests the app has begun to handle, by path

  async def counted(scope, receive, send):
    if scope["type"] == "http":
      started[scope["path"]] += 1
    await app(scope, receive, send)

  records = _Records()
  for name in _WATCHED_LOGGERS:
    logging.getLogger(name).addHandler(records)
  with running_in_thread(counted) as (url, instance):
    yield {"url": url, "app": app, "uvicorn": instance, "gate": gate, "logs": records, "started": started}
  for name in _WATCHED_LOGGERS:
    logging.getLogger(name).removeHandler(records)
  del family.run_member


def _greedy(member: str, prompt: int, max_tokens: int = NEW_TOKENS) -> dict:
  return {"model": member, "prompt": list(PROMPTS[prompt]), "max_tokens": max_tokens, "temperature": 0}


def _reference_tokens(references, body: dict) -> list[list[int]]:
  """A greedy request's reference tokens, one list per prompt: its member's child's, up to ``max_tokens``."""
  prompts = body["prompt"] if isinstance(body["prompt"][0], list) else [body["prompt"]]
  return [references[body["model"]][PROMPTS.index(tuple(p))][:body["max_tokens"]] for p in prompts]


def _expected_greedy(family, references, body: dict) -> list[str]:
  """The reference texts of a greedy request (one per prompt)."""
  return [family.tokenizer.decode(tokens) for tokens in _reference_tokens(references, body)]


def _texts(response: dict) -> list[str]:
  return [choice["text"] for choice in response["choices"]]


def _post(url: str, body: dict) -> httpx.Response:
  return httpx.post(url + "/v1/completions", json=body, timeout=PATIENCE_S)


# ---------------------------------------------------------------------------------------------------- load
def _load(rng: np.random.Generator, count: int) -> list[dict]:
  """``count`` requests over every member: greedy ones (some with two prompts) and seeded sampled ones (some with
  top-k or top-p); two prompt lengths and two ``max_tokens``, so that a few compiled shapes serve them all."""
  bodies = []
  for i in range(count):
    member = MEMBERS[i % len(MEMBERS)]
    prompt = int(rng.integers(len(PROMPTS)))
    max_tokens = int(rng.choice([SHORT, NEW_TOKENS]))
    kind = rng.random()
    if kind < 0.55:
      body = _greedy(member, prompt, max_tokens)
    elif kind < 0.65:
      other = (prompt + 1 + int(rng.integers(len(PROMPTS) - 1))) % len(PROMPTS)
      body = {**_greedy(member, prompt, max_tokens), "prompt": [list(PROMPTS[prompt]), list(PROMPTS[other])]}
    else:
      body = {"model": member, "prompt": list(PROMPTS[prompt]), "max_tokens": max_tokens, "temperature": 1.5,
              "seed": 1000 + i, "top_k": int(rng.choice([0, 8])), "top_p": float(rng.choice([1.0, 0.9]))}
    bodies.append(body)
  return bodies


async def _fire(url: str, bodies: list[dict]) -> tuple[list[httpx.Response], list[float]]:
  """Every request at once, each on its own connection; their responses and latencies (s), in order."""
  async with httpx.AsyncClient(base_url=url, timeout=PATIENCE_S,
                               limits=httpx.Limits(max_connections=len(bodies))) as client:
    async def one(body):
      start = time.perf_counter()
      response = await client.post("/v1/completions", json=body)
      return response, time.perf_counter() - start

    done = await asyncio.gather(*(one(body) for body in bodies))
  return [response for response, _ in done], [seconds for _, seconds in done]


def test_200_concurrent_requests_mixed_over_the_members_are_batched_and_answer_as_each_would_alone(
    server, family, references):
  batcher = server["app"].state.batcher
  before = len(batcher.batches)
  bodies = _load(np.random.default_rng(0), 200)
  start = time.perf_counter()
  responses, latencies = asyncio.run(_fire(server["url"], bodies))
  wall = time.perf_counter() - start
  assert [r.status_code for r in responses] == [200] * len(bodies), [r.text for r in responses if r.status_code != 200]
  answers = [r.json() for r in responses]
  completion_tokens = sum(a["usage"]["completion_tokens"] for a in answers)
  batches = batcher.batches[before:]
  print(f"\n{len(bodies)} requests ({sum(len(a['choices']) for a in answers)} rows) in {wall:.2f} s "
        f"(compiles included): {len(bodies) / wall:.1f} requests/s, {completion_tokens / wall:.1f} completion "
        f"tokens/s; latency p50 {np.percentile(latencies, 50):.2f} s, max {max(latencies):.2f} s; {len(batches)} "
        f"batches, {np.mean([rows for _, rows in batches]):.1f} rows per batch on average")

  sampled = []
  for body, answer in zip(bodies, answers):
    assert answer["model"] == body["model"]
    if body["temperature"] == 0:
      assert _texts(answer) == _expected_greedy(family, references, body), body
      assert answer["usage"]["completion_tokens"] == sum(map(len, _reference_tokens(references, body)))
    else:
      sampled.append((body, answer))
  # Sampled requests: the same request sent alone afterwards (its own batch) draws the same tokens.
  start, after_load = time.perf_counter(), len(batcher.batches)
  with httpx.Client(base_url=server["url"], timeout=PATIENCE_S) as client:
    for body, answer in sampled:
      alone = client.post("/v1/completions", json=body).json()
      assert _texts(alone) == _texts(answer) and alone["usage"] == answer["usage"], body
  print(f"{len(sampled)} sampled requests sent again one at a time: {time.perf_counter() - start:.2f} s")
  assert [rows for _, rows in batcher.batches[after_load:]] == [1] * len(sampled)
  # The sampled rows are not the greedy ones (otherwise the comparison above would not tell seeds apart).
  assert sum(_texts(a) != _expected_greedy(family, references, b) for b, a in sampled) > len(sampled) // 2

  # Every row ran, in batches of each member's concurrent requests.
  rows = collections.Counter()
  for body in bodies:
    prompts = len(body["prompt"]) if isinstance(body["prompt"][0], list) else 1
    rows[body["model"]] += prompts
  ran = collections.Counter()
  for member, size in batches:
    ran[member] += size
  assert ran == rows
  sizes = [size for _, size in batches]
  assert max(sizes) >= MAX_BATCH and len(batches) < len(bodies) / 4, sizes
  assert max(sizes) <= MAX_BATCH + 1, sizes  # the window closes at MAX_BATCH rows; a two-row request may cross it
  assert server["logs"].messages() == []


# ---------------------------------------------------------------------------------------------------- clients leaving
def _open_connections(server) -> set:
  return set(server["uvicorn"].server_state.connections)


@pytest.mark.parametrize("client, where", [("killed", "queued"), ("killed", "running"), ("timed out", "queued")])
def test_a_client_that_leaves_mid_request_does_not_disturb_the_others(server, family, references, client, where):
  """A request's client goes away while the request waits for its batch, or while its batch runs (held at the gate);
  the other requests, its batch mates included, get their reference tokens, nothing is logged, and afterwards
  ``/health`` answers and every member still serves."""
  url, gate, batcher = server["url"], server["gate"], server["app"].state.batcher
  member = "family-75pct"
  leaving = {"model": member, "prompt": [7] * 9, "max_tokens": NEW_TOKENS, "temperature": 1.0, "seed": 4}
  mates = [_greedy(member, 1), _greedy(member, 2, SHORT), _greedy(member, 3)]
  first = len(gate.calls)
  logged = len(server["logs"].records)
  process = None
  gate.hold()
  with ThreadPoolExecutor(len(mates) + 2) as pool:
    try:
      blocker = pool.submit(_post, url, _greedy(member, 0))
      _wait(lambda: len(gate.calls) > first, "the first batch to reach the gate")
      answers = [pool.submit(_post, url, body) for body in mates]
      _wait(lambda: batcher.queued(member) == len(mates), "the batch mates to be queued")
      known = _open_connections(server)  # the blocker's and the batch mates'
      if client == "killed":
        process = subprocess.Popen([sys.executable, "-c", _CLIENT, url + "/v1/completions", json.dumps(leaving)])
      else:
        timed_out = pool.submit(httpx.post, url + "/v1/completions", json=leaving, timeout=1.0)
      _wait(lambda: batcher.queued(member) == len(mates) + 1, "the leaving client's request to be queued")

      if where == "running":
        gate.let_through(1)  # the first batch; the next one (the leaving client's and its mates') waits at the gate
        _wait(lambda: len(gate.calls) > first + 1, "the leaving client's batch to reach the gate")
        member_of, rows = gate.calls[first + 1]
        assert member_of == member
        assert sorted(row.prompt for row in rows) == sorted(tuple(body["prompt"]) for body in mates + [leaving])
      if client == "killed":
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(PATIENCE_S) == -signal.SIGKILL
      else:
        with pytest.raises(httpx.TimeoutException):
          timed_out.result(PATIENCE_S)
      _wait(lambda: not _open_connections(server) - known, "the server to see the leaving client's connection close")
    finally:
      gate.open()
      if process is not None and process.poll() is None:
        process.kill()

    assert blocker.result(PATIENCE_S).status_code == 200
    for body, answer in zip(mates, answers):
      response = answer.result(PATIENCE_S)
      assert response.status_code == 200, response.text
      assert _texts(response.json()) == _expected_greedy(family, references, body)

  assert server["logs"].messages()[logged:] == []
  health = httpx.get(url + "/health", timeout=PATIENCE_S)
  assert health.status_code == 200 and health.json()["status"] == "ok"
  for name in MEMBERS:  # every member's queue still runs batches
    response = _post(url, _greedy(name, 2))
    assert _texts(response.json()) == _expected_greedy(family, references, _greedy(name, 2))


def test_a_client_killed_while_sending_its_body_leaves_the_server_serving(server, family, references):
  """The client is killed after its headers and half its body: the server keeps answering correctly and logs no
  error (Starlette's ``ClientDisconnect`` out of ``request.body()`` is the end of that request, not a failure)."""
  url = server["url"]
  host, port = url.removeprefix("http://").split(":")
  logged = len(server["logs"].records)
  seen = server["started"]["/v1/completions"]
  known = _open_connections(server)
  body = json.dumps(_greedy("family-50pct", 0))
  process = subprocess.Popen([sys.executable, "-c", _HALF_CLIENT, host, port, body])
  try:  # the handler has begun (and waits for the rest of the body)
    _wait(lambda: server["started"]["/v1/completions"] > seen, "the server to begin the request")
    ours = _open_connections(server) - known
  finally:
    process.kill()
  assert process.wait(PATIENCE_S) == -signal.SIGKILL
  _wait(lambda: not _open_connections(server) & ours, "the server to see the client go")
  response = _post(url, _greedy("family-50pct", 0))
  assert _texts(response.json()) == _expected_greedy(family, references, _greedy("family-50pct", 0))
  health = httpx.get(url + "/health", timeout=PATIENCE_S)
  assert health.status_code == 200 and health.json()["status"] == "ok"
  assert server["logs"].messages()[logged:] == []


# ---------------------------------------------------------------------------------------------------- the batcher
def _recording_engine():
  """A fake ``run_member`` for the batcher alone: records each batch, waits for ``release``, labels each row."""
  release = threading.Event()
  calls = []

  def run(member, rows):
    calls.append((member, list(rows)))
    release.wait(PATIENCE_S)
    return [f"{member}:{row}" for row in rows]

  return run, calls, release


async def _until(condition: Callable[[], bool]) -> None:
  deadline = time.monotonic() + PATIENCE_S
  while not condition():
    assert time.monotonic() < deadline
    await asyncio.sleep(0.01)


def test_a_request_cancelled_while_its_batch_runs_leaves_the_results_to_its_batch_mates():
  """The awaiting task of one request is cancelled while its batch computes: its batch mates get their own rows'
  results, the cancelled future is left alone (no InvalidStateError), and the member's queue goes on serving."""
  run, calls, release = _recording_engine()

  async def scenario():
    errors = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: errors.append(context))
    batcher = MemberBatcher(run, ["a", "b"], window_s=0.2, max_rows=4)  # the batch closes at its fourth row
    leaving = asyncio.create_task(batcher.submit("a", ["x0", "x1"]))
    staying = [asyncio.create_task(batcher.submit("a", [f"y{i}"])) for i in range(2)]
    await _until(lambda: bool(calls))
    leaving.cancel()
    await asyncio.sleep(0)
    release.set()
    results = await asyncio.gather(*staying)
    after = await batcher.submit("a", ["z"])
    other = await batcher.submit("b", ["w"])
    await batcher.close()
    return leaving, results, after, other, errors

  leaving, results, after, other, errors = asyncio.run(scenario())
  assert leaving.cancelled()
  assert results == [["a:y0"], ["a:y1"]] and after == ["a:z"] and other == ["b:w"]
  assert calls[0] == ("a", ["x0", "x1", "y0", "y1"])  # it was a batch mate of the two that stayed
  assert errors == []


def test_a_request_cancelled_while_queued_is_dropped_from_its_batch():
  """Requests whose awaiting tasks are cancelled before their batch runs cost it no rows: the others in that batch run
  and get their results, and a batch left with nobody is not run."""
  run, calls, release = _recording_engine()

  async def scenario():
    errors = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: errors.append(context))
    batcher = MemberBatcher(run, ["a"], window_s=0.2, max_rows=3)
    blocker = asyncio.create_task(batcher.submit("a", ["b"]))
    await _until(lambda: bool(calls))  # the worker runs the blocker's batch; the rest queue behind it
    first = asyncio.create_task(batcher.submit("a", ["x"]))
    staying = [asyncio.create_task(batcher.submit("a", [f"y{i}"])) for i in range(2)]
    second = asyncio.create_task(batcher.submit("a", ["x2"]))  # the next batch: it alone
    await _until(lambda: batcher.queued("a") == 4)
    first.cancel()
    second.cancel()
    await asyncio.sleep(0)
    release.set()
    results = await asyncio.gather(blocker, *staying)
    after = await batcher.submit("a", ["z"])
    await batcher.close()
    return first, second, results, after, errors

  first, second, results, after, errors = asyncio.run(scenario())
  assert first.cancelled() and second.cancelled()
  assert results == [["a:b"], ["a:y0"], ["a:y1"]] and after == ["a:z"]
  assert [rows for _, rows in calls] == [["b"], ["y0", "y1"], ["z"]]
  assert errors == []
