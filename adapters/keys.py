"""Tenant API keys: `lg_<prefix>_<secret>`; only sha256(secret) is stored.

The prefix (12 hex chars, no underscore) is the lookup handle and is stored in clear; the
secret carries 256 bits from `secrets.token_urlsafe` and may itself contain `_`, so a key is
split on the first two underscores only.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field

KEY_SCHEME = "lg"
PREFIX_BYTES = 6  # 12 hex characters; unique in the catalog, regenerated on collision
SECRET_BYTES = 32
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True, slots=True)
class GeneratedKey:
    prefix: str
    secret_hash: str
    plaintext: str = field(repr=False)  # shown to the caller once, never logged


def hash_secret(secret: str) -> str:
    """Lowercase hex sha256 of the secret part of a key."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def generate_key() -> GeneratedKey:
    prefix = secrets.token_hex(PREFIX_BYTES)
    secret = secrets.token_urlsafe(SECRET_BYTES)
    return GeneratedKey(prefix, hash_secret(secret), f"{KEY_SCHEME}_{prefix}_{secret}")


def parse_key(plaintext: str) -> tuple[str, str] | None:
    """(prefix, secret) of a well-formed key, else None. Does not touch the catalog."""
    parts = plaintext.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_SCHEME:
        return None
    prefix, secret = parts[1], parts[2]
    if len(prefix) != 2 * PREFIX_BYTES or not set(prefix) <= _HEX:
        return None
    if not secret or len(secret) > 256:
        return None
    return prefix, secret


def verify_secret(secret: str, stored_hash: str) -> bool:
    """Constant-time comparison of sha256(secret) with the stored hex digest."""
    return hmac.compare_digest(hash_secret(secret), stored_hash)
