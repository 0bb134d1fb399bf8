"""One `/generate` call to one runtime (docs/internals.md, "Runtime wire protocol").

A small HTTP/1.1 client of its own, over a keep-alive pool per runtime: the request path is
the gateway's hot loop, and httpx's pool bookkeeping cost more than everything else the
gateway does per request (it scans every pooled connection on each request). It speaks only
what the runtimes answer: a status line, headers, then a body by Content-Length or chunks.

`RuntimeClient.open_generate` returns the NDJSON event stream once the runtime has answered
200; failures before that are classified so that the router knows whether another runtime
may be tried: `RuntimeUnreachable` (connection failed), `RuntimeBusy` (503: draining,
loading, queue full), `RuntimeRefused` (400/413: the request itself is wrong, no retry).
Closing a stream before its end closes the connection, which is how the runtime learns that
the client went away and aborts the request.

The body is the runtime's own wire type (`runtime.protocol.GenerateBody`), encoded here;
`adapter_body` is the one mapping from the catalog's view of a version to the runtime's, and
`Collected` gathers the events a stream brought back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import msgspec

from adapters.views import ResolvedAdapter
from runtime.protocol import (
    ErrorEvent,
    Event,
    FinishEvent,
    GenerateBody,
    LogprobEntry,
    StartEvent,
    TokenEvent,
    decode_event,
)
from runtime.types import AdapterRef

MAX_IDLE_PER_RUNTIME = 256
MAX_LINE_BYTES = 4 * 1024 * 1024  # one NDJSON event; a token event is far smaller
_encoder = msgspec.json.Encoder()


def adapter_body(tenant: str, adapter: ResolvedAdapter | None) -> AdapterRef | None:
    """The runtime's reference to a catalog version: all it needs to fetch and apply it.

    Its key is the version's identity (runtime.types.adapter_key over the weights' sha256
    and the config that changes the math), computed by the runtime's own function: adapters/
    cannot import the runtime, and the runtime refuses a key that does not match.
    """
    if adapter is None:
        return None
    ref = adapter.ref
    return AdapterRef.for_version(
        sha256=ref.sha256, uri=ref.uri, rank=ref.rank, alpha=ref.alpha,
        target_modules=tuple(ref.target_modules), use_rslora=ref.use_rslora,
        name=f"{tenant}/{adapter.name}@{adapter.version}",
    )


@dataclass(slots=True)
class Choice:
    """One choice's events, gathered: text, token ids, logprobs, its end."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[LogprobEntry] = field(default_factory=list)
    completion_tokens: int = 0
    finish_reason: str | None = None

    @property
    def output(self) -> str:
        return "".join(self.text)

    @property
    def num_completion_tokens(self) -> int:
        # A stream that ended without its finish event has no usage: count what it carried.
        return self.completion_tokens or len(self.token_ids)


@dataclass(slots=True)
class Collected:
    """The events of one stream, gathered per choice (index 0..n-1), the counts, the error.

    `output`, `token_ids`, `logprobs` and `finish_reason` are choice 0's; the token counts are
    summed over the choices (OpenAI's usage: the prompt once, every choice's completion)."""

    choices: dict[int, Choice] = field(default_factory=dict)
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of prompt_tokens, those the runtime's prefix cache supplied
    error: ErrorEvent | None = None

    def choice(self, index: int) -> Choice:
        found = self.choices.get(index)
        if found is None:
            found = self.choices[index] = Choice()
        return found

    def add(self, event: Event) -> None:
        if isinstance(event, TokenEvent):
            choice = self.choice(event.index)
            choice.text.append(event.text)
            choice.token_ids.extend(event.token_ids)
            if event.logprobs:
                choice.logprobs.extend(event.logprobs)
        elif isinstance(event, StartEvent):
            self.prompt_tokens = event.prompt_tokens
        elif isinstance(event, FinishEvent):
            choice = self.choice(event.index)
            choice.finish_reason = event.finish_reason
            self.prompt_tokens = event.usage.prompt_tokens
            if event.index == 0:  # the prompt is counted once, as choice 0 admitted it
                self.cached_tokens = event.usage.cached_tokens
            choice.completion_tokens = event.usage.completion_tokens
        elif isinstance(event, ErrorEvent):
            self.error = event

    def ordered(self, n: int) -> list[Choice]:
        """Choices 0..n-1, an empty one for any that carried nothing."""
        return [self.choices.get(i) or Choice() for i in range(n)]

    @property
    def output(self) -> str:
        return self.choice(0).output

    @property
    def token_ids(self) -> list[int]:
        return self.choice(0).token_ids

    @property
    def logprobs(self) -> list[LogprobEntry]:
        return self.choice(0).logprobs

    @property
    def finish_reason(self) -> str | None:
        return self.choice(0).finish_reason

    @property
    def num_completion_tokens(self) -> int:
        return sum(c.num_completion_tokens for c in self.choices.values())

    @property
    def num_tokens(self) -> int:
        return self.prompt_tokens + self.num_completion_tokens


