"""Liveness and readiness probes (``/health``, ``/ready``) for load balancers and containers."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse

from flplatform.kit.health import database_unreachable
from flplatform.kit.routing import APIRouter

router = APIRouter(tags=["health"])


@router.get("/health", summary="Liveness", description="200 while the process serves requests.")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/ready",
    summary="Readiness",
    description="200 when the database answers, 503 otherwise.",
    responses={503: {"description": "Database unreachable"}},
)
async def ready(request: Request) -> JSONResponse:
    error = await database_unreachable(request.app.state.engine)
    if error is not None:
        return JSONResponse(
            {"detail": f"Database unreachable: {error}", "code": "not_ready"}, status_code=503
        )
    return JSONResponse({"status": "ready"})
