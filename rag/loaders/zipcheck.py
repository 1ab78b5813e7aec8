"""The zip inspector: measure a zip's members before anything inflates them for real.

``zipfile`` trusts the sizes a member declares: ``ZipFile.read`` inflates a whole member in one zlib
call of up to 2 GiB and only then cuts it to the declared size, so a member that declares 3 KB and
inflates to 1 GiB costs 1 GiB of memory there. ``check_zip_member`` inflates a member first, in
bounded chunks that are counted and dropped, and fails unless it stops at exactly its declared size;
after that, reading it with ``zipfile`` costs its declared size and no more.

Used by the .docx parser and by labelled datasets uploaded as zip archives (``rag.datasets``).
Failures are ``Failed`` with a reason that starts with ``corrupt <kind>``.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib

from rag.loaders.base import Failed, describe

__all__ = ["check_zip_member", "zip_members"]

_INFLATE_CHUNK = 1 << 20  # output bytes per zlib call while checking members: bounds memory
_RAW_CHUNK = 1 << 16  # compressed bytes fed per call (unconsumed_tail copies at most this)
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., name length, extra length


def zip_members(data: bytes, *, kind: str) -> list[zipfile.ZipInfo]:
    """The members a zip's central directory declares (nothing is inflated); ``Failed`` if it is no zip."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            return zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, struct.error) as exc:
        raise Failed(f"corrupt {kind} ({describe(exc)})") from exc


def check_zip_member(view: memoryview, info: zipfile.ZipInfo, *, kind: str) -> None:
    """Fail unless the member ``info`` of the zip in ``view`` is plain or deflated, not encrypted, and
    inflates to exactly its declared size."""
    name = repr(info.filename[:100])
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise Failed(f"unsupported zip compression method {info.compress_type} ({name})")
    if info.flag_bits & 0x1:
        raise Failed(f"encrypted {kind} ({name})")
    raw = _raw_member(view, info, name, kind)
    if info.compress_type == zipfile.ZIP_STORED:
        size = len(raw)
    else:
        try:
            size = _inflated_size(raw, info.file_size)
        except zlib.error as exc:
            raise Failed(f"corrupt {kind} ({name}: {str(exc)[:200]})") from exc
    if size > info.file_size:
        raise Failed(
            f"corrupt {kind} (member {name} inflates to more than its declared {info.file_size:,} bytes)"
        )
    if size < info.file_size:
        raise Failed(f"corrupt {kind} (member {name} is shorter than declared)")


def _raw_member(view: memoryview, info: zipfile.ZipInfo, name: str, kind: str) -> memoryview:
    """The member's compressed bytes, found through its local header."""
    start = info.header_offset
    header = view[start : start + _LOCAL_HEADER.size]
    if len(header) < _LOCAL_HEADER.size:
        raise Failed(f"corrupt {kind} (member {name} lies outside the file)")
    signature, name_len, extra_len = _LOCAL_HEADER.unpack(header)
    if signature != b"PK\x03\x04":
        raise Failed(f"corrupt {kind} (bad local header for {name})")
    begin = start + _LOCAL_HEADER.size + name_len + extra_len
    raw = view[begin : begin + info.compress_size]
    if len(raw) < info.compress_size:
        raise Failed(f"corrupt {kind} (member {name} is truncated)")
    return raw


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
