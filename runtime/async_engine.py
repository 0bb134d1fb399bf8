"""AsyncLLMEngine: the engine's step loop in a worker thread, streamed to asyncio consumers.

The worker thread owns the LLMEngine: requests and aborts reach it through an inbox, outputs
go back to each request's asyncio.Queue with `call_soon_threadsafe`. The event loop never
waits on a forward. If a step raises, every request in flight ends with an error output and
the loop keeps serving new requests.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from runtime.engine import LLMEngine
from runtime.model.threads import engine_threads
from runtime.types import EngineDraining, EngineRequest, FinishReason, QueueFull, RequestOutput

__all__ = ["AsyncLLMEngine", "EngineDraining"]

log = logging.getLogger(__name__)
RATE_WINDOW_S = 10.0  # tokens_per_s is measured over this trailing window


class AsyncLLMEngine:
    def __init__(
        self, engine: LLMEngine, *, requests_checked: bool = False,
        num_threads: int | None = None,
    ) -> None:
        """`requests_checked`: every request comes through runtime.http.app, which checks it
        against the same limits (`engine.limits`) while decoding the body; then `generate`
        does not check it again, and a request is checked once on its way in.
        `num_threads`: the engine thread's torch threads (None: the process's default)."""
        self.engine = engine
        self._num_threads = num_threads
        self._requests_checked = requests_checked
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # guards the inbox below
        self._wake = threading.Event()
        self._new: list[EngineRequest] = []
        self._aborts: list[str] = []
        self._queues: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._stopping = False
        self._admitting = True
        self._idle = threading.Event()
        self._idle.set()
        self._rates: collections.deque[tuple[float, int]] = collections.deque()
        self._stats: dict[str, Any] = engine.stats()

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="llm-engine", daemon=True)
        self._thread.start()

    async def generate(self, req: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs as they come, each choice's last with `finished` set;
        the iteration ends once every one of the request's `n` choices has finished.

        Raises ValueError (bad request), QueueFull or EngineDraining before the first output.
        Leaving the iteration early (client gone) aborts the request.
        """
        if not self._admitting:
            raise EngineDraining("the runtime is draining")
        if self._thread is None:
            raise RuntimeError("call start() first")
        if not self._requests_checked:
            self.engine.check_request(req)  # pure: safe outside the worker thread
        if self._stats["num_waiting"] + len(self._new) >= self.engine.config.max_waiting:
            raise QueueFull("the waiting queue is full")
        if req.request_id in self._queues:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._queues[req.request_id] = queue
        with self._lock:
            self._new.append(req)
            self._idle.clear()
        self._wake.set()
        finished, remaining = False, req.sampling.n
        try:
            while remaining:
                out = await queue.get()
                remaining -= out.finished
                finished = not remaining
                yield out
        finally:
            self._queues.pop(req.request_id, None)
            if not finished:
                self.abort(req.request_id)

    def backlog(self, request_id: str) -> int:
        """Outputs of `request_id` delivered and not yet taken by its `generate` (on the
        event loop): the HTTP layer writes them out with the one in hand as one chunk."""
        queue = self._queues.get(request_id)
        return 0 if queue is None else queue.qsize()

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.append(request_id)
        self._wake.set()

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        with self._lock:
            recent = [(t, n) for t, n in self._rates if now - t <= RATE_WINDOW_S]
        tokens = sum(n for _, n in recent)
        span = max(now - recent[0][0], 1.0) if recent else RATE_WINDOW_S
        return {**self._stats, "tokens_per_s": round(tokens / span, 2)}

    async def shutdown(self, drain: bool = True) -> None:
        """Stop admitting; with drain, let running and waiting requests finish; stop the thread."""
        self._admitting = False
        if drain:
            await asyncio.to_thread(self._idle.wait)
        else:
            with self._lock:
                self._aborts.extend(self._queues)
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    # -- worker thread ------------------------------------------------------------------

    def _run(self) -> None:
        # Every torch op of the runtime runs here, on the process's intra-op pool; helper
        # threads (model load, adapter parsing) keep to one thread (runtime/model/threads.py).
        engine_threads(self._num_threads)
        engine = self.engine
        while True:
            with self._lock:
                new, self._new = self._new, []
                aborts, self._aborts = self._aborts, []
            outputs: list[RequestOutput] = []
            for req in new:
                try:
                    engine.add_request(req, checked=True)  # generate() or the HTTP app did
                except (ValueError, QueueFull) as exc:
                    outputs += [_error(req.request_id, str(exc), i) for i in range(req.sampling.n)]
            for rid in aborts:
                engine.abort(rid)
            if engine.has_unfinished():
                try:
                    outputs += engine.step()
                except Exception:
                    log.exception("engine step failed; failing the requests in flight")
                    outputs += engine.fail_all("internal error in the engine step")
            self._stats = engine.stats()
            self._deliver(outputs)
            if not engine.has_unfinished():
                with self._lock:
                    if not self._new:
                        self._idle.set()
                if self._stopping:
                    return
                self._wake.wait()
                self._wake.clear()

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        tokens = sum(len(o.new_token_ids) for o in outputs)
        if tokens:
            now = time.monotonic()
            with self._lock:
                self._rates.append((now, tokens))
                while self._rates and now - self._rates[0][0] > RATE_WINDOW_S:
                    self._rates.popleft()
        if outputs and self._loop is not None:
            self._loop.call_soon_threadsafe(self._dispatch, outputs)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:  # on the event loop
        for out in outputs:
            queue = self._queues.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)


def _error(request_id: str, message: str, index: int = 0) -> RequestOutput:
    return RequestOutput(request_id, [], finished=True, finish_reason=FinishReason.ERROR,
                         error=message, index=index)
