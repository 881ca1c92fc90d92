"""``GET /metrics``: Prometheus' text format (included only with ``FLP_METRICS_ENABLED``; kept out
of the OpenAPI document: it is for scrapers, not API clients)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Response

from flplatform.db import SessionDep
from flplatform.kit.metrics import workqueue_depth
from flplatform.kit.prometheus import metrics_access, render
from flplatform.kit.routing import APIRouter
from flplatform.workqueue.queue import depth

router = APIRouter(include_in_schema=False)


@router.get("/metrics")
async def metrics(
    request: Request, _: Annotated[None, Depends(metrics_access)], session: SessionDep
) -> Response:
    body, content_type = render([workqueue_depth(await depth(session))], request.headers.get("accept", ""))
    return Response(body, media_type=content_type)
