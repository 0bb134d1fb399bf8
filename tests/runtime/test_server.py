"""The runtime's HTTP layer against a fake engine front: stream shape, errors, limits, abort.

The fake generates a known sequence (token i of a request is `(last prompt id + 1 + i) % 50`
plus 100) so every assertion compares with values computed here, not read back from the
server. The disconnect test runs a real uvicorn on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator

import httpx
import pytest
import uvicorn
from litestar.testing import AsyncTestClient

from runtime.http.app import RuntimeInfo, RuntimeState, create_runtime_app
from runtime.protocol import MAX_BODY_BYTES
from runtime.types import EngineRequest, FinishReason, RequestOutput, TokenLogprob, adapter_key

pytestmark = pytest.mark.unit

INFO = RuntimeInfo(
    model="fake-model", device="cpu", max_model_len=64, vocab_size=1000, max_running=4,
    max_waiting=2, max_gpu_adapters=2, max_lora_rank=16,
)  # fmt: skip
KEY = "ab" * 32


def expected_tokens(prompt: list[int], n: int) -> list[int]:
    return [100 + (prompt[-1] + 1 + i) % 50 for i in range(n)]


class FakeTokenizer:
    """Bytes as ids with a BOS of 1; chat as "role: content\\n" lines."""

    def encode(self, text: str) -> list[int]:
        return [1] + [b + 3 for b in text.encode()]

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        return self.encode("".join(f"{m['role']}: {m['content']}\n" for m in messages))

    def token_text(self, token_id: int) -> str:
        return f"<{token_id}>"


class FakeFront:
    """The AsyncLLMEngine interface, with knobs to make requests slow, fail or wait."""

    def __init__(self) -> None:
        self.requests: list[EngineRequest] = []
        self.aborted: list[str] = []
        self.running: set[str] = set()
        self.num_waiting = 0
        self.delay_s = 0.0
        self.fail_with: str | None = None  # an error output after the first token
        self.raise_exc: Exception | None = None
        self.started = self.shut_down = False
        self._abort_events: dict[str, asyncio.Event] = {}

    async def start(self) -> None:
        self.started = True

    async def shutdown(self, drain: bool = True) -> None:
        self.shut_down = True

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        if request_id in self._abort_events:
            self._abort_events[request_id].set()

    def stats(self) -> dict:
        return {"num_running": len(self.running), "num_waiting": self.num_waiting,
                "kv_blocks_free": 10, "kv_blocks_total": 10, "tokens_per_s": 0.0}

    async def generate(self, req: EngineRequest) -> AsyncIterator[RequestOutput]:
        self.requests.append(req)
        self.running.add(req.request_id)
        aborted = self._abort_events.setdefault(req.request_id, asyncio.Event())
        prompt = req.prompt_token_ids
        try:
            for i, tok in enumerate(expected_tokens(prompt, req.sampling.max_tokens)):
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                else:
                    await asyncio.sleep(0)
                if aborted.is_set():
                    yield RequestOutput(req.request_id, [], finished=True,
                                        finish_reason=FinishReason.ABORT,
                                        num_prompt_tokens=len(prompt), num_output_tokens=i)
                    return
                if self.raise_exc is not None and i == 1:
                    raise self.raise_exc
                if self.fail_with is not None and i == 1:
                    yield RequestOutput(req.request_id, [], finished=True,
                                        finish_reason=FinishReason.ERROR, error=self.fail_with)
                    return
                last = i == req.sampling.max_tokens - 1
                logprobs = None
                if req.sampling.logprobs is not None:
                    top = tuple((tok + k, -0.5 * (k + 1)) for k in range(req.sampling.logprobs))
                    logprobs = [TokenLogprob(tok, -0.25, top)]
                yield RequestOutput(
                    req.request_id, [tok], logprobs, text_delta=chr(ord("a") + tok % 26),
                    finished=last, finish_reason=FinishReason.LENGTH if last else None,
                    num_prompt_tokens=len(prompt), num_output_tokens=i + 1,
                )
        finally:
            self.running.discard(req.request_id)


def body(**overrides) -> dict:
    base = {"request_id": "r1", "tenant": "acme", "prompt_token_ids": [1, 5, 7],
            "sampling": {"max_tokens": 4, "temperature": 0.0}}
    base.update(overrides)
    return base


def events_of(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line]


@pytest.fixture
def front() -> FakeFront:
    return FakeFront()


@pytest.fixture
async def client(front: FakeFront) -> AsyncIterator[AsyncTestClient]:
    app = create_runtime_app(front, tokenizer=FakeTokenizer(), info=INFO)
    async with AsyncTestClient(app) as c:
        yield c


async def test_stream_has_start_tokens_and_finish_with_usage(client, front) -> None:
    resp = await client.post("/generate", json=body())
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/x-ndjson")
    events = events_of(resp.text)
    want = expected_tokens([1, 5, 7], 4)
    assert events[0] == {"type": "start", "prompt_tokens": 3}
    assert [e["token_ids"] for e in events[1:-1]] == [[t] for t in want]
    assert "".join(e["text"] for e in events[1:-1]) == "".join(chr(97 + t % 26) for t in want)
    assert all(e["logprobs"] is None for e in events[1:-1])
    assert events[-1] == {"type": "finish", "finish_reason": "length",
                          "usage": {"prompt_tokens": 3, "completion_tokens": 4}}
    req = front.requests[0]
    assert (req.tenant, req.sampling.max_tokens, req.sampling.temperature) == ("acme", 4, 0.0)
    assert front.started and not front.aborted


async def test_logprobs_carry_token_texts(client) -> None:
    resp = await client.post("/generate", json=body(sampling={"max_tokens": 1, "logprobs": 2}))
    (tok_event,) = [e for e in events_of(resp.text) if e["type"] == "token"]
    tok = expected_tokens([1, 5, 7], 1)[0]
    assert tok_event["logprobs"] == [{
        "token_id": tok, "token": f"<{tok}>", "logprob": -0.25,
        "top": [{"token_id": tok, "token": f"<{tok}>", "logprob": -0.5},
                {"token_id": tok + 1, "token": f"<{tok + 1}>", "logprob": -1.0}],
    }]


async def test_string_prompt_and_messages_are_tokenized_by_the_runtime(client, front) -> None:
    await client.post("/generate", json=body(prompt_token_ids=None, prompt="hi"))
    await client.post("/generate", json=body(request_id="r2", prompt_token_ids=None,
                                             messages=[{"role": "user", "content": "yo"}]))
    assert front.requests[0].prompt_token_ids == FakeTokenizer().encode("hi")
    assert front.requests[1].prompt_token_ids == FakeTokenizer().encode("user: yo\n")


async def test_adapter_reference_reaches_the_engine(client, front) -> None:
    identity = adapter_key(KEY, 8, 16.0, True, ("q_proj", "v_proj"))
    adapter = {"key": identity, "sha256": KEY, "uri": "file:///tmp/x", "rank": 8, "alpha": 16.0,
               "target_modules": ["q_proj", "v_proj"], "use_rslora": True, "name": "acme/a@1"}
    resp = await client.post("/generate", json=body(adapter=adapter))
    assert resp.status_code == 200
    ref = front.requests[0].adapter
    assert (ref.key, ref.sha256, ref.rank, ref.target_modules, ref.use_rslora) == (
        identity, KEY, 8, ("q_proj", "v_proj"), True)
    assert ref.scale == pytest.approx(16.0 / 8**0.5)


async def test_a_legacy_reference_gets_its_identity_computed_not_taken(client, front) -> None:
    # A gateway that predates `sha256` sent the weights' sha256 as `key`.
    adapter = {"key": KEY, "uri": "file:///tmp/x", "rank": 8, "alpha": 16.0,
               "target_modules": ["q_proj"]}
    assert (await client.post("/generate", json=body(adapter=adapter))).status_code == 200
    ref = front.requests[0].adapter
    assert (ref.sha256, ref.key) == (KEY, adapter_key(KEY, 8, 16.0, False, ("q_proj",)))


async def test_a_key_that_does_not_follow_from_its_fields_is_refused(client, front) -> None:
    # Same weights, alpha 16, but the key of the alpha-8 version: it would be served with
    # whichever of the two the cache holds under that key.
    adapter = {"key": adapter_key(KEY, 8, 8.0, False, ("q_proj",)), "sha256": KEY,
               "uri": "file:///tmp/x", "rank": 8, "alpha": 16.0, "target_modules": ["q_proj"]}
    resp = await client.post("/generate", json=body(adapter=adapter))
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "adapter_key_mismatch"
    assert front.requests == []


async def test_engine_error_becomes_an_error_event_and_server_keeps_serving(client, front) -> None:
    front.fail_with = "adapter acme/a@1: sha256 mismatch"
    events = events_of((await client.post("/generate", json=body())).text)
    assert events[-1] == {"type": "error", "code": "adapter_load_failed",
                          "message": "adapter acme/a@1: sha256 mismatch"}
    assert [e["type"] for e in events[:-1]] == ["start", "token"]
    front.fail_with = None
    assert (await client.get("/health")).status_code == 200
    again = events_of((await client.post("/generate", json=body(request_id="r2"))).text)
    assert again[-1]["type"] == "finish"


async def test_engine_exception_is_an_internal_error_and_the_request_is_aborted(
    client, front
) -> None:
    front.raise_exc = RuntimeError("CUDA fell over at /secret/path")
    events = events_of((await client.post("/generate", json=body())).text)
    assert events[-1] == {"type": "error", "code": "internal_error",
                          "message": "the runtime failed"}  # no internals leak
    assert front.aborted == ["r1"]


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"request_id": "r", "prompt": "x", "bogus": 1}', "bogus"),
        (json.dumps(body(prompt="x")).encode(), "exactly one of"),
        (json.dumps(body(prompt_token_ids=None)).encode(), "exactly one of"),
        (json.dumps(body(sampling={"temperature": 3.0})).encode(), "temperature"),
        (json.dumps(body(sampling={"top_k": 0})).encode(), "top_k"),
        (json.dumps(body(sampling={"top_p": 0.0})).encode(), "top_p"),
        (json.dumps(body(sampling={"max_tokens": 0})).encode(), "max_tokens"),
        (json.dumps(body(sampling={"logprobs": 6})).encode(), "logprobs"),
        (json.dumps(body(sampling={"stop": ["a"] * 5})).encode(), "stop"),
        (json.dumps(body(prompt_token_ids=list(range(64)))).encode(), "context holds 64"),
        (json.dumps(body(prompt_token_ids=[1, 1000])).encode(), "between 0 and 999"),
        (json.dumps(body(prompt_token_ids=[])).encode(), "empty"),
        (json.dumps(body(request_id="")).encode(), "request_id"),
        (json.dumps(body(messages=[], prompt_token_ids=None)).encode(), "messages"),
        (json.dumps(body(adapter={"key": "XYZ", "uri": "file:///a", "rank": 8, "alpha": 8,
                                  "target_modules": ["q_proj"]})).encode(), "adapter.key"),
        (json.dumps(body(adapter={"key": KEY, "uri": "file:///a", "rank": 32, "alpha": 8,
                                  "target_modules": ["q_proj"]})).encode(), "between 1 and 16"),
        (json.dumps(body(adapter={"key": KEY, "uri": "http://evil/a", "rank": 8, "alpha": 8,
                                  "target_modules": ["q_proj"]})).encode(), "adapter.uri"),
        (json.dumps(body(adapter={"key": KEY, "uri": "file:///a", "rank": 8, "alpha": 8,
                                  "target_modules": ["lm_head"]})).encode(), "target_modules"),
    ],
)
async def test_bad_bodies_are_400_with_a_clear_message(client, front, payload, needle) -> None:
    resp = await client.post("/generate", content=payload,
                             headers={"content-type": "application/json"})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert needle in error["message"]
    assert error["code"] in {"invalid_request", "prompt_too_long"}
    assert front.requests == []


async def test_body_over_the_limit_is_refused(client, front) -> None:
    huge = json.dumps(body(prompt_token_ids=None, prompt="x" * MAX_BODY_BYTES)).encode()
    resp = await client.post("/generate", content=huge,
                             headers={"content-type": "application/json"})
    assert resp.status_code == 413
    assert front.requests == []


async def test_full_queue_is_503_with_retry_after(client, front) -> None:
    front.num_waiting = INFO.max_waiting
    resp = await client.post("/generate", json=body())
    assert resp.status_code == 503
    assert int(resp.headers["retry-after"]) >= 1
    assert resp.json()["error"]["code"] == "queue_full"


async def test_draining_refuses_new_work_and_health_says_so() -> None:
    state = RuntimeState()
    app = create_runtime_app(FakeFront(), tokenizer=FakeTokenizer(), info=INFO, state=state)
    async with AsyncTestClient(app) as c:
        assert (await c.get("/health")).json()["status"] == "ok"
        state.draining = True
        resp = await c.post("/generate", json=body())
        assert resp.status_code == 503 and int(resp.headers["retry-after"]) >= 1
        health = await c.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "draining"


async def test_not_loaded_is_503_everywhere() -> None:
    async with AsyncTestClient(create_runtime_app()) as c:
        assert (await c.get("/health")).status_code == 503
        assert (await c.get("/stats")).status_code == 503
        resp = await c.post("/generate", json=body())
        assert resp.status_code == 503 and resp.headers["retry-after"]


async def test_health_and_stats(client, front) -> None:
    health = (await client.get("/health")).json()
    assert health == {"status": "ok", "model": "fake-model", "device": "cpu",
                      "max_model_len": 64, "vocab_size": 1000}
    front.num_waiting = 1
    stats = (await client.get("/stats")).json()
    assert (stats["num_waiting"], stats["num_streams"], stats["draining"]) == (1, 0, False)
    assert stats["limits"]["max_waiting"] == 2


async def test_duplicate_running_request_id_is_refused() -> None:
    state = RuntimeState()
    app = create_runtime_app(FakeFront(), tokenizer=FakeTokenizer(), info=INFO, state=state)
    async with AsyncTestClient(app) as c:
        state.open_stream("r1")
        resp = await c.post("/generate", json=body())
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "duplicate_request_id"


# --- a real server: the client goes away mid-stream ------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def wait_for(predicate, timeout_s: float = 10.0) -> None:
    """Poll until `predicate()` holds: the server reacts asynchronously to the disconnect."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


