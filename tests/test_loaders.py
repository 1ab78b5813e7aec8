"""rag.loaders: real files of every supported format, good and broken."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import docx
import pytest
from fpdf import FPDF
from pypdf import PdfReader, PdfWriter

from rag.errors import DocumentError
from rag.loaders import (
    SUPPORTED_SUFFIXES,
    LoadFailure,
    LoadLimits,
    default_document_id,
    load,
    load_document,
    normalize_text,
)
from rag.settings import Settings
from rag.types import Document
from tests import hostile_files as hostile

SCIFACT = Path("/work/shared/data/scifact/corpus.jsonl")

try:  # pypdf needs it for AES (the pypdf[crypto] extra); RC4 works without it
    import cryptography  # noqa: F401

    HAS_CRYPTO = True
except ImportError:
    HAS_CRYPTO = False
needs_crypto = pytest.mark.skipif(not HAS_CRYPTO, reason="AES needs the cryptography package")


def one(filename: str, data: bytes, **kwargs) -> Document | LoadFailure:
    results = list(load(filename, data, **kwargs))
    assert len(results) == 1, results
    return results[0]


def ok(filename: str, data: bytes, **kwargs) -> Document:
    result = one(filename, data, **kwargs)
    assert isinstance(result, Document), result
    return result


def failure(filename: str, data: bytes, **kwargs) -> LoadFailure:
    result = one(filename, data, **kwargs)
    assert isinstance(result, LoadFailure), result
    return result


# -- builders for real files ----------------------------------------------------------------------


def make_pdf(pages: list[str], title: str | None = None) -> bytes:
    pdf = FPDF()
    if title:
        pdf.set_title(title)
    pdf.set_font("Helvetica", size=12)
    for page in pages:
        pdf.add_page()
        pdf.multi_cell(0, 10, page)
    return bytes(pdf.output())


def encrypt_pdf(data: bytes, user_password: str, algorithm: str) -> bytes:
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(data)))
    writer.encrypt(user_password, owner_password="owner-secret", algorithm=algorithm)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def make_docx() -> bytes:
    document = docx.Document()
    document.core_properties.title = "Quarterly Report"
    document.add_heading("Summary", level=1)
    document.add_paragraph("Revenue grew   by ten percent.")
    document.add_heading("Details", level=2)
    table = document.add_table(rows=2, cols=2)
    table.cell(0, 0).text = "Region"
    table.cell(0, 1).text = "Sales"
    merged = table.cell(1, 0).merge(table.cell(1, 1))
    merged.text = "All regions"
    document.add_paragraph("")
    document.add_paragraph("Closing remarks.")
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


# -- ids, dispatch, normalization -----------------------------------------------------------------


def test_default_document_id_is_readable_and_deterministic() -> None:
    assert default_document_id("report-2024_v1.pdf") == "report-2024_v1.pdf"
    assert default_document_id("dir/sub/notes.md") == "notes.md"
    assert default_document_id(r"C:\Users\me\notes.md") == "notes.md"
    spaced = default_document_id("my report.txt")
    assert spaced.startswith("my_report-") and spaced.endswith(".txt")
    assert spaced == default_document_id("my report.txt")
    assert default_document_id("résumé.txt").startswith("resume-")
    # names that sanitize to the same characters still get distinct ids
    assert default_document_id("報告.pdf") != default_document_id("計画.pdf")
    for name in ["", ".", "..", "x" * 500 + ".txt", "a b/c?d*.txt", "報告.pdf"]:
        doc_id = default_document_id(name)
        assert 0 < len(doc_id) <= 200
        assert all(c.isascii() and (c.isalnum() or c in "._-") for c in doc_id)
        assert doc_id not in {".", ".."}


def test_supported_suffixes() -> None:
    assert SUPPORTED_SUFFIXES == {
        ".txt", ".md", ".markdown", ".html", ".htm", ".pdf", ".docx", ".jsonl",
    }  # fmt: skip


def test_unsupported_suffix_names_the_supported_ones() -> None:
    result = failure("slides.pptx", b"whatever")
    assert "unsupported" in result.reason and ".pptx" in result.reason
    assert ".pdf" in result.reason and ".docx" in result.reason
    assert failure("README", b"text").reason.startswith("unsupported")


def test_suffix_dispatch_is_case_insensitive() -> None:
    doc = ok("NOTES.TXT", b"hello")
    assert doc.text == "hello"
    assert doc.metadata["format"] == "text"


def test_normalize_text() -> None:
    raw = "\ufeffa\r\nb\rc  \t\n\x00d\x07e\x0cf\n\n\n\n\n\ng\u2028h   \n\n"
    assert normalize_text(raw) == "a\nb\nc\nde\nf\n\n\ng\nh"
    assert normalize_text("  indented first line") == "  indented first line"
    assert normalize_text("\n\n \n  \n") == ""
    assert normalize_text("lone \ud800 surrogate") == "lone  surrogate"


# -- txt / md -------------------------------------------------------------------------------------


def test_txt_loads_with_id_title_source_metadata() -> None:
    data = "Line one  \r\nLine two\r\n\r\n\r\n\r\n\r\nPara 2 — ünïcode ✓\r\n".encode()
    doc = ok("docs/notes.txt", data, metadata={"tenant": "acme"})
    assert doc.id == "notes.txt"
    assert doc.title == "notes.txt"
    assert doc.source == "docs/notes.txt"
    assert doc.text == "Line one\nLine two\n\n\nPara 2 — ünïcode ✓"
    assert doc.metadata == {"format": "text", "tenant": "acme"}


def test_given_id_and_title_win() -> None:
    doc = ok("a.md", b"# Own Title\n\nbody", document_id="doc-1", title="  Given   Title ")
    assert (doc.id, doc.title) == ("doc-1", "Given Title")


def test_utf8_bom_is_stripped() -> None:
    doc = ok("bom.txt", b"\xef\xbb\xbfhello")
    assert doc.text == "hello"


def test_utf16_with_bom_is_decoded() -> None:
    doc = ok("win.txt", "Grüße aus Windows".encode("utf-16"))
    assert doc.text == "Grüße aus Windows"


def test_non_utf8_text_fails_instead_of_decoding_garbage() -> None:
    result = failure("latin1.txt", "café crème".encode("latin-1"))
    assert result.reason == "not valid UTF-8 text"
    assert result.document_id == "latin1.txt"
    assert result.source == "latin1.txt"


def test_binary_data_in_txt_fails() -> None:
    result = failure("blob.txt", b"abc\x00\x00\x01\x02def")
    assert "binary" in result.reason


@pytest.mark.parametrize("data", [b"", b"   \n\t\r\n  ", b"\xef\xbb\xbf\n\n"])
def test_empty_documents_fail(data: bytes) -> None:
    assert failure("empty.txt", data).reason == "empty document"


def test_control_characters_only_is_empty() -> None:
    assert failure("ctl.md", b"\x07\x08\x1b\n").reason == "empty document"


def test_markdown_title_is_first_h1_outside_code() -> None:
    data = b"Intro text\n\n```\n# not a title\n```\n\n## Second level\n\n# Real Title #\n\nBody"
    doc = ok("guide.md", data)
    assert doc.title == "Real Title"
    assert doc.metadata["format"] == "markdown"
    assert doc.text == data.decode()
    assert ok("plain.markdown", b"no heading here").title == "plain.markdown"


# -- HTML -----------------------------------------------------------------------------------------

HTML = b"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>  The   Page  </title>
<style>body { color: red }</style><script>var secret = "script text";</script></head>
<body>
<!-- a comment -->
<noscript>enable javascript</noscript>
<template><p>template text</p></template>
<h1>Install</h1>
<p>Hello <b>bold</b>
   world.<br>Next&nbsp;line</p>
<script>alert("inline script")</script>
<h2>Linux &amp; BSD</h2>
<ul><li>first item</li><li>second <em>item</em></li></ul>
<table><tr><th>Name</th><th>Value</th></tr><tr><td>a</td><td>1</td></tr></table>
<div>Closing <span>words</span>.</div>
</body></html>"""


