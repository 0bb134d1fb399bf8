"""Hostile names everywhere a name is accepted: traversal, absolute paths, NUL, backslashes,
homoglyphs, right-to-left overrides, 10,000 characters, URL schemes. Each gets a clear 4xx
in OpenAI's shape (API.md: names match ^[a-z0-9][a-z0-9._-]{0,62}$), and nothing is written
outside the data dir, whose files stay the catalog and content-addressed objects only.
"""

from __future__ import annotations

import ast
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from litestar.testing import AsyncTestClient

from adapters.db import upgrade_database
from adapters.storage import LocalStore, S3Store, object_key
from gateway.app import create_app
from tests.support.gw_helpers import admin, bearer, make_settings
from tests.support.sec_helpers import adapter_dir

pytestmark = pytest.mark.unit

HOSTILE = [
    "../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "..", ".", "/etc/passwd", "/abs", "a\x00b",
    "a\\b", "..\\..\\windows", "\u0430dapter",  # Cyrillic a: a homoglyph of "adapter"
    "adapter\u202egpj", "a" * 10_000, "s3://bucket/key", "file:///etc/passwd", "Upper",
    "", " ", "a b", "a/b", "-lead", ".hidden", "a" * 64,
]
# Files a data dir may hold: the SQLite catalog, content-addressed objects, empty upload dirs.
ALLOWED_FILE = re.compile(
    r"catalog\.db(-wal|-shm|-journal)?|artifacts/sha256/([0-9a-f]{2})/\2[0-9a-f]{62}")


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


def _assert_shaped_4xx(response: Any, where: str) -> None:
    assert 400 <= response.status_code < 500, (where, response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "code",
                                                             "param"}, (where, body)


@pytest.fixture
async def gw(tmp_path: Path, base_model_dir: Path) -> AsyncIterator[tuple[Any, Path]]:
    settings = make_settings(tmp_path / "data", base_model_dir)
    upgrade_database(settings.database_url)
    async with AsyncTestClient(create_app(settings)) as client:
        yield client, settings.data_dir


@pytest.fixture
def good_adapter(tmp_path: Path, base_spec: Any) -> Path:
    return adapter_dir(tmp_path / "good", base_spec, seed=3)


def _files(directory: Path, config_name: str = "adapter_config.json",
           model_name: str = "adapter_model.safetensors") -> dict[str, Any]:
    return {
        "adapter_config": (config_name, (directory / "adapter_config.json").read_bytes(),
                           "application/json"),
        "adapter_model": (model_name, (directory / "adapter_model.safetensors").read_bytes(),
                          "application/octet-stream"),
    }


