"""Every failure leaves the server in OpenAI's envelope {"error": {message, type, param, code}} with
the matching HTTP status: never FastAPI's 422, never a bare 500 page or a traceback."""

from __future__ import annotations

import json
import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from slipstream.engine.async_llm import EngineDeadError, EngineStepError
from slipstream.engine.llm_engine import ContextLengthError, TokenIdError
from slipstream.entrypoints.openai.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          503: "service_unavailable_error"}


class APIError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=_TYPES.get(self.status, "server_error"),
                                             param=self.param, code=self.code))

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status, headers=self.headers)

    def sse(self) -> str:
        """The error as a server-sent event, for failures after a stream has started."""
        return f"data: {self.body().model_dump_json()}\n\n"


def from_validation_error(exc: ValidationError) -> APIError:
    return from_errors(exc.errors(include_url=False))


def from_errors(errors: list) -> APIError:
    """The 400 of pydantic's errors (ValidationError.errors(): dicts of type, loc, msg, ctx)."""
    # A union field (stop: a string or a list of them) reports every form the value failed; the form of the value's
    # own type says what is wrong with it ("at most 64 items", not "Input should be a valid string"): the deepest
    # error that is not about the type, where there is one.
    about_the_value = [e for e in errors if not e["type"].endswith("_type")]
    err = max(about_the_value, key=lambda e: len(e["loc"])) if about_the_value else errors[0]
    if err["type"] == "json_invalid":
        return APIError(f"The request body is not valid JSON: {err['ctx']['error']}", code="invalid_json")
    msg = err["msg"].removeprefix("Value error, ")
    if not err["loc"]:  # a rule across fields: the message names them
        return APIError(msg, code="invalid_value")
    where = ".".join(str(p) for p in err["loc"])
    return APIError(f"{where}: {msg}", param=str(err["loc"][0]), code="invalid_value")


def from_exception(exc: Exception, prompt_param: str | None = None, log: bool = True) -> APIError:
    """Map what the engine raises about a request to what the client sees; an unexpected exception (a bug) is a
    500, its traceback logged unless `log` is false (whoever calls logs it)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextLengthError):
        return APIError(str(exc), param=prompt_param, code="context_length_exceeded")
    if isinstance(exc, TokenIdError):
        param = prompt_param if exc.field == "prompt" else exc.field
        return APIError(f"{param}: token ids must be in [0, {exc.vocab_size})", param=param, code="invalid_value")
    if isinstance(exc, EngineDeadError):
        return APIError(str(exc), status=503)
    if isinstance(exc, EngineStepError):  # (the engine has logged the traceback)
        return APIError(str(exc), status=500, code="engine_step_failed")
    if isinstance(exc, ValueError):
        return APIError(str(exc))
    if log:
        logger.error("internal error", exc_info=exc)
    return APIError(f"internal error: {type(exc).__name__}: {exc}", status=500)


def install_error_handlers(app: FastAPI) -> None:
    async def on_known(request: Request, exc: Exception) -> JSONResponse:
        return from_exception(exc).response()

    async def on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return APIError(detail or HTTPStatus(exc.status_code).phrase, exc.status_code).response()

    async def on_invalid_params(request: Request, exc: RequestValidationError) -> JSONResponse:
        # What FastAPI validates itself (query and path parameters: ?limit=null) answered its own 422 shape; the
        # location's first part says where ("query"), the rest names the parameter.
        return from_errors([{**e, "loc": e["loc"][1:]} for e in exc.errors()]).response()

    async def on_client_gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
        # The client left while its body was read (a disconnect storm does this): nobody reads the answer, and it is
        # no bug of ours. (As a plain Exception it would be logged as an internal error, traceback and all.)
        logger.info("%s %s: the client disconnected before its request body arrived", request.method, request.url.path)
        return APIError("the client disconnected before its request body arrived").response()

    async def on_bug(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises what this handler answered, and uvicorn logs its traceback: logged once, there.
        return from_exception(exc, log=False).response()

    # (each known kind by its own handler: the catch-all's exceptions are re-raised, and logged as bugs; a ValueError
    # stays among them, a 400 whose traceback shows where a route let it through)
    for known in (APIError, EngineDeadError, EngineStepError):  # EngineDeadError: /v1/models while the model loads
        app.add_exception_handler(known, on_known)
    app.add_exception_handler(ClientDisconnect, on_client_gone)
    app.add_exception_handler(RequestValidationError, on_invalid_params)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(Exception, on_bug)  # a bug: still the envelope, and the traceback in the log
