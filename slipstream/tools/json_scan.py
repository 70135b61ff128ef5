"""Scanning JSON that is still being written: where a value ends, or that it has not ended yet.

A tool call's arguments are handed on as the raw JSON text the model wrote, so the parsers never need
a decoded value, only its extent. `value_end` finds it without building anything, and reports a
malformed value at the first character that no JSON text could continue with: every shorter prefix
is then merely "not ended yet", so a stream that handed out that prefix never has to take it back.
Numbers are scanned leniently (any run of number characters) and escapes are not checked: the
model's text is passed through, not judged. Nesting is tracked with a list, not recursion, so no
output is deep enough to raise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import NamedTuple

_SPACE = re.compile(r"[ \t\n\r]*")
# A whole string, quotes included; no match when the text ends inside it (or inside an escape).
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NUMBER = re.compile(r"[-+0-9.eE]+")
_HEX = re.compile(r"[0-9a-fA-F]{0,4}")
# What may still become the low half's `\uXXXX` after a high surrogate: nothing yet, or a cut-off escape.
_CUT_ESCAPE = re.compile(r"(\\(u[0-9a-fA-F]{0,3})?)?")
_LITERALS = {"t": "true", "f": "false", "n": "null"}
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


class JSONScanError(ValueError):
    """The text stopped being JSON at `pos`: no continuation can make the text before it plus that character JSON."""

    def __init__(self, pos: int) -> None:
        super().__init__(f"not JSON at position {pos}")
        self.pos = pos


def skip_space(text: str, pos: int) -> int:
    return _SPACE.match(text, pos).end()


def string_end(text: str, pos: int) -> int | None:
    """End of the string whose opening quote is at `pos`; None while the text ends inside it."""
    m = _STRING.match(text, pos)
    return m.end() if m else None


def value_end(text: str, pos: int) -> int | None:
    """End of the JSON value starting at `pos`; None while the text ends inside it (a number at the very
    end counts as unfinished: more digits may follow). JSONScanError at the first impossible character."""
    closers: list[str] = []  # the bracket each open container waits for
    expect = "value"  # or "key", "colon", "comma"
    first = False  # a container was just opened: it may close at once
    i = pos
    while True:
        i = skip_space(text, i)
        if i == len(text):
            return None
        c = text[i]
        if expect == "value":
            if c in "{[":
                closers.append("}" if c == "{" else "]")
                expect, first, i = ("key" if c == "{" else "value"), True, i + 1
                continue
            if first and c == "]":  # the array just opened is empty
                closers.pop()
                i += 1
            elif c == '"':
                end = string_end(text, i)
                if end is None:
                    return None
                i = end
            elif c in "-0123456789":
                i = _NUMBER.match(text, i).end()
                if i == len(text):
                    return None
            elif c in _LITERALS:
                word = _LITERALS[c]
                k = 0
                while k < len(word) and i + k < len(text) and text[i + k] == word[k]:
                    k += 1
                if k < len(word):
                    if i + k == len(text):
                        return None
                    raise JSONScanError(i + k)
                i += k
            else:
                raise JSONScanError(i)
        elif expect == "key":
            if first and c == "}":  # the object just opened is empty
                closers.pop()
                i += 1
            elif c == '"':
                end = string_end(text, i)
                if end is None:
                    return None
                expect, first, i = "colon", False, end
                continue
            else:
                raise JSONScanError(i)
        elif expect == "colon":
            if c != ":":
                raise JSONScanError(i)
            expect, i = "value", i + 1
            continue
        else:  # "comma": after a member or an element
            if c == ",":
                expect, first, i = ("key" if closers[-1] == "}" else "value"), False, i + 1
                continue
            if c != closers[-1]:
                raise JSONScanError(i)
            closers.pop()
            i += 1
        # A value just ended: the whole one, or one inside a container.
        if not closers:
            return i
        expect, first = "comma", False


class Member(NamedTuple):
    key: str
    start: int  # where the value starts (after the colon and any whitespace)
    end: int | None  # where it ends; None while the text ends inside it, or where it broke off


@dataclass
class ObjectScan:
    members: list[Member] = field(default_factory=list)  # each once its colon is read
    end: int | None = None  # position after the closing brace, once it is read
    error: int | None = None  # position of the first character that cannot belong to the object


def scan_object(text: str, pos: int) -> ObjectScan:
    """The members of the object whose `{` is at `pos`, as far as the text goes."""
    scan = ObjectScan()
    i = skip_space(text, pos + 1)
    if text.startswith("}", i):
        scan.end = i + 1
        return scan
    try:
        while i < len(text):
            if text[i] != '"':
                raise JSONScanError(i)
            key_end = string_end(text, i)
            if key_end is None:
                break
            key = decode_string(text[i + 1 : key_end - 1])
            i = skip_space(text, key_end)
            if i == len(text):
                break
            if text[i] != ":":
                raise JSONScanError(i)
            start = skip_space(text, i + 1)
            scan.members.append(Member(key, start, None))  # before scanning: an error inside still leaves it
            end = value_end(text, start)
            if end is None:
                break
            scan.members[-1] = Member(key, start, end)
            i = skip_space(text, end)
            if i == len(text):
                break
            if text[i] == "}":
                scan.end = i + 1
                break
            if text[i] != ",":
                raise JSONScanError(i)
            i = skip_space(text, i + 1)
    except JSONScanError as exc:
        scan.error = exc.pos
    return scan


def decode_string(body: str, complete: bool = True) -> str:
    """The text of a JSON string from its raw body (what lies between its quotes). Unless `complete`, an escape
    that the body so far cuts off (a surrogate pair included) is left out, so decoding a growing body only ever
    appends. Never raises: an unknown escape stands for its character, a broken or lone surrogate for U+FFFD."""
    out = []
    i = 0
    while (j := body.find("\\", i)) >= 0:
        out.append(body[i:j])
        if j + 1 == len(body):
            return "".join(out)  # a backslash whose escape has not come yet
        if body[j + 1] != "u":
            out.append(_ESCAPES.get(body[j + 1], body[j + 1]))
            i = j + 2
            continue
        code, i = _hex_escape(body, j)
        if code is None:
            if i < 0 and not complete:
                return "".join(out)
            out.append("\ufffd")
            i = j + 2
            continue
        if 0xD800 <= code < 0xDC00:  # a high surrogate: only with the low one after it is it a character
            low, after = _hex_escape(body, i) if body.startswith("\\", i) else (None, i)
            if low is not None and 0xDC00 <= low < 0xE000:
                out.append(chr(0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)))
                i = after
                continue
            if not complete and _CUT_ESCAPE.fullmatch(body, i):
                return "".join(out)
        out.append("\ufffd" if 0xD800 <= code < 0xE000 else chr(code))
    out.append(body[i:])
    return "".join(out)


def _hex_escape(body: str, j: int) -> tuple[int | None, int]:
    """The code of the `\\uXXXX` at `j` and the position after it; (None, -1) if the body ends before its four
    digits do, (None, j) if it is not one."""
    if not body.startswith("\\u", j):
        return None, j
    digits = _HEX.match(body, j + 2).group()
    if len(digits) == 4:
        return int(digits, 16), j + 6
    return None, (-1 if j + 2 + len(digits) == len(body) else j)

