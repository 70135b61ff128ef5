"""Reasoning parsers: split a thinking model's output into `reasoning_content` and `content`."""

from slipstream.reasoning import parsers  # noqa: F401  (registers the parsers)
from slipstream.reasoning.base import (
    REASONING_PARSERS,
    ReasoningParser,
    ReasoningStream,
    get_reasoning_parser,
    register_reasoning_parser,
)

__all__ = [
    "REASONING_PARSERS",
    "ReasoningParser",
    "ReasoningStream",
    "get_reasoning_parser",
    "register_reasoning_parser",
]
