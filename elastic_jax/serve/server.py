"""The HTTP server: an OpenAI-compatible ``/v1/completions`` over a ``ServedFamily`` (FastAPI; run by uvicorn).

Endpoints:

- ``POST /v1/completions``: OpenAI's completions request. ``model`` names the member (``family-50pct``), any budget
  in the trained range (``family-60pct``, deployed from the interpolated router on first use), or a budget-control
  pair (``family-50pct+100pct``: the first member reasons up to the answer marker, the second answers); ``prompt``
  is a string, a list of strings, a list of token ids or a list of them; ``max_tokens`` (default 16), ``temperature``
  (default 1; 0 is greedy), ``top_p``, ``n``, ``stop`` (up to 4 strings), ``seed``; as extensions ``top_k`` (0: off)
  and ``answer_marker`` (where a pair hands over; default the server's ``--answer-marker``). A pair's choices carry
  ``reasoning_tokens``: how many of the completion's tokens the reasoning member wrote. Not supported, and refused by name when asked for: ``stream``, ``echo``, ``logprobs``, ``best_of`` > 1,
  ``suffix``, penalties and ``logit_bias``. Concurrent requests for one member run as one batch
  (``batching.MemberBatcher``).
- ``GET /v1/models`` (and ``/v1/models/{id}``): the members, with their budget, parameter count and pattern.
- ``GET /health``: ``{"status": "ok", ...}`` once the family is loaded, with the trained budget range and the answer
  marker.

Errors follow OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 for malformed JSON or an
invalid field (the message names it, its value and the fix), 404 for an unknown member, 500 if a batch fails (the
server keeps serving).
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.requests import ClientDisconnect

from elastic_jax.serve import text
from elastic_jax.serve.batching import MemberBatcher
from elastic_jax.serve.engine import RequestError, Row, Sampling, ServedFamily, UnknownMember

OWNER = "elastic_jax"
MAX_N = 16


class CompletionRequest(BaseModel):
  """The fields of OpenAI's completions request this server reads (others are ignored)."""
  model_config = ConfigDict(extra="ignore")
  model: str
  prompt: str | list[str] | list[int] | list[list[int]]
  max_tokens: int | None = 16
  temperature: float | None = 1.0
  top_p: float | None = 1.0
  top_k: int | None = 0
  n: int | None = 1
  stop: str | list[str] | None = None
  seed: int | None = None
  stream: bool | None = False
  echo: bool | None = False
  logprobs: int | None = None
  best_of: int | None = None
  suffix: str | None = None
  presence_penalty: float | None = 0.0
  frequency_penalty: float | None = 0.0
  logit_bias: dict[str, float] | None = None
  answer_marker: str | None = None


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
  kind = "invalid_request_error" if status < 500 else "server_error"
  return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


def _validation_message(error: ValidationError) -> tuple[str, str | None]:
  """The first problem of a request body: its message (field, problem, value) and the field's name."""
  first = error.errors()[0]
  field = str(first["loc"][0]) if first["loc"] else None  # the request's field (not the union member tried)
  value = first.get("input")
  shown = json.dumps(value)[:80] if value is not None and first["type"] != "missing" else None
  return f"{field}: {first['msg']}" + (f" (got {shown})" if shown else ""), field


def _refuse_unsupported(request: CompletionRequest) -> None:
  unsupported = {"stream": bool(request.stream), "echo": bool(request.echo), "logprobs": request.logprobs is not None,
                 "best_of": (request.best_of or 1) > 1, "suffix": request.suffix is not None,
                 "presence_penalty": bool(request.presence_penalty), "frequency_penalty": bool(request.frequency_penalty),
                 "logit_bias": bool(request.logit_bias)}
  for field, asked in unsupported.items():
    if asked:
      raise RequestError(f"{field} is not supported by this server; leave it out.", field)


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
  """The request's prompts: one string or token list, or a list of them."""
  if isinstance(prompt, str):
    return [prompt]
  if not prompt:
    raise RequestError("prompt is an empty list; give a string, token ids, or a list of them.", "prompt")
  if all(isinstance(p, int) for p in prompt):
    return [list(prompt)]
  return list(prompt)


def _rows(family: ServedFamily, request: CompletionRequest) -> list[Row]:
  """The request as rows (prompt-major, ``n`` per prompt), every one checked."""
  _refuse_unsupported(request)
  n = 1 if request.n is None else request.n
  if not 1 <= n <= MAX_N:
    raise RequestError(f"n {n} must be in [1, {MAX_N}].", "n")
  max_tokens = 16 if request.max_tokens is None else request.max_tokens
  rows = []
  for prompt in _prompts(request.prompt):
    ids = text.encode_prompt(family, prompt)
    for i in range(n):
      seed = None if request.seed is None else (request.seed * 1_000_003 + i) % (1 << 32)
      sampling = Sampling(1.0 if request.temperature is None else request.temperature, request.top_k or 0,
                          1.0 if request.top_p is None else request.top_p, seed)
      rows.append(Row(ids, max_tokens, sampling))
  for row in rows:
    family.check_row(request.model, row)
  return rows


