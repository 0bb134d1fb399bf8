"""Finding 4 of issue 12: the runtime's port answers only its gateways (API.md "Runtimes").

Every route but /health needs `Authorization: Bearer <LORAGATE_RUNTIME_TOKEN>`; a runtime
refuses a non-loopback bind without a token, before it loads anything.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from litestar.testing import AsyncTestClient

from runtime.http.app import RuntimeState, create_runtime_app
from runtime.http.process import check_bind, is_loopback

pytestmark = pytest.mark.unit
TOKEN = "rt-" + "x" * 40
BODY = {"request_id": "r1", "prompt_token_ids": [1, 2], "sampling": {"max_tokens": 2}}


@pytest.fixture
async def client():
    # No engine yet: an authorized request gets 503 "loading", so 401 can only be the guard.
    app = create_runtime_app(state=RuntimeState(), token=TOKEN)
    async with AsyncTestClient(app) as client:
        yield client


@pytest.mark.parametrize("auth", [None, "", "Bearer", "Bearer wrong", f"Bearer {TOKEN}x",
                                  f"bearer{TOKEN}", TOKEN, f"Basic {TOKEN}"])
async def test_every_route_but_health_refuses_without_the_token(client, auth) -> None:
    headers = {"Authorization": auth} if auth is not None else {}
    for method, path, kwargs in (("POST", "/generate", {"json": BODY}),
                                 ("POST", "/abort/r1", {}), ("GET", "/stats", {})):
        resp = await client.request(method, path, headers=headers, **kwargs)
        assert resp.status_code == 401, (path, auth)
        assert resp.json()["error"]["code"] == "unauthorized"
    assert (await client.get("/health", headers=headers)).status_code == 503  # open: loading


async def test_the_token_opens_every_route(client) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    resp = await client.post("/generate", json=BODY, headers=headers)
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "loading"
    assert (await client.post("/abort/r1", headers=headers)).status_code == 200
    assert (await client.get("/stats", headers=headers)).status_code == 503


async def test_without_a_token_the_runtime_is_open_as_before() -> None:
    async with AsyncTestClient(create_runtime_app(state=RuntimeState())) as client:
        assert (await client.post("/abort/r1")).status_code == 200


def test_a_non_loopback_bind_needs_a_token() -> None:
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        assert is_loopback(host), host
        check_bind(host, None)
    for host in ("0.0.0.0", "::", "", "10.0.0.5", "runtime.internal"):
        assert not is_loopback(host), host
        with pytest.raises(ValueError, match="LORAGATE_RUNTIME_TOKEN"):
            check_bind(host, None)
        with pytest.raises(ValueError):
            check_bind(host, "")
        check_bind(host, TOKEN)


def test_loragate_runtime_refuses_a_public_bind_without_a_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.cli.main import main

    monkeypatch.delenv("LORAGATE_RUNTIME_TOKEN", raising=False)
    # No model there: the refusal comes before anything is loaded.
    code = main(["runtime", "--base-model", str(tmp_path), "--host", "0.0.0.0",
                 "--device", "cpu"])
    assert code == 2
    assert "LORAGATE_RUNTIME_TOKEN" in capsys.readouterr().err
