"""One `/generate` call to one runtime (docs/internals.md, "Runtime wire protocol").

`open_generate` sends the body and returns the NDJSON event stream once the runtime has
answered 200; everything that happens before that is classified so that the router knows
whether another runtime may be tried: `RuntimeUnreachable` (connection failed),
`RuntimeBusy` (503: draining, loading, queue full) and `RuntimeRefused` (400/413: the request
itself is wrong, no retry). Closing the stream closes the connection, which is how the
runtime learns that the client went away and aborts the request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec

from runtime.protocol import Event, decode_event


class RuntimeError_(Exception):
    """Base of the failures of one runtime call."""


class RuntimeUnreachable(RuntimeError_):
    """Connecting or sending failed, or the stream broke: the runtime is suspect."""


class RuntimeBusy(RuntimeError_):
    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RuntimeRefused(RuntimeError_):
    """The runtime refused the request itself (400/413); another runtime would too."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


_encoder = msgspec.json.Encoder()


def _retry_after(response: httpx.Response) -> int:
    try:
        return max(1, int(response.headers.get("retry-after", "1")))
    except ValueError:
        return 1


def _refusal(response_body: bytes) -> tuple[str, str]:
    try:
        error = msgspec.json.decode(response_body).get("error", {})
        return str(error.get("message", "refused")), str(error.get("code", "invalid_request"))
    except (msgspec.DecodeError, AttributeError):
        return "the runtime refused the request", "invalid_request"


class GenerateStream:
    """The open NDJSON stream of one request; iterate for events, always `aclose()`."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response

    async def events(self) -> AsyncIterator[Event]:
        try:
            async for line in self._response.aiter_lines():
                if line:
                    yield decode_event(line.encode())
        except (httpx.HTTPError, msgspec.DecodeError) as exc:
            raise RuntimeUnreachable(f"stream broke: {type(exc).__name__}") from exc

    async def aclose(self) -> None:
        await self._response.aclose()


async def open_generate(
    http: httpx.AsyncClient, url: str, body: dict[str, Any], timeout_s: float
) -> GenerateStream:
    request = http.build_request(
        "POST", f"{url}/generate", content=_encoder.encode(body),
        headers={"content-type": "application/json"},
        timeout=httpx.Timeout(timeout_s, connect=min(5.0, timeout_s)),
    )
    try:
        response = await http.send(request, stream=True)
    except httpx.HTTPError as exc:
        raise RuntimeUnreachable(f"{url}: {type(exc).__name__}") from exc
    if response.status_code == 200:
        return GenerateStream(response)
    try:
        payload = await response.aread()
    except httpx.HTTPError as exc:
        raise RuntimeUnreachable(f"{url}: {type(exc).__name__}") from exc
    finally:
        await response.aclose()
    if response.status_code == 503:
        raise RuntimeBusy(f"{url} is busy", _retry_after(response))
    if response.status_code in (400, 413, 422):
        message, code = _refusal(payload)
        raise RuntimeRefused(message, code)
    raise RuntimeUnreachable(f"{url}: HTTP {response.status_code}")


async def abort(http: httpx.AsyncClient, url: str, request_id: str) -> None:
    """Best effort: closing the stream already aborts; this covers a half-open connection."""
    try:
        await http.post(f"{url}/abort/{request_id}", timeout=2.0)
    except httpx.HTTPError:
        pass
