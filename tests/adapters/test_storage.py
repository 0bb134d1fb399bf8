"""LocalStore and S3Store (against a real SeaweedFS) behave the same: content addressed,
streamed, verified on every read, idempotent deletes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from adapters.catalog import Catalog
from adapters.db import create_engine, create_sessionmaker
from adapters.errors import ArtifactCorrupt, ArtifactMissing, StorageUnavailable, ValidationFailed
from adapters.storage import LocalStore, S3Store, object_key
from tests.support.adapter_files import SPEC, lora_tensors, write_adapter


def _s3_store(s3_server, prefix: str, **kw) -> S3Store:
    return S3Store(
        s3_server.bucket,
        prefix,
        endpoint_url=s3_server.endpoint_url,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        region=s3_server.region,
        **kw,
    )


@pytest.fixture(
    params=[
        pytest.param("local", marks=pytest.mark.unit),
        pytest.param("s3", marks=pytest.mark.integration),
    ]
)
def store(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    server = request.getfixturevalue("s3_server")
    return _s3_store(server, f"t/{os.urandom(4).hex()}")


def _corrupt(store, sha: str) -> None:
    """Replace the stored bytes behind the store's back."""
    if isinstance(store, LocalStore):
        (store.root / object_key(sha)).write_bytes(b"tampered")
    else:
        store._client.put_object(Bucket=store.bucket, Key=store._key(sha), Body=b"tampered")


def _blob(tmp_path: Path, data: bytes) -> tuple[Path, str]:
    path = tmp_path / f"blob-{hashlib.sha256(data).hexdigest()[:8]}"
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def test_put_get_exists_delete_round_trip(store, tmp_path: Path) -> None:
    path, sha = _blob(tmp_path, os.urandom(300_000))
    assert not store.exists(sha)
    assert store.put_file(path, sha) is True
    assert store.put_file(path, sha) is False  # content addressed: already there
    assert store.exists(sha)
    out = tmp_path / "fetched" / "copy"
    store.get_to_file(sha, out)
    assert out.read_bytes() == path.read_bytes()
    assert store.uri(sha).endswith(f"sha256/{sha[:2]}/{sha}")
    store.delete(sha)
    store.delete(sha)  # idempotent
    assert not store.exists(sha)
    with pytest.raises(ArtifactMissing):
        store.get_to_file(sha, tmp_path / "gone")


def test_reads_verify_the_hash(store, tmp_path: Path) -> None:
    path, sha = _blob(tmp_path, b"genuine bytes" * 1000)
    store.put_file(path, sha)
    _corrupt(store, sha)
    dest = tmp_path / "out"
    with pytest.raises(ArtifactCorrupt):
        store.get_to_file(sha, dest)
    assert not dest.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".fetch-")]


def test_put_refuses_a_file_that_is_not_its_hash(store, tmp_path: Path) -> None:
    path, _ = _blob(tmp_path, b"one thing")
    wrong = hashlib.sha256(b"another thing").hexdigest()
    with pytest.raises(ArtifactCorrupt):
        store.put_file(path, wrong)
    assert not store.exists(wrong)


@pytest.mark.unit
def test_object_keys_accept_only_sha256_hex(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    for bad in ("../../etc/passwd", "A" * 64, "0" * 63, "g" * 64):
        with pytest.raises(ValueError):
            store.uri(bad)
    assert store.uri("ab" * 32) == (tmp_path.resolve() / "sha256/ab" / ("ab" * 32)).as_uri()


@pytest.mark.integration
def test_s3_large_files_go_up_in_parts_and_uris_carry_the_prefix(s3_server, tmp_path) -> None:
    store = _s3_store(s3_server, "/team/prefix/", multipart_bytes=5 * 1024 * 1024)
    path, sha = _blob(tmp_path, os.urandom(11 * 1024 * 1024))
    assert store.put_file(path, sha)
    head = store._client.head_object(Bucket=s3_server.bucket, Key=f"team/prefix/{object_key(sha)}")
    assert head["ContentLength"] == 11 * 1024 * 1024
    assert head["ETag"].strip('"').endswith("-3")  # three parts of 5, 5 and 1 MiB
    assert store.uri(sha) == f"s3://{s3_server.bucket}/team/prefix/{object_key(sha)}"
    out = tmp_path / "back"
    store.get_to_file(sha, out)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == sha


@pytest.mark.unit
def test_s3_unreachable_is_storage_unavailable(tmp_path: Path) -> None:
    store = S3Store(
        "b", endpoint_url="http://127.0.0.1:9", access_key="x", secret_key="y", region="us-east-1"
    )
    with pytest.raises(StorageUnavailable) as failure:
        store.exists("ab" * 32)
    assert "y" not in failure.value.message.split()  # no secret in the message


@pytest.mark.integration
async def test_catalog_over_s3_stores_and_cleans_up(s3_server, sqlite_url, tmp_path) -> None:
    prefix = f"cat/{os.urandom(4).hex()}"
    store = _s3_store(s3_server, prefix)
    engine = create_engine(sqlite_url)
    cat = Catalog(create_sessionmaker(engine), store, SPEC, max_rank=16)
    try:
        await cat.create_tenant("acme")
        bad = write_adapter(tmp_path / "bad", model=lora_tensors(rank=8))
        with pytest.raises(ValidationFailed):
            await cat.upload_version("acme", "a", *bad)
        listed = store._client.list_objects_v2(Bucket=s3_server.bucket, Prefix=prefix)
        assert listed.get("KeyCount", 0) == 0
        view = await cat.upload_version("acme", "a", *write_adapter(tmp_path / "good"))
        resolved = await cat.resolve("acme", "a")
        assert resolved.adapter is not None
        assert (
            resolved.adapter.ref.uri
            == f"s3://{s3_server.bucket}/{prefix}/{object_key(view.sha256)}"
        )
        assert store.exists(view.sha256)
    finally:
        await engine.dispose()
