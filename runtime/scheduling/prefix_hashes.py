"""Hashes of full KV blocks for the prefix cache. No torch.

Block i's hash is `H(hash of block i-1, token ids of block i)`, chained from a root that names
the tenant and the adapter version; so one hash stands for every token up to the block's end
and for whose K/V they are:
- Tenants never share a block. A prefix cache shared across tenants is a timing side channel
  (a fast first token tells that somebody else sent the same prompt), so the tenant is in the
  root even where two tenants' K/V would be identical.
- Adapter versions never share a block: an adapter changes K and V. The root holds the
  adapter's key (sha256 of its weights and the config that changes the math) and its version
  label, so two versions never share even when their bytes are equal.
BLAKE2b, not Python's `hash`: the hash of a tuple of ints is easy to collide on purpose, and
a collision would hand one prompt's K/V to another.
"""

from __future__ import annotations

import hashlib
from array import array

from runtime.types import AdapterRef

DIGEST_BYTES = 16


def root_hash(tenant: str, adapter: AdapterRef | None) -> bytes:
    """The chain's start for one tenant and adapter version (None: the base model)."""
    parts = [tenant, adapter.key if adapter else "", adapter.name if adapter else ""]
    # Length-prefixed, so no choice of strings can make two different triples meet.
    payload = b"".join(len(p.encode()).to_bytes(4, "little") + p.encode() for p in parts)
    return hashlib.blake2b(payload, digest_size=DIGEST_BYTES, person=b"loragate-root").digest()


def chain(parent: bytes, token_ids: list[int]) -> bytes:
    """The hash of a full block given the hash before it and the block's token ids."""
    h = hashlib.blake2b(parent, digest_size=DIGEST_BYTES, person=b"loragate-block")
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class BlockHashes:
    """The hashes of one sequence's full blocks, extended as its tokens grow."""

    __slots__ = ("block_size", "hashes", "root")

    def __init__(self, root: bytes, block_size: int) -> None:
        self.root = root
        self.block_size = block_size
        self.hashes: list[bytes] = []

    def copy(self) -> BlockHashes:
        twin = BlockHashes(self.root, self.block_size)
        twin.hashes = list(self.hashes)
        return twin

    def upto(self, token_ids: list[int], num_blocks: int) -> list[bytes]:
        """The hashes of the first `num_blocks` full blocks of `token_ids` (computed once)."""
        bs = self.block_size
        while len(self.hashes) < num_blocks:
            i = len(self.hashes)
            parent = self.hashes[-1] if self.hashes else self.root
            self.hashes.append(chain(parent, token_ids[i * bs : (i + 1) * bs]))
        return self.hashes[:num_blocks]
