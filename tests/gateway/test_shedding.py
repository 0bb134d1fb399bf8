"""Load shedding: past its in-flight cap the gateway answers 503 + Retry-After at once, and
the slots it counts are given back whatever way a request ends, so capacity never leaks."""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from litestar.testing import AsyncTestClient

from adapters.db import upgrade_database
from gateway.app import create_app
from gateway.errors import BadRequest, Unavailable
from gateway.inference.router import (
    DEFAULT_MAX_RUNNING,
    INFLIGHT_PER_RUNNING,
    Router,
    rendezvous_order,
)
from gateway.inference.runtime_client import RuntimeBusy, RuntimeRefused, RuntimeUnreachable
from runtime.http.app import RuntimeInfo, create_runtime_app
from runtime.protocol import ErrorEvent, FinishEvent, StartEvent, TokenEvent, Usage
from tests.support.gw_helpers import create_tenant, make_settings

pytestmark = pytest.mark.unit
URLS = ("http://r1", "http://r2")
KEY = "cd" * 32


class SlowStream:
    """A runtime stream that yields its first token, then waits for `release` to finish."""

    def __init__(self, kind: str, release: asyncio.Event) -> None:
        self.kind, self.release, self.closed = kind, release, False

    async def events(self) -> AsyncIterator[Any]:
        yield StartEvent(1)
        if self.kind == "broken_early":
            raise RuntimeUnreachable("stream broke before a token")
        yield TokenEvent([5], "x", None)
        await self.release.wait()
        if self.kind == "broken":
            raise RuntimeUnreachable("stream broke: runtime died")
        if self.kind == "error_event":
            yield ErrorEvent("adapter_load_failed", "adapter fetch failed")
            return
        yield FinishEvent("length", Usage(1, 1))

    async def aclose(self) -> None:
        self.closed = True


class Client:
    """Stands for RuntimeClient; `kind` says how every runtime answers."""

    def __init__(self) -> None:
        self.kind = "ok"
        self.release = asyncio.Event()
        self.release.set()
        self.calls = 0

    async def open_generate(self, url: str, body: dict[str, Any], deadline: Any = None
                            ) -> SlowStream:
        self.calls += 1
        if self.kind == "busy":
            raise RuntimeBusy(f"{url} queue full", 4)
        if self.kind == "down":
            raise RuntimeUnreachable(f"{url}: ConnectError")
        if self.kind == "refuse":
            raise RuntimeRefused("prompt too long", "prompt_too_long")
        return SlowStream(self.kind, self.release)

    async def aclose(self) -> None:
        pass


def make_router(stats: dict[str, Any] | None = None, **kwargs: Any) -> tuple[Router, Client]:
    def probe(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200, json={"status": "ok"})
        return httpx.Response(200, json=stats if stats is not None else {"num_running": 0})

    client = Client()
    router = Router(httpx.AsyncClient(transport=httpx.MockTransport(probe)), URLS,
                    client=client, **kwargs)
    return router, client


def in_flight(router: Router) -> int:
    return sum(s.in_flight for s in router.runtimes.values())


async def drain(router: Router, key: str | None = KEY) -> list[Any]:
    return [e async for e in router.generate({"request_id": "r"}, key)]


async def test_cap_derived_from_the_runtimes_max_running_unless_set() -> None:
    router, _ = make_router({"num_running": 0, "limits": {"max_running": 4}})
    await router.refresh()
    assert {router.capacity(s) for s in router.runtimes.values()} == {INFLIGHT_PER_RUNNING * 4}
    router, _ = make_router()  # a runtime that does not report its limits
    await router.refresh()
    assert router.capacity(router.runtimes[URLS[0]]) == INFLIGHT_PER_RUNNING * DEFAULT_MAX_RUNNING
    router, _ = make_router({"limits": {"max_running": 4}}, max_inflight_per_runtime=3)
    await router.refresh()
    assert router.capacity(router.runtimes[URLS[0]]) == 3


async def test_every_runtime_at_cap_sheds_at_once_with_retry_after() -> None:
    router, client = make_router(max_inflight_per_runtime=2)
    await router.refresh()
    home, other = (router.runtimes[u] for u in rendezvous_order(KEY, URLS))
    home.in_flight = 2
    assert isinstance((await drain(router))[-1], FinishEvent)  # spills to the other runtime
    assert client.calls == 1
    other.in_flight = 2
    with pytest.raises(Unavailable) as info:
        await drain(router)
    assert info.value.code == "overloaded" and info.value.retry_after == 1
    assert client.calls == 1  # shed without calling any runtime
    assert router.load_figures()["shed"]["at_capacity"] == 1
    home.in_flight = other.in_flight = 0
    assert isinstance((await drain(router))[-1], FinishEvent)


async def test_concurrent_requests_past_the_cap_are_shed_then_capacity_returns() -> None:
    router, client = make_router(max_inflight_per_runtime=3)
    await router.refresh()
    client.release.clear()
    first_tokens: list[asyncio.Event] = []

    async def consume() -> str:
        got = asyncio.Event()
        first_tokens.append(got)
        try:
            async for event in router.generate({"request_id": "r"}, None):
                if isinstance(event, TokenEvent):
                    got.set()
        except Unavailable as exc:
            got.set()
            return str(exc.code)
        return "ok"

    tasks = [asyncio.create_task(consume()) for _ in range(10)]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in first_tokens)), 5)
    assert in_flight(router) == 6  # two runtimes x 3
    client.release.set()
    outcomes = await asyncio.gather(*tasks)
    assert outcomes.count("ok") == 6 and outcomes.count("overloaded") == 4
    assert in_flight(router) == 0
    assert all(s.in_flight == 0 for s in router.runtimes.values())
    assert isinstance((await drain(router))[-1], FinishEvent)


