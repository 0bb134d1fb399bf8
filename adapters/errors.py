"""The catalog's exception tree; `gateway/errors.py` maps each class to HTTP in one table.

Every message is safe to show to the caller: no paths, no secrets, no SQL.
"""

from __future__ import annotations


class CatalogError(Exception):
    """Base of everything `adapters/` raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(CatalogError):
    """Unknown tenant, key, adapter, version or experiment for this caller (404)."""


class Conflict(CatalogError):
    """Name taken, version active or still used by an experiment (409)."""


class ValidationFailed(CatalogError):
    """An uploaded adapter that fails validation (422); `reason` says which rule."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InvalidArgument(ValidationFailed):
    """A malformed argument: bad name, weights, sample rate (400).

    A subclass of ValidationFailed so that a mapping that does not know it still answers 4xx.
    """


class TooLarge(CatalogError):
    """An upload over the configured byte limit (413)."""


class StorageUnavailable(CatalogError):
    """The artifact store cannot be reached or refused the operation (503)."""


class ArtifactCorrupt(StorageUnavailable):
    """A stored object whose bytes no longer match its sha256 (served as unavailable)."""


class ArtifactMissing(StorageUnavailable):
    """A catalog row whose stored object is gone (served as unavailable)."""


class CatalogUnavailable(CatalogError):
    """The catalog's database cannot be reached right now (503, retry later).

    Raised in place of the driver's and the pool's own connection errors (see
    `adapters.db.is_unreachable`), whose messages may carry hosts and SQL.
    """
