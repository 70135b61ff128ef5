"""Who gets in: API keys on /v1/* (401) and a cap on generation requests in flight (429).

Plain ASGI middleware rather than route dependencies: they answer before the body is read, and the
concurrency slot is held until the whole response (a stream included) has gone out.
"""

from __future__ import annotations

import asyncio
import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from slipstream.entrypoints.openai.errors import APIError


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, keys: list[str]) -> None:
        self.app = app
        self.accepted = [f"Bearer {k}".encode() for k in keys]

    def _authorized(self, scope: Scope) -> bool:
        """Every key is compared in constant time, so response times tell nothing about any key."""
        # Header values arrive decoded as latin-1: encoding back gives the bytes the client sent.
        given = Headers(scope=scope).get("authorization", "").encode("latin-1")
        return sum(hmac.compare_digest(given, key) for key in self.accepted) > 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/") and not self._authorized(scope):
            error = APIError("Invalid or missing API key: send `Authorization: Bearer <key>`", status=401,
                             code="invalid_api_key")
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)


class ConcurrencyLimitMiddleware:
    """At most `limit` requests to `paths` at once; one over waits up to `max_wait` seconds for a slot
    (0: not at all, -1: without limit), then gets a 429."""

    def __init__(self, app: ASGIApp, limit: int, max_wait: float, paths: tuple[str, ...]) -> None:
        self.app = app
        self.limit = limit
        self.max_wait = max_wait
        self.paths = paths
        self.slots = asyncio.Semaphore(limit)

    async def _acquire(self) -> bool:
        if not self.slots.locked() or self.max_wait < 0:
            await self.slots.acquire()
            return True
        if self.max_wait == 0:
            return False
        try:
            await asyncio.wait_for(self.slots.acquire(), self.max_wait)
        except asyncio.TimeoutError:
            return False
        return True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        if not await self._acquire():
            error = APIError(f"Too many requests in flight (--max-concurrency {self.limit}); retry later",
                             status=429, code="rate_limit_exceeded")
            await error.response()(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.slots.release()
