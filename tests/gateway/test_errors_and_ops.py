"""Error bodies in OpenAI's shape from the one table, 500s without traces, ops routes,
and no secret in any log line."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar, get
from litestar.testing import AsyncTestClient

from adapters import errors as catalog_errors
from gateway import errors
from gateway.errors import RateLimited, Unavailable, to_response
from tests.support.gw_helpers import ADMIN_TOKEN, admin

pytestmark = pytest.mark.unit

ERROR_KEYS = {"message", "type", "code", "param"}


def assert_openai_error(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS
    return dict(body["error"])


async def test_framework_errors_come_in_openai_shape(client: AsyncTestClient[Any]) -> None:
    assert_openai_error(await client.get("/no/such/route"), 404)
    error = assert_openai_error(await client.patch("/admin/tenants", headers=admin()), 405)
    assert error["code"] == "method_not_allowed"
    error = assert_openai_error(
        await client.post("/admin/tenants", json={"name": "BAD NAME"}, headers=admin()), 400
    )
    assert error["param"] == "name"
    error = assert_openai_error(
        await client.post("/admin/tenants", content=b"{not json",
                          headers={**admin(), "Content-Type": "application/json"}), 400
    )
    assert error["type"] == "invalid_request_error"
    error = assert_openai_error(
        await client.post("/admin/tenants/acme/adapters/a/activate", json={"version": "x"},
                          headers=admin()), 400
    )
    assert error["param"] == "version"


async def test_json_body_over_the_request_limit_is_413(client: AsyncTestClient[Any]) -> None:
    limit = client.app.state.services.settings.max_request_bytes
    huge = {"name": "acme", "pad": "x" * (limit + 1)}
    assert_openai_error(await client.post("/admin/tenants", json=huge, headers=admin()), 413)


async def test_server_fault_is_500_without_a_trace(caplog: pytest.LogCaptureFixture) -> None:
    @get("/boom", sync_to_thread=False)
    def boom() -> None:
        raise RuntimeError("secret internals at /srv/loragate/catalog.db")

    app = Litestar([boom], exception_handlers=errors.EXCEPTION_HANDLERS, logging_config=None)
    with caplog.at_level(logging.ERROR):
        async with AsyncTestClient(app) as client:
            response = await client.get("/boom")
    error = assert_openai_error(response, 500)
    assert error == {"message": "internal server error", "type": "server_error",
                     "code": "internal_error", "param": None}
    assert "secret internals" not in response.text and "Traceback" not in response.text
    assert "RuntimeError" in caplog.text  # the trace goes to the log instead


@pytest.mark.parametrize(
    ("exc", "status", "retry_after"),
    [
        (RateLimited("tenant over its requests per minute", retry_after=7), 429, "7"),
        (RateLimited("over"), 429, "1"),
        (Unavailable("no healthy runtime"), 503, "5"),
        (catalog_errors.StorageUnavailable("S3 down"), 503, "5"),
    ],
)
def test_retry_after_on_429_and_503(exc: Exception, status: int, retry_after: str) -> None:
    response = to_response(exc)
    assert response.status_code == status
    assert response.headers["Retry-After"] == retry_after


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (catalog_errors.NotFound("x"), 404),
        (catalog_errors.Conflict("x"), 409),
        (catalog_errors.ValidationFailed("rank 128 exceeds 64"), 422),
        (catalog_errors.InvalidArgument("bad name"), 400),
        (catalog_errors.TooLarge("x"), 413),
        (catalog_errors.ArtifactCorrupt("x"), 503),
        (errors.ModelNotFound("model 'x' not found", param="model"), 404),
    ],
)
def test_domain_errors_map_through_the_table(exc: Exception, status: int) -> None:
    response = to_response(exc)
    assert response.status_code == status
    assert response.content["error"]["message"] == str(exc)


def test_model_not_found_code() -> None:
    body = to_response(errors.ModelNotFound("no such model", param="model")).content
    assert body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model"


async def test_healthz_and_readyz_say_what_is_missing(client: AsyncTestClient[Any]) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")  # no runtime configured in this app
    assert ready.status_code == 503
    body = ready.json()
    assert body["catalog"] == "ok" and body["status"] == "not_ready"
    assert body["missing"] == ["no runtime configured"]


async def test_readyz_turns_200_with_a_healthy_runtime(client: AsyncTestClient[Any]) -> None:
    from gateway.inference.router import RuntimeHealth

    services = client.app.state.services
    health = [RuntimeHealth("http://127.0.0.1:8100", False, "unreachable: ConnectError")]

    async def probe() -> list[RuntimeHealth]:
        return health

    services.runtime_probe = probe
    down = await client.get("/readyz")
    assert down.status_code == 503
    assert down.json()["missing"] == ["no runtime has its base model loaded"]
    health.append(RuntimeHealth("http://127.0.0.1:8101", True, "ok"))
    up = await client.get("/readyz")
    assert up.status_code == 200 and up.json()["missing"] == []


async def test_readyz_reports_an_unreachable_catalog(tmp_path: Path, base_model_dir: Path) -> None:
    from gateway.app import create_app
    from tests.support.gw_helpers import make_settings

    # Nothing listens on port 1: every connection attempt is refused.
    settings = make_settings(tmp_path / "data", base_model_dir,
                             database_url="postgresql+asyncpg://loragate@127.0.0.1:1/catalog")
    async with AsyncTestClient(create_app(settings)) as client:
        ready = await client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["catalog"].startswith("unreachable")
    assert ready.json()["missing"][0].startswith("catalog unreachable")


def test_settings_repr_hides_the_admin_token(settings: Any) -> None:
    assert ADMIN_TOKEN not in repr(settings) and ADMIN_TOKEN not in str(settings)
