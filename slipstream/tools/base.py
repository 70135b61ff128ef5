"""Splitting a model's output into content and tool calls, whole or delta by delta.

A call is a JSON object `{"name": …, "arguments": {…}}` (`"parameters"` is taken too, in either order)
that a model writes inside tags or as its whole output. Its arguments are handed on as the raw JSON
text the model wrote, not re-serialised, so a stream can pass them on as they grow. `_split` is the
single source of truth: the non-streaming `extract` calls it on the whole text, and a `ToolCallStream`
calls it on the text so far and hands out only the growth of what it returns, so streamed and whole
results agree by construction. For that, `_split` of a prefix only ever reports what no further text
can change: a possible tag start, whitespace that may turn out to touch a tag, and markup not yet
known to be a call all wait. Markup that turns out not to be a call before its name is known stays
content; once a call is reported it stays one, and whatever breaks it later only ends it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from slipstream.parsing import ParserRegistry, partial_tag_len
from slipstream.tools.json_scan import decode_string, scan_object, skip_space

ARGUMENT_KEYS = ("arguments", "parameters")
# Text on both sides of a call is one field: the whitespace dropped around the call becomes a paragraph break.
CONTENT_JOINER = "\n\n"


@dataclass
class ToolCall:
    """One call as parsed from the text so far."""

    name: str  # reported only once the whole name is known
    arguments: str  # the raw JSON text of the arguments as the model wrote it (so far)
    complete: bool  # its object was closed: the arguments are final (False when cut off, or broken off)


@dataclass
class ToolCallDelta:
    """What a stream hands out for one call."""

    index: int  # the call's position in the output (0, 1, ...)
    name: str | None  # set on the first delta of that call only
    arguments: str  # the arguments text added since its last delta



def _before(text: str, tag: str, final: bool) -> str:
    """`text` up to the first `tag` in it or, unless `final`, up to a beginning of `tag` at its end."""
    at = text.find(tag)
    if at >= 0:
        return text[:at]
    return text if final else text[: len(text) - partial_tag_len(text, tag)]


@dataclass
class CallRead:
    """What the text at one position says of a call object."""

    call: ToolCall | None  # None: not a call, or not yet known to be one
    end: int | None = None  # where the call's object ended or broke off; None while it goes on
    pending: bool = False  # not yet known whether it is a call


def read_call_object(text: str, pos: int, final: bool, end_tag: str | None = None) -> CallRead:
    """The call object expected at `pos`. It is a call once its name is known (a non-empty string); before
    that it waits or, once it can no longer be one (or the text is `final`), is not a call. Arguments still
    being written are cut at `end_tag`: a call that never closes its JSON does not swallow the tag that ends
    it. A string holding the arguments' JSON is reported decoded, once it is complete."""
    if pos == len(text) or text[pos] != "{":
        return CallRead(None, pending=pos == len(text) and not final)
    scan = scan_object(text, pos)
    name = next((m for m in scan.members if m.key == "name"), None)
    args = next((m for m in scan.members if m.key in ARGUMENT_KEYS), None)
    ended = scan.end if scan.end is not None else scan.error
    named = name is not None and name.end is not None and text.startswith('"', name.start) and name.end > name.start + 2
    if not named:
        # It can become a call only while its name may: not there yet, or a string still being written.
        hopeless = name is not None and (name.end is not None or text[name.start : name.start + 1] not in ('"', ""))
        return CallRead(None, pending=not (final or hopeless or ended is not None))
    if args is None:
        arguments = "{}" if scan.end is not None else ""
    elif args.end is not None:
        arguments = text[args.start : args.end]
        if arguments.startswith('"'):
            arguments = decode_string(arguments[1:-1])
    else:  # still being written, or broken off inside
        arguments = text[args.start : len(text) if scan.error is None else scan.error]
        if end_tag:
            arguments = _before(arguments, end_tag, final)
        if arguments.startswith('"'):
            arguments = ""  # a string is decoded only once complete
    call = ToolCall(decode_string(text[name.start + 1 : name.end - 1]), arguments, scan.end is not None)
    return CallRead(call, ended)