async def test_hostile_names_are_refused_everywhere_and_write_nothing(
    gw: tuple[Any, Path], good_adapter: Path, tmp_path: Path
) -> None:
    client, data_dir = gw
    outside_before = _tree(tmp_path) - {f"data/{p}" for p in _tree(data_dir)}
    assert (await client.post("/admin/tenants", json={"name": "acme"},
                              headers=admin())).status_code == 201
    r = await client.post("/admin/tenants/acme/adapters/support/versions",
                          files=_files(good_adapter), headers=admin())
    assert r.status_code == 201, r.text
    key = (await client.post("/admin/tenants/acme/keys", json={"name": "ci"},
                             headers=admin())).json()["key"]
    variant = {"name": "control", "adapter": "support", "weight": 1}
    for name in HOSTILE:
        seg = quote(name, safe="")
        if name and set(name) == {"."}:  # sent as %2E: the client would resolve dot segments
            seg = name.replace(".", "%2E")
        calls = [
            ("POST", "/admin/tenants", {"name": name}),
            ("GET", f"/admin/tenants/{seg}", None),
            ("POST", f"/admin/tenants/{seg}/keys", {"name": "ci"}),
            ("GET", f"/admin/tenants/{seg}/adapters", None),
            ("POST", f"/admin/tenants/acme/adapters/{seg}/activate", {"version": 1}),
            ("POST", "/admin/tenants/acme/adapters/support/activate", {"version": name}),
            ("DELETE", f"/admin/tenants/acme/adapters/support/versions/{seg}", None),
            ("DELETE", f"/admin/tenants/acme/adapters/{seg}/versions/1", None),
            ("PUT", f"/admin/tenants/acme/experiments/{seg}", {"variants": [variant]}),
            ("GET", f"/admin/tenants/acme/experiments/{seg}", None),
            ("DELETE", f"/admin/tenants/acme/experiments/{seg}", None),
            ("PUT", "/admin/tenants/acme/experiments/exp",
             {"variants": [{**variant, "name": name}]}),
            ("PUT", "/admin/tenants/acme/experiments/exp",
             {"variants": [{**variant, "adapter": name}]}),
            ("PUT", "/admin/tenants/acme/experiments/exp",
             {"variants": [variant], "shadow": {"adapter": name, "sample_rate": 0.1}}),
            ("DELETE", f"/admin/keys/{seg}", None),
            ("PATCH", f"/admin/tenants/{seg}", {"requests_per_minute": 5}),
            ("GET", f"/admin/tenants/{seg}/keys", None),
            ("DELETE", f"/admin/tenants/acme/adapters/{seg}", None),
            ("PUT", f"/admin/tenants/acme/adapters/{seg}/rollout", {"version": 1}),
            ("GET", f"/admin/tenants/acme/adapters/{seg}/rollout", None),
            ("DELETE", f"/admin/tenants/acme/adapters/{seg}/rollout", None),
            ("DELETE", f"/admin/tenants/{seg}", None),
        ]
        for method, path, body in calls:
            if method == "GET" and path in ("/admin/tenants/", "/admin/tenants/acme/experiments/"):
                continue  # an empty name there is the list itself, not a name
            r = await client.request(method, path, json=body, headers=admin())
            _assert_shaped_4xx(r, f"{method} {path!r} {body!r}")
        # The upload checks the adapter name before reading the body.
        r = await client.post(f"/admin/tenants/acme/adapters/{seg}/versions",
                              files=_files(good_adapter), headers=admin())
        _assert_shaped_4xx(r, f"upload as adapter {name!r}")
        for path, payload in (
            ("/v1/completions", {"model": name, "prompt": "hi"}),
            ("/v1/chat/completions", {"model": name,
                                      "messages": [{"role": "user", "content": "hi"}]}),
        ):
            r = await client.post(path, json=payload, headers=bearer(key))
            _assert_shaped_4xx(r, f"{path} model {name!r}")
    for model in ("acme/../support", "../acme/support", "acme/support", "support@../1",
                  "support@1/../2", "support@01", "support@-1", "support@" + "9" * 5000,
                  "s3://bucket/sha256/aa/" + "a" * 64, "file:///etc/passwd"):
        r = await client.post("/v1/completions", json={"model": model, "prompt": "hi"},
                              headers=bearer(key))
        assert r.status_code == 404, (model, r.text)
        assert r.json()["error"]["code"] == "model_not_found"
    # Nothing new outside the data dir; inside it, only the catalog and content addresses.
    outside_after = _tree(tmp_path) - {f"data/{p}" for p in _tree(data_dir)}
    assert outside_after == outside_before
    for rel in _tree(data_dir):
        path = data_dir / rel
        if path.is_file():
            assert ALLOWED_FILE.fullmatch(rel), rel
        else:
            assert rel in ("artifacts", "artifacts/sha256", "uploads") or re.fullmatch(
                r"artifacts/sha256/[0-9a-f]{2}", rel), rel
    assert not any((data_dir / "uploads").iterdir())
    listed = (await client.get("/admin/tenants", headers=admin())).json()
    assert [t["name"] for t in listed] == ["acme"]


