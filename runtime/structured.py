"""The grammar of a request's `response_format`, and its check. No torch.

`grammar_text` turns json_object / json_schema into an llguidance grammar (see
runtime/model/grammar.py for why llguidance and how masks are made); `RequestLimits.check`
calls it before a request is queued, so an invalid schema is a 400, not a failed stream.

Whitespace is bounded: between JSON tokens at most `MAX_BLANKS` spaces or newlines (enough
for the indented layout models are trained on, which keeps their answers as good as
unconstrained ones), so a small model cannot loop on blanks.
"""

from __future__ import annotations

import json
from typing import Any

from runtime.types import SamplingParams

MAX_BLANKS = 8
_JSON_OPTIONS: Any = {"whitespace_flexible": False,
                      "whitespace_pattern": rf"[ \n]{{0,{MAX_BLANKS}}}"}
_ANY_OBJECT = '{"type": "object"}'


def grammar_text(params: SamplingParams) -> str | None:
    """The llguidance grammar for the request's response_format, None for plain text.

    Raises ValueError when the schema is not one llguidance accepts (HTTP 400).
    """
    if params.response_format is None:
        return None
    import llguidance

    schema = params.json_schema if params.response_format == "json_schema" else _ANY_OBJECT
    assert schema is not None  # SamplingParams.validate pairs them
    try:
        json.loads(schema)
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"response_format: the JSON schema is invalid: {exc}") from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise ValueError(f"response_format: the JSON schema is not supported: {error}")
    return str(grammar)
