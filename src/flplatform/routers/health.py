from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

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
    try:
        async with request.app.state.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    except Exception as exc:  # any driver error means "not ready"
        return JSONResponse(
            {"detail": f"Database unreachable: {type(exc).__name__}", "code": "not_ready"}, status_code=503
        )
    return JSONResponse({"status": "ready"})
