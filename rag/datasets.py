"""Labelled datasets: (query, document id) pairs parsed from bytes a tenant sent, never from a server path.

Formats:

- JSONL: one ``{"query": ..., "document_id": ...}`` object a line (other fields are ignored);
- JSON: ``{"name", "split"?, "pairs": [{"query", "document_id"}, ...]}`` (the API's JSON body; unknown
  fields are refused);
- a BEIR folder as a zip or a tar (plain, gzip, bzip2 or xz): ``queries.jsonl`` and
  ``qrels/<split>.tsv``, at the archive's top or inside one top-level folder. A qrels row (header
  ``query-id corpus-id score`` optional) with a score above 0 whose query is in ``queries.jsonl`` is a
  pair. Other members (a corpus) are not read: the documents are the tenant's own, already uploaded.

Archives are read in memory and never extracted. Refused: symbolic and hard links, devices and other
special members, absolute or ``..`` member names, more than ``max_members`` members, a member read past
``max_bytes``, members declaring more than ``max_inflated_bytes`` together, and a member (or a whole
compressed tar) inflating more than ``max_ratio`` times. A zip member is measured by the zip inspector
(``rag.loaders.check_zip_member``) before ``zipfile`` inflates it. Every refusal is a ``BadRequest``
(``PayloadTooLarge`` for a size limit) naming the member, line, split or setting.

``ingest.pairs.read_labelled`` (the CLI's local JSONL files and BEIR folders) uses the same parsers.
"""

from __future__ import annotations

import hashlib
import io
import lzma
import re
import secrets
import tarfile
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from stat import S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFMT, S_IFREG, S_IFSOCK
from typing import Annotated, Any, Literal

import msgspec

from rag.errors import BadRequest, PayloadTooLarge
from rag.jsonsafe import JsonTooDeep, check_json_depth
from rag.loaders import Failed, check_zip_member, zip_members

__all__ = [
    "DatasetFormat", "DatasetIn", "DatasetLimits", "DatasetRecord", "LabelledPair", "PairIn", "ParsedDataset",
    "check_name", "check_split", "default_name", "new_dataset_id", "parse_beir", "parse_json_body", "parse_jsonl",
    "parse_upload",
]

# "feedback": the pairs a tenant's chat frontend confirmed through POST /v1/feedback, one growing dataset.
DatasetFormat = Literal["jsonl", "json", "beir-zip", "beir-tar", "feedback"]
LabelledPair = tuple[str, str]  # (query, document id)

MAX_QUERY_CHARS = 2000
MAX_DOCUMENT_ID_CHARS = 512
MAX_NAME_CHARS = 200
SPLIT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
NAME_PATTERN = r"^[^\x00-\x1f\x7f]+$"
BYTES_SETTING = "RAG_DATASET_MAX_BYTES"
PAIRS_SETTING = "RAG_DATASET_MAX_PAIRS"
INFLATE_SETTING = "RAG_MAX_DECOMPRESSED_BYTES"
QUERIES_FILE = "queries.jsonl"
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_ZIP_KINDS = {S_IFLNK: "a symbolic link", S_IFCHR: "a character device", S_IFBLK: "a block device",
              S_IFIFO: "a FIFO", S_IFSOCK: "a socket"}
_TAR_KINDS = {
    tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link", tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device", tarfile.FIFOTYPE: "a FIFO", tarfile.GNUTYPE_SPARSE: "a sparse file",
    tarfile.CONTTYPE: "a contiguous file",
}


