"""`loragate admin ...`: the admin HTTP API from the command line.

Each subcommand makes one call with the admin token from LORAGATE_ADMIN_TOKEN, prints the
JSON answer, and exits non-zero with the server's error message on failure. An upload is
streamed from disk with a progress bar and never read into memory whole. `rollout status`
prints a table of the stages with both arms' figures and the history (`--json`: the answer).
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


def run(args: Any, url: str, token: str | None,
        transport: httpx.BaseTransport | None = None) -> int:
    """Run one parsed `loragate admin` subcommand; print JSON, or the error on stderr."""
    try:
        client = AdminClient(url, token, transport)
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
    if isinstance(result, str):
        print(result)
    elif result is not None:
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
        case "tenant-update":
            changes = {name: _limit(value) for name, value in
                       (("requests_per_minute", args.rpm), ("tokens_per_minute", args.tpm))
                       if value is not None}
            return client.call("PATCH", f"/admin/tenants/{_seg(args.name)}", json=changes)
        case "tenant-delete":
            client.call("DELETE", f"/admin/tenants/{_seg(args.name)}")
            return {"tenant": args.name, "deleted": True}
        case "key-create":
            body = {"name": args.name}
            if args.expires_at:
                body["expires_at"] = args.expires_at
            return client.call("POST", f"/admin/tenants/{_seg(args.tenant)}/keys", json=body)
        case "key-list":
            return client.call("GET", f"/admin/tenants/{_seg(args.tenant)}/keys")
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
        case "adapter-delete":
            client.call("DELETE", f"/admin/tenants/{_seg(args.tenant)}/adapters/"
                        f"{_seg(args.adapter)}")
            return {"adapter": args.adapter, "deleted": True}
        case "experiment-list":
            return client.call("GET", f"/admin/tenants/{_seg(args.tenant)}/experiments")
        case "experiment-get":
            return client.call("GET", f"/admin/tenants/{_seg(args.tenant)}/experiments/"
                               f"{_seg(args.name)}")
        case "experiment-delete":
            client.call("DELETE", f"/admin/tenants/{_seg(args.tenant)}/experiments/"
                        f"{_seg(args.name)}")
            return {"experiment": args.name, "deleted": True}
        case "rollout":
            return _rollout(client, args)
    raise AdminError(f"unknown admin command {args.admin_command!r}")


def _limit(value: str) -> int | None:
    if value.lower() == "none":
        return None
    try:
        return int(value)
    except ValueError:
        raise AdminError(f"a limit is a whole number or 'none', not {value!r}") from None


def _rollout(client: AdminClient, args: Any) -> Any:
    path = f"/admin/tenants/{_seg(args.tenant)}/adapters/{_seg(args.adapter)}/rollout"
    match args.rollout_command:
        case "start":
            body: dict[str, Any] = {"version": args.version}
            if args.stages:
                try:
                    body["stages"] = [float(s) for s in args.stages.split(",")]
                except ValueError:
                    raise AdminError("--stages is a comma-separated list of percentages") \
                        from None
            for name in ("stage_seconds", "min_requests"):
                if getattr(args, name) is not None:
                    body[name] = getattr(args, name)
            guardrails = {name: getattr(args, name) for name in
                          ("max_error_rate", "max_latency_p95_ratio", "min_score_delta")
                          if getattr(args, name) is not None}
            if guardrails:
                body["guardrails"] = guardrails
            return status_view(args.tenant, client.call("PUT", path, json=body))
        case "status":
            rollout = client.call("GET", path)
            return rollout if args.json else status_view(args.tenant, rollout)
        case "abort":
            client.call("DELETE", path)
            return status_view(args.tenant, client.call("GET", path))
    raise AdminError(f"unknown rollout command {args.rollout_command!r}")


_COLUMNS = f"{'req':>6} {'err':>4} {'p95':>7} {'score':>6} (n)"


def _arm(figures: dict[str, Any]) -> str:
    p95 = figures.get("p95_latency_ms")
    mean = figures.get("feedback_mean")
    return (f"{figures['requests']:>6} {figures['errors']:>4} "
            f"{f'{p95:.0f}ms' if p95 is not None else '-':>7} "
            f"{f'{mean:.3f}' if mean is not None else '-':>6} ({figures['feedback_count']})")


def status_view(tenant: str, rollout: dict[str, Any]) -> str:
    """The rollout as a table: one row per stage (figures for the stages reached), then the
    history. `>` marks the stage traffic is in now."""
    state, stage = rollout["state"], rollout["stage"]
    lines = [f"{tenant}/{rollout['adapter']}: version {rollout['version']} against version "
             f"{rollout['from_version']}: {state}, {rollout['weight']:g}% on the candidate",
             "",
             f"{'':27}{'stable':<38}candidate",
             f"{'':2}{'stage':>5} {'weight':>6}  {'result':<11}{_COLUMNS:<38}{_COLUMNS}"]
    reached = {s["stage"]: s for s in rollout.get("stage_figures", [])}
    for index, weight in enumerate(rollout["stages"]):
        if index < stage or (index == stage and state == "promoted"):
            result = "passed"
        elif index == stage:
            result = {"running": "current", "rolled_back": "rolled back",
                      "aborted": "aborted"}.get(state, state)
        else:
            result = ""
        mark = ">" if index == stage and state == "running" else " "
        row = f"{mark:2}{index:>5} {weight:>5g}%  {result:<11}"
        if index in reached:
            row += f"{_arm(reached[index]['stable']):<38}{_arm(reached[index]['candidate'])}"
        lines.append(row.rstrip())
    lines += ["", "history:"]
    lines += [f"  {e['at']}  {e['action']:<11} {e['reason']}" for e in rollout["history"]]
    return "\n".join(lines)
