"""Where adapter bytes come from: the artifact store (file:// or s3://), a local disk cache
with a byte budget, and a thread pool that loads them off the engine's thread.

Every byte is checked against the artifact's sha256 (`AdapterRef.sha256`, its content
address; not the `key`, which is the version's identity) after each fetch and each disk
read. With an `ArtifactScope`, a URI outside the runtime's store is refused before it is
opened. Transient store errors (connection refused, timeouts, 5xx, throttling)
are retried with exponential backoff; a missing object, a refused access or a hash mismatch
fail at once. Torch stays out: parsing the bytes is the injected `parse(data, ref)`.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from runtime.lora.lru import LruTier
from runtime.lora.protocol import (
    ADAPTER_KEY_RE,
    ArtifactRefused,
    ArtifactScope,
    FetchError,
    LoadResult,
)
from runtime.model.threads import single_threaded
from runtime.types import AdapterRef

log = logging.getLogger(__name__)

DEFAULT_MAX_ARTIFACT_BYTES = 512 * 1024 * 1024  # API.md's upload limit
_PERMANENT_S3_CODES = {"NoSuchKey", "NoSuchBucket", "404", "403", "AccessDenied",
                       "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidBucketName"}


class ArtifactFetcher:
    """Fetch an artifact by URI and verify its sha256, retrying transient errors."""

    def __init__(
        self,
        s3_endpoint_url: str | None = None,
        *,
        s3_region: str | None = None,
        max_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES,
        attempts: int = 4,
        backoff_s: float = 0.2,
        s3_client: Any = None,
        sleep: Callable[[float], None] = time.sleep,
        scope: ArtifactScope | None = None,
    ) -> None:
        """`scope`: the store this fetcher may read; None reads any URI (tests of fetching)."""
        self._scope = scope
        self._endpoint = s3_endpoint_url
        self._region = s3_region
        self._max_bytes = max_bytes
        self._attempts = max(1, attempts)
        self._backoff_s = backoff_s
        self._s3 = s3_client
        self._s3_lock = threading.Lock()
        self._sleep = sleep

    def fetch(self, uri: str, sha256: str) -> bytes:
        """The artifact's bytes; FetchError with a clear reason otherwise."""
        if self._scope is not None:
            try:
                self._scope.check(uri, sha256)
            except ArtifactRefused as exc:
                raise FetchError(f"refused: {exc}", False) from None
        for attempt in range(self._attempts):
            try:
                data = self._read(uri)
                break
            except FetchError as exc:
                if not exc.transient:
                    raise
                if attempt + 1 == self._attempts:
                    # Still transient: no more tries now, but the adapter cache remembers
                    # this failure only briefly, so a store that comes back serves again.
                    raise FetchError(
                        f"store unreachable after {self._attempts} attempts: {exc}", True
                    ) from exc
                delay = self._backoff_s * 2**attempt
                log.warning("transient fetch error (attempt %d, retry in %.2fs): %s",
                            attempt + 1, delay, exc)
                self._sleep(delay)
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            raise FetchError(f"sha256 mismatch: expected {sha256}, fetched {digest}", False)
        return data

    def _read(self, uri: str) -> bytes:
        parts = urlparse(uri)
        if parts.scheme == "file":
            return self._read_file(Path(unquote(parts.path)))
        if parts.scheme == "s3":
            return self._read_s3(parts.netloc, parts.path.lstrip("/"))
        raise FetchError(f"unsupported artifact URI scheme {parts.scheme!r}", False)

    def _read_file(self, path: Path) -> bytes:
        if not path.is_absolute():
            raise FetchError("file URI must hold an absolute path", False)
        # O_NOFOLLOW: a symlink put in place after the scope check is not followed.
        flags = os.O_RDONLY | (getattr(os, "O_NOFOLLOW", 0) if self._scope is not None else 0)
        try:
            with os.fdopen(os.open(path, flags), "rb") as f:
                data = f.read(self._max_bytes + 1)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise FetchError(f"artifact not found at {path}", False) from None
        except PermissionError:
            raise FetchError(f"artifact not readable at {path}", False) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink
                raise FetchError(f"artifact at {path} is a symlink", False) from None
            # Other I/O errors (of a network mount, say) may pass: transient.
            raise FetchError(f"reading {path}: {exc.strerror or exc}", True) from exc
        return self._check_size(data)

    def _read_s3(self, bucket: str, key: str) -> bytes:
        import botocore.exceptions as bx

        try:
            body = self._client().get_object(Bucket=bucket, Key=key)["Body"]
            try:
                data = body.read(self._max_bytes + 1)
            finally:
                body.close()
        except bx.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            transient = code not in _PERMANENT_S3_CODES and (status >= 500 or status in (0, 429))
            raise FetchError(f"s3://{bucket}/{key}: {code or status}", transient) from exc
        except bx.BotoCoreError as exc:  # connection refused, timeouts, truncated reads
            raise FetchError(f"s3://{bucket}/{key}: {exc}", True) from exc
        return self._check_size(data)

    def _check_size(self, data: bytes) -> bytes:
        if len(data) > self._max_bytes:
            raise FetchError(f"artifact larger than {self._max_bytes} bytes", False)
        return data

    def _client(self) -> Any:
        with self._s3_lock:  # boto3 clients are thread-safe; creating them is not
            if self._s3 is None:
                import boto3
                from botocore.config import Config

                self._s3 = boto3.client(
                    "s3",
                    endpoint_url=self._endpoint,
                    region_name=self._region,
                    config=Config(
                        s3={"addressing_style": "path"},
                        connect_timeout=3,
                        read_timeout=30,
                        retries={"total_max_attempts": 1},  # our own backoff does the retries
                    ),
                )
            return self._s3


