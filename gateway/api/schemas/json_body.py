"""Strict decoding of a JSON body that a route reads itself (PATCH and feedback bodies).

`msgspec.json.decode` with a type is strict: `"10"` is not 10 and `1` is no boolean; a bad
body is a 400 in OpenAI's error shape naming the field.
"""

from __future__ import annotations

import re
from typing import TypeVar

import msgspec

from gateway.errors import BadRequest

T = TypeVar("T")
_PATH_RE = re.compile(r"at `\$\.([A-Za-z_][A-Za-z0-9_]*)")


def decode(raw: bytes, kind: type[T]) -> T:
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as exc:
        match = _PATH_RE.search(str(exc))
        raise BadRequest(str(exc), param=match.group(1) if match else None) from None
    except msgspec.DecodeError:
        raise BadRequest("request body is not valid JSON") from None