class RuntimeCallError(Exception):
    """Base of the failures of one runtime call."""


class RuntimeUnreachable(RuntimeCallError):
    """Connecting or sending failed, or the stream broke: the runtime is suspect."""


class RuntimeBusy(RuntimeCallError):
    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RuntimeRefused(RuntimeCallError):
    """The runtime refused the request itself (400/413); another runtime would too."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class _Body:
    """The response body as raw byte pieces, by Content-Length or chunked encoding."""

    def __init__(self, reader: asyncio.StreamReader, headers: dict[str, str],
                 deadline: float | None = None) -> None:
        self.reader = reader
        self.deadline = deadline  # loop time after which a read raises TimeoutError
        self.chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        self.remaining = int(headers.get("content-length", "0") or 0)
        self.done = False
        self._timer: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        """One timer for the whole stream's deadline: when it fires, the pending (or next)
        read raises TimeoutError. Cheaper than a timeout context per read (a Timeout, a
        current_task lookup and a timer per token), and bound to no task, so the stream may
        be read from another task than the one that opened it."""
        if self.deadline is not None and self._timer is None:
            self._timer = asyncio.get_running_loop().call_at(self.deadline, self._expire)

    def _expire(self) -> None:
        self._timer = None
        if not self.done:
            self.reader.set_exception(TimeoutError())

    def disarm(self) -> None:
        """The stream is over (or given up): its deadline must not hit the connection later."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def pieces(self) -> AsyncIterator[bytes]:
        """The body's bytes: for a chunked body, the data of every chunk complete in what one
        read brought, joined (the runtime writes one NDJSON line or more per chunk, so lines
        stay whole across pieces only by the consumer's buffering, as before)."""
        if not self.chunked:  # one read: a timeout context of its own is cheap enough
            if self.remaining:
                async with asyncio.timeout_at(self.deadline):
                    data = await self.reader.readexactly(self.remaining)
                yield data
            self.done = True
            return
        # Parsed from one buffer: a read takes whatever the socket holds (often several
        # chunks under load) with one await, instead of a readline and a readexactly per
        # chunk. Nothing follows the last chunk until the next request is sent on this
        # connection, so a read never takes bytes of the next response.
        buf, pos = b"", 0
        self._arm()
        while True:
            data, pos, ended = _complete_chunks(buf, pos)
            if ended:
                self.done = True
                self.disarm()
            if data:
                yield data
            if ended:
                return
            buf = buf[pos:]
            pos = 0
            more = await self.reader.read(_READ_BYTES)
            if not more:  # EOF: the runtime went away mid-answer
                raise asyncio.IncompleteReadError(buf, None)
            if len(buf) > MAX_LINE_BYTES:
                raise ValueError("a chunk over the size limit")
            buf += more


_READ_BYTES = 256 * 1024


def _complete_chunks(buf: bytes, pos: int) -> tuple[bytes, int, bool]:
    """(the data of the complete chunks in buf[pos:], where the first incomplete one starts,
    whether the last chunk and its trailer were among them). ValueError on a bad size line."""
    parts: list[bytes] = []
    while True:
        line_end = buf.find(b"\r\n", pos)
        if line_end < 0:
            break
        size = int(buf[pos:line_end].split(b";")[0].strip() or b"0", 16)
        start = line_end + 2
        if size == 0:
            trailer_end = start + 2 if buf[start:start + 2] == b"\r\n" else (
                buf.find(b"\r\n\r\n", start) + 4 if buf.find(b"\r\n\r\n", start) >= 0
                else -1)
            if trailer_end < 0 or len(buf) < trailer_end:
                break
            return b"".join(parts), trailer_end, True
        if len(buf) < start + size + 2:
            break
        parts.append(buf[start:start + size])
        pos = start + size + 2
    return b"".join(parts), pos, False


class GenerateStream:
    """The open NDJSON stream of one request; iterate `events()`, always `aclose()`."""

    def __init__(self, client: RuntimeClient, key: str, conn: Conn, body: _Body) -> None:
        self._client, self._key, self._conn, self._body = client, key, conn, body

    async def events(self) -> AsyncIterator[Event]:
        buffer = b""
        try:
            async for piece in self._body.pieces():
                buffer += piece
                if len(buffer) > MAX_LINE_BYTES:
                    raise RuntimeUnreachable("an event line over the size limit")
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line:
                        yield decode_event(line)
            if buffer.strip():
                yield decode_event(buffer)
        except TimeoutError:
            raise  # the request's deadline, not a broken runtime (TimeoutError is an OSError)
        except (OSError, asyncio.IncompleteReadError, ValueError, msgspec.DecodeError) as exc:
            raise RuntimeUnreachable(f"stream broke: {type(exc).__name__}") from exc

    async def aclose(self) -> None:
        self._body.disarm()
        if self._body.done:
            self._client.release(self._key, self._conn)
        else:
            await _close(self._conn)  # the runtime sees the disconnect and aborts


