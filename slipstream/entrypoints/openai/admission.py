"""Who gets in: API keys on /v1/* (401), bodies up to a size (413), a cap on generation requests in
flight (429), none once the server drains for a shutdown (503).

Plain ASGI middleware rather than route dependencies: they answer before the route reads the body, and the
generation slot is taken once the body has arrived (a client slow to send it holds none) and held until the whole
response (a stream included) has gone out, or until the client has taken none of it for --send-timeout seconds (a
client that stopped reading held its slot, and its request kept generating into memory, for ever).
"""

from __future__ import annotations

import asyncio
import hmac
import logging

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from slipstream.entrypoints.openai.errors import APIError

logger = logging.getLogger("slipstream.api_server")


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, keys: list[str]) -> None:
        self.app = app
        self.accepted = [k.encode() for k in keys]

    def _authorized(self, scope: Scope) -> bool:
        """Every key is compared in constant time, so response times tell nothing about any key. The scheme is
        case-insensitive (RFC 7235: `bearer` is `Bearer`)."""
        # Header values arrive decoded as latin-1: encoding back gives the bytes the client sent.
        scheme, _, given = Headers(scope=scope).get("authorization", "").encode("latin-1").partition(b" ")
        return scheme.lower() == b"bearer" and sum(hmac.compare_digest(given, key) for key in self.accepted) > 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/") and not self._authorized(scope):
            error = APIError("Invalid or missing API key: send `Authorization: Bearer <key>`", status=401,
                             code="invalid_api_key")
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)


RETRY_AFTER_S = 1  # what a 429 tells a client to wait: a slot frees whenever any request ends


class GenerationGate:
    """Generation requests in flight: at most `limit`; one over waits up to `max_wait` seconds for a slot
    (0: not at all, -1: without limit), then gets a 429. Closed by a drain: new ones get a 503."""

    def __init__(self, limit: int, max_wait: float) -> None:
        self.limit = limit
        self.max_wait = max_wait
        self.slots = asyncio.Semaphore(limit)
        self.in_flight = 0
        self.closed = False
        self._idle = asyncio.Event()
        self._idle.set()

    async def acquire(self) -> bool:
        if self.max_wait < 0 or not self.slots.locked():
            await self.slots.acquire()
        elif self.max_wait == 0:
            return False
        else:
            try:
                await asyncio.wait_for(self.slots.acquire(), self.max_wait)
            except asyncio.TimeoutError:
                return False
        self.in_flight += 1
        self._idle.clear()
        return True

    def release(self) -> None:
        self.slots.release()
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def drain(self, timeout: float) -> bool:
        """Close the gate and wait up to `timeout` seconds for the requests in flight; False if some remain."""
        self.closed = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True


class _ClientStalled(Exception):
    pass


class GenerationGateMiddleware:
    def __init__(self, app: ASGIApp, gate: GenerationGate, paths: tuple[str, ...], send_timeout: float) -> None:
        self.app = app
        self.gate = gate
        self.paths = paths
        self.send_timeout = send_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        try:
            body = await _whole_body(receive)
        except APIError as error:  # (the body-size limit's 413)
            await error.response()(scope, receive, send)
            return
        if body is None:
            return  # the client left before its body arrived: nobody to answer
        if self.gate.closed:
            error = APIError("The server is shutting down", status=503, code="shutting_down")
        elif not await self.gate.acquire():
            error = APIError(f"Too many requests in flight (--max-concurrency {self.gate.limit}); retry later",
                             status=429, code="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_S)})
        else:
            async def replayed() -> Message:  # the body read, then what the connection says next (a disconnect)
                return body.pop(0) if body else await receive()

            async def timed(message: Message) -> None:  # (a send waits while the client's buffers are full)
                try:
                    async with asyncio.timeout(self.send_timeout):
                        await send(message)
                except TimeoutError:
                    raise _ClientStalled from None

            try:
                await self.app(scope, replayed, timed)
            except _ClientStalled:  # the route's generator is closed on the way out: its engine requests end
                logger.warning("%s: the client took none of its response for %.0f s (--send-timeout): ended",
                               scope["path"], self.send_timeout)
            finally:
                self.gate.release()
            return
        await error.response()(scope, receive, send)


async def _whole_body(receive: Receive) -> list[Message] | None:
    """The request's body messages, read to the end; None if the client disconnected first."""
    messages = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        messages.append(message)
        if not message.get("more_body", False):
            return messages


class BodySizeLimitMiddleware:
    """A body over `max_bytes` is a 413: at once when its Content-Length says so, else (a chunked body)
    as soon as what arrived passes the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> APIError:
        return APIError(f"The request body is larger than {self.max_bytes} bytes (--max-body-size)", status=413,
                        code="request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            await self._too_large().response()(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise self._too_large()  # inside the route's body read: the error handlers answer it
            return message

        await self.app(scope, counted, send)
