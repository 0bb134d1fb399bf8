"""Fetching adapter artifacts: file:// and s3://, sha256 checks, retries, disk tier, loader."""

from __future__ import annotations

import hashlib
import socket
import threading
from pathlib import Path

import pytest

from runtime.lora.protocol import FetchError
from runtime.lora.store import AdapterLoader, ArtifactFetcher, DiskCache
from runtime.types import AdapterRef


def artifact(tmp_path: Path, payload: bytes, name: str = "obj") -> tuple[str, str]:
    path = tmp_path / name
    path.write_bytes(payload)
    return path.as_uri(), hashlib.sha256(payload).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.unit
def test_file_fetch_returns_verified_bytes(tmp_path: Path) -> None:
    uri, key = artifact(tmp_path, b"lora bytes")
    assert ArtifactFetcher().fetch(uri, key) == b"lora bytes"


@pytest.mark.unit
def test_corrupted_artifact_is_refused_with_both_hashes(tmp_path: Path) -> None:
    uri, key = artifact(tmp_path, b"original")
    (tmp_path / "obj").write_bytes(b"tampered")
    with pytest.raises(FetchError, match=f"sha256 mismatch: expected {key}") as info:
        ArtifactFetcher().fetch(uri, key)
    assert hashlib.sha256(b"tampered").hexdigest() in str(info.value)
    assert not info.value.transient


@pytest.mark.unit
def test_missing_file_and_bad_scheme_fail_without_retry(tmp_path: Path) -> None:
    sleeps: list[float] = []
    fetcher = ArtifactFetcher(sleep=sleeps.append)
    with pytest.raises(FetchError, match="artifact not found"):
        fetcher.fetch((tmp_path / "nope").as_uri(), "0" * 64)
    with pytest.raises(FetchError, match="unsupported artifact URI scheme 'http'"):
        fetcher.fetch("http://example.com/x", "0" * 64)
    assert sleeps == []


@pytest.mark.unit
def test_oversized_artifact_is_refused(tmp_path: Path) -> None:
    uri, key = artifact(tmp_path, b"x" * 100)
    with pytest.raises(FetchError, match="larger than 64 bytes"):
        ArtifactFetcher(max_bytes=64).fetch(uri, key)


class FlakyS3:
    """A botocore-shaped client whose first `failures` calls fail as the network does."""

    def __init__(self, data: bytes, failures: int, error: Exception) -> None:
        self.data, self.failures, self.error, self.calls = data, failures, error, 0

    def get_object(self, Bucket: str, Key: str) -> dict:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        import io

        return {"Body": io.BytesIO(self.data)}


@pytest.mark.unit
def test_transient_s3_errors_are_retried_with_growing_backoff() -> None:
    from botocore.exceptions import EndpointConnectionError

    data = b"adapter"
    client = FlakyS3(data, 2, EndpointConnectionError(endpoint_url="http://s3"))
    sleeps: list[float] = []
    fetcher = ArtifactFetcher(s3_client=client, backoff_s=0.1, sleep=sleeps.append)
    assert fetcher.fetch("s3://b/p/obj", hashlib.sha256(data).hexdigest()) == data
    assert client.calls == 3 and sleeps == [0.1, 0.2]


@pytest.mark.unit
def test_s3_missing_key_is_permanent_and_503_is_transient() -> None:
    from botocore.exceptions import ClientError

    def client_error(code: str, status: int) -> ClientError:
        body = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
        return ClientError(body, "GetObject")

    missing = FlakyS3(b"", 5, client_error("NoSuchKey", 404))
    with pytest.raises(FetchError, match="NoSuchKey"):
        ArtifactFetcher(s3_client=missing, sleep=lambda s: None).fetch("s3://b/k", "0" * 64)
    assert missing.calls == 1
    busy = FlakyS3(b"", 5, client_error("SlowDown", 503))
    with pytest.raises(FetchError, match="store unreachable after 3 attempts"):
        fetcher = ArtifactFetcher(s3_client=busy, attempts=3, sleep=lambda s: None)
        fetcher.fetch("s3://b/k", "0" * 64)
    assert busy.calls == 3