def read_call_list(text: str, pos: int, separator: str, final: bool) -> tuple[list[ToolCall], int | None]:
    """Call objects from `pos` on, `separator` between them: (calls, stop), `stop` the position of the first
    character that is not part of the list (a closing bracket, other text, where a call broke off), or None
    while the list may go on."""
    calls: list[ToolCall] = []
    while True:
        i = skip_space(text, pos)
        read = read_call_object(text, i, final)
        if read.pending:
            return calls, None
        if read.call is None:
            return calls, i
        calls.append(read.call)
        if read.end is None:
            return calls, len(text) if final else None
        if not read.call.complete:
            return calls, read.end
        i = skip_space(text, read.end)
        if i == len(text):
            return calls, i if final else None
        if text[i] != separator:
            return calls, i
        pos = i + 1


class ToolParser:
    """Default grammar (Hermes): calls as `<tool_call>{"name": …, "arguments": {…}}</tool_call>`, any number,
    content before, between and after them.

    Subclasses set the class attributes or replace `_split`; they hold no per-request state, so one instance
    serves every request (per-request state lives in `ToolCallStream`).
    """

    start_tag: ClassVar[str] = "<tool_call>"
    end_tag: ClassVar[str] = "</tool_call>"

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a whole output; content None when empty."""
        content, calls = self._split(text, final=True)
        return content or None, calls

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self)

    def _split(self, text: str, final: bool) -> tuple[str, list[ToolCall]]:
        """(content, calls) of `text`; unless `final`, only what no further text can change."""
        pieces: list[str] = []  # content: before the first call, between calls, after the last
        calls: list[ToolCall] = []
        start = look = 0  # where the current content piece starts; where to look for the next tag
        while True:
            tag = text.find(self.start_tag, look)
            if tag < 0:
                held = 0 if final else partial_tag_len(text[look:], self.start_tag)
                piece = text[start : len(text) - held]
                pieces.append(piece if final else piece.rstrip())  # trailing whitespace may touch a tag
                break
            read = read_call_object(text, skip_space(text, tag + len(self.start_tag)), final, self.end_tag)
            if read.call is None and not read.pending:  # not a call: the tag is content, look past it
                look = tag + len(self.start_tag)
                continue
            pieces.append(text[start:tag].rstrip())
            if read.call is None:
                break  # held until it is known whether this is a call
            calls.append(read.call)
            if read.end is None:
                break  # the call is still being written
            # The call's text runs to its end tag, or to the next call should the model leave that out.
            closing = text.find(self.end_tag, read.end)
            following = text.find(self.start_tag, read.end)
            if closing >= 0 and (following < 0 or closing < following):
                look = closing + len(self.end_tag)
            elif following >= 0:
                look = following
            else:
                break  # held until the end tag, or dropped: the text ends inside the call
            start = len(text) - len(text[look:].lstrip())  # whitespace after a call goes with it
        return CONTENT_JOINER.join(p for p in pieces if p), calls


class ToolCallStream:
    """One request's output fed as text deltas; each call returns (content delta, call deltas)."""

    def __init__(self, parser: ToolParser) -> None:
        self._parser = parser
        self._text = ""
        self._sent_content = 0
        self._sent_arguments: list[int] = []  # per call reported so far: how much of its arguments went out

    def feed(self, delta: str) -> tuple[str, list[ToolCallDelta]]:
        self._text += delta
        return self._advance(final=False)

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """Flush what was held back in case it began a tag or a call; call once, when the output ends."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> tuple[str, list[ToolCallDelta]]:
        content, calls = self._parser._split(self._text, final)
        deltas = []
        for index, call in enumerate(calls):
            new = index == len(self._sent_arguments)
            if new:
                self._sent_arguments.append(0)
            grown = call.arguments[self._sent_arguments[index] :]
            if new or grown:
                deltas.append(ToolCallDelta(index, call.name if new else None, grown))
            self._sent_arguments[index] = len(call.arguments)
        out = content[self._sent_content :]
        self._sent_content = len(content)
        return out, deltas


TOOL_PARSERS: ParserRegistry[ToolParser] = ParserRegistry("tool parser")
register_tool_parser = TOOL_PARSERS.register  # class decorator: the parser's names
get_tool_parser = TOOL_PARSERS.create  # the parser called `name`; ValueError naming the choices
