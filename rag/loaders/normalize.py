"""Text normalisation and decoding, shared by every format.

``normalize_text`` is what every loaded text goes through (see the package docstring);
``decode_text`` turns uploaded bytes into text, strictly: UTF-8 (or the encoding a BOM or an HTML
``<meta charset>`` names) or a refusal.
"""

from __future__ import annotations

import codecs
import re

from rag.loaders.base import Failed

_NEWLINES = re.compile(r"\r\n?|[\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")
# C0/C1 controls except \t and \n, a stray BOM, and lone surrogates (unencodable as UTF-8).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff\ud800-\udfff]")
_TRAILING = re.compile(r"[^\S\n]+$", re.MULTILINE)
_BLANK_RUNS = re.compile(r"\n{4,}")


def normalize_text(text: str) -> str:
    """Unify newlines, drop control characters, strip trailing spaces, cap blank runs at two."""
    text = _NEWLINES.sub("\n", text)
    text = _CONTROL.sub("", text)
    text = _TRAILING.sub("", text)
    text = _BLANK_RUNS.sub("\n\n\n", text)
    return text.lstrip("\n").rstrip()


def clean_title(title: str | None) -> str:
    """A title on one line: control characters dropped, whitespace runs made one space."""
    if not title:
        return ""
    return " ".join(_CONTROL.sub("", title).split())


_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.I)


def decode_text(data: bytes, *, html: bool = False) -> str:
    """The text of ``data``, or ``Failed`` when it is not text (``html``: honour ``<meta charset>``)."""
    if data.startswith(codecs.BOM_UTF8):
        text = _strict(data[len(codecs.BOM_UTF8) :], "utf-8")
    elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        text = _strict(data, "utf-16")  # the BOM says which byte order
    else:
        text = _strict(data, "utf-8")
        if text is None and html:
            m = _META_CHARSET.search(data[:8192])
            if m:
                try:
                    codec = codecs.lookup(m.group(1).decode("ascii")).name
                except LookupError:
                    raise Failed(
                        f"not valid UTF-8 text, and the declared charset "
                        f"{m.group(1).decode('ascii')!r} is unknown"
                    ) from None
                text = _strict(data, codec)
    if text is None:
        raise Failed("not valid UTF-8 text")
    if "\x00" in text:
        raise Failed("binary data (NUL bytes), not text")
    return text


def _strict(data: bytes, codec: str) -> str | None:
    try:
        return data.decode(codec)
    except UnicodeDecodeError:
        return None
