"""`POST /v1/feedback` (Tenant API): a score in [0, 1] for one of the tenant's own answers.

204 once booked to the adapter version and experiment variant or rollout arm (and stage)
that served the answer (gateway/inference/feedback.py); 404 for any id that is not one of
this tenant's answers of the last LORAGATE_FEEDBACK_TTL_S, with one message for all of them.
"""

from __future__ import annotations

from typing import Any

from litestar import Request, post

from gateway.api.schemas.feedback import FeedbackCreate
from gateway.api.schemas.openapi import body_operation
from gateway.api.schemas.strict import decode_json
from gateway.auth import require_tenant, tenant_of
from gateway.services import Services

_BEARER: list[dict[str, list[str]]] = [{"bearer": []}]


@post("/v1/feedback", guards=[require_tenant], status_code=204, security=_BEARER,
      operation_class=body_operation(FeedbackCreate))
async def feedback(request: Request[Any, Any, Any]) -> None:
    body = decode_json(await request.body(), FeedbackCreate)
    services: Services = request.app.state.services
    served = await services.answers.score(tenant_of(request).tenant, body.id, body.score)
    labels = services.metrics.labels(served.tenant, served.adapter or "base",
                                     served.variant or served.arm or "")
    services.metrics.observe_feedback(labels, body.score)


routes = [feedback]
