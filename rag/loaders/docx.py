"""Word (.docx): paragraphs and tables in document order, "Heading N" styles as Markdown headings.

The zip is inspected before python-docx opens it (``_check_docx_zip``), because ``zipfile``
trusts the sizes a member declares.
"""

from __future__ import annotations

import io
import re
import struct
import zipfile
import zlib
from typing import Any

from rag.loaders.base import INFLATE_SETTING, Failed, LoadLimits, Parsed, describe, over, text_over

_DOCX_HEADING = re.compile(r"heading\s*([1-9])", re.I)


def parse_docx(data: bytes, limits: LoadLimits) -> Parsed:
    import docx
    from docx.opc.exceptions import OpcError
    from docx.table import Table
    from docx.text.paragraph import Paragraph
    from lxml.etree import LxmlError

    _check_docx_zip(data, limits)
    # After the check above every member inflates to exactly its declared size, within budget;
    # what can still go wrong is inside python-docx and lxml (bad XML, missing parts, ...).
    errors = (
        zipfile.BadZipFile, OpcError, KeyError, ValueError, LxmlError, EOFError, OSError,
        zlib.error, NotImplementedError, struct.error, AttributeError, TypeError,
    )  # fmt: skip
    try:
        document = docx.Document(io.BytesIO(data))
        blocks: list[str] = []
        chars = 0
        for item in document.iter_inner_content():
            if isinstance(item, Paragraph):
                text = " ".join(item.text.split())
                if not text:
                    continue
                level = _docx_heading_level(item)
                blocks.append(f"{'#' * level} {text}" if level else text)
            elif isinstance(item, Table):
                rows = _docx_table_rows(item)
                if not rows:
                    continue
                blocks.append("\n".join(rows))
            else:
                continue
            chars += len(blocks[-1]) + 2
            if chars > limits.max_chars + 2:
                raise Failed(text_over(chars, limits, more=True))
        title = document.core_properties.title
    except errors as exc:
        raise Failed(f"corrupt .docx ({describe(exc)})") from exc
    return "\n\n".join(blocks), title, {"format": "docx"}


def _docx_heading_level(paragraph: Any) -> int:
    style = paragraph.style
    if style is None:
        return 0
    for name in (style.name or "", getattr(style, "style_id", "") or ""):
        m = _DOCX_HEADING.fullmatch(name.strip())
        if m:
            return min(int(m.group(1)), 6)
    return 0


def _docx_table_rows(table: Any) -> list[str]:
    rows: list[str] = []
    for row in table.rows:
        cells: list[str] = []
        previous = None
        for cell in row.cells:
            if cell._tc is previous:  # a merged cell is reported once per grid column it spans
                continue
            previous = cell._tc
            text = " ".join(cell.text.split())
            if text:
                cells.append(text)
        if cells:
            rows.append(" | ".join(cells))
    return rows


# -- the zip inspector ---------------------------------------------------------------------------

_INFLATE_CHUNK = 1 << 20  # output bytes per zlib call while checking members: bounds memory
_RAW_CHUNK = 1 << 16  # compressed bytes fed per call (unconsumed_tail copies at most this)
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., name length, extra length


def _check_docx_zip(data: bytes, limits: LoadLimits) -> None:
    """Refuse a .docx zip before python-docx reads it: too big inflated, odd methods, lying sizes.

    ``ZipFile.read`` inflates a whole member in one zlib call of up to 2 GiB and only then cuts it
    to the declared size, so a member that declares 3 KB and inflates to 1 GiB costs 1 GiB of
    memory there. Each member is therefore inflated here first, in bounded chunks that are
    counted and dropped, and must stop at exactly its declared size; the declared sizes together
    must fit ``max_decompressed_bytes``.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, struct.error) as exc:
        raise Failed(f"corrupt .docx ({describe(exc)})") from exc
    declared = sum(info.file_size for info in infos)
    if declared > limits.max_decompressed_bytes:
        raise Failed(
            over(".docx inflates to", declared, "bytes", limits.max_decompressed_bytes, INFLATE_SETTING)
        )
    view = memoryview(data)
    for info in infos:
        _check_member(view, info)


def _check_member(view: memoryview, info: zipfile.ZipInfo) -> None:
    """Fail unless the member ``info`` is plain or deflated and inflates to exactly its declared size."""
    name = repr(info.filename[:100])
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise Failed(f"unsupported zip compression method {info.compress_type} ({name})")
    if info.flag_bits & 0x1:
        raise Failed(f"encrypted .docx ({name})")
    start = info.header_offset
    header = view[start : start + _LOCAL_HEADER.size]
    if len(header) < _LOCAL_HEADER.size:
        raise Failed(f"corrupt .docx (member {name} lies outside the file)")
    signature, name_len, extra_len = _LOCAL_HEADER.unpack(header)
    if signature != b"PK\x03\x04":
        raise Failed(f"corrupt .docx (bad local header for {name})")
    begin = start + _LOCAL_HEADER.size + name_len + extra_len
    raw = view[begin : begin + info.compress_size]
    if len(raw) < info.compress_size:
        raise Failed(f"corrupt .docx (member {name} is truncated)")
    if info.compress_type == zipfile.ZIP_STORED:
        size = len(raw)
    else:
        try:
            size = _inflated_size(raw, info.file_size)
        except zlib.error as exc:
            raise Failed(f"corrupt .docx ({name}: {str(exc)[:200]})") from exc
    if size > info.file_size:
        raise Failed(
            f"corrupt .docx (member {name} inflates to more than its declared "
            f"{info.file_size:,} bytes)"
        )
    if size < info.file_size:
        raise Failed(f"corrupt .docx (member {name} is shorter than declared)")


def _inflated_size(raw: memoryview, cap: int) -> int:
    """How many bytes the raw deflate stream ``raw`` inflates to, stopping once past ``cap``."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    size = 0
    for offset in range(0, len(raw), _RAW_CHUNK):
        pending: bytes | memoryview = raw[offset : offset + _RAW_CHUNK]
        while pending and not inflater.eof:
            size += len(inflater.decompress(pending, _INFLATE_CHUNK))
            if size > cap:
                return size
            pending = inflater.unconsumed_tail
        if inflater.eof:
            break
    while not inflater.eof:  # output zlib still holds after the last input (bounded calls too)
        out = inflater.decompress(b"", _INFLATE_CHUNK)
        if not out:
            break
        size += len(out)
        if size > cap:
            break
    return size
