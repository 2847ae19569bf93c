"""Errors at the HTTP edge, in OpenAI's shape.

`APIError` carries a status, a message and the offending parameter; every
route turns it (and the engine's `ValueError`s) into
``{"error": {"message", "type", "param", "code"}}`` with that status.
"""

from __future__ import annotations

from starlette.responses import JSONResponse

_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                405: "MethodNotAllowed", 408: "RequestTimeoutError", 413: "BadRequestError",
                500: "InternalServerError", 503: "ServiceUnavailableError"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status,
                        headers=headers)


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message[:2000], "type": _ERROR_TYPES.get(status, "Error"),
                      "param": param, "code": status}}


def param_of(msg: str) -> str | None:
    """The field a `SamplingParams` error names (``"top_p=0 is invalid..."``)."""
    head = msg.split("=", 1)[0]
    return head if head.isidentifier() else None