@pytest.fixture
async def live(front: FakeFront) -> AsyncIterator[tuple[httpx.AsyncClient, RuntimeState]]:
    """A real uvicorn on a free port of 127.0.0.1 (the test client buffers whole responses)."""
    front.delay_s = 0.02  # slow enough that the client acts while the stream still runs
    state = RuntimeState()
    app = create_runtime_app(front, tokenizer=FakeTokenizer(), info=INFO, state=state)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    try:
        await wait_for(lambda: server.started)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            yield http, state
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=10)


async def test_client_disconnect_aborts_the_request_in_a_real_server(live, front) -> None:
    http, state = live
    async with http.stream("POST", "/generate", json=body(sampling={"max_tokens": 60})) as resp:
        lines = resp.aiter_lines()
        assert json.loads(await anext(lines))["type"] == "start"
        assert json.loads(await anext(lines))["type"] == "token"
        # Leaving the block closes the connection with the stream unfinished.
    await wait_for(lambda: "r1" in front.aborted and not front.running and not state.streams)
    assert len(front.requests) == 1


async def test_abort_endpoint_ends_the_stream(live, front) -> None:
    http, state = live
    events = []
    async with http.stream("POST", "/generate", json=body(sampling={"max_tokens": 60})) as resp:
        async for line in resp.aiter_lines():
            events.append(json.loads(line))
            if len(events) == 2:
                abort = await http.post("/abort/r1")
                assert abort.json() == {"request_id": "r1", "aborted": True}
    assert events[-1]["type"] == "finish" and events[-1]["finish_reason"] == "abort"
    assert len([e for e in events if e["type"] == "token"]) < 60
    assert front.aborted[0] == "r1"
    await wait_for(lambda: not state.streams)
    unknown = await http.post("/abort/nobody")
    assert unknown.json() == {"request_id": "nobody", "aborted": False}


class BackloggedFront(FakeFront):
    """Says another output is always queued: every output is held for the next write."""

    def backlog(self, request_id: str) -> int:
        return 1


@pytest.mark.parametrize(("front_type", "num_writes"), [(FakeFront, 1 + 4), (BackloggedFront, 2)])
async def test_stream_writes_queued_outputs_and_a_finish_together(front_type, num_writes) -> None:
    """One write per output (its last token and finish together), and the outputs already
    queued for the request coalesced into one: the same NDJSON lines either way."""
    from runtime.http.app import RuntimeState, _events
    from runtime.protocol import build_request, decode_generate

    fake = front_type()
    state = RuntimeState()
    state.attach(fake, FakeTokenizer(), INFO)
    raw = json.dumps(body(request_id="c1")).encode()
    req = build_request(decode_generate(raw), [1, 5, 7], INFO.limits)
    state.open_stream(req.request_id)
    writes = [piece async for piece in _events(state, req)]
    assert len(writes) == num_writes
    events = events_of(b"".join(writes).decode())
    assert [e["type"] for e in events] == ["start"] + ["token"] * 4 + ["finish"]
    assert [e["token_ids"] for e in events[1:-1]] == [[t] for t in expected_tokens([1, 5, 7], 4)]
