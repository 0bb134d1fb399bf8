"""Router: adapter affinity, bounded load, circuit breaker, retry only before the first token."""

from __future__ import annotations

from collections import Counter
from typing import Any

import httpx
import pytest

from gateway.errors import BadRequest, Unavailable
from gateway.inference.router import Router, affinity_key, rendezvous_order
from gateway.inference.runtime_client import RuntimeBusy, RuntimeRefused, RuntimeUnreachable
from runtime.protocol import ErrorEvent, FinishEvent, StartEvent, TokenEvent, Usage

pytestmark = pytest.mark.unit
URLS = ("http://r1", "http://r2", "http://r3")
KEY = "ab" * 32


OK = [StartEvent(1), TokenEvent([5], "x", None), FinishEvent("length", Usage(1, 1))]


class FakeStream:
    def __init__(self, events: list[Any], broken: bool = False) -> None:
        self._events, self._broken = events, broken
        self.closed = False

    async def events(self):  # type: ignore[no-untyped-def]
        for event in self._events:
            yield event
        if self._broken:
            raise RuntimeUnreachable("stream broke: runtime died")

    async def aclose(self) -> None:
        self.closed = True


class FakeClient:
    """Stands for RuntimeClient: each runtime behaves as `behaviour` says."""

    def __init__(self, behaviour: dict[str, str], calls: list[str]) -> None:
        self.behaviour, self.calls = behaviour, calls
        self.streams: list[FakeStream] = []

    async def open_generate(self, url: str, body: dict[str, Any], deadline: Any = None
                            ) -> FakeStream:
        self.calls.append(url)
        kind = self.behaviour.get(url, "ok")
        if kind == "down":
            raise RuntimeUnreachable(f"{url}: ConnectError")
        if kind == "busy":
            raise RuntimeBusy(f"{url} is busy", 3)
        if kind == "refuse":
            raise RuntimeRefused("too long", "prompt_too_long")
        stream = FakeStream(OK[:2], broken=True) if kind == "break" else FakeStream(OK)
        self.streams.append(stream)
        return stream

    async def aclose(self) -> None:
        pass


def make_router(behaviour: dict[str, str], calls: list[str]) -> Router:
    def health(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200, json={"status": "ok"})
        return httpx.Response(200, json={"num_running": 0})

    http = httpx.AsyncClient(transport=httpx.MockTransport(health))
    return Router(http, URLS, failure_threshold=2, cooldown_s=30.0,
                  client=FakeClient(behaviour, calls))


async def events(router: Router, key: str | None = KEY) -> list[Any]:
    return [e async for e in router.generate({"request_id": "r"}, key)]


async def test_same_adapter_same_runtime_and_keys_spread() -> None:
    assert rendezvous_order(KEY, URLS) == rendezvous_order(KEY, URLS[::-1])
    firsts = Counter(rendezvous_order(f"{i:064x}", URLS)[0] for i in range(300))
    assert all(60 < firsts[u] < 140 for u in URLS), firsts
    calls: list[str] = []
    router = make_router({}, calls)
    await router.refresh()
    for _ in range(5):
        assert isinstance((await events(router))[-1], FinishEvent)
    assert len(set(calls)) == 1 and calls[0] == rendezvous_order(KEY, URLS)[0]


async def test_hot_adapter_spills_to_other_runtimes() -> None:
    router = make_router({}, [])
    await router.refresh()
    home = rendezvous_order(KEY, URLS)[0]
    router.runtimes[home].in_flight = 10
    assert router.candidates(KEY)[0].url != home
    router.runtimes[home].in_flight = 0
    assert router.candidates(KEY)[0].url == home


async def test_retry_on_connection_failure_and_503_then_breaker_opens() -> None:
    order = rendezvous_order(KEY, URLS)
    calls: list[str] = []
    router = make_router({order[0]: "down", order[1]: "busy"}, calls)
    await router.refresh()
    assert isinstance((await events(router))[-1], FinishEvent)
    assert calls == order
    calls.clear()
    assert isinstance((await events(router))[-1], FinishEvent)
    assert router.runtimes[order[0]].breaker(float("inf")) == "half_open"
    calls.clear()
    await events(router)
    assert order[0] not in calls  # open: skipped without a try


async def test_no_retry_after_the_first_token() -> None:
    order = rendezvous_order(KEY, URLS)
    calls: list[str] = []
    router = make_router({order[0]: "break"}, calls)
    await router.refresh()
    got = await events(router)
    assert isinstance(got[1], TokenEvent)
    assert isinstance(got[-1], ErrorEvent) and got[-1].code == "runtime_failed"
    assert calls == [order[0]]
    assert all(stream.closed for stream in router.client.streams)


async def test_all_busy_is_unavailable_and_refusal_is_bad_request() -> None:
    router = make_router(dict.fromkeys(URLS, "busy"), [])
    await router.refresh()
    with pytest.raises(Unavailable) as info:
        await events(router)
    assert info.value.retry_after == 3
    router = make_router(dict.fromkeys(URLS, "refuse"), calls := [])
    await router.refresh()
    with pytest.raises(BadRequest):
        await events(router)
    assert len(calls) == 1


async def test_no_healthy_runtime_is_unavailable() -> None:
    router = make_router({}, [])  # never probed: nothing known healthy
    with pytest.raises(Unavailable):
        await events(router)


async def test_base_model_requests_keep_to_their_tenants_runtime_within_the_load_bound(
) -> None:
    """The runtime's prefix cache is per tenant: one tenant's base-model requests land where
    its system prompt is cached; tenants spread; a busy tenant spills like a hot adapter."""
    calls: list[str] = []
    router = make_router({}, calls)
    await router.refresh()
    acme = affinity_key("acme", None)
    assert acme != affinity_key("globex", None) and affinity_key("acme", KEY) == KEY
    for _ in range(4):
        await events(router, acme)
    assert calls == [rendezvous_order(acme, URLS)[0]] * 4
    homes = Counter(rendezvous_order(affinity_key(f"t{i}", None), URLS)[0] for i in range(300))
    assert all(60 < homes[u] < 140 for u in URLS), homes
    home = router.runtimes[calls[0]]
    home.in_flight = 10
    assert router.candidates(acme)[0] is not home
    assert router.candidates(None)[0] is not home  # no affinity: least loaded
