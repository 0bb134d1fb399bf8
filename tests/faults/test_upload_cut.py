"""An adapter upload whose connection is cut halfway through its body leaves nothing behind.

A real `loragate serve` over TCP (not the ASGI test client, which cannot lose a connection):
the request head announces the full Content-Length, half the multipart body goes out, and
the socket is closed once the gateway has started writing the upload to its temporary files.
Afterwards: no catalog row (admin API and the SQLite file itself), no stored object (local
artifacts dir or S3 bucket), no temporary file in the data dir, the gateway still serves,
and a full upload under the same name becomes version 1.
"""

from __future__ import annotations

import secrets
import socket
from pathlib import Path

import httpx
import pytest

from tests.support.fault_procs import (
    Proc,
    catalog_rows,
    free_port,
    listed_adapters,
    new_tenant,
    s3_env,
    start_gateway,
    upload,
    wait_until,
)
from tests.support.gw_helpers import ADMIN_TOKEN, adapter_files

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def multipart(directory: Path) -> tuple[bytes, str]:
    """The upload's multipart/form-data body, as an HTTP client would send it; its boundary."""
    boundary = f"loragate-cut-{secrets.token_hex(8)}"
    body = b""
    for name, (filename, data, content_type) in adapter_files(directory).items():
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\";"
                 f" filename=\"{filename}\"\r\nContent-Type: {content_type}\r\n\r\n").encode()
        body += data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), boundary


def files_under(directory: Path) -> set[Path]:
    """Every file of the data dir except the SQLite catalog, whose WAL files come and go."""
    return {p.relative_to(directory) for p in directory.rglob("*")
            if p.is_file() and not p.name.startswith("catalog.db")}


def cut_upload(gateway: Proc, data_dir: Path, tenant: str, adapter: str,
               directory: Path) -> None:
    """Send the head and half the body, wait until the gateway writes it out, then hang up."""
    body, boundary = multipart(directory)
    head = (f"POST /admin/tenants/{tenant}/adapters/{adapter}/versions HTTP/1.1\r\n"
            f"Host: {gateway.url.removeprefix('http://')}\r\n"
            f"Authorization: Bearer {ADMIN_TOKEN}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    host, port = gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + body[: len(body) // 2])
        # The cut lands while the upload is half on the gateway's disk, not before it began.
        wait_until(lambda: list((data_dir / "uploads").glob("upload-*/adapter_model")),
                   "the gateway to start writing the upload", timeout_s=30)
    # Leaving the `with` closed the socket with half the announced body unsent.


@pytest.mark.parametrize("store", ["local", "s3"])
def test_upload_cut_halfway_leaves_nothing_behind(
    store: str, tmp_path: Path, base_model_dir: Path, peft_adapter: Path,
    request: pytest.FixtureRequest,
) -> None:
    data_dir = tmp_path / "data"
    env: dict[str, str] = {}
    if store == "s3":
        s3_server = request.getfixturevalue("s3_server")
        prefix = f"cut-{secrets.token_hex(4)}"
        env = s3_env(s3_server, prefix)

        def stored_objects() -> int:
            listing = s3_server.client().list_objects_v2(Bucket=s3_server.bucket,
                                                         Prefix=f"{prefix}/")
            return int(listing.get("KeyCount", 0))
    else:
        def stored_objects() -> int:
            return sum(1 for p in (data_dir / "artifacts").rglob("*") if p.is_file())

    # Uploads need no runtime: a URL nobody listens on keeps the gateway from starting one.
    gateway = start_gateway(data_dir, base_model_dir, [f"http://127.0.0.1:{free_port()}"],
                            tmp_path / "gateway.log", **env)
    try:
        tenant, _ = new_tenant(gateway.url)
        before = files_under(data_dir)
        assert stored_objects() == 0

        cut_upload(gateway, data_dir, tenant, "support", peft_adapter)

        # The gateway notices the hang-up and removes its temporary directory.
        wait_until(lambda: not any((data_dir / "uploads").iterdir()),
                   "the upload's temporary files to be removed", timeout_s=30)
        assert files_under(data_dir) == before
        assert listed_adapters(gateway.url, tenant) == {}
        assert catalog_rows(data_dir / "catalog.db", tenant) == []
        assert stored_objects() == 0
        assert gateway.alive()
        assert httpx.get(f"{gateway.url}/healthz").status_code == 200

        full = upload(gateway.url, tenant, "support", peft_adapter)
        assert full.status_code == 201, full.text
        assert full.json()["version"] == 1 and full.json()["active"] is True
        assert listed_adapters(gateway.url, tenant) == {"support": [1]}
        assert catalog_rows(data_dir / "catalog.db", tenant) == [("support", 1)]
        assert stored_objects() == 2  # the safetensors and its adapter_config.json
        assert not any((data_dir / "uploads").iterdir())
    finally:
        gateway.stop()
    assert "Traceback" not in gateway.log_tail(100_000), gateway.log_tail()
