"""The runtime client against a live stub runtime: keep-alive reuse, deadlines, a dead runtime."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import msgspec
import pytest

from adapters.views import AdapterRefData, ResolvedAdapter
from gateway.inference.runtime_client import RuntimeClient, RuntimeUnreachable, adapter_body
from runtime.protocol import FinishEvent, GenerateBody, StartEvent, TokenEvent, decode_generate
from runtime.types import adapter_key
from tests.support.stub_procs import free_port, start_stub, stop

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def stub() -> Iterator[str]:
    proc, url = start_stub(token_delay_ms=20)
    yield url
    stop(proc)


def body(max_tokens: int) -> dict[str, object]:
    return {"request_id": "r1", "prompt": "a b", "sampling": {"max_tokens": max_tokens}}


async def test_events_in_order_and_the_connection_is_reused(stub: str) -> None:
    client = RuntimeClient()
    for _ in range(2):
        stream = await client.open_generate(stub, body(3))
        events = [e async for e in stream.events()]
        await stream.aclose()
        assert isinstance(events[0], StartEvent) and isinstance(events[-1], FinishEvent)
        assert [e.token_ids for e in events if isinstance(e, TokenEvent)] == [[100], [101], [102]]
        assert len(client._idle[stub]) == 1  # back in the pool, and the same one reused
    await client.aclose()


async def test_deadline_bounds_every_read(stub: str) -> None:
    client = RuntimeClient()
    stream = await client.open_generate(stub, body(500), asyncio.get_running_loop().time() + 0.3)
    with pytest.raises(TimeoutError):
        async for _ in stream.events():
            pass
    await stream.aclose()
    assert not client._idle.get(stub)  # an unfinished answer's connection is closed, not kept
    await client.aclose()


async def test_a_finished_streams_deadline_never_hits_its_reused_connection(stub: str) -> None:
    """The deadline is one timer per stream: a stream that ended before it fires releases a
    connection the next request then reads without a stray TimeoutError."""
    client = RuntimeClient()
    loop = asyncio.get_running_loop()
    stream = await client.open_generate(stub, body(2), loop.time() + 0.25)
    assert isinstance([e async for e in stream.events()][-1], FinishEvent)
    await stream.aclose()
    await asyncio.sleep(0.35)  # past the first stream's deadline
    stream = await client.open_generate(stub, body(3))
    events = [e async for e in stream.events()]
    await stream.aclose()
    assert [e.token_ids for e in events if isinstance(e, TokenEvent)] == [[100], [101], [102]]
    assert len(client._idle[stub]) == 1  # the same connection, reused twice
    await client.aclose()


async def test_nothing_listening_is_unreachable() -> None:
    with pytest.raises(RuntimeUnreachable):
        await RuntimeClient().open_generate(f"http://127.0.0.1:{free_port()}", body(1))


def test_a_catalog_version_maps_to_the_runtimes_adapter_reference() -> None:
    ref = AdapterRefData("ab" * 32, "file:///store/sha256/ab/x", 8, 16.0, ("q_proj", "v_proj"),
                         use_rslora=True)
    adapter = adapter_body("acme", ResolvedAdapter("support", 3, ref))
    assert adapter is not None and adapter_body("acme", None) is None
    sent = decode_generate(msgspec.json.encode(GenerateBody("r1", prompt="x", adapter=adapter)))
    assert sent.adapter == adapter
    assert (adapter.sha256, adapter.uri, adapter.rank, adapter.alpha) == (
        "ab" * 32, "file:///store/sha256/ab/x", 8, 16.0)
    # The cache identity: the runtime's own function over the weights and the config.
    assert adapter.key == adapter_key("ab" * 32, 8, 16.0, True, ("q_proj", "v_proj"))
    assert (adapter.target_modules, adapter.use_rslora) == (("q_proj", "v_proj"), True)
    assert adapter.name == "acme/support@3"


@pytest.mark.parametrize("split", [1, 2, 3, 5, 7, 64])
async def test_chunked_body_parses_at_any_split(split: int) -> None:
    """However the socket cuts the chunked body (mid size line, mid data, mid trailer), the
    pieces join to the body and the stream ends at the last chunk, nothing read past it."""
    from gateway.inference.runtime_client import _Body

    lines = [b'{"type":"token","token_ids":[%d],"text":" w"}\n' % i for i in range(20)]
    wire = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(x), x) if i % 2 else b"%x\r\n%s\r\n" % (len(x), x)
                    for i, x in enumerate(lines)) + b"0\r\n\r\n"
    reader = asyncio.StreamReader()
    body = _Body(reader, {"transfer-encoding": "chunked"})

    async def feed() -> None:
        for i in range(0, len(wire), split):
            reader.feed_data(wire[i:i + split])
            await asyncio.sleep(0)
        reader.feed_data(b"NEXT")  # what a later response would start with: never consumed

    task = asyncio.create_task(feed())
    got = b"".join([piece async for piece in body.pieces()])
    await task
    assert got == b"".join(lines) and body.done
    assert await reader.read(4) == b"NEXT"