def test_html_text_headings_and_title() -> None:
    doc = ok("page.html", HTML)
    assert doc.title == "The Page"
    assert doc.metadata["format"] == "html"
    assert doc.text == (
        "# Install\n\n"
        "Hello bold world.\nNext line\n\n"
        "## Linux & BSD\n\n"
        "first item\nsecond item\n\n"
        "Name | Value\na | 1\n\n"
        "Closing words."
    )
    for dropped in ("secret", "inline script", "enable javascript", "template text", "comment"):
        assert dropped not in doc.text


def test_html_without_title_uses_file_name() -> None:
    doc = ok("frag.htm", b"<p>just a fragment</p>")
    assert (doc.title, doc.text) == ("frag.htm", "just a fragment")


def test_html_meta_charset_used_when_not_utf8() -> None:
    page = (
        '<html><head><meta charset="windows-1252"><title>Caf\xe9</title></head>'
        "<body><p>cr\xe8me br\xfbl\xe9e</p></body></html>"
    )
    data = page.encode("cp1252")
    doc = ok("legacy.html", data)
    assert doc.title == "Café"
    assert doc.text == "crème brûlée"
    data2 = (
        b'<meta http-equiv="Content-Type" content="text/html; charset=iso-8859-1">'
        b"<p>na\xefve</p>"
    )
    assert ok("legacy2.html", data2).text == "naïve"


