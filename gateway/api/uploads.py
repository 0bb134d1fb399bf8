"""Receive an adapter upload: multipart/form-data streamed to temporary files, size-capped.

The body is never held in memory whole: each chunk from the socket goes through a push
parser into one of two files with fixed names (the client's filenames are ignored, so no
user-supplied name reaches the filesystem). A part over its cap stops the upload with 413
at once, and the temporary directory is removed whatever happens.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from litestar import Request
from litestar.exceptions import InternalServerException
from multipart import MultipartSegment, ParserError, ParserLimitReached, PushMultipartParser

from gateway.errors import BadRequest, PayloadTooLarge

CONFIG_PART = "adapter_config"
MODEL_PART = "adapter_model"
# Room for the multipart boundaries and part headers around the two files.
ENVELOPE_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class AdapterUpload:
    config_path: Path  # adapter_config.json as sent
    model_path: Path  # adapter_model.safetensors as sent


def _boundary(request: Request[Any, Any, Any]) -> str:
    media_type, options = request.content_type
    if media_type != "multipart/form-data" or not options.get("boundary"):
        raise BadRequest(
            "expected multipart/form-data with parts adapter_config and adapter_model",
            param="content-type",
        )
    return options["boundary"]


@asynccontextmanager
async def receive_adapter_upload(
    request: Request[Any, Any, Any],
    tmp_root: Path,
    *,
    max_config_bytes: int,
    max_model_bytes: int,
) -> AsyncIterator[AdapterUpload]:
    """Stream the request's two parts into files under a fresh directory in `tmp_root`."""
    boundary = _boundary(request)
    caps = {CONFIG_PART: max_config_bytes, MODEL_PART: max_model_bytes}
    max_body = max_config_bytes + max_model_bytes + ENVELOPE_BYTES
    if request.content_length is not None and request.content_length > max_body:
        raise PayloadTooLarge(_too_large(max_model_bytes))
    workdir = await asyncio.to_thread(_make_workdir, tmp_root)
    try:
        paths = {name: workdir / name for name in caps}
        await _stream_parts(request, boundary, paths, caps, max_body, max_model_bytes)
        yield AdapterUpload(paths[CONFIG_PART], paths[MODEL_PART])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


async def _stream_parts(
    request: Request[Any, Any, Any],
    boundary: str,
    paths: dict[str, Path],
    caps: dict[str, int],
    max_body: int,
    max_model_bytes: int,
) -> None:
    seen: set[str] = set()
    current: BinaryIO | None = None
    current_name = ""
    written = 0
    received = 0
    try:
        with PushMultipartParser(boundary, max_segment_count=len(caps)) as parser:
            async for chunk in _body_chunks(request):
                received += len(chunk)
                if received > max_body:
                    raise PayloadTooLarge(_too_large(max_model_bytes))
                for event in parser.parse(chunk):
                    if isinstance(event, MultipartSegment):
                        current_name = _accept_part(event, seen, caps)
                        # Local disk writes of socket-sized chunks: short enough to do inline.
                        current = paths[current_name].open("wb")
                        written = 0
                    elif event is None:
                        if current is not None:
                            current.close()
                        current = None
                    elif current is not None:
                        written += len(event)
                        if written > caps[current_name]:
                            raise PayloadTooLarge(_part_too_large(current_name, caps))
                        current.write(event)
                if parser.closed:
                    break
            if not parser.closed:
                raise BadRequest("incomplete multipart body")
    except ParserLimitReached:
        # The parser's limits cover part headers too (a 10,000-character filename trips them),
        # so the message names both rather than claiming there were too many parts.
        raise BadRequest(
            "multipart body over the parser's limits (too many parts, or part headers too "
            "long): send only adapter_config and adapter_model"
        ) from None
    except ParserError as exc:
        raise BadRequest(f"malformed multipart body: {exc}") from None
    finally:
        if current is not None:
            current.close()
    missing = [name for name in caps if name not in seen]
    if missing:
        raise BadRequest(f"missing part(s): {', '.join(missing)}", param=missing[0])


async def _body_chunks(request: Request[Any, Any, Any]) -> AsyncIterator[bytes]:
    """The request body's chunks; a client that hangs up mid-body is the client's fault.

    Litestar reports the hang-up as InternalServerException (its other use, "stream
    consumed", cannot happen on this one read of the body), which became a 500 with a stack
    trace in the log for every interrupted upload. A 400 is not logged as a server fault;
    the caller's `finally` removes the partial files either way.
    """
    try:
        async for chunk in request.stream():
            yield chunk
    except InternalServerException:
        raise BadRequest("the upload ended before its body was complete "
                         "(the client disconnected)") from None


def _make_workdir(tmp_root: Path) -> Path:
    tmp_root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="upload-", dir=tmp_root))


def _accept_part(segment: MultipartSegment, seen: set[str], caps: dict[str, int]) -> str:
    name = segment.name or ""
    if name not in caps:
        raise BadRequest(
            f"unexpected part {name[:64]!r}: send only adapter_config and adapter_model",
            param=name[:64] or None,
        )
    if name in seen:
        raise BadRequest(f"part {name} sent twice", param=name)
    seen.add(name)
    return name


def _too_large(max_model_bytes: int) -> str:
    return f"upload exceeds the limit of {max_model_bytes} bytes (LORAGATE_MAX_ADAPTER_BYTES)"


def _part_too_large(name: str, caps: dict[str, int]) -> str:
    if name == MODEL_PART:
        return _too_large(caps[name])
    return f"{name} exceeds the limit of {caps[name]} bytes"
