"""OpenAPI request bodies of routes that decode their body by hand.

The OpenAI routes read `await request.body()` and decode it with msgspec themselves (so that a
bad body is a 400 in OpenAI's error shape naming the field), which leaves Litestar no `data`
argument to document. Without a declared body, /schema/openapi.json showed those routes with
no request body at all: useless to client generators, and schema-driven fuzzers sent them
nothing but empty bodies. `body_operation(Struct)` declares the body from the very Struct the
route decodes with, so the document cannot drift from what the route accepts.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import msgspec
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIType, Operation, RequestBody, Schema

# JSON Schema keyword -> Schema field name (Litestar keeps the keyword as the field's alias).
_FIELD_OF = {f.metadata.get("alias", f.name): f.name for f in fields(Schema)}
_NESTED_ONE = ("items", "additionalProperties", "not")
_NESTED_MANY = ("anyOf", "oneOf", "allOf")


def _schema(node: dict[str, Any], defs: dict[str, Any]) -> Schema:
    """A Litestar Schema from msgspec's JSON Schema, with `$ref`s to `$defs` inlined."""
    ref = node.get("$ref")
    if ref is not None:
        return _schema(defs[ref.rsplit("/", 1)[-1]], defs)
    kwargs: dict[str, Any] = {}
    for key, value in node.items():
        if key == "type":
            types = value if isinstance(value, list) else [value]
            value = [OpenAPIType(t) for t in types] if len(types) > 1 else OpenAPIType(types[0])
        elif key == "properties":
            value = {name: _schema(sub, defs) for name, sub in value.items()}
        elif key in _NESTED_ONE and isinstance(value, dict):
            value = _schema(value, defs)
        elif key in _NESTED_MANY:
            value = [_schema(sub, defs) for sub in value]
        kwargs[_FIELD_OF[key]] = value
    return Schema(**kwargs)


def body_operation(struct: type[msgspec.Struct]) -> type[Operation]:
    """An Operation class whose JSON request body is `struct`'s schema."""
    raw = msgspec.json.schema(struct)
    body = _schema(raw, raw.get("$defs", {}))

    @dataclass
    class _JSONBodyOperation(Operation):
        def __post_init__(self) -> None:
            self.request_body = RequestBody(
                content={"application/json": OpenAPIMediaType(schema=body)}, required=True
            )

    return _JSONBodyOperation