class DatasetLimits(msgspec.Struct, frozen=True, kw_only=True):
    """Bounds on one dataset upload; ``from_settings`` maps them to ``RAG_*`` settings.

    ``max_bytes`` caps the file or JSON body as sent and every archive member that is read;
    ``max_inflated_bytes`` caps what an archive's members declare together; ``max_ratio`` caps how many
    times a member (or a compressed tar) inflates, once it is over ``ratio_floor_bytes``.
    """

    max_bytes: int = 32 * 1024 * 1024
    max_pairs: int = 200_000
    max_inflated_bytes: int = 200 * 1024 * 1024
    max_members: int = 1000
    max_ratio: int = 100
    ratio_floor_bytes: int = 1024 * 1024
    max_query_chars: int = MAX_QUERY_CHARS
    max_document_id_chars: int = MAX_DOCUMENT_ID_CHARS
    max_json_depth: int = 32

    def __post_init__(self) -> None:
        for field in self.__struct_fields__:
            if getattr(self, field) < 1:
                raise ValueError(f"DatasetLimits.{field} must be positive")

    @classmethod
    def from_settings(cls, settings: Any) -> DatasetLimits:
        """The limits configured in ``settings`` (a ``rag.settings.Settings``)."""
        return cls(max_bytes=settings.dataset_max_bytes, max_pairs=settings.dataset_max_pairs,
                   max_inflated_bytes=settings.max_decompressed_bytes, max_json_depth=settings.max_json_depth)


class DatasetRecord(msgspec.Struct, kw_only=True):
    """A tenant's stored dataset (its pairs are read with ``Registry.dataset_pairs``)."""

    id: str
    tenant: str
    name: str
    split: str
    format: DatasetFormat
    pairs: int  # how many (query, document) pairs
    queries: int  # distinct queries among them
    bytes: int  # size of the file or JSON body as uploaded
    sha256: str  # of the file or JSON body as uploaded
    created_at: float = 0.0


class ParsedDataset(msgspec.Struct, kw_only=True):
    """An upload's pairs, and what its record says about the upload."""

    format: DatasetFormat
    split: str
    pairs: list[LabelledPair]
    size: int
    sha256: str


class PairIn(msgspec.Struct, forbid_unknown_fields=True):
    query: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_QUERY_CHARS)]
    document_id: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_DOCUMENT_ID_CHARS)]


DatasetName = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME_CHARS, pattern=NAME_PATTERN)]
Split = Annotated[str, msgspec.Meta(pattern=SPLIT_PATTERN)]


class DatasetIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The JSON body of ``POST /v1/datasets`` (the number of pairs is bounded by ``RAG_DATASET_MAX_PAIRS``)."""

    name: DatasetName
    pairs: Annotated[list[PairIn], msgspec.Meta(min_length=1)]
    split: Split = "train"


class _PairLine(msgspec.Struct):
    query: str
    document_id: str | int


class _QueryLine(msgspec.Struct):
    id: str | int = msgspec.field(name="_id")
    text: str


def new_dataset_id() -> str:
    """A random dataset id (``ds_`` and 96 random bits): ids reveal nothing and are never guessed."""
    return "ds_" + secrets.token_hex(12)


# ---- the entry points --------------------------------------------------------------------------------


def parse_upload(data: bytes, *, filename: str, split: str = "train",
                 limits: DatasetLimits = DatasetLimits()) -> ParsedDataset:
    """An uploaded file's pairs: a BEIR zip or tar (by content, or by a zip/tar name), else JSONL."""
    source = filename or "upload"
    _check_size(len(data), repr(source[:100]), limits)
    check_split(split)
    kind = _sniff(data, filename)
    beir_empty = f"no row of qrels/{split}.tsv with a score above 0 names a query of {QUERIES_FILE}"
    if kind == "zip":
        return _parsed("beir-zip", split, _zip_beir(data, split, limits), data, beir_empty)
    if kind == "tar":
        return _parsed("beir-tar", split, _tar_beir(data, split, limits), data, beir_empty)
    pairs = parse_jsonl(data, source=source, limits=limits)
    return _parsed("jsonl", split, pairs, data, f"{source[:100]!r} has no non-blank line")


