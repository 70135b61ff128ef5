"""The OpenAI-compatible HTTP server over one engine: the routes (`build_app`) and the process (`serve`); started by
`python -m slipstream.entrypoints.openai.api_server --model M --port 8188` (api_server.py, the command line).

The port opens at once and the model loads in the engine thread meanwhile: /health answers 503 until
it is up (and again if the engine dies). A model that fails to load stops the server with its reason.
The first SIGTERM (or Ctrl-C) drains: new generation requests and /health get 503, those in flight
may finish within --shutdown-timeout seconds, then the rest end with an error; a second one stops at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from types import FrameType

import uvicorn
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, start_http_server
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from slipstream import __version__
from slipstream.engine.async_llm import AsyncLLM
from slipstream.entrypoints.openai.admission import (
    ApiKeyMiddleware,
    BodySizeLimitMiddleware,
    GenerationGate,
    GenerationGateMiddleware,
)
from slipstream.entrypoints.openai.args import engine_config, ignored_flags, served_model_name
from slipstream.entrypoints.openai.connections import (
    H11WithRequestHeadTimeout,
    quiet_accept_errors,
    raise_open_files_limit,
)
from slipstream.entrypoints.openai.dashboard import Dashboard
from slipstream.entrypoints.openai.errors import APIError, install_error_handlers
from slipstream.entrypoints.openai.metrics import Metrics
from slipstream.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
)
from slipstream.entrypoints.openai.serving_chat import OpenAIServingChat
from slipstream.entrypoints.openai.serving_completion import OpenAIServingCompletion
from slipstream.entrypoints.openai.serving_engine import ServingOptions
from slipstream.entrypoints.openai.serving_responses import OpenAIServingResponses, ResponsesRequest
from slipstream.entrypoints.openai.serving_tokenization import OpenAIServingTokenization
from slipstream.entrypoints.openai.tool_calling import describe_tool_format
from slipstream.kernels import dispatch
from slipstream.reasoning import get_reasoning_parser

logger = logging.getLogger("slipstream.api_server")

GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
UVICORN_GRACE_S = 5  # after a drain, for responses to go out and connections to close


def body_schema(model: type[BaseModel]) -> dict:
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def document_bodies(app: FastAPI, models: list[type[BaseModel]]) -> None:
    """FastAPI documents the bodies it validates; these are validated by hand (a 400 naming the field, not
    FastAPI's 422), so their schemas join /openapi.json here, for clients and fuzzers."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            spec = generate()
            _, defs = models_json_schema([(m, "validation") for m in models],
                                         ref_template="#/components/schemas/{model}")
            spec.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
        return app.openapi_schema

    app.openapi = openapi


def build_app(args: argparse.Namespace, llm: AsyncLLM, metrics: Metrics) -> FastAPI:
    """The routes over an AsyncLLM (started by the caller; shut down with the app)."""
    options = ServingOptions(served_model_name(args), tuple(args.served_model_name or ()), args.enable_logprob,
                             args.max_logprobs, args.trust_request_chat_template)
    reasoning_parser = get_reasoning_parser(args.reasoning_parser) if args.reasoning_parser else None
    chat = OpenAIServingChat(llm, options, reasoning_parser, args.tool_call_parser)
    completion = OpenAIServingCompletion(llm, options)
    tokenization = OpenAIServingTokenization(llm, options)
    responses = OpenAIServingResponses(chat)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        llm.shutdown()

    app = FastAPI(title="slipstream", version=__version__, lifespan=lifespan)
    app.state.chat = chat
    app.state.gate = gate = GenerationGate(args.max_concurrency, args.max_waiting_time)
    install_error_handlers(app)

    async def health() -> Response:
        if llm.error is not None:
            return APIError(str(llm.error), status=503).response()
        if gate.closed:
            return APIError("the server is shutting down", status=503, code="shutting_down").response()
        return JSONResponse({"status": "ok"})

    app.get("/health")(health)
    app.get("/ping")(health)

    @app.get("/version")
    async def version() -> dict:
        table = dispatch.decided()  # (decided by the engine as it loads the model)
        return {"version": __version__, "numerics": llm.engine.numerics,
                "cpu_kernels": table.describe() if table is not None else None}

    names = options.accepted_names or (options.model_name,)  # (each served name, as vLLM lists them)

    def model_card(name: str) -> ModelCard:
        engine = llm.engine
        return ModelCard(id=name, root=str(engine.model_dir), max_model_len=engine.max_model_len)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[model_card(name) for name in names])

    @app.get("/v1/models/{model_id:path}")  # (path: a served name may hold slashes, "org/model")
    async def model(model_id: str) -> ModelCard:
        if model_id not in names:
            raise APIError(f"The model `{model_id}` does not exist.", status=404, param="model",
                           code="model_not_found")
        return model_card(model_id)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    bodies = {"/v1/chat/completions": (ChatCompletionRequest, chat.create),
              "/v1/completions": (CompletionRequest, completion.create),
              "/v1/responses": (ResponsesRequest, responses.create),
              "/tokenize": (TokenizeRequest, tokenization.tokenize),
              "/detokenize": (DetokenizeRequest, tokenization.detokenize)}
    for path, (model, handler) in bodies.items():
        app.post(path, openapi_extra=body_schema(model))(handler)
    document_bodies(app, [model for model, _ in bodies.values()])
    if not args.disable_dashboard:
        Dashboard(llm, metrics, gate, options.model_name, args.dashboard_show_prompts).add_routes(app)
    app.get("/v1/responses/{response_id}")(responses.retrieve)
    app.get("/v1/responses/{response_id}/input_items")(responses.input_items)
    app.delete("/v1/responses/{response_id}")(responses.delete)

    app.add_middleware(GenerationGateMiddleware, gate=gate, paths=GENERATION_PATHS, send_timeout=args.send_timeout)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=args.max_body_size)
    if args.api_key:  # a request without a key learns nothing else
        app.add_middleware(ApiKeyMiddleware, keys=args.api_key)
    if args.allowed_origins:  # outermost: a browser's preflight carries no key
        app.add_middleware(CORSMiddleware, allow_origins=args.allowed_origins, allow_methods=["*"],
                           allow_headers=["*"])
    return app


class DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM/SIGINT runs `drain` (which sets should_exit when done) instead of
    closing the port at once; a second signal is uvicorn's own: stop now."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[uvicorn.Server], Awaitable[None]]) -> None:
        super().__init__(config)
        self.drain = drain
        self.draining = False
        self._drain_task: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.draining or self.should_exit:
            self.force_exit = True
            super().handle_exit(sig, frame)
            return
        # Not recorded as a captured signal: uvicorn re-raises those on exit, and the exit status would not be 0.
        self.draining = True
        loop = asyncio.get_running_loop()
        loop.call_soon_threadsafe(lambda: setattr(self, "_drain_task", loop.create_task(self.drain(self))))


async def drain(server: uvicorn.Server, gate: GenerationGate, llm: AsyncLLM, timeout: float) -> None:
    """Let the generation requests in flight finish within `timeout` seconds, end the rest, then stop."""
    logger.info("shutting down: waiting up to %.0f s for %d requests in flight", timeout, gate.in_flight)
    if not await gate.drain(timeout):
        logger.warning("shutting down: ending %d requests still in flight after --shutdown-timeout",
                       gate.in_flight)
        llm.shutdown()  # their streams end with an error event, the others with a 503
        await gate.drain(UVICORN_GRACE_S)
    server.should_exit = True


async def serve(args: argparse.Namespace) -> int:
    """Run until a signal (0) or until the model fails to load (1)."""
    model_name = served_model_name(args)
    if ignored := ignored_flags(args):
        logger.info("%s: accepted for vLLM's and FastDeploy's command lines; nothing here acts on them",
                    ", ".join(ignored))
    metrics = Metrics(model_name, lambda: llm.stats())
    llm = AsyncLLM.from_config(engine_config(args), on_output=metrics.observe)
    app = build_app(args, llm, metrics)
    raise_open_files_limit()
    quiet_accept_errors(asyncio.get_running_loop())
    config = uvicorn.Config(app, host=args.host, port=args.port, http=H11WithRequestHeadTimeout,
                            log_level=args.log_level, timeout_graceful_shutdown=UVICORN_GRACE_S)
    sock = config.bind_socket()  # a taken port stops the start here (uvicorn's message), before any loading
    server = DrainingServer(config, partial(drain, gate=app.state.gate, llm=llm, timeout=args.shutdown_timeout))
    if args.metrics_port is not None:  # a thread of prometheus_client's own; it ends with the process
        start_http_server(args.metrics_port, addr=args.host, registry=metrics.registry)
    llm.start()
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    ready = asyncio.create_task(llm.wait_ready())
    await asyncio.wait({serving, ready}, return_when=asyncio.FIRST_COMPLETED)
    if ready.done() and ready.exception() is not None:
        if not server.draining:  # (a signal while it loads stops the load: no failure of its own)
            logger.error("%s", ready.exception())
            server.should_exit = True
            await serving
            return 1
    elif ready.done():
        logger.info("%s", describe_tool_format(app.state.chat.renders_tools(None), args.tool_call_parser))
        logger.info("serving %s at http://%s:%d/v1", model_name, args.host, args.port)
        # An engine that dies (a failed step, a lost tensor-parallel worker) takes the server down with
        # it, so a supervisor can restart it; meanwhile /health has said 503.
        died = asyncio.create_task(llm.wait_dead())
        await asyncio.wait({serving, died}, return_when=asyncio.FIRST_COMPLETED)
        if died.done() and not serving.done() and not server.draining:
            logger.error("stopping: %s", died.result())
            server.should_exit = True
            await serving
            return 1
        died.cancel()
    await serving
    ready.cancel()
    return 0
