"""Per-request generation settings (what to sample, when to stop, what to return)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

GREEDY_BELOW_TEMPERATURE = 1e-5  # a request's temperature below this samples greedily


@dataclass(frozen=True)
class StructuredOutputsParams:
    """What the output must match (vLLM's `structured_outputs`): exactly one of these fields.

    `json` is a JSON schema (a dict or its text), `regex` a regular expression, `choice` a list of
    exact strings, `grammar` an EBNF (GBNF) grammar, `json_object` any JSON object, `structural_tag`
    an xgrammar structural tag (dict or text). `param` names the request field it came from, so an
    invalid one is a 400 naming that field.
    """

    json: str | dict | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool = False
    structural_tag: str | dict | None = None
    param: str = "structured_outputs"

    def __post_init__(self) -> None:
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
        given = [k for k in ("json", "regex", "choice", "grammar", "structural_tag") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError(f"{self.param}: give exactly one of json, regex, choice, grammar, json_object and "
                             f"structural_tag, got {', '.join(given) or 'none'}")

    @property
    def kind(self) -> str:
        return next(k for k in ("json", "regex", "choice", "grammar", "structural_tag", "json_object")
                    if getattr(self, k) not in (None, False))

    def key(self) -> tuple[str, str]:
        """What identifies the compiled grammar: same key, same grammar."""
        value: Any = getattr(self, self.kind)
        if isinstance(value, str) and self.kind in ("json", "structural_tag"):
            try:  # a schema given as text shares the compiled grammar of the same schema given as an object
                value = json.loads(value)
            except ValueError:
                return self.kind, value
        return self.kind, value if isinstance(value, str) else json.dumps(value, sort_keys=True)


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    bad_words: list[str] = field(default_factory=list)
    bad_words_token_ids: list[int] = field(default_factory=list)  # never sampled
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None: no logprobs; k: sampled token plus top-k alternatives
    prompt_logprobs: int | None = None  # same, for prompt positions (completions `echo`)
    skip_special_tokens: bool = True
    # Thinking budget: after this many generated tokens inside a thinking span, force the end of it.
    reasoning_max_tokens: int | None = None
    # Answer budget: at most this many tokens after the thinking span (all of them without one).
    response_max_tokens: int | None = None
    # Constrained decoding: the answer (after any thinking span) must match this.
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        # API layers pass None for "not given" and JSON gives logit_bias keys as strings.
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.bad_words = list(self.bad_words or [])
        self.bad_words_token_ids = list(self.bad_words_token_ids or [])
        self.logit_bias = {int(t): float(b) for t, b in (self.logit_bias or {}).items()}
        if self.top_k < 0:
            self.top_k = 0
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be positive, got {self.repetition_penalty}")
        for name in ("max_tokens", "reasoning_max_tokens", "response_max_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be non-negative, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if "" in self.stop:
            raise ValueError("stop strings must not be empty")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")

    @property
    def greedy(self) -> bool:
        # (below 1e-5, as vLLM's _SAMPLING_EPS: a temperature that float32 rounds to 0 divided the logits by zero,
        # and the draw ran past the vocabulary)
        return self.temperature < GREEDY_BELOW_TEMPERATURE or self.top_k == 1
