"""Content-addressed artifact storage: `sha256/<aa>/<hex>` in a local dir or an S3 bucket.

Stores are synchronous (boto3 is); async callers run them in a worker thread. Objects are
written from files already on disk, never from bytes held whole in memory, and every read
re-hashes the bytes and refuses a mismatch. Keys come only from validated sha256 hex, so no
user-supplied name ever reaches a filesystem path or an object key.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Protocol, runtime_checkable

from adapters.errors import ArtifactCorrupt, ArtifactMissing, StorageUnavailable

CHUNK_BYTES = 1024 * 1024
_SHA256 = re.compile(r"[0-9a-f]{64}")


def object_key(sha256: str) -> str:
    """The content address of an object, relative to the store root or S3 prefix."""
    if not _SHA256.fullmatch(sha256):
        raise ValueError("object keys are lowercase hex sha256 digests")
    return f"sha256/{sha256[:2]}/{sha256}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _copy_verified(src: BinaryIO, dst: BinaryIO, sha256: str) -> None:
    digest = hashlib.sha256()
    while chunk := src.read(CHUNK_BYTES):
        digest.update(chunk)
        dst.write(chunk)
    if digest.hexdigest() != sha256:
        raise ArtifactCorrupt(f"object {sha256} does not match its sha256")


@runtime_checkable
class ArtifactStore(Protocol):
    def put_file(self, path: Path, sha256: str) -> bool:
        """Store the file under its sha256; True when this call created the object."""

    def get_to_file(self, sha256: str, dest: Path) -> None:
        """Write the object to dest, verifying its sha256 (dest is removed on mismatch)."""

    def exists(self, sha256: str) -> bool: ...

    def delete(self, sha256: str) -> None:
        """Remove the object; removing a missing object is not an error."""

    def uri(self, sha256: str) -> str:
        """`file:///...` or `s3://bucket/prefix/...`: where a runtime fetches it."""


def _fetch_verified(write_body: Any, dest: Path) -> None:
    """Run write_body(file) into a temp file beside dest, verify, then rename into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".fetch-", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            write_body(out)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class LocalStore:
    """Objects under a local directory (the embedded default: DATA_DIR/artifacts)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    def _path(self, sha256: str) -> Path:
        return self.root / object_key(sha256)

    def put_file(self, path: Path, sha256: str) -> bool:
        target = self._path(sha256)
        if target.exists():
            return False
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".put-", dir=target.parent)
        except OSError as exc:
            raise StorageUnavailable(f"local store not writable: {exc.strerror}") from exc
        try:
            with os.fdopen(fd, "wb") as out, Path(path).open("rb") as src:
                _copy_verified(src, out, sha256)
                out.flush()
                os.fsync(out.fileno())
            # Atomic: a reader sees either no object or the whole verified one.
            os.replace(tmp, target)
        except BaseException as exc:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(exc, OSError):  # disk full, permissions: the store, not the caller
                raise StorageUnavailable(f"local store write failed: {exc.strerror}") from exc
            raise
        return True

    def get_to_file(self, sha256: str, dest: Path) -> None:
        try:
            src = self._path(sha256).open("rb")
        except FileNotFoundError:
            raise ArtifactMissing(f"object {sha256} is missing from the store") from None
        with src:
            _fetch_verified(lambda out: _copy_verified(src, out, sha256), dest)

    def exists(self, sha256: str) -> bool:
        return self._path(sha256).is_file()

    def delete(self, sha256: str) -> None:
        self._path(sha256).unlink(missing_ok=True)

    def uri(self, sha256: str) -> str:
        return self._path(sha256).as_uri()


class S3Store:
    """Objects in an S3 bucket under a prefix; large files go up as multipart uploads."""

    MULTIPART_BYTES = 8 * 1024 * 1024  # S3 parts are at least 5 MiB

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        client: Any | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str | None = None,
        multipart_bytes: int = MULTIPART_BYTES,
    ) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        # Credentials default to boto3's chain (AWS_* variables, profiles, instance roles).
        self._client = client or boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name=region,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
        )
        self._transfer = TransferConfig(
            multipart_threshold=multipart_bytes,
            multipart_chunksize=multipart_bytes,
            max_concurrency=4,
        )

    def _key(self, sha256: str) -> str:
        key = object_key(sha256)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _unavailable(self, op: str, exc: Exception) -> StorageUnavailable:
        # botocore messages carry no credentials; keep only the error class and code.
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", type(exc).__name__)
        return StorageUnavailable(f"S3 {op} failed: {code}")

    def put_file(self, path: Path, sha256: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        if self.exists(sha256):
            return False
        # Hash the local file first: an object must never sit under a wrong address.
        if sha256_file(Path(path)) != sha256:
            raise ArtifactCorrupt(f"file does not match its sha256 {sha256}")
        try:
            with Path(path).open("rb") as src:
                self._client.upload_fileobj(
                    src,
                    self.bucket,
                    self._key(sha256),
                    ExtraArgs={"Metadata": {"sha256": sha256}},
                    Config=self._transfer,
                )
        except (BotoCoreError, ClientError) as exc:
            raise self._unavailable("put", exc) from exc
        return True

    def get_to_file(self, sha256: str, dest: Path) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            body = self._client.get_object(Bucket=self.bucket, Key=self._key(sha256))["Body"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise ArtifactMissing(f"object {sha256} is missing from the store") from None
            raise self._unavailable("get", exc) from exc
        except BotoCoreError as exc:
            raise self._unavailable("get", exc) from exc
        try:
            _fetch_verified(lambda out: _copy_verified(body, out, sha256), dest)
        except (BotoCoreError, ClientError) as exc:
            raise self._unavailable("get", exc) from exc
        finally:
            body.close()

    def exists(self, sha256: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.head_object(Bucket=self.bucket, Key=self._key(sha256))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._unavailable("head", exc) from exc
        except BotoCoreError as exc:
            raise self._unavailable("head", exc) from exc
        return True

    def delete(self, sha256: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.delete_object(Bucket=self.bucket, Key=self._key(sha256))
        except (BotoCoreError, ClientError) as exc:
            raise self._unavailable("delete", exc) from exc

    def uri(self, sha256: str) -> str:
        return f"s3://{self.bucket}/{self._key(sha256)}"
