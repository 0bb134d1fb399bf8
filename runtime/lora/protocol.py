"""What the scheduler needs from the adapter cache, as a protocol: it stays torch-free."""

from __future__ import annotations

from typing import Protocol

from runtime.types import AdapterRef


class AdapterUnavailable(Exception):  # noqa: N818 (the name the contract uses)
    """The adapter cannot be served (fetch failed, hash mismatch); its requests fail with this."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class AdapterProvider(Protocol):
    def try_acquire(self, ref: AdapterRef) -> int | None:
        """Pin the adapter on a device slot and return the slot, or start loading it and return
        None (ask again on a later step). Raises AdapterUnavailable when loading failed.
        Each successful acquire is paired with exactly one `release(ref.key)`."""
        ...

    def release(self, key: str) -> None:
        """Unpin one use of the adapter (its request finished, aborted or was preempted)."""
        ...