def test_html_non_utf8_without_charset_fails() -> None:
    result = failure("bad.html", "<p>café</p>".encode("latin-1"))
    assert result.reason == "not valid UTF-8 text"
    bogus = failure("bogus.html", b'<meta charset="no-such-codec"><p>caf\xe9</p>')
    assert "no-such-codec" in bogus.reason


def test_html_with_only_scripts_is_empty() -> None:
    assert failure("js.html", b"<script>x()</script><style>a{}</style>").reason == "empty document"


def test_deeply_nested_html_does_not_crash() -> None:
    data = b"<div>" * 3000 + b"deep text" + b"</div>" * 3000
    result = one("deep.html", data)
    if isinstance(result, Document):
        assert "deep text" in result.text
    else:
        assert "HTML" in result.reason


# -- PDF ------------------------------------------------------------------------------------------


def test_pdf_pages_joined_and_metadata_title() -> None:
    data = make_pdf(["First page says hello.", "Second page says goodbye."], title="A PDF Title")
    doc = ok("paper.pdf", data)
    assert doc.text == "First page says hello.\n\nSecond page says goodbye."
    assert doc.title == "A PDF Title"
    assert doc.metadata == {"format": "pdf", "pages": 2}


def test_pdf_without_metadata_title_uses_file_name() -> None:
    assert ok("untitled.pdf", make_pdf(["text"])).title == "untitled.pdf"


@pytest.mark.parametrize("algorithm", [pytest.param("AES-256", marks=needs_crypto), "RC4-128"])
def test_encrypted_pdf_with_password_fails(algorithm: str) -> None:
    data = encrypt_pdf(make_pdf(["secret content"]), "user-secret", algorithm)
    result = failure("locked.pdf", data)
    assert result.reason.startswith("encrypted PDF")


@pytest.mark.parametrize("algorithm", [pytest.param("AES-128", marks=needs_crypto), "RC4-40"])
def test_encrypted_pdf_with_empty_user_password_loads(algorithm: str) -> None:
    data = encrypt_pdf(make_pdf(["readable content"]), "", algorithm)
    assert ok("owner-only.pdf", data).text == "readable content"


