"""`slipstream run-batch -i requests.jsonl -o results.jsonl [engine flags]`: an OpenAI Batch input file
processed offline by the engine, no HTTP server (vLLM's and FastDeploy's command).

Each input line is `{"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions",
"body"}`. All lines go to the engine at once (continuous batching does the rest) through the same code
as the server's endpoints, so a body is validated and answered exactly as over HTTP. Each output line is
OpenAI's batch output: `{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`,
in input order; a line that is not a request gets an error record, never a crash.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import uuid
from typing import Any

from pydantic import BaseModel, ValidationError

from slipstream.engine.async_llm import AsyncLLM
from slipstream.entrypoints.openai.args import engine_config, make_arg_parser, parse_args, served_model_name
from slipstream.entrypoints.openai.errors import from_exception
from slipstream.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from slipstream.entrypoints.openai.serving_chat import OpenAIServingChat
from slipstream.entrypoints.openai.serving_completion import OpenAIServingCompletion
from slipstream.entrypoints.openai.serving_engine import ServingOptions, parse_body
from slipstream.reasoning import get_reasoning_parser

logger = logging.getLogger("slipstream.run_batch")


class BatchLine(BaseModel):
    custom_id: str
    method: str = "POST"
    url: str
    body: dict[str, Any]


class BatchRunner:
    def __init__(self, llm: AsyncLLM, args: argparse.Namespace) -> None:
        options = ServingOptions(served_model_name(args), (), args.enable_logprob, args.max_logprobs,
                                 args.trust_request_chat_template)
        reasoning = get_reasoning_parser(args.reasoning_parser) if args.reasoning_parser else None
        self.chat = OpenAIServingChat(llm, options, reasoning, args.tool_call_parser)
        self.completion = OpenAIServingCompletion(llm, options)

    async def answer(self, number: int, text: str) -> dict[str, Any]:
        """The output record of input line `number` (1-based, for messages)."""
        record: dict[str, Any] = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": None, "response": None,
                                  "error": None}
        try:
            raw = json.loads(text)
            if isinstance(raw, dict) and isinstance(raw.get("custom_id"), str):
                record["custom_id"] = raw["custom_id"]  # (kept even when the rest is wrong)
            line = BatchLine.model_validate(raw)
        except json.JSONDecodeError as exc:
            record["error"] = {"code": "invalid_json", "message": f"line {number}: not JSON: {exc}"}
            return record
        except ValidationError as exc:
            record["error"] = {"code": "invalid_request", "message": f"line {number}: {_first_error(exc)}"}
            return record
        if line.method != "POST" or line.url not in ("/v1/chat/completions", "/v1/completions"):
            record["error"] = {"code": "invalid_url", "message": f"line {number}: {line.method} {line.url} is not "
                               "supported: POST /v1/chat/completions or /v1/completions"}
            return record
        body = json.dumps({**line.body, "stream": False}).encode()  # one response per line
        try:
            if line.url == "/v1/chat/completions":
                result = await self.chat.generate_chat(parse_body(ChatCompletionRequest, body))
            else:
                result = await self.completion.generate_completion(parse_body(CompletionRequest, body))
            status, payload, request_id = 200, result.model_dump(), result.id
        except Exception as exc:  # refused (400, ...) or failed: the error envelope, as over HTTP
            error = from_exception(exc)
            status, payload, request_id = error.status, error.body().model_dump(), None
        record["response"] = {"status_code": status, "request_id": request_id, "body": payload}
        return record


def _first_error(exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"{where}: {err['msg']}" if where else err["msg"]


async def run(args: argparse.Namespace) -> int:
    with open(args.input_file, encoding="utf-8") as f:
        lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
    llm = AsyncLLM.from_config(engine_config(args))
    llm.start()
    try:
        await llm.wait_ready()
        runner = BatchRunner(llm, args)
        from tqdm import tqdm

        with tqdm(total=len(lines), desc="requests", unit="req", file=sys.stderr) as progress:

            async def one(number: int, text: str) -> dict[str, Any]:
                record = await runner.answer(number, text)
                progress.update()
                return record

            records = await asyncio.gather(*(one(i, text) for i, text in lines))
    finally:
        llm.shutdown()
    with open(args.output_file, "w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    failed = sum(r["error"] is not None or r["response"]["status_code"] != 200 for r in records)
    logger.info("%d requests, %d failed; results in %s", len(records), failed, args.output_file)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = make_arg_parser("slipstream run-batch")
    parser.description = __doc__.splitlines()[0]
    parser.add_argument("-i", "--input-file", required=True, help="the batch input (JSON lines)")
    parser.add_argument("-o", "--output-file", required=True, help="where the results go (JSON lines)")
    args = parse_args(argv, parser=parser)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(run(args))
