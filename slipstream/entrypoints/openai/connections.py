"""Connections before they are requests: each open socket holds a file descriptor from the moment it is accepted, so
sockets that never send a request (idle, or a slowloris sending its headers a byte at a time) could take them all:
the server then accepted nobody, and asyncio logged a traceback for every refused accept (250,000 in 40 s). Here:
the open-files limit raised to what the system allows (as vLLM does), a deadline for each request's head, and one
warning a while about refused accepts. (In front of real traffic a proxy bounds connections better still.)"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger("slipstream.api_server")

REQUEST_HEAD_TIMEOUT_S = 20.0  # from a connection's opening (or its last response) to a whole request head
OPEN_FILES_TARGET = 65536
ACCEPT_WARNING_INTERVAL_S = 10.0


def raise_open_files_limit() -> None:
    """The soft limit on open files raised towards OPEN_FILES_TARGET, as far as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = OPEN_FILES_TARGET if hard == resource.RLIM_INFINITY else min(OPEN_FILES_TARGET, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            logger.warning("could not raise the open-files limit from %d to %d (%s): about that many idle "
                           "connections stop the server from accepting more", soft, target, exc)


class H11WithRequestHeadTimeout(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, closing a connection that has not sent a whole request head within
    REQUEST_HEAD_TIMEOUT_S of opening or of its last response (uvicorn's own keep-alive timer stops at the first
    byte, so a head sent slowly was never timed)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_request_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._await_request_head()

    def _await_request_head(self) -> None:
        waiting_after = self.cycle  # a request head, once parsed, starts a new cycle

        def check() -> None:
            if self.cycle is waiting_after and not self.transport.is_closing():
                self.transport.close()

        self.loop.call_later(REQUEST_HEAD_TIMEOUT_S, check)


def quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """asyncio logs each accept() refused for want of file descriptors, with its traceback, up to the listen backlog
    (2048) times a second: one warning every ACCEPT_WARNING_INTERVAL_S instead, with the count."""
    refused = 0
    last_warning = float("-inf")

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        nonlocal refused, last_warning
        if not str(context.get("message", "")).startswith("socket.accept() out of system resource"):
            loop.default_exception_handler(context)
            return
        refused += 1
        if time.monotonic() - last_warning >= ACCEPT_WARNING_INTERVAL_S:
            logger.warning("new connections wait: out of file descriptors (%s; %d accepts refused): too many open "
                           "connections for the open-files limit %d", context.get("exception"), refused,
                           resource.getrlimit(resource.RLIMIT_NOFILE)[0])
            last_warning, refused = time.monotonic(), 0

    loop.set_exception_handler(handler)
