"""Tool calling: split a model's output into `content` and `tool_calls`, and the JSON formats the server
constrains an output to when it asks for calls itself."""

from slipstream.tools import parsers  # noqa: F401  (registers the parsers)
from slipstream.tools.base import (
    TOOL_PARSERS,
    ToolCall,
    ToolCallDelta,
    ToolCallStream,
    ToolParser,
    get_tool_parser,
    register_tool_parser,
)
from slipstream.tools.formats import (
    CallListFormat,
    GenericFormat,
    NamedCallFormat,
    call_list_schema,
    generic_schema,
    generic_system_prompt,
    parameters_schema,
    render_generic_calls,
)

__all__ = [
    "TOOL_PARSERS",
    "CallListFormat",
    "GenericFormat",
    "NamedCallFormat",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallStream",
    "ToolParser",
    "call_list_schema",
    "generic_schema",
    "generic_system_prompt",
    "get_tool_parser",
    "parameters_schema",
    "register_tool_parser",
    "render_generic_calls",
]