def _model_card(name: str, family: ServedFamily, created: int) -> dict[str, Any]:
  member = family.member(name)
  spec = member.spec
  return {"id": name, "object": "model", "created": created, "owned_by": OWNER, "budget": spec.budget,
          "params": spec.params, "fraction": spec.fraction, "pattern": spec.pattern,
          "interpolated": member.interpolated}


def create_app(family: ServedFamily, *, batch_window_ms: float = 5.0) -> FastAPI:
  """The server's app over ``family``; ``batch_window_ms``: how long a member's queue waits for more requests."""
  created = int(time.time())

  @contextlib.asynccontextmanager
  async def lifespan(app: FastAPI):
    app.state.batcher = MemberBatcher(family.run_member, list(family.members), window_s=batch_window_ms / 1000,
                                      max_rows=family.max_batch)
    yield
    await app.state.batcher.close()

  app = FastAPI(title="elastic_jax family server", lifespan=lifespan)
  app.state.family = family

  @app.get("/health")
  async def health() -> dict[str, Any]:
    return {"status": "ok", "members": sorted(family.members), "slicing": family.slicing.value,
            "max_context": family.max_context, "budget_range": family.budget_range,
            "answer_marker": family.answer_marker}

  @app.get("/v1/models")
  async def models() -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(name, family, created) for name in family.members]}

  @app.get("/v1/models/{model}")
  async def model(model: str):
    try:
      return _model_card(model, family, created)
    except UnknownMember as error:
      return _error(404, str(error), error.param, "model_not_found")

  @app.post("/v1/completions")
  async def completions(request: Request):
    try:
      body = json.loads(await request.body())
    except ClientDisconnect:  # the client went away while sending its request: nobody is left to answer
      return Response(status_code=499)
    except (ValueError, UnicodeDecodeError) as error:
      return _error(400, f"the request body is not valid JSON ({error}); send a JSON object such as "
                         '{"model": "family-100pct", "prompt": "..."}.')
    if not isinstance(body, dict):
      return _error(400, f"the request body must be a JSON object, got {type(body).__name__}.")
    try:
      parsed = CompletionRequest.model_validate(body)
    except ValidationError as error:
      message, field = _validation_message(error)
      return _error(400, message, field)
    try:
      rows = _rows(family, parsed)
      stop = text.check_stop(parsed.stop)
      if parsed.answer_marker is not None and not parsed.answer_marker:
        raise RequestError("answer_marker must be a non-empty string (where a budget-control pair hands over).",
                           "answer_marker")
    except UnknownMember as error:
      return _error(404, str(error), error.param, "model_not_found")
    except RequestError as error:
      return _error(400, str(error), error.param)
    try:
      continuations = await request.app.state.batcher.run_plan(family.plan(parsed.model, rows, parsed.answer_marker))
      done = [text.finish(family, row, c, stop) for row, c in zip(rows, continuations)]
    except Exception as error:  # pylint: disable=broad-except  (one failed batch must not take the server down)
      return _error(500, f"generation failed: {type(error).__name__}: {error}")
    prompt_tokens = sum(len(row.prompt) for i, row in enumerate(rows) if i % max(1, parsed.n or 1) == 0)
    completion_tokens = sum(len(c.tokens) for c in done)
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": parsed.model,
            "choices": [{"text": c.text, "index": i, "logprobs": None, "finish_reason": c.finish_reason,
                         **({} if c.handoff is None else {"reasoning_tokens": c.handoff})}
                        for i, c in enumerate(done)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}

  return app


@contextlib.contextmanager
def running_in_thread(app: Any, *, host: str = "127.0.0.1", timeout_s: float = 60.0
                      ) -> Iterator[tuple[str, Any]]:
  """Serves an ASGI app (``create_app(family)``) with uvicorn on a free port in a background thread, for a notebook,
  a test or a benchmark: yields its URL and the uvicorn server, and stops it on exit."""
  import socket  # pylint: disable=import-outside-toplevel
  import threading  # pylint: disable=import-outside-toplevel
  import uvicorn  # pylint: disable=import-outside-toplevel
  with socket.socket() as probe:
    probe.bind((host, 0))
    port = probe.getsockname()[1]
  server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  deadline = time.monotonic() + timeout_s
  while not server.started:
    if time.monotonic() > deadline or not thread.is_alive():
      raise RuntimeError(f"the server did not start on {host}:{port} within {timeout_s:g} s")
    time.sleep(0.05)
  try:
    yield f"http://{host}:{port}", server
  finally:
    server.should_exit = True
    thread.join(timeout_s)