@pytest.mark.parametrize("kind", ["ok", "error_event", "broken", "broken_early", "busy", "down",
                                  "refuse"])
async def test_slot_released_however_the_request_ends(kind: str) -> None:
    router, client = make_router()
    await router.refresh()
    client.kind = kind
    for _ in range(3):
        try:
            await drain(router)
        except (Unavailable, BadRequest):
            pass
        assert in_flight(router) == 0


async def test_slot_released_when_the_client_goes_away() -> None:
    router, client = make_router()
    await router.refresh()
    client.release.clear()  # every stream stops after its first token

    # The SSE route closes the generator when the client disconnects.
    events = router.generate({"request_id": "a"}, KEY)
    assert isinstance(await anext(events), StartEvent)
    assert in_flight(router) == 1
    await events.aclose()  # type: ignore[attr-defined]
    assert in_flight(router) == 0

    # A cancelled handler task unwinds the generator where it waits.
    waiting = asyncio.Event()

    async def read_all() -> None:
        async for event in router.generate({"request_id": "b"}, KEY):
            if isinstance(event, TokenEvent):
                waiting.set()  # the next read waits on the runtime

    task = asyncio.create_task(read_all())
    await asyncio.wait_for(waiting.wait(), 5)
    await asyncio.sleep(0.01)
    assert in_flight(router) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert in_flight(router) == 0

    # A generator dropped without a close is finalized by the event loop.
    dropped = router.generate({"request_id": "c"}, KEY)
    await anext(dropped)
    assert in_flight(router) == 1
    del dropped
    gc.collect()
    for _ in range(50):
        if in_flight(router) == 0:
            break
        await asyncio.sleep(0.01)
    assert in_flight(router) == 0


# ---------------------------------------------------------------- through the HTTP app


class FullFront:
    """An engine front whose waiting queue is always full: the runtime server refuses."""

    async def start(self) -> None:
        pass

    def generate(self, req: Any) -> AsyncIterator[Any]:
        raise AssertionError("a full queue admits nothing")

    def abort(self, request_id: str) -> None:
        pass

    async def shutdown(self, drain: bool = True) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {"num_running": 2, "num_waiting": 0, "kv_blocks_free": 1, "kv_blocks_total": 1}


class Words:
    def encode(self, text: str) -> list[int]:
        return [1] * len(text.split())

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        return [1]

    def token_text(self, token_id: int) -> str:
        return "w"


async def test_http_503_with_retry_after_at_the_cap_and_from_a_full_runtime_queue(
    tmp_path: Path, base_model_dir: Path, unused_tcp_port: int
) -> None:
    """The real runtime server with max_waiting=0 answers 503 queue_full; the gateway turns
    both that and its own cap into OpenAI error bodies with Retry-After, counted in /metrics."""
    info = RuntimeInfo(model="builtin", device="cpu", max_model_len=64, vocab_size=100,
                       max_running=2, max_waiting=0)
    runtime_app = create_runtime_app(front=FullFront(), tokenizer=Words(), info=info)
    server = uvicorn.Server(uvicorn.Config(runtime_app, host="127.0.0.1", port=unused_tcp_port,
                                           log_level="warning", lifespan="on"))
    # A thread of its own: the gateway's startup blocks the test's loop for a while (catalog
    # set-up), and a runtime on that loop would miss the router's first probe.
    serving = threading.Thread(target=server.run, daemon=True)
    serving.start()
    while not server.started:  # noqa: ASYNC110 (a flag set by another thread)
        await asyncio.sleep(0.02)
    runtime_url = f"http://127.0.0.1:{unused_tcp_port}"
    try:
        settings = make_settings(tmp_path / "data", base_model_dir, runtimes=(runtime_url,))
        upgrade_database(settings.database_url)
        async with AsyncTestClient(create_app(settings)) as gw:
            key = await create_tenant(gw, "acme")
            router: Router = gw.app.state.services.router
            state = router.runtimes[runtime_url]
            assert router.capacity(state) == INFLIGHT_PER_RUNNING * 2  # from /stats limits
            body = {"model": "builtin", "prompt": "one two", "max_tokens": 2}
            headers = {"Authorization": f"Bearer {key}"}

            state.in_flight = router.capacity(state)
            answer = await gw.post("/v1/completions", json=body, headers=headers)
            assert answer.status_code == 503
            assert answer.headers["retry-after"] == "1"
            error = answer.json()["error"]
            assert error["code"] == "overloaded" and error["type"] == "server_error"
            assert set(error) == {"message", "type", "code", "param"}

            state.in_flight = 0
            answer = await gw.post("/v1/completions", json={**body, "stream": True},
                                   headers=headers)
            assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
            assert answer.json()["error"]["code"] == "overloaded"
            assert state.in_flight == 0

            scrape = (await gw.get("/metrics")).text
            assert 'loragate_requests_shed_total{reason="at_capacity"} 1.0' in scrape
            assert 'loragate_requests_shed_total{reason="runtime_busy"} 1.0' in scrape
            assert f'loragate_runtime_in_flight_limit{{runtime="{runtime_url}"}} 4.0' in scrape
    finally:
        server.should_exit = True
        await asyncio.to_thread(serving.join, 10)
