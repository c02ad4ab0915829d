"""Batching concurrent requests per member: a queue per member collects rows for a few milliseconds and runs them
as one program call.

A request's rows (its prompts x ``n``) stay together; a budget-control request's two steps (reasoning, then answer)
each join their member's queue. The first row to arrive opens a window of ``window_s``; rows
that arrive inside it, up to ``max_rows``, join the batch. Batches run one at a time, in arrival order over all
members, on one worker thread (one accelerator: concurrent calls would only compete for it), so the event loop
stays free to accept requests while a batch computes.

A request that goes away before its batch runs (its awaiting task cancelled) is dropped from the batch; one that goes
away while its batch runs leaves the batch to finish for its batch mates, and its rows' results are discarded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

from elastic_jax.serve.engine import Continuation, Plan, Row


@dataclasses.dataclass
class _Pending:
  rows: Sequence[Row]
  future: asyncio.Future


class MemberBatcher:
  """Per-member queues in front of ``run(member, rows) -> continuations`` (``ServedFamily.run_member``).

  Create it inside the running event loop (the server's startup); ``close()`` stops its tasks and worker.
  """

  def __init__(self, run: Callable[[str, Sequence[Row]], list[Continuation]], members: Sequence[str], *,
               window_s: float = 0.005, max_rows: int = 8):
    self._run, self._window_s, self._max_rows = run, window_s, max_rows
    self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="family-batches")
    self._queues: dict[str, asyncio.Queue[_Pending]] = {}
    self._tasks: list[asyncio.Task] = []
    self.batches: list[tuple[str, int]] = []  # (member, rows) of every batch run, for tests and logs
    for member in members:
      self._queue(member)

  def _queue(self, member: str) -> asyncio.Queue[_Pending]:
    """``member``'s queue, opened on first use (members deployed on request join the deployed ones)."""
    if member not in self._queues:
      self._queues[member] = asyncio.Queue()
      self._tasks.append(asyncio.get_running_loop().create_task(self._serve(member)))
    return self._queues[member]

  async def submit(self, member: str, rows: Sequence[Row]) -> list[Continuation]:
    """Queues ``rows`` for ``member`` and waits for their continuations (in order)."""
    future = asyncio.get_running_loop().create_future()
    await self._queue(member).put(_Pending(rows, future))
    return await future

  async def run_plan(self, plan: Plan) -> list[Continuation]:
    """Runs a generation plan (``ServedFamily.plan``), each of its steps batched with the other requests for that
    member."""
    try:
      member, rows = next(plan)
      while True:
        member, rows = plan.send(await self.submit(member, rows))
    except StopIteration as done:
      return done.value

  def queued(self, member: str) -> int:
    """How many requests wait in ``member``'s queue for its next batch (not counting the batch that runs)."""
    return self._queue(member).qsize()

  async def _serve(self, member: str) -> None:
    queue = self._queues[member]
    loop = asyncio.get_running_loop()
    while True:
      batch = [await queue.get()]
      deadline = time.monotonic() + self._window_s
      while sum(len(p.rows) for p in batch) < self._max_rows:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
          break
        try:
          batch.append(await asyncio.wait_for(queue.get(), remaining))
        except asyncio.TimeoutError:
          break
      batch = [pending for pending in batch if not pending.future.done()]  # drop requests that went away
      if not batch:
        continue
      rows = [row for pending in batch for row in pending.rows]
      self.batches.append((member, len(rows)))
      try:
        results: list[Any] = await loop.run_in_executor(self._executor, self._run, member, rows)
      except Exception as error:  # pylint: disable=broad-except  (each waiting request gets the error)
        for pending in batch:
          if not pending.future.done():
            pending.future.set_exception(error)
        continue
      first = 0
      for pending in batch:
        if not pending.future.done():  # a client that went away has its future cancelled
          pending.future.set_result(results[first:first + len(pending.rows)])
        first += len(pending.rows)

  async def close(self) -> None:
    for task in self._tasks:
      task.cancel()
    await asyncio.gather(*self._tasks, return_exceptions=True)
    self._executor.shutdown(wait=False, cancel_futures=True)
