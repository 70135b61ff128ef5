"""What the output parsers (`--reasoning-parser`, `--tool-call-parser`) share: one registry shape, so a
name is spelled and refused the same way everywhere, and the hold-back of a tag that may still be arriving."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


def partial_tag_len(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `tag` (to hold back in a stream)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "-")


class ParserRegistry(dict[str, type[T]], Generic[T]):
    """Parser classes by name (case, `-` and `_` do not matter); parsers hold no per-request state, so
    each name makes one instance for every request."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what  # "reasoning parser", for messages

    def register(self, *names: str) -> Callable[[type[T]], type[T]]:
        """Class decorator: make a parser available under `names`."""

        def add(cls: type[T]) -> type[T]:
            for name in names:
                self[_key(name)] = cls
            return cls

        return add

    def create(self, name: str) -> T:
        """The parser called `name`; ValueError naming the choices."""
        cls = self.get(_key(name))
        if cls is None:
            raise ValueError(f"unknown {self.what} {name!r}; choose one of: {', '.join(sorted(self))}")
        return cls()
