"""The faults the security fuzzers found, pinned as plain tests so CI checks each every run
whatever the fuzz draws."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from adapters.db import upgrade_database
from adapters.errors import ValidationFailed
from adapters.safetensors_header import parse_header
from adapters.validation import validate_adapter
from gateway.app import create_app
from tests.support.adapter_mutations import SPEC, good_config, good_tensors, header_and_data, pack
from tests.support.gw_helpers import admin, bearer, create_tenant, make_settings, upload
from tests.support.sec_helpers import adapter_dir

pytestmark = pytest.mark.unit
GIANT = "9" * 5000  # past Python's 4300-digit int conversion limit: json raised ValueError


def _write(tmp_path: Path, config: bytes, model: bytes) -> tuple[Path, Path]:
    (tmp_path / "c.json").write_bytes(config)
    (tmp_path / "m.safetensors").write_bytes(model)
    return tmp_path / "c.json", tmp_path / "m.safetensors"


def _good_model() -> bytes:
    header, data = header_and_data(good_tensors())
    return pack(json.dumps(header).encode(), data)


def test_a_giant_integer_in_the_header_is_refused(tmp_path: Path) -> None:
    text = ('{"x": ' + GIANT + "}").encode()
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text)
    with pytest.raises(ValidationFailed, match="not valid UTF-8 JSON"):
        parse_header(path)


def test_a_giant_integer_in_the_config_is_refused(tmp_path: Path) -> None:
    config = json.dumps(good_config()).replace('"r": 4', f'"r": {GIANT}').encode()
    with pytest.raises(ValidationFailed, match="not valid JSON"):
        validate_adapter(*_write(tmp_path, config, _good_model()), SPEC, 16)


def test_a_catastrophic_target_modules_regex_is_refused_quickly(tmp_path: Path) -> None:
    # With `re` this pattern backtracks for hours against "model.layers.0.self_attn.q_proj"
    # and holds the GIL meanwhile, which froze the whole gateway.
    evil = r"(?:[a-z.0-9_]|\w|.)*(?:\w|.)*(?:\w|.|[a-z])*\d{2}"
    config = {**good_config(), "target_modules": evil}
    started = time.perf_counter()
    with pytest.raises(ValidationFailed, match="too long to evaluate"):
        validate_adapter(*_write(tmp_path, json.dumps(config).encode(), _good_model()), SPEC, 16)
    assert time.perf_counter() - started < 2.0


async def test_version_numbers_past_the_column_are_404(
    tmp_path: Path, base_model_dir: Path, base_spec: Any
) -> None:
    settings = make_settings(tmp_path / "data", base_model_dir)
    upgrade_database(settings.database_url)
    adapter = adapter_dir(tmp_path / "a", base_spec, seed=1)
    async with AsyncTestClient(create_app(settings)) as client:
        key = await create_tenant(client, "acme")
        assert (await upload(client, "acme", "support", adapter)).status_code == 201
        huge = 29929273960059124056064  # what the API fuzz drew: OverflowError, a 500
        for number in (huge, 2**63, 2**31):
            r = await client.delete(f"/admin/tenants/acme/adapters/support/versions/{number}",
                                    headers=admin())
            assert r.status_code == 404, r.text
            r = await client.post("/admin/tenants/acme/adapters/support/activate",
                                  json={"version": number}, headers=admin())
            assert r.status_code in (400, 404), r.text
            r = await client.put("/admin/tenants/acme/experiments/e", headers=admin(), json={
                "variants": [{"name": "c", "adapter": "support", "version": number,
                              "weight": 1}]})
            assert r.status_code in (400, 404), r.text
            r = await client.post("/v1/completions", headers=bearer(key),
                                  json={"model": f"support@{number}", "prompt": "hi"})
            assert r.status_code == 404, r.text
        r = await client.post("/v1/completions", headers=bearer(key),
                              json={"model": f"support@{GIANT}", "prompt": "hi"})
        assert r.status_code == 404, r.text


async def test_admin_paths_with_encoded_slashes_or_empty_segments_are_400(
    tmp_path: Path, base_model_dir: Path
) -> None:
    settings = make_settings(tmp_path / "data", base_model_dir)
    upgrade_database(settings.database_url)
    async with AsyncTestClient(create_app(settings)) as client:
        await create_tenant(client, "acme")
        body = {"variants": [{"name": "c", "adapter": "nope", "weight": 1}]}
        for path in ("/admin/tenants/%2Facme", "/admin/tenants//acme",
                     "/admin/tenants/acme%2F", "/admin/tenants/acme/experiments/%2Fab"):
            method = "PUT" if "experiments" in path else "GET"
            r = await client.request(method, path, headers=admin(), json=body)
            assert r.status_code == 400, (path, r.text)
            assert r.json()["error"]["param"] == "path"


@pytest.mark.parametrize("dtype", [["F32"], {"F32": 1}, 32, None])
def test_a_dtype_of_the_wrong_json_type_is_refused(tmp_path: Path, dtype: Any) -> None:
    header, data = header_and_data(good_tensors())
    next(iter(header.values()))["dtype"] = dtype  # a list was unhashable: TypeError, a 500
    path = tmp_path / "m.safetensors"
    path.write_bytes(pack(json.dumps(header).encode(), data))
    with pytest.raises(ValidationFailed, match="unknown dtype"):
        parse_header(path)
