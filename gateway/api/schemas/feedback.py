"""The body of `POST /v1/feedback` (API.md): one score for one of the tenant's answers."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta, Struct

# Completion ids are "cmpl-" or "chatcmpl-" and 32 hex digits; the bound keeps lookups small.
CompletionId = Annotated[str, Meta(min_length=1, max_length=100)]
Score = Annotated[float, Meta(ge=0.0, le=1.0)]


class FeedbackCreate(Struct, forbid_unknown_fields=False):
    id: CompletionId
    score: Score
