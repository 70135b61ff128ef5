"""Splitting a thinking model's output into reasoning and answer, whole or delta by delta.

Every parser reads the same shape, `[<think>] reasoning </think> [answer_open] answer [answer_close]`,
and differs only in its tags and in whether thinking needs an opening tag. Tags never reach either
field, and whitespace touching a tag is dropped with it. `_split` is the single source of truth: the
non-streaming `extract` calls it on the whole text, and a `ReasoningStream` calls it on the text so
far and hands out only the growth of what it returns, so streamed and whole results agree by
construction. Re-splitting the text per delta costs a few string scans, microseconds against a
decode step.
"""

from __future__ import annotations

from typing import ClassVar

from slipstream.parsing import ParserRegistry, partial_tag_len


def _skip_space(text: str, pos: int) -> int:
    return len(text) - len(text[pos:].lstrip())



class ReasoningParser:
    """Default grammar: `<think>…</think>` then the answer, thinking on only when opened.

    Subclasses set the class attributes below; they hold no per-request state, so one instance
    serves every request (per-request state lives in `ReasoningStream`).
    """

    start_tag: ClassVar[str] = "<think>"
    end_tag: ClassVar[str] = "</think>"
    # Optional tag opening the answer, and one ending it (what follows the closing tag is dropped).
    answer_open: ClassVar[str | None] = None
    answer_close: ClassVar[str | None] = None
    # True: the output is reasoning from its start even when neither prompt nor output opens it.
    implicit_start: ClassVar[bool] = False

    def prompt_opens_thinking(self, prompt: str) -> bool:
        """Whether the chat template already opened thinking, so the model starts inside it."""
        return prompt.rstrip().endswith(self.start_tag)

    def extract(self, text: str, prompt_opened: bool = False) -> tuple[str | None, str | None]:
        """(reasoning, content) of a whole output; None for an empty field."""
        reasoning, content, _ = self._split(text, prompt_opened, final=True)
        return reasoning or None, content or None

    def stream(self, prompt_opened: bool = False) -> ReasoningStream:
        return ReasoningStream(self, prompt_opened)

    def _split(self, text: str, prompt_opened: bool, final: bool) -> tuple[str, str, bool]:
        """(reasoning, content, thinking ended) of `text`. Unless `final`, only what no further
        text can change: a possible tag start or whitespace that may turn out to touch a tag waits."""
        if not (prompt_opened or self.implicit_start):
            head = text.lstrip()
            if not head.startswith(self.start_tag):
                if not final and self.start_tag.startswith(head):
                    return "", "", False
                return "", text, True  # thinking never opened: the output is all answer, untouched
        reasoning, pos, ended = self._section(text, 0, self.start_tag, self.end_tag, final)
        if not ended:
            return reasoning, "", False
        content, _, _ = self._section(text, pos, self.answer_open, self.answer_close, final)
        return reasoning, content, True

    @staticmethod
    def _section(text: str, pos: int, opener: str | None, closer: str | None, final: bool) -> tuple[str, int, bool]:
        """The field starting at `pos` (after whitespace and an optional `opener`) up to `closer`:
        returns (field text, position after the closer, closer found)."""
        start = _skip_space(text, pos)
        if opener:
            if text.startswith(opener, start):
                start = _skip_space(text, start + len(opener))
            elif not final and opener.startswith(text[start:]):
                return "", start, False
        end = text.find(closer, start) if closer else -1
        if end >= 0:
            return text[start:end].rstrip(), end + len(closer), True
        if final or not closer:
            return text[start:], len(text), False
        stable = len(text) - partial_tag_len(text, closer)
        return text[start:stable].rstrip(), len(text), False


class ReasoningStream:
    """One request's output fed as text deltas; each call returns (reasoning delta, content delta)."""

    def __init__(self, parser: ReasoningParser, prompt_opened: bool) -> None:
        self._parser = parser
        self._prompt_opened = prompt_opened
        self._text = ""
        self._sent_reasoning = 0
        self._sent_content = 0
        self.reasoning_ended = False  # the end of thinking is known (or thinking never opened)

    def feed(self, delta: str) -> tuple[str, str]:
        self._text += delta
        return self._advance(final=False)

    def finish(self) -> tuple[str, str]:
        """Flush what was held back in case it began a tag; call once, when the output ends."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> tuple[str, str]:
        reasoning, content, self.reasoning_ended = self._parser._split(self._text, self._prompt_opened, final)
        out = reasoning[self._sent_reasoning :], content[self._sent_content :]
        self._sent_reasoning, self._sent_content = len(reasoning), len(content)
        return out


REASONING_PARSERS: ParserRegistry[ReasoningParser] = ParserRegistry("reasoning parser")
register_reasoning_parser = REASONING_PARSERS.register  # class decorator: the parser's names
get_reasoning_parser = REASONING_PARSERS.create  # the parser called `name`; ValueError naming the choices
