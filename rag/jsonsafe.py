"""Checks on untrusted JSON that must run before a parser sees it.

msgspec (like most JSON parsers) recurses once per nesting level, so a line of ten thousand ``[``
raises ``RecursionError`` deep inside the decoder. ``json_depth`` measures the nesting with a
linear scan that never recurses, so a caller can refuse such input with a clear message first.
"""

from __future__ import annotations

import re

__all__ = ["json_depth", "check_json_depth", "JsonTooDeep"]

# Strings are skipped whole (escapes included), so brackets inside them do not count.
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"?|[\[\]{}]')


class JsonTooDeep(ValueError):
    """The JSON text nests deeper than allowed."""

    def __init__(self, depth: int, limit: int) -> None:
        super().__init__(f"JSON nests more than {limit} levels deep")
        self.depth = depth
        self.limit = limit


def json_depth(data: bytes | str, stop_above: int | None = None) -> int:
    """The deepest nesting of arrays/objects in ``data`` (0 for a scalar); stops early past ``stop_above``."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    depth = deepest = 0
    for m in _TOKENS.finditer(raw):
        c = m.group()[:1]
        if c in (b"[", b"{"):
            depth += 1
            if depth > deepest:
                deepest = depth
                if stop_above is not None and deepest > stop_above:
                    return deepest
        elif c in (b"]", b"}"):
            depth -= 1
    return deepest


def check_json_depth(data: bytes | str, limit: int) -> None:
    """Raise :class:`JsonTooDeep` when ``data`` nests deeper than ``limit``."""
    depth = json_depth(data, stop_above=limit)
    if depth > limit:
        raise JsonTooDeep(depth, limit)