def parse_json_body(body: bytes, limits: DatasetLimits = DatasetLimits()) -> tuple[str, ParsedDataset]:
    """The name and pairs of a JSON body (:class:`DatasetIn`)."""
    _check_size(len(body), "the JSON body", limits)
    try:
        check_json_depth(body, limits.max_json_depth)
        doc = msgspec.json.decode(body, type=DatasetIn)
    except JsonTooDeep as exc:
        raise BadRequest(f"body: {exc} (RAG_MAX_JSON_DEPTH)", code="json_too_deep") from exc
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid dataset: {exc}", code="validation_error") from exc
    except msgspec.DecodeError as exc:
        raise BadRequest(f"body is not valid JSON: {exc}", code="invalid_json") from exc
    _check_count(len(doc.pairs), "the JSON body", limits)
    pairs = [(_check_query(p.query, f"pairs[{i}]", limits), _check_document_id(p.document_id, f"pairs[{i}]", limits))
             for i, p in enumerate(doc.pairs)]
    return doc.name, _parsed("json", doc.split, pairs, body, "the body has none")


def parse_jsonl(data: bytes, *, source: str, limits: DatasetLimits = DatasetLimits()) -> list[LabelledPair]:
    """Pairs from ``{"query", "document_id"}`` lines (blank lines skipped); errors name ``source:line``."""
    pairs: list[LabelledPair] = []
    for n, line in _lines(data, source):
        where = f"{source}:{n}"
        row = _decode_line(line, _PairLine, where, 'expected {"query": ..., "document_id": ...}', limits)
        pairs.append((_check_query(row.query, where, limits), _check_document_id(str(row.document_id), where, limits)))
        _check_count(len(pairs), source, limits)
    return pairs


def parse_beir(queries: bytes, qrels: bytes, *, queries_source: str, qrels_source: str,
               limits: DatasetLimits = DatasetLimits()) -> list[LabelledPair]:
    """Pairs from a BEIR split: each qrels row scored above 0 whose query is in ``queries.jsonl``."""
    texts = _beir_queries(queries, queries_source, limits)
    pairs: list[LabelledPair] = []
    for n, line in _lines(qrels, qrels_source):
        where = f"{qrels_source}:{n}"
        cols = [c.strip() for c in line.split("\t")]
        if cols[0] in ("query-id", "query_id"):
            continue  # the header row (optional)
        if len(cols) < 3:
            raise BadRequest(f"{where}: expected 3 tab-separated columns (query-id, corpus-id, score), got "
                             f"{len(cols)}", code="invalid_dataset")
        try:
            score = float(cols[2])
        except ValueError as exc:
            raise BadRequest(f"{where}: score {cols[2][:50]!r} is not a number", code="invalid_dataset") from exc
        if score > 0 and cols[0] in texts:
            text, query_where = texts[cols[0]]
            pairs.append((_check_query(text, query_where, limits), _check_document_id(cols[1], where, limits)))
            _check_count(len(pairs), qrels_source, limits)
    return pairs


def check_split(split: str) -> str:
    """A split names a qrels file: 1-64 of ``[A-Za-z0-9._-]``, starting with a letter or digit."""
    if not re.fullmatch(SPLIT_PATTERN, split):
        raise BadRequest(f"split {split[:70]!r}: 1-64 of [A-Za-z0-9._-], starting with a letter or digit",
                         code="invalid_split")
    return split


def check_name(name: str) -> str:
    """A dataset's name: 1-200 characters, no control characters."""
    if not 1 <= len(name) <= MAX_NAME_CHARS or not re.fullmatch(NAME_PATTERN, name):
        raise BadRequest(f"name: 1-{MAX_NAME_CHARS} characters without control characters", code="invalid_name")
    return name


def default_name(filename: str | None) -> str:
    """A name for a dataset uploaded without one: its file name (cut to a valid name), else ``dataset``."""
    base = re.sub(r"[\x00-\x1f\x7f]", "", (filename or "").replace("\\", "/").rsplit("/", 1)[-1])
    return base[:MAX_NAME_CHARS] or "dataset"


# ---- lines, checks -----------------------------------------------------------------------------------


