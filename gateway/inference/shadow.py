"""The shadow policy, whole: which answers get a shadow copy, how it is sent, what is kept.

After a primary answer of an experiment with a shadow succeeds, the request is copied to the
shadow adapter with the shadow's `sample_rate` (a random draw, not sticky per user). The
copy runs inside the answer's book-keeping task, at most `max_concurrent` at once; beyond
that the sample is dropped rather than queued, so shadows never build a backlog that slows
the primaries. Only its figures are kept: latency, tokens, errors, and whether its output was
identical to the primary's. Its answer is never returned to anyone.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from typing import TYPE_CHECKING

import msgspec

from gateway.errors import GatewayError
from gateway.inference.experiments import SHADOW, stats_key
from gateway.inference.runtime_client import Collected, adapter_body

if TYPE_CHECKING:
    from adapters.views import ExperimentView
    from gateway.inference.experiments import ExperimentStats
    from gateway.inference.router import Router
    from runtime.protocol import GenerateBody

logger = logging.getLogger("loragate.gateway.shadow")


def sample_shadow(rate: float, rng: random.Random | None = None) -> bool:
    return rate > 0 and (rng or random).random() < rate


class Shadow:
    def __init__(self, router: Router, stats: ExperimentStats, *, max_concurrent: int = 8) -> None:
        self.router = router
        self.stats = stats
        self.max_concurrent = max_concurrent
        self._running = 0

    async def after(self, tenant: str, experiment: ExperimentView, primary: GenerateBody,
                    primary_output: str) -> None:
        """Called by book-keeping once a primary answer of `experiment` succeeded."""
        shadow = experiment.shadow
        if shadow is None or shadow.resolved is None or not sample_shadow(shadow.sample_rate):
            return
        if self._running >= self.max_concurrent:
            return
        body = msgspec.structs.replace(primary, request_id=f"shadow-{uuid.uuid4().hex}",
                                       adapter=adapter_body(tenant, shadow.resolved))
        self._running += 1
        started = time.perf_counter()
        got = Collected()
        ok = False
        try:
            async for event in self.router.generate(body, shadow.resolved.ref.sha256):
                got.add(event)
            ok = got.error is None
        except GatewayError as exc:
            logger.info("shadow request not served: %s", exc.message)
        finally:
            self._running -= 1
        await self.stats.record(
            tenant, stats_key(experiment), SHADOW, ok=ok, latency_s=time.perf_counter() - started,
            tokens_in=got.prompt_tokens, tokens_out=got.num_completion_tokens,
            identical=(got.output == primary_output) if ok else None)