class RuntimeClient:
    def __init__(self, connect_timeout_s: float = 5.0, token: str | None = None) -> None:
        """`token`: LORAGATE_RUNTIME_TOKEN, sent as a bearer token with every request."""
        self.connect_timeout_s = connect_timeout_s
        self._auth = f"Authorization: Bearer {token}\r\n" if token else ""
        self._idle: dict[str, list[Conn]] = {}

    async def open_generate(self, url: str, body: GenerateBody,
                            deadline: float | None = None) -> GenerateStream:
        """`deadline` (event loop time) bounds every read of the answer, headers included."""
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname is None:
            raise RuntimeUnreachable(f"unsupported runtime URL {url!r} (http:// only)")
        host, port = parts.hostname, parts.port or 80
        payload = _encoder.encode(body)
        request_head = (f"POST /generate HTTP/1.1\r\nHost: {parts.netloc}\r\n{self._auth}"
                f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n")
        raw = request_head.encode() + payload
        conn = self._take(url)
        head: tuple[int, dict[str, str]] | None = None
        if conn is not None:
            try:
                head = await _exchange(conn, raw, deadline)
            except TimeoutError:
                await _close(conn)
                raise
            except (OSError, asyncio.IncompleteReadError, ValueError):
                await _close(conn)  # a pooled connection the runtime had closed: a fresh one
                conn = None
        if conn is None or head is None:
            conn = await self._connect(url, host, port)
            try:
                head = await _exchange(conn, raw, deadline)
            except TimeoutError:
                await _close(conn)
                raise
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                await _close(conn)
                raise RuntimeUnreachable(f"{url}: {type(exc).__name__}") from exc
        status, headers = head
        response = _Body(conn[0], headers, deadline)
        if status == 200:
            return GenerateStream(self, url, conn, response)
        try:
            data = b"".join([p async for p in response.pieces()])
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            await _close(conn)
            raise RuntimeUnreachable(f"{url}: {type(exc).__name__}") from exc
        self.release(url, conn)
        if status == 503:
            raise RuntimeBusy(f"{url} is busy", _retry_after(headers))
        if status in (400, 413, 422):
            raise RuntimeRefused(*_refusal(data))
        raise RuntimeUnreachable(f"{url}: HTTP {status}")

    async def _connect(self, url: str, host: str, port: int) -> Conn:
        try:
            return await asyncio.wait_for(
                asyncio.open_connection(host, port, limit=MAX_LINE_BYTES),
                self.connect_timeout_s)
        except (OSError, TimeoutError) as exc:
            raise RuntimeUnreachable(f"{url}: {type(exc).__name__}") from exc

    def _take(self, url: str) -> Conn | None:
        idle = self._idle.get(url)
        while idle:
            conn = idle.pop()
            if not conn[0].at_eof() and not conn[1].is_closing():
                return conn
            conn[1].close()
        return None

    def release(self, url: str, conn: Conn) -> None:
        idle = self._idle.setdefault(url, [])
        if len(idle) < MAX_IDLE_PER_RUNTIME and not conn[0].at_eof():
            idle.append(conn)
        else:
            conn[1].close()

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                await _close(conn)
        self._idle.clear()


async def _exchange(conn: Conn, raw: bytes, deadline: float | None
                    ) -> tuple[int, dict[str, str]]:
    conn[1].write(raw)
    async with asyncio.timeout_at(deadline):
        return await _read_head(conn[0])


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status_line = await reader.readline()
    if not status_line:
        raise asyncio.IncompleteReadError(b"", None)
    status = int(status_line.split(b" ", 2)[1])
    headers: dict[str, str] = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n"):
            return status, headers
        if not line:
            raise asyncio.IncompleteReadError(b"", None)
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()


async def _close(conn: Conn) -> None:
    conn[1].close()
    with contextlib.suppress(OSError, asyncio.CancelledError):
        await conn[1].wait_closed()


def _retry_after(headers: dict[str, str]) -> int:
    try:
        return max(1, int(headers.get("retry-after", "1")))
    except ValueError:
        return 1


def _refusal(data: bytes) -> tuple[str, str]:
    try:
        error = msgspec.json.decode(data).get("error", {})
        return str(error.get("message", "refused")), str(error.get("code", "invalid_request"))
    except (msgspec.DecodeError, AttributeError):
        return "the runtime refused the request", "invalid_request"
