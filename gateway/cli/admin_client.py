"""`loragate admin ...`: the admin HTTP API from the command line.

Each subcommand makes one call with the admin token from LORAGATE_ADMIN_TOKEN, prints the
JSON answer, and exits non-zero with the server's error message on failure. An upload is
streamed from disk with a progress bar and never read into memory whole.
"""

from __future__ import annotations

import json
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from tqdm import tqdm

CONFIG_FILE = "adapter_config.json"
MODEL_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "pytorch_model.bin")
CHUNK_BYTES = 1024 * 1024
TIMEOUT_S = 600.0


class AdminError(Exception):
    """A failed admin call; the message is what the user sees."""


class AdminClient:
    def __init__(self, url: str, token: str | None, transport: httpx.BaseTransport | None = None):
        if not token:
            raise AdminError("set LORAGATE_ADMIN_TOKEN to the admin token")
        self._http = httpx.Client(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(TIMEOUT_S, connect=10.0),
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise AdminError(f"cannot reach {self._http.base_url}: {exc}") from None
        if response.status_code >= 400:
            raise AdminError(f"HTTP {response.status_code}: {_error_message(response)}")
        return response.json() if response.content else None

    def upload(self, tenant: str, adapter: str, directory: Path, activate: bool) -> Any:
        config, model = _adapter_files(directory)
        boundary = secrets.token_hex(16)
        parts = [("adapter_config", config), ("adapter_model", model)]
        heads = [_part_head(boundary, name, path.name) for name, path in parts]
        tail = f"--{boundary}--\r\n".encode()
        sizes = [p.stat().st_size for _, p in parts]
        total = sum(sizes) + sum(len(h) + 2 for h in heads) + len(tail)
        with tqdm(total=sum(sizes), unit="B", unit_scale=True, desc=adapter, file=sys.stderr,
                  disable=None) as bar:
            body = _multipart_body(heads, [p for _, p in parts], tail, bar)
            return self.call(
                "POST",
                f"/admin/tenants/{_seg(tenant)}/adapters/{_seg(adapter)}/versions",
                params={"activate": "true"} if activate else None,
                content=body,
                headers={
                    "Content-Type": f"multipart/form-data; boundary={boundary}",
                    "Content-Length": str(total),
                },
            )


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:500] or response.reason_phrase


def _adapter_files(directory: Path) -> tuple[Path, Path]:
    config, model = directory / CONFIG_FILE, directory / MODEL_FILE
    if not config.is_file():
        raise AdminError(f"{directory}: no {CONFIG_FILE}")
    if not model.is_file():
        if any((directory / name).exists() for name in PICKLE_FILES):
            raise AdminError(f"{directory}: pickle weights are refused; save with safetensors")
        raise AdminError(f"{directory}: no {MODEL_FILE}")
    return config, model


def _part_head(boundary: str, name: str, filename: str) -> bytes:
    return (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()


def _multipart_body(
    heads: list[bytes], paths: list[Path], tail: bytes, bar: tqdm[Any]
) -> Iterator[bytes]:
    for head, path in zip(heads, paths, strict=True):
        yield head
        with path.open("rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                bar.update(len(chunk))
                yield chunk
        yield b"\r\n"
    yield tail


def run(args: Any, url: str, token: str | None) -> int:
    """Run one parsed `loragate admin` subcommand; print JSON, or the error on stderr."""
    try:
        client = AdminClient(url, token)
    except AdminError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        result = _dispatch(client, args)
    except AdminError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    if result is not None:
        print(json.dumps(result, indent=2))
    return 0


def _seg(value: str) -> str:
    """One path segment: quoted, so no argument can step into another route."""
    return quote(str(value), safe="")


def _dispatch(client: AdminClient, args: Any) -> Any:
    match args.admin_command:
        case "tenant-create":
            body = {"name": args.name, "requests_per_minute": args.rpm,
                    "tokens_per_minute": args.tpm}
            return client.call("POST", "/admin/tenants", json=body)
        case "tenant-list":
            return client.call("GET", "/admin/tenants")
        case "key-create":
            return client.call("POST", f"/admin/tenants/{_seg(args.tenant)}/keys",
                               json={"name": args.name})
        case "key-revoke":
            client.call("DELETE", f"/admin/keys/{_seg(args.key_id)}")
            return {"id": args.key_id, "revoked": True}
        case "upload":
            return client.upload(args.tenant, args.adapter, Path(args.dir), args.activate)
        case "list":
            return client.call("GET", f"/admin/tenants/{_seg(args.tenant)}/adapters")
        case "activate":
            return client.call("POST", f"/admin/tenants/{_seg(args.tenant)}/adapters/"
                               f"{_seg(args.adapter)}/activate", json={"version": args.version})
    raise AdminError(f"unknown admin command {args.admin_command!r}")