async def test_key_names_are_labels_never_paths(gw: tuple[Any, Path]) -> None:
    """API.md sets no pattern for key names: the catalog takes 1 to 63 printable characters
    and stores them as a label only. A traversal-looking label is harmless; NUL, RTL and
    overlong labels are 400."""
    client, data_dir = gw
    assert (await client.post("/admin/tenants", json={"name": "acme"},
                              headers=admin())).status_code == 201
    before = _tree(data_dir)
    for name in HOSTILE + [123, None, ["ci"]]:
        r = await client.post("/admin/tenants/acme/keys", json={"name": name}, headers=admin())
        printable_label = isinstance(name, str) and 0 < len(name) <= 63 and name.isprintable()
        if printable_label:
            assert r.status_code == 201, (name, r.text)
            assert r.json()["name"] == name
        else:
            _assert_shaped_4xx(r, f"key name {name!r}")
    assert {p for p in _tree(data_dir) if not p.startswith("catalog.db")} == {
        p for p in before if not p.startswith("catalog.db")}


async def test_multipart_filenames_and_part_names_never_reach_the_filesystem(
    gw: tuple[Any, Path], good_adapter: Path, tmp_path: Path
) -> None:
    client, data_dir = gw
    assert (await client.post("/admin/tenants", json={"name": "acme"},
                              headers=admin())).status_code == 201
    outside_before = _tree(tmp_path) - {f"data/{p}" for p in _tree(data_dir)}
    for i, filename in enumerate(["../../etc/passwd", "/etc/passwd", "..\\..\\x.json", "a\x00b",
                                  "x" * 10_000, "s3://b/k", "file:///etc/passwd",
                                  "\u202ejson.exe"]):
        r = await client.post(f"/admin/tenants/acme/adapters/a{i}/versions",
                              files=_files(good_adapter, filename, filename), headers=admin())
        # Part filenames are ignored (gateway/api/uploads.py): the upload is judged on its bytes,
        # except that a filename past the multipart parser's header limit is a 400.
        if len(filename) > 1000:
            _assert_shaped_4xx(r, "overlong filename")
        else:
            assert r.status_code == 201, (filename, r.text)
    for part in ("../adapter_config", "adapter_config/../x", "adapter_model\x00"):
        files = _files(good_adapter)
        files[part] = files.pop("adapter_config")
        r = await client.post("/admin/tenants/acme/adapters/bad/versions", files=files,
                              headers=admin())
        _assert_shaped_4xx(r, f"part {part!r}")
    outside_after = _tree(tmp_path) - {f"data/{p}" for p in _tree(data_dir)}
    assert outside_after == outside_before
    files = [p for p in _tree(data_dir) if (data_dir / p).is_file()]
    assert all(ALLOWED_FILE.fullmatch(p) for p in files), files
    # Eight uploads of the same bytes: one model object and one config object.
    assert sum(p.startswith("artifacts/") for p in files) == 2, files


def test_object_keys_come_only_from_sha256_digests(tmp_path: Path) -> None:
    for bad in ("../../etc/passwd", "a" * 63, "A" * 64, "g" * 64, "a" * 64 + "/..", "",
                "acme/support"):
        with pytest.raises(ValueError):
            object_key(bad)
        with pytest.raises(ValueError):
            LocalStore(tmp_path).uri(bad)
        with pytest.raises(ValueError):
            S3Store("bucket", "prefix", endpoint_url="http://127.0.0.1:9").uri(bad)
    # Every object key and path in storage.py goes through object_key(sha256): no method
    # builds one from anything else (read from the source, so a new method is covered).
    source = Path(__file__).resolve().parents[2] / "adapters" / "storage.py"
    tree = ast.parse(source.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "Key":
            assert isinstance(node.value, ast.Call), ast.unparse(node)
            assert ast.unparse(node.value.func) == "self._key", ast.unparse(node)
    funcs = {n.name: ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    assert "object_key(sha256)" in funcs["_key"] and "object_key(sha256)" in funcs["_path"]
