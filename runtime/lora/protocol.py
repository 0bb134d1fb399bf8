"""The types both sides of the adapter cache share, and what the scheduler needs of it. No torch.

    scheduler --AdapterProvider--> cache (runtime/lora/cache.py) --Loader--> store (store.py)

The scheduler only knows `AdapterProvider`; the cache only knows `Loader`, `LoadResult` and
`FetchError`; the store implements `Loader`. Each side imports these from here, never the
other side's module, so the cache stays torch-free and nothing needs duck typing.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from runtime.types import AdapterRef

# An adapter_key (runtime.types.adapter_key) or an artifact's sha256: lowercase hex.
ADAPTER_KEY_RE = re.compile(r"^[0-9a-f]{64}$")

# The model's four LoRA-carrying projections, as `lora.apply(layer, projection, x, y)` names them.
PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
# The PEFT target modules this runtime serves -> (the fused projection, slice index).
# The one list: the wire check (runtime.protocol) and the PEFT reader (peft.py) both use it.
LORA_TARGETS: dict[str, tuple[str, int]] = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "o_proj": ("o_proj", 0),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
    "down_proj": ("down_proj", 0),
}
LORA_TARGET_MODULES = frozenset(LORA_TARGETS)


class AdapterUnavailable(Exception):
    """The adapter cannot be served (fetch failed, hash mismatch); its requests fail with this."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ArtifactRefused(ValueError):
    """An artifact URI outside this runtime's store: refused before anything is opened."""


@dataclass(frozen=True, slots=True)
class ArtifactScope:
    """The store a runtime may open artifacts from: its artifacts folder, its S3 bucket+prefix.

    An artifact is named by its content address, `sha256/<aa>/<hex>` under the folder or the
    prefix (adapters/storage.py writes that layout), so a URI is accepted only when it is
    exactly that address of the reference's own sha256. A file URI is compared after
    realpath, so a symlink out of the folder is refused too. Nothing is opened here.
    """

    root: str | None = None  # realpath of the artifacts folder; None: no file:// URIs
    bucket: str | None = None  # None: no s3:// URIs
    prefix: str = ""

    @classmethod
    def of(cls, artifacts_dir: str | os.PathLike[str] | None, bucket: str | None = None,
           prefix: str = "") -> ArtifactScope:
        root = os.path.realpath(artifacts_dir) if artifacts_dir is not None else None
        return cls(root, bucket or None, prefix.strip("/"))

    def check(self, uri: str, sha256: str) -> None:
        """Raise ArtifactRefused unless `uri` is the content address of `sha256` in the store."""
        if not ADAPTER_KEY_RE.match(sha256):
            raise ArtifactRefused("the artifact's sha256 is not a lowercase sha256 hex")
        address = f"sha256/{sha256[:2]}/{sha256}"
        parts = urlsplit(uri)
        if parts.query or parts.fragment:
            raise ArtifactRefused("an artifact URI carries no query or fragment")
        if parts.scheme == "file":
            if self.root is None:
                raise ArtifactRefused("this runtime has no artifacts folder: file URIs refused")
            if parts.netloc not in ("", "localhost"):
                raise ArtifactRefused("a file URI names no host")
            real = os.path.realpath(unquote(parts.path))
            if real != os.path.join(self.root, address):
                raise ArtifactRefused(
                    "a file URI must name the artifact's content address in the artifacts folder"
                )
            return
        if parts.scheme == "s3":
            if self.bucket is None:
                raise ArtifactRefused("this runtime has no S3 bucket: s3 URIs refused")
            key = f"{self.prefix}/{address}" if self.prefix else address
            if parts.netloc != self.bucket or parts.path != f"/{key}":
                raise ArtifactRefused(
                    "an s3 URI must name the artifact's content address in this runtime's "
                    "bucket and prefix"
                )
            return
        raise ArtifactRefused("adapter.uri must be a file:/// or s3:// URI")


class AdapterProvider(Protocol):
    def try_acquire(self, ref: AdapterRef) -> int | None:
        """Pin the adapter on a device slot and return the slot, or start loading it and return
        None (ask again on a later step). Raises AdapterUnavailable when loading failed.
        Each successful acquire is paired with exactly one `release(ref.key)`."""
        ...

    def release(self, key: str) -> None:
        """Unpin one use of the adapter (its request finished, aborted or was preempted)."""
        ...


class FetchError(Exception):
    """A fetch that failed; `transient` says whether trying again may help.

    The cache remembers a permanent failure (bad hash, missing object) long and a transient
    one (the store was unreachable) only briefly, so a store that comes back serves again.
    """

    def __init__(self, message: str, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True, slots=True)
class LoadResult:
    key: str
    weights: Any  # what the loader's parse returned (peft.LoraWeights in the runtime)
    source: str  # "disk" or "store": the tier the bytes came from
    seconds: float
    num_bytes: int


class Loader(Protocol):
    """Where the cache's loads come from (store.AdapterLoader in the runtime)."""

    def load(self, ref: AdapterRef) -> Future[LoadResult]: ...

    def num_disk_entries(self) -> int | None: ...

    def shutdown(self) -> None: ...
