"""API errors in OpenAI's JSON envelope, and the handlers that turn every failure into one."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


UNION_BRANCH_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict"})  # pydantic names union branches by type


class APIError(Exception):
    """An error reply: HTTP status, message, the offending parameter (if any), a machine-readable code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"), "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def generation_failed(message: str) -> APIError:
    """A sequence the engine ended with an error (e.g. an expert it needed could not be read): 500, code 'generation_failed'."""
    return APIError(500, message, code="generation_failed")


def _parameter_name(location: tuple) -> str | None:
    """'messages.0.content' from pydantic's ('body', 'messages', 0, 'content', ...), union branches dropped."""
    parts = [str(p) for p in location[1:] if isinstance(p, int) or (p.isidentifier() and p not in UNION_BRANCH_TAGS)]
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": ("body",), "msg": "invalid request body"}
        param = _parameter_name(tuple(first.get("loc", ("body",))))
        message = f"{param}: {first['msg']}" if param else f"request body: {first['msg']}"
        return APIError(400, message, param=param, code="invalid_parameter").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return APIError(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        logger.exception("unexpected error serving %s", request.url.path)
        return APIError(500, "internal server error").response()
