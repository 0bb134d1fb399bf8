"""Property-based calls generated from the OpenAPI document: no admin input makes a 500, and
every error answer has OpenAI's shape."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from adapters.db import upgrade_database
from gateway.app import create_app
from tests.support.gw_helpers import admin, make_settings

pytestmark = [pytest.mark.unit, pytest.mark.slow]

EXAMPLES_PER_OPERATION = 15


def test_generated_calls_never_fault(tmp_path: Path, base_model_dir: Path) -> None:
    app_settings = make_settings(tmp_path / "data", base_model_dir)
    upgrade_database(app_settings.database_url)
    schema = schemathesis.openapi.from_asgi("/schema/openapi.json", create_app(app_settings),
                                            headers=admin())
    checked = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if not operation.path.startswith("/admin"):
            continue  # /readyz answers 503 with its own body by design

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def call(case: Any) -> None:
            response = case.call(headers=admin())
            assert response.status_code < 500, (case.method, case.path, response.text)
            if response.status_code >= 400:
                body = response.json()
                assert set(body) == {"error"}, body
                assert set(body["error"]) == {"message", "type", "code", "param"}

        call()
        checked.append(f"{operation.method.upper()} {operation.path}")
    assert any("/admin/tenants" in c for c in checked), checked