@needs_crypto
def test_aes_pdf_without_cryptography_fails_clearly() -> None:
    data = encrypt_pdf(make_pdf(["readable content"]), "", "AES-128")
    code = (
        "import sys\n"
        "sys.modules['cryptography'] = None  # as if it were not installed\n"
        "from rag.loaders import load\n"
        "(result,) = load('aes.pdf', sys.stdin.buffer.read())\n"
        "print(result.reason)\n"
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", code], input=data, capture_output=True, cwd=root, timeout=60
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert proc.stdout.decode().startswith("encrypted PDF (cannot decrypt: cryptography")


def test_pdf_without_text_layer_fails() -> None:
    pdf = FPDF()
    pdf.add_page()
    pdf.rect(10, 10, 50, 50)
    result = failure("scan.pdf", bytes(pdf.output()))
    assert "no text layer" in result.reason


@pytest.mark.parametrize("cut", [0.5, 0.1])
def test_truncated_pdf_fails(cut: float) -> None:
    data = make_pdf(["Some text that will be cut off."])
    result = failure("cut.pdf", data[: int(len(data) * cut)])
    assert result.reason.startswith("corrupt PDF")


def test_garbage_pdf_fails() -> None:
    assert failure("junk.pdf", b"%PDF-1.7\n" + b"\x13\x37garbage" * 40).reason.startswith(
        "corrupt PDF"
    )
    assert failure("notpdf.pdf", b"hello, I am plain text").reason.startswith("corrupt PDF")


# -- docx -----------------------------------------------------------------------------------------


def test_docx_headings_paragraphs_tables() -> None:
    doc = ok("report.docx", make_docx())
    assert doc.title == "Quarterly Report"
    assert doc.metadata == {"format": "docx"}
    assert doc.text == (
        "# Summary\n\n"
        "Revenue grew by ten percent.\n\n"
        "## Details\n\n"
        "Region | Sales\nAll regions\n\n"
        "Closing remarks."
    )


def test_docx_without_title_uses_file_name() -> None:
    document = docx.Document()
    document.add_paragraph("Only a paragraph.")
    out = io.BytesIO()
    document.save(out)
    doc = ok("plain.docx", out.getvalue())
    assert (doc.title, doc.text) == ("plain.docx", "Only a paragraph.")


def test_corrupt_docx_fails() -> None:
    assert failure("bad.docx", b"PK\x03\x04 not really a zip").reason.startswith("corrupt .docx")
    data = make_docx()
    assert failure("cut.docx", data[: len(data) // 2]).reason.startswith("corrupt .docx")
    other_zip = io.BytesIO()
    with zipfile.ZipFile(other_zip, "w") as zf:
        zf.writestr("hello.txt", "hi")
    assert failure("zip.docx", other_zip.getvalue()).reason.startswith("corrupt .docx")


def test_empty_docx_fails() -> None:
    out = io.BytesIO()
    docx.Document().save(out)
    assert failure("blank.docx", out.getvalue()).reason == "empty document"


# -- JSONL (BEIR) ---------------------------------------------------------------------------------


def test_jsonl_bad_lines_fail_alone() -> None:
    lines = [
        json.dumps(
            {"_id": "d1", "title": "One", "text": "First text.", "metadata": {"year": 2020}}
        ),
        "",
        "{not json",
        json.dumps({"title": "no id", "text": "x"}),
        json.dumps({"_id": 7, "title": "", "text": "Integer id."}),
        json.dumps({"_id": "d3", "title": "", "text": "   "}),
        json.dumps(["not", "an", "object"]),
        json.dumps({"_id": True, "text": "bool id"}),
        json.dumps({"_id": "d4", "title": "Title only", "text": ""}),
        json.dumps({"_id": "d5", "text": "bad metadata", "metadata": [1]}),
        json.dumps({"_id": "d1", "text": "duplicate"}),
        json.dumps({"_id": "d6", "text": "Last line, CRLF ended."}),
    ]
    data = ("\r\n".join(lines) + "\r\n").encode()
    results = list(load("corpus.jsonl", data, metadata={"corpus": "test"}, document_id="ignored"))
    docs = [r for r in results if isinstance(r, Document)]
    failures = [r for r in results if isinstance(r, LoadFailure)]
    assert [d.id for d in docs] == ["d1", "7", "d4", "d6"]
    assert docs[0].title == "One" and docs[0].text == "First text."
    assert docs[0].metadata == {"corpus": "test", "year": 2020}
    assert docs[0].source == "corpus.jsonl"
    assert docs[2].text == "Title only" and docs[2].title == "Title only"
    assert docs[3].text == "Last line, CRLF ended."
    reasons = {f.reason.split(":")[0]: f for f in failures}
    assert set(reasons) == {"line 3", "line 4", "line 6", "line 7", "line 8", "line 10", "line 11"}
    assert "invalid JSON" in reasons["line 3"].reason
    assert "missing _id" in reasons["line 4"].reason
    assert "no text and no title" in reasons["line 6"].reason
    assert reasons["line 6"].document_id == "d3"
    assert "object" in reasons["line 7"].reason
    assert "_id must be" in reasons["line 8"].reason
    assert "metadata" in reasons["line 10"].reason
    assert "duplicate" in reasons["line 11"].reason
    assert all(f.source == "corpus.jsonl" for f in failures)


def test_jsonl_invalid_utf8_line_fails_alone() -> None:
    data = (
        b'{"_id": "a", "text": "ok"}\n'
        b'{"_id": "b", "text": "caf\xe9"}\n'
        b'{"_id": "c", "text": "ok too"}\n'
    )
    results = list(load("c.jsonl", data))
    assert [type(r).__name__ for r in results] == ["Document", "LoadFailure", "Document"]
    assert results[1].reason == "line 2: not valid UTF-8 text"


def test_empty_jsonl_fails() -> None:
    assert failure("empty.jsonl", b"\n\n  \n").reason == "empty document"


def test_scifact_lines_load() -> None:
    if not SCIFACT.exists():
        pytest.skip("SciFact corpus not available")
    with SCIFACT.open("rb") as fh:
        head = b"".join(next(fh) for _ in range(3))
    docs = list(load("scifact.jsonl", head))
    assert len(docs) == 3 and all(isinstance(d, Document) for d in docs)
    first = json.loads(head.splitlines()[0])
    assert docs[0].id == first["_id"]
    assert docs[0].title == first["title"]
    assert docs[0].text == first["text"].strip()


# -- load_document --------------------------------------------------------------------------------


def test_load_document_raises_document_error() -> None:
    assert load_document("a.txt", b"hi").text == "hi"
    with pytest.raises(DocumentError, match="empty document"):
        load_document("a.txt", b"")
    with pytest.raises(DocumentError, match="expected one"):
        load_document("c.jsonl", b'{"_id": "1", "text": "a"}\n{"_id": "2", "text": "b"}\n')
    error = LoadFailure("x", "x.pdf", "encrypted PDF").to_error()
    assert isinstance(error, DocumentError) and error.status_code == 422


# -- hostile files ----------------------------------------------------------------------------------


def test_jsonl_deep_line_fails_alone() -> None:
    results = list(load("deep.jsonl", hostile.jsonl_deep_line()))
    assert [type(r).__name__ for r in results] == ["LoadFailure", "Document"]
    assert results[0].reason == "line 1: JSON nests more than 32 levels deep (RAG_MAX_JSON_DEPTH)"
    assert (results[1].id, results[1].text) == ("ok", "fine")


def test_jsonl_hostile_invalid_utf8_line() -> None:
    results = list(load("utf.jsonl", hostile.invalid_utf8_jsonl()))
    assert [type(r).__name__ for r in results] == ["Document", "LoadFailure"]
    assert results[0].id == "good"
    assert results[1].reason == "line 2: not valid UTF-8 text"


def test_docx_corrupt_deflate_fails() -> None:
    reason = failure("bad.docx", hostile.docx_corrupt_deflate()).reason
    assert reason.startswith("corrupt .docx ('word/document.xml': Error -3"), reason
    assert "invalid block type" in reason


def test_docx_unsupported_compression_method_fails() -> None:
    reason = failure("aes.docx", hostile.docx_compression_99()).reason
    assert reason.startswith("unsupported zip compression method 99 ("), reason


def test_docx_bomb_fails_on_declared_size() -> None:
    data = hostile.docx_bomb()
    assert len(data) < 2_000_000  # the builder stays small
    reason = failure("bomb.docx", data).reason
    assert reason.startswith(".docx inflates to 1,07"), reason
    assert reason.endswith("bytes; the limit is 209,715,200 (RAG_MAX_DECOMPRESSED_BYTES)")


def test_docx_bomb_lying_about_its_size_fails() -> None:
    # The headers declare 3,000 bytes (with a matching CRC); the member inflates to 1 GiB.
    reason = failure("liar.docx", hostile.docx_bomb(declared_size=3000)).reason
    assert reason == (
        "corrupt .docx (member 'word/document.xml' inflates to more than its declared 3,000 bytes)"
    )


def test_docx_bombs_do_not_inflate_in_memory() -> None:
    # A fresh process, so that the peak RSS is this load's and not an earlier test's.
    code = (
        "import resource, sys\n"
        "import docx, pypdf\n"
        "from rag.loaders import load\n"
        "from tests import hostile_files as hostile\n"
        "honest, liar = hostile.docx_bomb(), hostile.docx_bomb(declared_size=3000)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "for data in (honest, liar):\n"
        "    (result,) = load('bomb.docx', data)\n"
        "    assert type(result).__name__ == 'LoadFailure', result\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print((after - before) // 1024)\n"
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=root, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    grown_mib = int(proc.stdout.decode().split()[-1])
    assert grown_mib < 100  # zipfile alone would take 1-2 GiB for these


def test_docx_of_padding_within_limits_loads() -> None:
    doc = ok("padded.docx", hostile.docx_bomb(inflated=2 << 20))
    assert doc.text == "bomb"  # 2 MiB of spaces collapse away


def test_docx_over_custom_decompressed_limit() -> None:
    limits = LoadLimits(max_decompressed_bytes=1 << 20)
    reason = failure("padded.docx", hostile.docx_bomb(inflated=2 << 20), limits=limits).reason
    assert reason.startswith(".docx inflates to 2,")
    assert reason.endswith("the limit is 1,048,576 (RAG_MAX_DECOMPRESSED_BYTES)")
    assert isinstance(one("ok.docx", hostile.docx_valid(), limits=limits), Document)


def test_pdf_unknown_filter_page_is_unreadable() -> None:
    reason = failure("filter.pdf", hostile.pdf_unknown_filter()).reason
    assert reason == "corrupt PDF (no page could be read, 1 failed: NotImplementedError)"
    doc = ok("filter2.pdf", hostile.pdf_unknown_filter(good_pages=2))
    assert doc.metadata == {"format": "pdf", "pages": 3, "unreadable_pages": [1]}
    assert doc.text == "Hostile page text\n\nHostile page text"


def test_pdf_with_too_many_pages_fails_before_extracting() -> None:
    reason = failure("many.pdf", hostile.pdf_many_pages()).reason
    assert reason == "PDF has 10,000 pages; the limit is 2,000 (RAG_MAX_PDF_PAGES)"
    # 2**40 pages in about 2 KB: refused without flattening the page tree
    huge = failure("huge.pdf", hostile.pdf_many_pages(2**40)).reason
    assert huge.endswith("pages; the limit is 2,000 (RAG_MAX_PDF_PAGES)")


def test_pdf_page_limit_boundary() -> None:
    limits = LoadLimits(max_pages=5)
    doc = ok("five.pdf", hostile.pdf_many_pages(5), limits=limits)
    assert doc.metadata["pages"] == 5
    reason = failure("six.pdf", hostile.pdf_many_pages(6), limits=limits).reason
    assert reason == "PDF has 6 pages; the limit is 5 (RAG_MAX_PDF_PAGES)"


# -- limits -----------------------------------------------------------------------------------------


def test_load_limits_defaults_and_from_settings() -> None:
    assert LoadLimits() == LoadLimits.from_settings(Settings())
    settings = Settings(
        max_text_chars=11, max_decompressed_bytes=12, max_pdf_pages=13,
        max_json_depth=14, max_metadata_bytes=15, max_title_chars=16,
    )  # fmt: skip
    assert LoadLimits.from_settings(settings) == LoadLimits(
        max_chars=11, max_decompressed_bytes=12, max_pages=13,
        max_json_depth=14, max_metadata_bytes=15, max_title_chars=16,
    )  # fmt: skip
    with pytest.raises(ValueError, match="max_pages"):
        LoadLimits(max_pages=0)


@pytest.mark.parametrize(
    ("filename", "data"),
    [
        ("long.txt", b"x" * 101),
        ("long.md", b"# T\n\n" + b"y" * 100),
        ("long.html", b"<p>" + b"z" * 101 + b"</p>"),
    ],
)
def test_text_over_max_chars_fails(filename: str, data: bytes) -> None:
    limits = LoadLimits(max_chars=100)
    reason = failure(filename, data, limits=limits).reason
    assert reason.endswith("characters; the limit is 100 (RAG_MAX_TEXT_CHARS)"), reason
    assert ok("fits.txt", b"x" * 100, limits=limits).text == "x" * 100


def test_text_limit_message() -> None:
    reason = failure("long.txt", b"x" * 101, limits=LoadLimits(max_chars=100)).reason
    assert reason == "text is 101 characters; the limit is 100 (RAG_MAX_TEXT_CHARS)"


def test_pdf_and_docx_stop_extracting_past_max_chars() -> None:
    limits = LoadLimits(max_chars=30)
    pdf = make_pdf(["First page says hello.", "Second page says goodbye."])
    assert failure("long.pdf", pdf, limits=limits).reason == (
        "text is more than 30 characters; the limit is 30 (RAG_MAX_TEXT_CHARS)"
    )
    assert failure("long.docx", make_docx(), limits=limits).reason == (
        "text is more than 30 characters; the limit is 30 (RAG_MAX_TEXT_CHARS)"
    )
    assert ok("fits.pdf", make_pdf(["First page says hello."]), limits=limits)


def test_pdf_content_counts_against_decompressed_limit() -> None:
    pdf = hostile.pdf_many_pages(20)  # one ~50-byte content stream, parsed once per page
    reason = failure("pages.pdf", pdf, limits=LoadLimits(max_decompressed_bytes=500)).reason
    assert reason == (
        "PDF page content inflates to more than 500 bytes; the limit is 500 "
        "(RAG_MAX_DECOMPRESSED_BYTES)"
    )
    assert ok("pages.pdf", pdf, limits=LoadLimits(max_decompressed_bytes=5000)).metadata["pages"] == 20


def test_jsonl_line_limits_fail_alone() -> None:
    limits = LoadLimits(max_chars=20, max_title_chars=10, max_metadata_bytes=40, max_json_depth=3)
    lines = [
        {"_id": "ok", "title": "Short", "text": "fits", "metadata": {"a": [1]}},
        {"_id": "text", "text": "t" * 21},
        {"_id": "title", "title": "T" * 11, "text": "x"},
        {"_id": "meta", "text": "x", "metadata": {"k": "v" * 40}},
        {"_id": "deep", "text": "x", "metadata": {"a": {"b": [1]}}},
    ]
    data = b"\n".join(json.dumps(line).encode() for line in lines)
    results = list(load("c.jsonl", data, limits=limits))
    assert [type(r).__name__ for r in results] == ["Document"] + ["LoadFailure"] * 4
    assert [r.document_id for r in results[1:]] == ["text", "title", "meta", None]
    reasons = [r.reason for r in results[1:]]
    assert reasons[0] == "line 2: text is 21 characters; the limit is 20 (RAG_MAX_TEXT_CHARS)"
    assert reasons[1] == "line 3: title is 11 characters; the limit is 10 (RAG_MAX_TITLE_CHARS)"
    assert reasons[2].startswith("line 4: metadata is ")
    assert reasons[2].endswith("bytes as JSON; the limit is 40 (RAG_MAX_METADATA_BYTES)")
    assert reasons[3] == "line 5: JSON nests more than 3 levels deep (RAG_MAX_JSON_DEPTH)"


def test_jsonl_merged_metadata_counts_against_limit() -> None:
    limits = LoadLimits(max_metadata_bytes=40)
    data = b'{"_id": "a", "text": "x", "metadata": {"own": "0123456789"}}\n'
    assert ok("c.jsonl", data, limits=limits)
    reason = failure("c.jsonl", data, metadata={"tenant": "0123456789"}, limits=limits).reason
    assert reason.endswith("(RAG_MAX_METADATA_BYTES)")


def test_metadata_argument_over_limits_fails() -> None:
    limits = LoadLimits(max_metadata_bytes=30, max_json_depth=3)
    big = failure("a.txt", b"hi", metadata={"k": "v" * 30}, limits=limits)
    assert big.reason == "metadata is 38 bytes as JSON; the limit is 30 (RAG_MAX_METADATA_BYTES)"
    assert big.document_id == "a.txt"
    deep = failure("a.txt", b"hi", metadata={"a": {"b": {"c": {}}}}, limits=limits).reason
    assert deep == "metadata: JSON nests more than 3 levels deep (RAG_MAX_JSON_DEPTH)"
    odd = failure("a.txt", b"hi", metadata={1: object()}).reason
    assert odd.startswith("metadata cannot be stored as JSON")
    for_jsonl = failure("c.jsonl", b'{"_id": "a", "text": "x"}', metadata={"k": "v" * 30}, limits=limits)
    assert for_jsonl.reason.endswith("(RAG_MAX_METADATA_BYTES)")
    assert ok("a.txt", b"hi", metadata={"a": {"b": 1}}, limits=limits).metadata["a"] == {"b": 1}


def test_title_argument_over_limit_fails_but_own_title_is_cut() -> None:
    limits = LoadLimits(max_title_chars=10)
    reason = failure("a.txt", b"hi", title="T" * 11, limits=limits).reason
    assert reason == "title is 11 characters; the limit is 10 (RAG_MAX_TITLE_CHARS)"
    assert ok("a.txt", b"hi", title="  T  " * 5, limits=limits).title == "T T T T T"
    # the document's own title was not chosen by the uploader: it is cut, not refused
    assert ok("a.md", b"# " + b"H" * 50 + b"\n\nbody", limits=limits).title == "H" * 10
    # a .jsonl file ignores the title argument, so its length does not matter there
    assert ok("c.jsonl", b'{"_id": "a", "text": "x"}', title="T" * 11, limits=limits).id == "a"


# -- the last line of defence: a parser crash never escapes ------------------------------------------


@pytest.mark.parametrize("crash", [RecursionError, MemoryError, RuntimeError])
def test_parser_crash_becomes_a_failure_and_is_logged(monkeypatch, crash) -> None:
    from structlog.testing import capture_logs

    def broken(*args, **kwargs):  # a fault injected at the library edge (python-docx)
        raise crash("secret document text")

    data = make_docx()
    monkeypatch.setattr(docx, "Document", broken)
    with capture_logs() as logs:
        result = failure("crash.docx", data)
    assert result.reason == f"could not parse .docx ({crash.__name__})"
    assert result.document_id == "crash.docx"
    (entry,) = [e for e in logs if e["event"] == "document_parse_crashed"]
    assert entry["error"] == crash.__name__ and entry["log_level"] == "warning"
    assert entry["source"] == "crash.docx" and entry["suffix"] == ".docx"
    assert "secret" not in repr(entry)


def test_pdf_library_crash_becomes_a_failure(monkeypatch) -> None:
    import pypdf

    def broken(*args, **kwargs):  # a fault injected at the library edge (pypdf)
        raise MemoryError

    data = make_pdf(["x"])
    monkeypatch.setattr(pypdf, "PdfReader", broken)
    assert failure("crash.pdf", data).reason == "could not parse .pdf (MemoryError)"


def test_jsonl_line_crash_fails_that_line_only(monkeypatch) -> None:
    import msgspec

    real = msgspec.json.Decoder

    class Crashing:  # a fault injected at the library edge (msgspec), on one line only
        def __init__(self) -> None:
            self.inner = real()

        def decode(self, line: bytes):
            if b"boom" in line:
                raise RecursionError("boom")
            return self.inner.decode(line)

    monkeypatch.setattr(msgspec.json, "Decoder", Crashing)
    data = b'{"_id": "a", "text": "x"}\n{"_id": "b", "text": "boom"}\n{"_id": "c", "text": "y"}\n'
    results = list(load("c.jsonl", data))
    assert [type(r).__name__ for r in results] == ["Document", "LoadFailure", "Document"]
    assert results[1].reason == "line 2: could not parse .jsonl (RecursionError)"


def test_wrong_argument_types_do_not_raise() -> None:
    result = one("a.txt", None)  # type: ignore[arg-type]
    assert isinstance(result, LoadFailure)
    assert result.reason == "could not parse .txt (AttributeError)"