def _parsed(fmt: DatasetFormat, split: str, pairs: list[LabelledPair], data: bytes, empty: str) -> ParsedDataset:
    """The upload's record data; ``empty`` says why there is no pair, should there be none."""
    if not pairs:
        raise BadRequest(f"no labelled pairs: {empty}", code="empty_dataset")
    return ParsedDataset(format=fmt, split=split, pairs=pairs, size=len(data), sha256=hashlib.sha256(data).hexdigest())


def _lines(data: bytes, source: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of UTF-8 text, blank lines skipped; invalid UTF-8 names its line."""
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, bom + exc.start) + 1
        raise BadRequest(f"{source}:{line}: not UTF-8 text (byte {bom + exc.start})", code="invalid_utf8") from exc
    # Only "\n" ends a line: str.splitlines would also split at U+2028, which a JSON string may hold.
    for n, line in enumerate(text.split("\n"), 1):
        if line.strip():
            yield n, line.rstrip("\r")


def _decode_line(line: str, type_: type, where: str, expected: str, limits: DatasetLimits) -> Any:
    try:
        check_json_depth(line, limits.max_json_depth)
        return msgspec.json.decode(line, type=type_)
    except JsonTooDeep as exc:
        raise BadRequest(f"{where}: {exc}", code="json_too_deep") from exc
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise BadRequest(f"{where}: {expected} ({exc})", code="invalid_dataset") from exc


def _beir_queries(data: bytes, source: str, limits: DatasetLimits) -> dict[str, tuple[str, str]]:
    """query id → (text, where it was read)."""
    out: dict[str, tuple[str, str]] = {}
    for n, line in _lines(data, source):
        where = f"{source}:{n}"
        row = _decode_line(line, _QueryLine, where, 'expected {"_id": ..., "text": ...}', limits)
        out[str(row.id)] = (row.text, where)
    return out


def _check_query(query: str, where: str, limits: DatasetLimits) -> str:
    if not query.strip():
        raise BadRequest(f"{where}: the query is empty", code="invalid_dataset")
    if len(query) > limits.max_query_chars:
        raise BadRequest(f"{where}: the query is {len(query):,} characters; the limit is {limits.max_query_chars:,}",
                         code="query_too_long")
    return query


def _check_document_id(document_id: str, where: str, limits: DatasetLimits) -> str:
    if not document_id.strip():
        raise BadRequest(f"{where}: the document id is empty", code="invalid_dataset")
    if len(document_id) > limits.max_document_id_chars:
        raise BadRequest(f"{where}: the document id is {len(document_id):,} characters; the limit is "
                         f"{limits.max_document_id_chars:,}", code="invalid_document_id")
    return document_id


def _check_size(size: int, what: str, limits: DatasetLimits) -> None:
    if size > limits.max_bytes:
        raise PayloadTooLarge(f"{what} is {size:,} bytes; the limit is {limits.max_bytes:,} ({BYTES_SETTING})")


def _check_count(pairs: int, source: str, limits: DatasetLimits) -> None:
    if pairs > limits.max_pairs:
        raise PayloadTooLarge(f"{source} holds more than {limits.max_pairs:,} pairs; the limit is "
                              f"{limits.max_pairs:,} ({PAIRS_SETTING})", code="too_many_pairs")


# ---- archives ----------------------------------------------------------------------------------------


def _sniff(data: bytes, filename: str) -> Literal["zip", "tar", "jsonl"]:
    if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if data[:2] == b"\x1f\x8b" or data[:3] == b"BZh" or data[:6] == b"\xfd7zXZ\x00" or data[257:262] == b"ustar":
        return "tar"
    lower = filename.lower()
    if lower.endswith(".zip"):
        return "zip"  # not a zip after all: refused as a corrupt one, not misread as JSONL
    return "tar" if lower.endswith(_TAR_SUFFIXES) else "jsonl"


def _safe_name(name: str, archive: str) -> str:
    """A member's name without ``.`` parts; absolute names and ``..`` parts are refused."""
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts:
        raise BadRequest(f"{archive} member {name[:100]!r} has an absolute or '..' path", code="unsafe_archive")
    return "/".join(p for p in parts if p not in ("", "."))


def _check_ratio(what: str, inflated: int, compressed: int, limits: DatasetLimits) -> None:
    if inflated > limits.ratio_floor_bytes and inflated > limits.max_ratio * max(compressed, 1):
        raise BadRequest(f"{what} inflates {inflated // max(compressed, 1):,} times ({compressed:,} bytes to "
                         f"{inflated:,}); a compression ratio over {limits.max_ratio} is refused as a "
                         "decompression bomb", code="unsafe_archive")


def _check_inflated(total: int, archive: str, limits: DatasetLimits) -> None:
    if total > limits.max_inflated_bytes:
        raise PayloadTooLarge(f"the {archive}'s members inflate to more than {limits.max_inflated_bytes:,} bytes "
                              f"({INFLATE_SETTING})", code="archive_too_large")


def _check_members(count: int, archive: str, limits: DatasetLimits) -> None:
    if count > limits.max_members:
        raise BadRequest(f"the {archive} has more than {limits.max_members:,} members", code="unsafe_archive")


def _check_member_size(name: str, size: int, limits: DatasetLimits) -> None:
    if size > limits.max_bytes:
        raise PayloadTooLarge(f"member {name[:100]!r} is {size:,} bytes; the limit is {limits.max_bytes:,} "
                              f"({BYTES_SETTING})")


def _beir_paths(names: Iterable[str], split: str, archive: str) -> tuple[str, str]:
    """The archive's queries.jsonl and qrels/<split>.tsv, at its top or in one top-level folder."""
    names = set(names)
    roots = sorted({n[: -len(QUERIES_FILE)] for n in names
                    if n == QUERIES_FILE or (n.endswith("/" + QUERIES_FILE) and n.count("/") == 1)})
    if not roots:
        raise BadRequest(f"the {archive} has no {QUERIES_FILE} (at its top or in one top-level folder)",
                         code="not_a_beir_archive")
    if len(roots) > 1:
        raise BadRequest(f"the {archive} has more than one {QUERIES_FILE}: "
                         f"{', '.join(r + QUERIES_FILE for r in roots[:5])}", code="not_a_beir_archive")
    root = roots[0]
    qrels = f"{root}qrels/{split}.tsv"
    if qrels not in names:
        prefix = f"{root}qrels/"
        present = sorted(n[len(prefix):-4] for n in names
                         if n.startswith(prefix) and n.endswith(".tsv") and "/" not in n[len(prefix):])
        raise BadRequest(f"the {archive} has no {qrels}: split {split!r} is missing (splits present: "
                         f"{', '.join(present[:20]) or 'none'})", code="missing_split")
    return root + QUERIES_FILE, qrels


def _maybe_beir(name: str, split: str) -> bool:
    """Whether a tar member could be the queries or the split's qrels (the tar is read in one pass)."""
    parts = name.split("/")
    return (parts[-1] == QUERIES_FILE and len(parts) <= 2) or (
        parts[-2:] == ["qrels", f"{split}.tsv"] and len(parts) <= 3)


def _zip_beir(data: bytes, split: str, limits: DatasetLimits) -> list[LabelledPair]:
    try:
        files = _zip_files(zip_members(data, kind="zip"), limits)
    except Failed as exc:
        raise BadRequest(str(exc), code="invalid_archive") from exc
    queries, qrels = _beir_paths(files, split, "zip")
    return parse_beir(_zip_read(data, files[queries], limits), _zip_read(data, files[qrels], limits),
                      queries_source=queries, qrels_source=qrels, limits=limits)


def _zip_files(infos: list[zipfile.ZipInfo], limits: DatasetLimits) -> dict[str, zipfile.ZipInfo]:
    """The zip's regular files by safe name; refuses what the module docstring lists."""
    _check_members(len(infos), "zip", limits)
    files: dict[str, zipfile.ZipInfo] = {}
    total = 0
    for info in infos:
        name = _safe_name(info.filename, "zip")
        mode = S_IFMT(info.external_attr >> 16)
        if mode not in (0, S_IFREG, S_IFDIR):  # a Unix mode other than file or folder: a symlink, a device…
            kind = _ZIP_KINDS.get(mode, "a special file")
            raise BadRequest(f"zip member {name[:100]!r} is {kind}; only regular files and folders are read",
                             code="unsafe_archive")
        if info.is_dir() or not name:
            continue
        if name in files:
            raise BadRequest(f"zip member {name[:100]!r} appears twice", code="unsafe_archive")
        total += info.file_size
        _check_inflated(total, "zip", limits)
        _check_ratio(f"zip member {name[:100]!r}", info.file_size, info.compress_size, limits)
        files[name] = info
    return files


def _zip_read(data: bytes, info: zipfile.ZipInfo, limits: DatasetLimits) -> bytes:
    """One member's bytes, after the inspector has seen it inflate to exactly its declared size."""
    _check_member_size(info.filename, info.file_size, limits)
    try:
        check_zip_member(memoryview(data), info, kind="zip")
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            return zf.read(info)
    except Failed as exc:
        raise BadRequest(str(exc), code="invalid_archive") from exc
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, zlib.error) as exc:  # a CRC mismatch, mostly
        raise BadRequest(f"corrupt zip ({type(exc).__name__}: {str(exc)[:200]})", code="invalid_archive") from exc


