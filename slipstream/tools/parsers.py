"""The tool-call parsers `--tool-call-parser` offers; a new model's parser is one small class here."""

from __future__ import annotations

from slipstream.tools.base import ToolCall, ToolParser, read_call_list, register_tool_parser
from slipstream.tools.json_scan import skip_space


@register_tool_parser("hermes")
class HermesToolParser(ToolParser):
    """Hermes 2/3, Qwen2.5, Qwen3 and many others: `<tool_call>\\n{"name": …, "arguments": {…}}\\n</tool_call>`,
    any number of them, with content before, between and after."""


@register_tool_parser("ernie-x1")
class ErnieX1ToolParser(HermesToolParser):
    """ERNIE X1 (ERNIE-4.5-21B-A3B-Thinking): Hermes calls after its reasoning, which the reasoning parser has
    already taken off (FastDeploy's `ernie-x1` tool parser reads the same `<tool_call>{json}</tool_call>`)."""


@register_tool_parser("ernie-45")
class Ernie45ToolParser(HermesToolParser):
    """ERNIE 4.5 thinking models: Hermes calls after `</think>` (FastDeploy's `ernie-45-vl-thinking`)."""


@register_tool_parser("llama3_json")
class Llama3JsonToolParser(ToolParser):
    """Llama 3.1/3.2 JSON tool calls: the output, after an optional `<|python_tag|>`, is one or more
    `{"name": …, "parameters": {…}}` separated by `;`. An output that starts otherwise is all content, and
    so is one whose first object turns out not to be a call; text after the calls is content too."""

    python_tag = "<|python_tag|>"

    def _split(self, text: str, final: bool) -> tuple[str, list[ToolCall]]:
        head = skip_space(text, 0)
        if text.startswith(self.python_tag, head):
            head += len(self.python_tag)
        elif not text.startswith("{", head):
            if not final and self.python_tag.startswith(text[head:]):
                return "", []
            return text, []  # not a call: all content, untouched
        calls, stop = read_call_list(text, head, ";", final)
        if stop is None:
            return "", calls
        if not calls:
            return text, []
        rest = text[stop:]
        return rest if final else rest.rstrip(), calls
