"""Composition: one builder makes every part, and the app starts them in one order and stops
them in reverse, extra parts (serve's runtime-child watcher) last in and first out."""

from __future__ import annotations

from pathlib import Path

import pytest
from litestar.testing import AsyncTestClient

from adapters.db import upgrade_database
from gateway.app import build_services, create_app
from gateway.services import Part
from tests.support.gw_helpers import make_settings

pytestmark = pytest.mark.unit


def _recorded(part: Part, log: list[str]) -> Part:
    async def start() -> None:
        log.append(f"start {part.name}")
        if part.start is not None:
            await part.start()

    async def stop() -> None:
        log.append(f"stop {part.name}")
        if part.stop is not None:
            await part.stop()

    return Part(part.name, start, stop)


async def test_parts_start_in_order_and_stop_in_reverse_past_a_failing_stop(
    tmp_path: Path, base_model_dir: Path
) -> None:
    settings = make_settings(tmp_path / "data", base_model_dir)
    upgrade_database(settings.database_url)

    async def fail() -> None:
        raise RuntimeError("this part cannot stop")

    services = build_services(settings, [Part("extra", stop=fail)])
    names = [p.name for p in services.parts]
    assert names[-1] == "extra"
    # A part stops before what it uses: the tasks after answers before the figures they
    # record and the router they call, the router before its probe client.
    stop_order = names[::-1]
    assert stop_order.index("background") < stop_order.index("experiment stats")
    assert stop_order.index("background") < stop_order.index("router")
    assert stop_order.index("router") < stop_order.index("runtime probe client")
    assert stop_order[-1] == "catalog database"

    log: list[str] = []
    services.parts = tuple(_recorded(p, log) for p in services.parts)
    async with AsyncTestClient(create_app(settings, services)) as client:
        assert (await client.get("/healthz")).status_code == 200
        assert log == [f"start {n}" for n in names]
        assert services.router._task is not None  # the router's probe loop runs
    assert log[len(names):] == [f"stop {n}" for n in stop_order]
    assert services.router._task is not None and services.router._task.cancelled()


async def test_extra_parts_join_the_services_create_app_builds(
    tmp_path: Path, base_model_dir: Path
) -> None:
    settings = make_settings(tmp_path / "data", base_model_dir)
    upgrade_database(settings.database_url)
    log: list[str] = []
    app = create_app(settings, extra_parts=[_recorded(Part("watcher"), log)])
    assert app.state.services.parts[-1].name == "watcher"
    async with AsyncTestClient(app):
        assert log == ["start watcher"]
    assert log == ["start watcher", "stop watcher"]
    with pytest.raises(ValueError, match="extra_parts"):
        create_app(settings, app.state.services, extra_parts=[Part("watcher")])