def _tar_beir(data: bytes, split: str, limits: DatasetLimits) -> list[LabelledPair]:
    names, kept = _tar_scan(data, split, limits)
    queries, qrels = _beir_paths(names, split, "tar")
    return parse_beir(kept[queries], kept[qrels], queries_source=queries, qrels_source=qrels, limits=limits)


def _tar_scan(data: bytes, split: str, limits: DatasetLimits) -> tuple[list[str], dict[str, bytes]]:
    """One streaming pass over the tar: every regular file's name, and the bytes of those that may be BEIR's.

    Stream mode never seeks, so each member's declared size is checked before the stream moves past it.
    """
    names: list[str] = []
    kept: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as tf:
            total = 0
            for count, member in enumerate(tf, 1):
                _check_members(count, "tar", limits)
                name = _safe_name(member.name, "tar")
                if member.isdir() or not name:
                    continue
                _check_tar_member(member, name, len(data), limits)
                if name in names:
                    raise BadRequest(f"tar member {name[:100]!r} appears twice", code="unsafe_archive")
                total += member.size
                _check_inflated(total, "tar", limits)
                names.append(name)
                if _maybe_beir(name, split):
                    _check_member_size(name, member.size, limits)
                    kept[name] = _tar_read(tf, member)
            _check_ratio("the tar", tf.offset, len(data), limits)
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError, ValueError) as exc:
        raise BadRequest(f"corrupt tar ({type(exc).__name__}: {str(exc)[:200]})", code="invalid_archive") from exc
    return names, kept


def _check_tar_member(member: tarfile.TarInfo, name: str, archive_size: int, limits: DatasetLimits) -> None:
    if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or member.issparse():
        kind = _TAR_KINDS.get(member.type, f"a special member (type {member.type!r})")
        kind = "a sparse file" if member.issparse() else kind
        raise BadRequest(f"tar member {name[:100]!r} is {kind}; only regular files and folders are read",
                         code="unsafe_archive")
    # No member of a legitimate archive inflates past max_ratio times the whole archive's size.
    _check_ratio(f"tar member {name[:100]!r}", member.size, archive_size, limits)


def _tar_read(tf: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = tf.extractfile(member)
    if handle is None:  # not a regular file (checked before; kept for the type checker)
        raise BadRequest(f"tar member {member.name[:100]!r} cannot be read", code="invalid_archive")
    with handle:
        return handle.read()
