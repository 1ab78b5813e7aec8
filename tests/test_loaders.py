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
    default_document_id,
    load,
    load_document,
    normalize_text,
)
from rag.types import Document

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
