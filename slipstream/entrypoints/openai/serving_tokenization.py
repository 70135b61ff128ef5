"""POST /tokenize and /detokenize: the server's own tokenizer and chat template, for clients that
count or build prompts themselves."""

from __future__ import annotations

from fastapi import Request

from slipstream.entrypoints.openai.errors import APIError
from slipstream.entrypoints.openai.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from slipstream.entrypoints.openai.serving_chat import render_chat_text
from slipstream.entrypoints.openai.serving_engine import OpenAIServing, off_loop, parse_body


class OpenAIServingTokenization(OpenAIServing):
    async def tokenize(self, raw_request: Request) -> TokenizeResponse:
        request = parse_body(TokenizeRequest, await raw_request.body())
        engine = self.llm.engine

        def ids_of_request() -> list[int]:  # (special tokens of a conversation come from its template's text alone)
            if request.messages is None:
                return self.encode(request.prompt, request.add_special_tokens, "prompt")
            text = render_chat_text(engine.tokenizer, request.messages, request.add_generation_prompt,
                                    **(request.chat_template_kwargs or {}))
            return self.encode(text, False, "messages")

        ids = await off_loop(ids_of_request)
        return TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids)

    async def detokenize(self, raw_request: Request) -> DetokenizeResponse:
        request = parse_body(DetokenizeRequest, await raw_request.body())
        engine = self.llm.engine
        vocab = engine.hf_config.vocab_size
        if len(request.tokens) > engine.max_model_len:  # (2.5M ids took 1.1 s to decode: no prompt is that long)
            raise APIError(f"tokens: {len(request.tokens)} ids, more than any prompt or answer here holds "
                           f"(the context is {engine.max_model_len} tokens)", param="tokens",
                           code="context_length_exceeded")
        if any(t >= vocab for t in request.tokens):
            raise APIError(f"tokens: token ids must be in [0, {vocab})", param="tokens")
        return DetokenizeResponse(prompt=await off_loop(lambda: engine.tokenizer.decode(request.tokens)))
