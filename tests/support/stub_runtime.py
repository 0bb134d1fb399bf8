"""A stand-in runtime speaking the runtime wire protocol (docs/internals.md) with no model.

It answers `/generate` with `max_tokens` tokens at once (or `--token-delay-ms` apart), so the
gateway's own cost can be measured and its routing tested without a model. Token i of a
request is id `100 + i` with text " w<i>"; prompt_tokens is the prompt's word count (or its
id count). A plain ASGI app under uvicorn, to add as little cost of its own as possible.

    python -m tests.support.stub_runtime --port 8100 [--token-delay-ms 0] [--model stub]
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

MAX_BODY_BYTES = 4 * 1024 * 1024


class StubRuntime:
    def __init__(self, model: str = "stub", token_delay_s: float = 0.0) -> None:
        self.model = model
        self.token_delay_s = token_delay_s
        self.num_requests = 0
        self.num_streams = 0
        self.seen_adapters: dict[str, int] = {}
        self.aborted: set[str] = set()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path, method = scope["path"], scope["method"]
        if method == "GET" and path == "/health":
            await _json(send, 200, {"status": "ok", "model": self.model, "device": "cpu",
                                    "max_model_len": 4096, "vocab_size": 32000})
        elif method == "GET" and path == "/stats":
            await _json(send, 200, {
                "num_running": self.num_streams, "num_waiting": 0, "num_streams": self.num_streams,
                "requests": self.num_requests,
                "adapters": {"resident": {"device": len(self.seen_adapters), "host": 0, "disk": 0},
                             "hits": {"device": sum(self.seen_adapters.values())},
                             "loads": len(self.seen_adapters), "evictions": 0}})
        elif method == "POST" and path == "/generate":
            await self._generate(receive, send)
        elif method == "POST" and path.startswith("/abort/"):
            request_id = path.removeprefix("/abort/")
            self.aborted.add(request_id)
            await _json(send, 200, {"request_id": request_id, "aborted": False})
        else:
            await _json(send, 404, {"error": {"message": "not found", "code": "not_found"}})

    async def _generate(self, receive: Any, send: Any) -> None:
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if len(raw) > MAX_BODY_BYTES:
                await _json(send, 413, {"error": {"message": "too large", "code": "too_large"}})
                return
            if not message.get("more_body"):
                break
        try:
            body = json.loads(raw)
            sampling = body.get("sampling") or {}
            max_tokens = int(sampling.get("max_tokens", 16))
        except (ValueError, TypeError, AttributeError):
            await _json(send, 400, {"error": {"message": "bad body", "code": "invalid_request"}})
            return
        self.num_requests += 1
        adapter = body.get("adapter") or {}
        if adapter.get("key"):
            self.seen_adapters[adapter["key"]] = self.seen_adapters.get(adapter["key"], 0) + 1
        prompt_tokens = _prompt_tokens(body)
        top = sampling.get("logprobs")
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/x-ndjson")]})
        self.num_streams += 1
        try:
            lines = [{"type": "start", "prompt_tokens": prompt_tokens}]
            for i in range(max_tokens):
                logprobs = None
                if top is not None:
                    tops = [{"token_id": 100 + i + j, "token": f" w{i + j}", "logprob": -0.5 - j}
                            for j in range(int(top))]
                    logprobs = [{"token_id": 100 + i, "token": f" w{i}", "logprob": -0.5,
                                 "top": tops}]
                lines.append({"type": "token", "token_ids": [100 + i], "text": f" w{i}",
                              "logprobs": logprobs})
            lines.append({"type": "finish", "finish_reason": "length",
                          "usage": {"prompt_tokens": prompt_tokens,
                                    "completion_tokens": max_tokens}})
            if self.token_delay_s <= 0:
                payload = "".join(json.dumps(line) + "\n" for line in lines).encode()
                await send({"type": "http.response.body", "body": payload})
                return
            # A closed connection must end the stream, as the real runtime aborts then:
            # uvicorn drops sends to a gone client silently, so listen for the disconnect.
            gone = asyncio.get_running_loop().create_task(_disconnected(receive))
            for line in lines:
                if gone.done():
                    return
                await send({"type": "http.response.body",
                            "body": (json.dumps(line) + "\n").encode(), "more_body": True})
                await asyncio.sleep(self.token_delay_s)
            gone.cancel()
            await send({"type": "http.response.body", "body": b""})
        finally:
            self.num_streams -= 1


async def _disconnected(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _prompt_tokens(body: dict[str, Any]) -> int:
    if body.get("prompt_token_ids"):
        return len(body["prompt_token_ids"])
    if body.get("messages"):
        return sum(len(str(m.get("content", "")).split()) for m in body["messages"]) + 1
    return len(str(body.get("prompt") or "").split()) + 1


async def _json(send: Any, status: int, payload: dict[str, Any]) -> None:
    data = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": data})


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--model", default="stub")
    parser.add_argument("--token-delay-ms", type=float, default=0.0)
    args = parser.parse_args(argv)
    app = StubRuntime(args.model, args.token_delay_ms / 1000.0)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
