"""Hostile uploads built in memory: each function returns the bytes of one malicious or broken file.

Nothing here is stored in git; every builder is deterministic (fixed zip timestamps, no random
data) and fast. The zip and PDF containers are written by hand so that their headers can lie
(compression method, declared sizes) and so that a 1 GiB bomb is built from a few hundred
kilobytes of repeated deflate blocks, never from 1 GiB of memory.
"""

from __future__ import annotations

import functools
import io
import struct
import zipfile
import zlib
from collections.abc import Iterable, Iterator

__all__ = [
    "docx_bomb",
    "docx_compression_99",
    "docx_corrupt_deflate",
    "invalid_utf8_jsonl",
    "jsonl_deep_line",
    "pdf_many_pages",
    "pdf_unknown_filter",
]

GIB = 1 << 30

# -- JSONL --------------------------------------------------------------------------------------


def jsonl_deep_line(depth: int = 10_000) -> bytes:
    """A BEIR corpus whose first line nests ``depth`` arrays deep; the second line is fine."""
    deep = b'{"_id":"deep","text":' + b"[" * depth + b"]" * depth + b"}"
    return deep + b"\n" + b'{"_id":"ok","text":"fine"}' + b"\n"


def invalid_utf8_jsonl() -> bytes:
    """A good line, then a line whose text holds bytes that are not UTF-8."""
    return b'{"_id":"good","text":"fine"}\n{"_id":"bad","text":"caf\xe9 \xff\xfe"}\n'


# -- zip / docx ---------------------------------------------------------------------------------

_DOS_DATE = (0 << 9) | (1 << 5) | 1  # 1980-01-01: fixed so that the bytes never change
_DOS_TIME = 0


class _Member:
    """One zip member as it will be written: raw deflate bytes plus the header fields."""

    def __init__(
        self, name: str, raw: bytes, crc: int, size: int, method: int = zipfile.ZIP_DEFLATED
    ) -> None:
        self.name = name.encode("utf-8")
        self.raw = raw
        self.crc = crc
        self.size = size
        self.method = method


def _deflated(name: str, data: bytes) -> _Member:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return _Member(name, c.compress(data) + c.flush(), zlib.crc32(data), len(data))


def _zip(members: Iterable[_Member]) -> bytes:
    """Write a zip by hand, trusting every header field the members carry (sizes, method, crc)."""
    out = io.BytesIO()
    central: list[bytes] = []
    for m in members:
        offset = out.tell()
        out.write(
            struct.pack(
                "<IHHHHHIIIHH",
                0x04034B50, 20, 0, m.method, _DOS_TIME, _DOS_DATE,
                m.crc, len(m.raw), m.size, len(m.name), 0,
            )
        )
        out.write(m.name)
        out.write(m.raw)
        central.append(
            struct.pack(
                "<IHHHHHHIIIHHHHHII",
                0x02014B50, 20, 20, 0, m.method, _DOS_TIME, _DOS_DATE,
                m.crc, len(m.raw), m.size, len(m.name), 0, 0, 0, 0, 0, offset,
            )
            + m.name
        )
    cd_offset = out.tell()
    cd = b"".join(central)
    out.write(cd)
    out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(central), len(central), len(cd), cd_offset, 0))
    return out.getvalue()


