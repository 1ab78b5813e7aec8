"""Word (.docx): paragraphs and tables in document order, "Heading N" styles as Markdown headings.

The zip is inspected before python-docx opens it (``_check_docx_zip``, with ``rag.loaders.zipcheck``),
because ``zipfile`` trusts the sizes a member declares.
"""

from __future__ import annotations

import io
import re
import struct
import zipfile
import zlib
from typing import Any

from rag.loaders.base import INFLATE_SETTING, Failed, LoadLimits, Parsed, describe, over, text_over
from rag.loaders.zipcheck import check_zip_member, zip_members

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


# -- the zip inspector (rag.loaders.zipcheck) ----------------------------------------------------


def _check_docx_zip(data: bytes, limits: LoadLimits) -> None:
    """Refuse a .docx zip before python-docx reads it: too big inflated, odd methods, lying sizes.

    Each member is inflated first in bounded chunks (``check_zip_member``) and must stop at exactly
    its declared size; the declared sizes together must fit ``max_decompressed_bytes``.
    """
    infos = zip_members(data, kind=".docx")
    declared = sum(info.file_size for info in infos)
    if declared > limits.max_decompressed_bytes:
        raise Failed(
            over(".docx inflates to", declared, "bytes", limits.max_decompressed_bytes, INFLATE_SETTING)
        )
    view = memoryview(data)
    for info in infos:
        check_zip_member(view, info, kind=".docx")
