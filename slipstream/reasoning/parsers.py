"""The reasoning parsers `--reasoning-parser` offers; a new model's parser is one small class here."""

from __future__ import annotations

from slipstream.reasoning.base import ReasoningParser, register_reasoning_parser


@register_reasoning_parser("qwen3")
class Qwen3ReasoningParser(ReasoningParser):
    """Qwen3: `<think>…</think>` then the answer. Thinking counts only when the template or the
    model opens it, so a reply without `<think>` (a non-thinking model or turn) is all answer."""


@register_reasoning_parser("deepseek_r1")
class DeepSeekR1ReasoningParser(ReasoningParser):
    """DeepSeek-R1: everything before `</think>` is reasoning, since R1 often omits `<think>`."""

    implicit_start = True


@register_reasoning_parser("ernie-45")
class Ernie45ReasoningParser(ReasoningParser):
    """ERNIE 4.5 thinking models: reasoning up to `</think>` (its template opens it), then the answer."""

    implicit_start = True


@register_reasoning_parser("ernie-x1")
class ErnieX1ReasoningParser(ReasoningParser):
    """ERNIE X1: reasoning up to `</think>`, then the answer inside `<response>…</response>`."""

    implicit_start = True
    answer_open = "<response>"
    answer_close = "</response>"
