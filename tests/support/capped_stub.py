"""The bench stub runtime, made to refuse and cap like a real runtime for fuzzing.

Fuzzed requests ask for any number of tokens and for token ids past the vocabulary. A real
runtime stops at its context ("length") and answers 400 `invalid_request` for such ids; the
plain stub would build a million-line answer instead. This wrapper does what the real one
does, so generated calls stay fast and the gateway's handling of a runtime 400 is exercised.

    python -m tests.support.capped_stub --port N      # from the repository root
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from tests.support.stub_runtime import StubRuntime, _json

MAX_MODEL_TOKENS = 8  # the stub's "context": generation stops here with finish "length"
VOCAB_SIZE = 1024  # the built-in model's


class CappedStub(StubRuntime):
    async def _generate(self, receive: Any, send: Any) -> None:
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        try:
            body = json.loads(raw)
            sampling = body["sampling"]
            ids = body.get("prompt_token_ids") or []
            if any(not 0 <= int(i) < VOCAB_SIZE for i in ids):
                raise ValueError("token id out of vocabulary")
            sampling["max_tokens"] = min(int(sampling.get("max_tokens") or 16), MAX_MODEL_TOKENS)
        except (ValueError, TypeError, KeyError):
            await _json(send, 400, {"error": {"message": "invalid request",
                                              "code": "invalid_request"}})
            return
        replay = json.dumps(body).encode()
        sent = False

        async def again() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": replay, "more_body": False}

        await super()._generate(again, send)


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(CappedStub(model="builtin"), host="127.0.0.1", port=args.port,
                log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
