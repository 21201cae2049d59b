"""Error responses: concise 422s that name the field, and a generic 500 with no stack trace."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from serving.middleware import REQUEST_ID_KEY

LOG = logging.getLogger(__name__)


def _field(loc: tuple | list) -> str:
    return ".".join(str(part) for part in loc) or "request"


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 listing each bad field and why (the offending input is not echoed back)."""
    problems = [
        {"loc": list(item.get("loc", ())), "msg": item.get("msg", ""), "type": item.get("type")}
        for item in exc.errors()
    ]
    message = "; ".join(f"{_field(item['loc'])}: {item['msg']}" for item in problems)
    return JSONResponse({"detail": problems, "message": message}, status_code=422)


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    """500 with a request id to find the logged traceback; nothing about the failure itself."""
    request_id = request.scope.get(REQUEST_ID_KEY, "")
    LOG.error(
        "request %s %s failed (id %s)",
        request.method,
        request.url.path,
        request_id,
        exc_info=exc,  # the traceback, findable by the id the client got
    )
    return JSONResponse(
        {"detail": "internal server error", "request_id": request_id}, status_code=500
    )


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers on `app`."""
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error)
