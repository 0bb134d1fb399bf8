"""Background work after an answer: book-keeping tasks and shadow copies.

A shadow copy of a request goes to the experiment's shadow adapter once the primary answer is
done. It runs as a background task (at most `max_concurrent` at once; beyond that the sample
is dropped rather than queued, so shadows never build a backlog that slows the primaries),
and only its figures are kept: latency, tokens, errors, and whether its output was identical
to the primary's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from typing import Any

from gateway.api.openai_format import Collected
from gateway.errors import GatewayError
from gateway.inference.experiments import SHADOW, ExperimentStats

logger = logging.getLogger("loragate.gateway.shadow")


class Background:
    def __init__(self, router: Any, stats: ExperimentStats, *, max_concurrent: int = 8) -> None:
        self.router = router
        self.stats = stats
        self.max_concurrent = max_concurrent
        self._tasks: set[asyncio.Task[Any]] = set()
        self._shadows_running = 0

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(self._guard(work))
        self._tasks.add(task)  # a reference, or the loop may drop the task mid-way
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _guard(work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except Exception:  # book-keeping must never surface; the answer is already out
            logger.exception("background work failed")

    async def run(self, tenant: str, experiment: str, body: dict[str, Any],
                  primary_output: str) -> None:
        """Send the shadow copy and record its figures (called from a background task)."""
        if self._shadows_running >= self.max_concurrent:
            return
        self._shadows_running += 1
        started = time.perf_counter()
        got = Collected()
        ok = False
        try:
            adapter = body.get("adapter") or {}
            async for event in self.router.generate(body, adapter.get("key")):
                got.add(event)
            ok = got.error is None
        except GatewayError as exc:
            logger.info("shadow request not served: %s", exc.message)
        finally:
            self._shadows_running -= 1
        usage = got.usage()
        await self.stats.record(
            tenant, experiment, SHADOW, ok=ok, latency_s=time.perf_counter() - started,
            tokens_in=usage.prompt_tokens, tokens_out=usage.completion_tokens,
            identical=(got.output == primary_output) if ok else None)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
