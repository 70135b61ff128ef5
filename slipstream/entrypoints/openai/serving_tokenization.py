"""POST /tokenize and /detokenize: the server's own tokenizer and chat template, for clients that
count or build prompts themselves."""

from __future__ import annotations

from functools import partial

from fastapi import Request

from slipstream.entrypoints.openai.errors import APIError
from slipstream.entrypoints.openai.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from slipstream.entrypoints.openai.serving_chat import render_chat
from slipstream.entrypoints.openai.serving_engine import OpenAIServing, off_loop, parse_body


class OpenAIServingTokenization(OpenAIServing):
    async def tokenize(self, raw_request: Request) -> TokenizeResponse:
        request = parse_body(TokenizeRequest, await raw_request.body())
        engine = self.llm.engine
        if request.messages is not None:
            ids = await off_loop(partial(render_chat, engine.tokenizer, request.messages,
                                         request.add_generation_prompt, **(request.chat_template_kwargs or {})))
        else:
            ids = await off_loop(partial(engine.tokenizer.encode, request.prompt,
                                         add_special_tokens=request.add_special_tokens))
        return TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids)

    async def detokenize(self, raw_request: Request) -> DetokenizeResponse:
        request = parse_body(DetokenizeRequest, await raw_request.body())
        engine = self.llm.engine
        vocab = engine.hf_config.vocab_size
        if any(t >= vocab for t in request.tokens):
            raise APIError(f"tokens: token ids must be in [0, {vocab})", param="tokens")
        return DetokenizeResponse(prompt=engine.tokenizer.decode(request.tokens))