@pytest.mark.unit
def test_unreachable_s3_endpoint_fails_clearly() -> None:
    fetcher = ArtifactFetcher(f"http://127.0.0.1:{free_port()}", attempts=2, sleep=lambda s: None)
    with pytest.raises(FetchError, match="store unreachable after 2 attempts") as info:
        fetcher.fetch("s3://bucket/sha256/aa/obj", "0" * 64)
    assert info.value.transient  # the cache remembers it briefly: the store may come back


@pytest.mark.integration
def test_s3_fetch_from_seaweedfs(s3_server) -> None:
    data = b"adapter on s3"
    key = hashlib.sha256(data).hexdigest()
    object_key = f"test-runtime/sha256/{key[:2]}/{key}"
    s3_server.client().put_object(Bucket=s3_server.bucket, Key=object_key, Body=data)
    fetcher = ArtifactFetcher(s3_client=s3_server.client())
    assert fetcher.fetch(f"s3://{s3_server.bucket}/{object_key}", key) == data
    with pytest.raises(FetchError, match="NoSuchKey|404"):
        fetcher.fetch(f"s3://{s3_server.bucket}/test-runtime/missing", key)


@pytest.mark.unit
def test_disk_cache_keeps_its_byte_budget_lru_and_survives_restart(tmp_path: Path) -> None:
    blobs = [bytes([i]) * 40 for i in range(4)]
    keys = [hashlib.sha256(b).hexdigest() for b in blobs]
    disk = DiskCache(tmp_path / "cache", max_bytes=100)
    disk.put(keys[0], blobs[0])
    disk.put(keys[1], blobs[1])
    assert disk.get(keys[0]) == blobs[0]  # 0 is now the most recent
    disk.put(keys[2], blobs[2])  # 120 > 100: the LRU (1) goes
    assert disk.get(keys[1]) is None and disk.used_bytes == 80
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([keys[0], keys[2]])
    again = DiskCache(tmp_path / "cache", max_bytes=100)
    assert len(again) == 2 and again.get(keys[2]) == blobs[2]
    disk.put(keys[3], b"x" * 101)  # over the whole budget: not kept
    assert disk.get(keys[3]) is None


@pytest.mark.unit
def test_disk_cache_drops_a_corrupt_file_and_refuses_odd_keys(tmp_path: Path) -> None:
    data = b"good"
    key = hashlib.sha256(data).hexdigest()
    disk = DiskCache(tmp_path, max_bytes=1000)
    disk.put(key, data)
    (tmp_path / key).write_bytes(b"evil")
    assert disk.get(key) is None
    assert not (tmp_path / key).exists()
    with pytest.raises(ValueError):
        disk.put("../../etc/passwd", data)


@pytest.mark.unit
def test_loader_fetches_once_for_concurrent_loads_then_serves_from_disk(tmp_path: Path) -> None:
    data = b"weights"
    uri, key = artifact(tmp_path, data)
    gate = threading.Event()
    parsed: list[bytes] = []

    def parse(raw: bytes, ref: AdapterRef) -> str:
        gate.wait(5)
        parsed.append(raw)
        return f"parsed:{ref.name}"

    ref = AdapterRef.for_version(key, uri, 4, 8.0, ("q_proj",), name="a")
    loader = AdapterLoader(ArtifactFetcher(), parse, DiskCache(tmp_path / "disk", 10_000))
    try:
        futures = [loader.load(ref) for _ in range(8)]
        assert len({id(f) for f in futures}) == 1
        gate.set()
        first = futures[0].result(5)
        assert (first.weights, first.source, first.num_bytes) == ("parsed:a", "store", len(data))
        (tmp_path / "obj").unlink()  # the store is gone: the disk tier still serves it
        second = loader.load(ref).result(5)
        assert second.source == "disk" and parsed == [data, data]
    finally:
        loader.shutdown()


@pytest.mark.unit
def test_loader_surfaces_fetch_errors_on_the_future(tmp_path: Path) -> None:
    uri, _ = artifact(tmp_path, b"abc")
    ref = AdapterRef.for_version("1" * 64, uri, 4, 8.0, ("q_proj",))
    loader = AdapterLoader(ArtifactFetcher(), lambda raw, r: raw)
    try:
        error = loader.load(ref).exception(5)
        assert isinstance(error, FetchError) and "sha256 mismatch" in str(error)
    finally:
        loader.shutdown()