@functools.lru_cache(maxsize=1)
def _docx_parts() -> tuple[tuple[str, bytes], ...]:
    """The parts of a small, valid python-docx document (built once, in memory)."""
    import docx

    document = docx.Document()
    document.add_heading("Hostile file", level=1)
    document.add_paragraph("This document is a valid docx before its zip is tampered with.")
    buf = io.BytesIO()
    document.save(buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zf:
        return tuple((info.filename, zf.read(info)) for info in zf.infolist())


def _docx_members() -> list[_Member]:
    return [_deflated(name, data) for name, data in _docx_parts()]


def docx_valid() -> bytes:
    """The untampered document the other docx builders start from (a control for tests)."""
    return _zip(_docx_members())


def docx_corrupt_deflate() -> bytes:
    """A .docx whose word/document.xml deflate stream is broken: reading it raises ``zlib.error``."""
    members = _docx_members()
    for m in members:
        if m.name == b"word/document.xml":
            # 0xFF starts a final block of type 3, which deflate does not define ("invalid block type").
            m.raw = b"\xff" * 8 + m.raw[8:]
    return _zip(members)


def docx_compression_99() -> bytes:
    """A .docx whose members claim compression method 99 (AES), so zipfile raises NotImplementedError."""
    members = _docx_members()
    for m in members:
        m.method = 99
    return _zip(members)


_BOMB_PREFIX = (
    b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
    b'<w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main">'
    b'<w:body><w:p><w:r><w:t xml:space="preserve">bomb'
)
_BOMB_SUFFIX = b"</w:t></w:r></w:p></w:body></w:document>"
_BOMB_CHUNK = b" " * (1 << 20)


def _full_flush(data: bytes) -> bytes:
    # A full flush ends byte-aligned with an empty history, so the block can be repeated and
    # concatenated with others into one valid raw deflate stream.
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush(zlib.Z_FULL_FLUSH)


def _final(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush(zlib.Z_FINISH)


def _bomb_pieces(inflated: int) -> Iterator[tuple[bytes, bytes, int]]:
    """(plain piece, its deflate block, repeat count) in order; plain pieces add up to ``inflated``."""
    padding = max(0, inflated - len(_BOMB_PREFIX) - len(_BOMB_SUFFIX))
    whole, rest = divmod(padding, len(_BOMB_CHUNK))
    yield _BOMB_PREFIX, _full_flush(_BOMB_PREFIX), 1
    if whole:
        yield _BOMB_CHUNK, _full_flush(_BOMB_CHUNK), whole
    if rest:
        yield _BOMB_CHUNK[:rest], _full_flush(_BOMB_CHUNK[:rest]), 1
    yield _BOMB_SUFFIX, _final(_BOMB_SUFFIX), 1


def docx_bomb(inflated: int = GIB, declared_size: int | None = None) -> bytes:
    """A .docx whose word/document.xml inflates to about ``inflated`` bytes (1 GiB: a ~1 MB file).

    The XML is a single paragraph padded with spaces. ``declared_size`` makes the zip headers lie:
    they then declare that many bytes for the member, with the CRC of its first ``declared_size``
    bytes, so that a reader that trusts the header and stops there sees a consistent member.
    """
    if not 0 < inflated < 0xFFFFFFFF:
        raise ValueError("inflated must fit a zip32 size field (below 4 GiB)")
    declared = inflated if declared_size is None else declared_size
    raw: list[bytes] = []
    crc = 0
    counted = 0  # plain bytes folded into the crc so far (stops at the declared size)
    for plain, block, times in _bomb_pieces(inflated):
        raw.append(block * times)
        for _ in range(times):
            if counted >= declared:
                break
            take = plain[: declared - counted]
            crc = zlib.crc32(take, crc)
            counted += len(take)
    members = []
    for m in _docx_members():
        if m.name == b"word/document.xml":
            m = _Member("word/document.xml", b"".join(raw), crc, declared)
        members.append(m)
    return _zip(members)


# -- PDF ----------------------------------------------------------------------------------------

_PAGE_TEXT = b"BT /F1 12 Tf 72 720 Td (Hostile page text) Tj ET"


def _pdf(objects: list[bytes]) -> bytes:
    """A PDF with ``objects`` numbered 1.. (object 1 is the catalog) and a correct xref table."""
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % number + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for offset in offsets:
        out.write(b"%010d 00000 n \n" % offset)
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref))
    return out.getvalue()


def _stream(dictionary: bytes, data: bytes) -> bytes:
    return b"<< " + dictionary + b" /Length %d >>\nstream\n" % len(data) + data + b"\nendstream"


_FONT = b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"


def pdf_unknown_filter(good_pages: int = 0) -> bytes:
    """A PDF whose first page's content stream has ``/Filter /FooDecode`` (pypdf: NotImplementedError).

    ``good_pages`` readable pages follow it, to show that one bad page does not lose the others.
    """
    n_pages = 1 + good_pages
    kids = b" ".join(b"%d 0 R" % (5 + i) for i in range(n_pages))
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [" + kids + b"] /Count %d >>" % n_pages,
        _stream(b"/Filter /FooDecode", b"\x00\x01 not decodable"),
        _stream(b"", _PAGE_TEXT),
    ]
    for i in range(n_pages):
        contents = 3 if i == 0 else 4
        objects.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents %d 0 R"
            b" /Resources << /Font << /F1 %d 0 R >> >> >>" % (contents, 5 + n_pages)
        )
    objects.append(_FONT)
    return _pdf(objects)


def pdf_many_pages(pages: int = 10_000) -> bytes:
    """A tiny PDF (about 2 KB) with ``pages`` pages that all share one page object and content stream.

    The page tree is binary: node k holds node k-1 twice (2**k pages), and the root holds the nodes
    of the set bits of ``pages``. A reader that flattens the tree gets ``pages`` pages.
    """
    if pages < 1:
        raise ValueError("pages must be positive")
    # 1 catalog, 2 root, 3 content, 4 font, 5 the page, 6.. node k (k >= 1) holds 2**k pages
    levels = pages.bit_length() - 1
    node = {0: 5, **{k: 5 + k for k in range(1, levels + 1)}}
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids ["
        + b" ".join(b"%d 0 R" % node[k] for k in range(levels + 1) if pages >> k & 1)
        + b"] /Count %d >>" % pages,
        _stream(b"", _PAGE_TEXT),
        _FONT,
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 3 0 R"
        b" /Resources << /Font << /F1 4 0 R >> >> >>",
    ]
    for k in range(1, levels + 1):
        child = node[k - 1]
        objects.append(
            b"<< /Type /Pages /Parent 2 0 R /Kids [%d 0 R %d 0 R] /Count %d >>" % (child, child, 1 << k)
        )
    return _pdf(objects)
