"""Strict JSON decoding of request bodies, the one entry point of every JSON body the API reads.

msgspec checks types and ranges in one pass and never coerces (`"10"` is not 10); any failure,
deep nesting included, becomes `BadRequest` (400 in OpenAI's error shape) naming the field.
"""

from __future__ import annotations

import re
from typing import TypeVar

import msgspec

from gateway.errors import BadRequest

T = TypeVar("T")
_PATH_RE = re.compile(r"at `\$\.(\w+)")


def decode_json(raw: bytes, kind: type[T]) -> T:
    """`raw` as `kind`, strictly (no "10" for 10), or BadRequest naming the field. Every JSON
    body of the API is decoded here, so malformed input is a 400 however it is malformed."""
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as exc:
        match = _PATH_RE.search(str(exc))
        raise BadRequest(str(exc), param=match.group(1) if match else None) from None
    except msgspec.DecodeError:
        raise BadRequest("request body is not valid JSON") from None
    except RecursionError:  # msgspec's guard against deep nesting, before the stack's end
        raise BadRequest("request body is nested too deeply") from None