class DiskCache:
    """Verified artifacts on local disk under `root/<sha256>`, LRU within `max_bytes`.

    Keyed by the artifact's content sha256: versions that share weights share one file."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lru: LruTier[str, None] = LruTier(max_bytes)
        self._lock = threading.Lock()
        # Files from an earlier run count against the budget, oldest access first.
        found = [p for p in self.root.iterdir() if ADAPTER_KEY_RE.match(p.name) and p.is_file()]
        for path in sorted(found, key=lambda p: p.stat().st_mtime):
            self._add(path.name, path.stat().st_size)

    def __len__(self) -> int:
        return len(self._lru)

    @property
    def used_bytes(self) -> int:
        return self._lru.used

    def get(self, key: str) -> bytes | None:
        """The verified bytes, or None (absent, or found corrupt and dropped)."""
        path = self._path(key)
        with self._lock:
            if key not in self._lru:
                return None
            self._lru.get(key)
            self._lru.pin(key)  # not deleted under our read
        try:
            data = path.read_bytes()
        except OSError:
            data = None
        finally:
            with self._lock:
                self._lru.unpin(key)
        if data is None or hashlib.sha256(data).hexdigest() != key:
            log.warning("dropping unreadable or corrupt disk cache entry %s", key)
            self._drop(key)
            return None
        return data

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        if len(data) > self._lru.capacity:
            return  # larger than the whole budget: serve it without keeping a copy
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".partial-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)  # readers see the whole file or none
        except OSError:
            Path(tmp).unlink(missing_ok=True)
            log.warning("could not write disk cache entry %s", key, exc_info=True)
            return
        with self._lock:
            self._add(key, len(data))

    def _add(self, key: str, size: int) -> None:
        for victim in self._lru.put(key, None, size=size):
            self._path(victim).unlink(missing_ok=True)

    def _drop(self, key: str) -> None:
        with self._lock:
            self._lru.remove(key)
        self._path(key).unlink(missing_ok=True)

    def _path(self, key: str) -> Path:
        if not ADAPTER_KEY_RE.match(key):  # never a caller's string as a file name
            raise ValueError("adapter key must be a lowercase sha256 hex")
        return self.root / key


class AdapterLoader:
    """Loads adapters in a thread pool: disk cache, else fetch (then keep on disk); parse.

    `load(ref)` returns the one Future of that adapter_key while its load runs, so concurrent
    callers share a fetch. The disk tier and the fetch go by `ref.sha256`; the parsed weights
    (which carry the version's scale) by `ref.key`. Implements runtime.lora.protocol.Loader.
    """

    def __init__(
        self,
        fetcher: ArtifactFetcher,
        parse: Callable[[bytes, AdapterRef], Any],
        disk: DiskCache | None = None,
        max_workers: int = 4,
    ) -> None:
        self._fetcher = fetcher
        self._parse = parse
        self.disk = disk
        # parse() builds tensors: on one thread each, so no second OpenMP team competes with
        # the engine thread's (runtime/model/threads.py has the measurement).
        self._pool = ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="adapter-load", initializer=single_threaded
        )
        self._lock = threading.Lock()
        self._inflight: dict[str, Future[LoadResult]] = {}

    def load(self, ref: AdapterRef) -> Future[LoadResult]:
        with self._lock:
            future = self._inflight.get(ref.key)
            if future is not None:
                return future
            future = self._pool.submit(self._load, ref)
            self._inflight[ref.key] = future
        # Outside the lock: a load that already finished runs the callback right here.
        future.add_done_callback(functools.partial(self._done, ref.key))
        return future

    def num_disk_entries(self) -> int | None:
        return len(self.disk) if self.disk is not None else None

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _done(self, key: str, future: Future[LoadResult]) -> None:
        with self._lock:
            if self._inflight.get(key) is future:
                del self._inflight[key]

    def _load(self, ref: AdapterRef) -> LoadResult:
        start = time.perf_counter()
        data = self.disk.get(ref.sha256) if self.disk is not None else None
        source = "disk"
        if data is None:
            source = "store"
            data = self._fetcher.fetch(ref.uri, ref.sha256)
            if self.disk is not None:
                self.disk.put(ref.sha256, data)
        weights = self._parse(data, ref)
        return LoadResult(ref.key, weights, source, time.perf_counter() - start, len(data))
