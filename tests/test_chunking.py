"""rag.chunking: token bounds, exact offsets, structure, overlap, multi-byte text."""

from __future__ import annotations

import json
import random
from itertools import islice
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rag.chunking import MIN_MAX_TOKENS, chunk
from rag.sentences import split_sentences
from rag.tokens import get_encoding
from rag.types import Chunk, Document

SCIFACT = Path("/work/shared/data/scifact/corpus.jsonl")
ENC = get_encoding("cl100k_base")


def tokens(text: str) -> int:
    return len(ENC.encode_ordinary(text))


def check_invariants(doc: Document, chunks: list[Chunk], max_tokens: int) -> None:
    """Properties every chunking must have."""
    text = doc.text
    covered = [False] * len(text)
    for i, c in enumerate(chunks):
        assert c.document_id == doc.id
        assert c.index == i
        assert 0 <= c.start < c.end <= len(text)
        assert c.text == text[c.start : c.end]
        assert c.token_count == tokens(c.text) <= max_tokens, (c.token_count, c.text)
        assert not c.text[0].isspace() and not c.text[-1].isspace()
        if i:
            assert c.start > chunks[i - 1].start and c.end > chunks[i - 1].end
        for k in range(c.start, c.end):
            covered[k] = True
    # nothing but whitespace is left out
    missing = [text[k] for k in range(len(text)) if not covered[k] and not text[k].isspace()]
    assert not missing, "".join(missing)[:80]


# -- generated documents --------------------------------------------------------------------------

WORDS = (
    "the of retrieval chunk token encoder vector naïve café über straße Ελληνικά русский "
    "漢字 かな 한국어 العربية עברית 😀 👍🏽 🇩🇪 👩‍👩‍👧 e\u0301 ﬁ <|endoftext|> 123456 3.14 "
    "x_y C++ #tag (paren) [bracket] \"quote\" 'single' http://example.com/a?b=c"
).split()


def random_sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 18))]
    return " ".join(words).capitalize() + rng.choice([".", "!", "?", "。", ".", ""])


def random_doc(rng: random.Random) -> Document:
    parts: list[str] = []
    for _ in range(rng.randint(1, 14)):
        kind = rng.random()
        if kind < 0.2:
            parts.append("#" * rng.randint(1, 4) + " " + random_sentence(rng).rstrip(".!?。"))
        elif kind < 0.3:
            parts.append("```\n# code comment\n\nx = 1\n```")
        elif kind < 0.4:
            # one huge paragraph, sometimes without any sentence breaks
            sep = " " if rng.random() < 0.5 else ""
            n = rng.randint(30, 120)
            if rng.random() < 0.5:
                parts.append(" ".join(random_sentence(rng) for _ in range(n)))
            else:
                parts.append(sep.join(rng.choice(WORDS) for _ in range(n * 5)))
        else:
            lines = [random_sentence(rng) for _ in range(rng.randint(1, 4))]
            parts.append(rng.choice([" ", "\n"]).join(lines))
    seps = ["\n\n", "\n\n\n", "\n \t\n", "\n", "\r\n\r\n"]
    text = rng.choice(["", "\n", "  "]) + "".join(p + rng.choice(seps) for p in parts)
    return Document(id=f"doc-{rng.random():.6f}", text=text)


@pytest.mark.parametrize("seed", range(24))
def test_random_documents_keep_invariants(seed: int) -> None:
    rng = random.Random(seed)
    doc = random_doc(rng)
    max_tokens = rng.choice([MIN_MAX_TOKENS, 5, 8, 16, 32, 64, 200])
    overlap = rng.choice([0, 1, max_tokens // 4, max_tokens // 2, max_tokens - 1])
    chunks = chunk(doc, max_tokens, overlap, ENC)
    assert chunks
    check_invariants(doc, chunks, max_tokens)


def test_empty_and_whitespace_documents() -> None:
    assert chunk(Document(id="e", text=""), 100, 10, ENC) == []
    assert chunk(Document(id="w", text=" \n\n\t \n"), 100, 10, ENC) == []


@pytest.mark.parametrize(("max_tokens", "overlap"), [(3, 0), (0, 0), (10, 10), (10, -1), (10, 11)])
def test_bad_parameters(max_tokens: int, overlap: int) -> None:
    with pytest.raises(ValueError):
        chunk(Document(id="d", text="text"), max_tokens, overlap, ENC)


# -- packing and structure ------------------------------------------------------------------------


def test_small_paragraphs_are_packed_whole() -> None:
    paragraphs = [f"Paragraph {i} has a few words in it." for i in range(30)]
    doc = Document(id="p", text="\n\n".join(paragraphs))
    chunks = chunk(doc, 50, 10, ENC)
    check_invariants(doc, chunks, 50)
    assert len(chunks) > 1
    for c in chunks:
        # every chunk is a run of whole paragraphs: no overlap, boundaries at blank lines
        assert c.text.split("\n\n")[0] in paragraphs and c.text.split("\n\n")[-1] in paragraphs
    for a, b in zip(chunks, chunks[1:]):
        assert a.end < b.start
        # greedy: the next paragraph would not have fitted
        next_paragraph_end = b.start + len(b.text.split("\n\n")[0])
        assert tokens(doc.text[a.start : next_paragraph_end]) > 50


def test_document_that_fits_is_one_chunk() -> None:
    doc = Document(id="one", text="  Hello world.\n\nSecond paragraph.  \n")
    (only,) = chunk(doc, 100, 10, ENC)
    assert only.text == "Hello world.\n\nSecond paragraph."
    assert (only.start, only.end, only.heading_path) == (2, 33, [])


MARKDOWN = """Preamble before any heading.

# Install

Intro to installing.

## Linux

Use the package manager.

```bash
# this is a shell comment, not a heading
apt-get install thing
```

### Debian
Debian specifics.

## Windows

Run the installer.

# Usage
## Quick start

Start it.

Setext Title
============

Under setext.

Sub setext
----------

Under sub setext.
"""


def test_heading_paths_and_heading_boundaries() -> None:
    doc = Document(id="md", text=MARKDOWN)
    chunks = chunk(doc, 200, 20, ENC)
    check_invariants(doc, chunks, 200)
    got = [(c.heading_path, c.text.splitlines()[0]) for c in chunks]
    assert got == [
        ([], "Preamble before any heading."),
        (["Install"], "# Install"),
        (["Install", "Linux"], "## Linux"),
        (["Install", "Linux", "Debian"], "### Debian"),
        (["Install", "Windows"], "## Windows"),
        # a chunk of headings only is carried into the next one
        (["Usage", "Quick start"], "# Usage"),
        (["Setext Title"], "Setext Title"),
        (["Setext Title", "Sub setext"], "Sub setext"),
    ]
    assert "apt-get install thing\n```" in chunks[2].text
    assert chunks[5].text == "# Usage\n## Quick start\n\nStart it."


def test_heading_path_survives_long_section_split() -> None:
    body = " ".join(f"Sentence {i} talks about kernels and drivers." for i in range(80))
    doc = Document(id="long", text=f"# Guide\n\n## Drivers\n\n{body}\n\n## Next\n\nShort.")
    chunks = chunk(doc, 40, 8, ENC)
    check_invariants(doc, chunks, 40)
    assert chunks[0].text.startswith("# Guide\n\n## Drivers\n\nSentence 0")
    assert all(c.heading_path == ["Guide", "Drivers"] for c in chunks[:-1])
    assert chunks[-1].heading_path == ["Guide", "Next"]
    assert chunks[-1].text == "## Next\n\nShort."


# -- long blocks: sentence preference and overlap -------------------------------------------------


def test_long_paragraph_splits_at_sentence_ends_with_overlap() -> None:
    sentences = [f"This is sentence {i} of a long paragraph about retrieval." for i in range(60)]
    doc = Document(id="s", text=" ".join(sentences))
    max_tokens, overlap = 64, 12
    chunks = chunk(doc, max_tokens, overlap, ENC)
    check_invariants(doc, chunks, max_tokens)
    assert len(chunks) > 3
    for a, b in zip(chunks, chunks[1:]):
        assert a.text.endswith(".")  # cut at a sentence end, not mid-sentence
        assert b.start < a.end  # windows overlap
        shared = tokens(doc.text[b.start : a.end])
        assert overlap - 3 <= shared <= overlap + 3, shared
        assert a.token_count >= max_tokens // 2


def test_long_paragraph_without_sentences_splits_at_tokens() -> None:
    doc = Document(id="t", text=" ".join(f"w{i}" for i in range(3000)))
    max_tokens, overlap = 100, 20
    chunks = chunk(doc, max_tokens, overlap, ENC)
    check_invariants(doc, chunks, max_tokens)
    for a, b in zip(chunks, chunks[1:]):
        assert a.token_count >= max_tokens - 2
        assert overlap - 2 <= tokens(doc.text[b.start : a.end]) <= overlap + 2


def test_zero_overlap_has_no_shared_text() -> None:
    doc = Document(id="z", text=" ".join(f"word{i}" for i in range(2000)))
    chunks = chunk(doc, 50, 0, ENC)
    check_invariants(doc, chunks, 50)
    for a, b in zip(chunks, chunks[1:]):
        assert b.start >= a.end


def test_last_window_of_long_block_packs_following_paragraph() -> None:
    long = " ".join(f"Sentence {i} here." for i in range(40))
    doc = Document(id="tail", text=f"{long}\n\nA short tail paragraph.")
    chunks = chunk(doc, 60, 10, ENC)
    check_invariants(doc, chunks, 60)
    assert chunks[-1].text.endswith("Sentence 39 here.\n\nA short tail paragraph.")


# -- multi-byte text ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "unit",
    ["😀", "👩‍👩‍👧", "🇩🇪", "漢字かな交じり文。", "e\u0301", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "ü"],
)
@pytest.mark.parametrize("max_tokens", [MIN_MAX_TOKENS, 7, 33])
def test_multibyte_text_never_cut_mid_character(unit: str, max_tokens: int) -> None:
    doc = Document(id="mb", text=unit * 300)
    chunks = chunk(doc, max_tokens, max_tokens // 3, ENC)
    check_invariants(doc, chunks, max_tokens)
    for c in chunks:
        # offsets are code point offsets, the text re-encodes to valid UTF-8 exactly
        assert c.text.encode("utf-8").decode("utf-8") == c.text
        assert ENC.decode(ENC.encode_ordinary(c.text)) == c.text


def test_emoji_offsets_round_trip_in_mixed_text() -> None:
    text = "\n\n".join(
        f"## Abschnitt {i} 🇩🇪\n\n" + " ".join(["Grüße 😀 naïve 漢字 👍🏽."] * (5 + 7 * (i % 4)))
        for i in range(12)
    )
    doc = Document(id="mixed", text=text)
    chunks = chunk(doc, 24, 6, ENC)
    check_invariants(doc, chunks, 24)
    assert {tuple(c.heading_path) for c in chunks} == {(f"Abschnitt {i} 🇩🇪",) for i in range(12)}


def test_lone_surrogates_do_not_break_offsets() -> None:
    doc = Document(id="sur", text=("ab\ud800cd " * 200).strip())
    chunks = chunk(doc, 16, 4, ENC)
    for i, c in enumerate(chunks):
        assert c.text == doc.text[c.start : c.end] and c.index == i
        assert c.token_count == tokens(c.text) <= 16


# -- real data ------------------------------------------------------------------------------------


def test_scifact_documents() -> None:
    if not SCIFACT.exists():
        pytest.skip("SciFact corpus not available")
    with SCIFACT.open("rb") as fh:
        records = [json.loads(line) for line in islice(fh, 200)]
    docs = [Document(id=r["_id"], text=r["text"], title=r["title"]) for r in records]
    for max_tokens, overlap in [(64, 16), (256, 32)]:
        for doc in docs:
            chunks = chunk(doc, max_tokens, overlap, ENC)
            if doc.text.strip():
                check_invariants(doc, chunks, max_tokens)
            else:
                assert chunks == []


# -- sentence boundaries: properties --------------------------------------------------------------

SENTENCES = [
    "Dr. Smith measured 25-hydroxyvitamin D in 120 adults.",
    "The prevalence was 0.1% (14.4), with little change over 3.5 years.",
    "Results were similar in the U.S. and in Europe, e.g. in Norway.",
    "See Fig. 3 and No. 5 for details!",
    "Why does it matter?",
    "東京は日本の首都です。",
    "大阪は大きい。",
    "Grüße 😀 naïve café 👍🏽 straße.",
    "A heading without a period",
    "- a list item",
    "1. a numbered item",
    "Supercalifragilisticexpialidocious" * 6 + ".",
    "漢字かな交じり文" * 20,
    "x" * 300,
    "a very long sentence " + "with many words and no stop " * 12 + "ends here.",
]
SEPARATORS = [" ", " ", "  ", "\n", "\n\n", "\n\n\n"]


@st.composite
def documents(draw: st.DrawFn) -> Document:
    parts = draw(st.lists(st.sampled_from(SENTENCES), min_size=1, max_size=40))
    seps = draw(st.lists(st.sampled_from(SEPARATORS), min_size=len(parts), max_size=len(parts)))
    heading = draw(st.sampled_from(["", "# Title\n\n", "## Section\n"]))
    return Document(id="h", text=heading + "".join(p + s for p, s in zip(parts, seps)))


def sentence_starts(text: str) -> set[int]:
    return {s for s, _ in split_sentences(text)}


def longest_unit_tokens(text: str) -> int:
    return max((tokens(text[s:e]) for s, e in split_sentences(text)), default=0)


def word_at(text: str, pos: int) -> str:
    """The run of non-space characters containing ``pos``."""
    s, e = pos, pos
    while s > 0 and not text[s - 1].isspace():
        s -= 1
    while e < len(text) and not text[e].isspace():
        e += 1
    return text[s:e]


@settings(max_examples=150, deadline=None)
@given(doc=documents(), max_tokens=st.sampled_from([MIN_MAX_TOKENS, 6, 16, 40, 64, 200]), data=st.data())
def test_chunks_start_at_sentences_or_words(doc: Document, max_tokens: int, data: st.DataObject) -> None:
    overlap = data.draw(st.integers(0, max_tokens - 1))
    chunks = chunk(doc, max_tokens, overlap, ENC)
    # offsets exact, budget kept, all text covered, trimmed, monotone
    check_invariants(doc, chunks, max_tokens)
    text = doc.text
    starts = sentence_starts(text)
    every_sentence_fits = longest_unit_tokens(text) <= max_tokens
    for c in chunks:
        if every_sentence_fits:
            assert c.start in starts, (c.text[:40], max_tokens)
        elif c.start not in starts and not text[c.start - 1].isspace():
            # inside a word only when that word alone is over the budget
            assert tokens(word_at(text, c.start)) > max_tokens, c.text[:40]
    assert chunk(doc, max_tokens, overlap, ENC) == chunks  # deterministic


@settings(max_examples=60, deadline=None)
@given(doc=documents(), max_tokens=st.sampled_from([16, 64, 200]), data=st.data())
def test_overlap_is_whole_sentences_near_the_request(doc: Document, max_tokens: int, data: st.DataObject) -> None:
    overlap = data.draw(st.integers(0, max_tokens // 2))
    chunks = chunk(doc, max_tokens, overlap, ENC)
    for a, b in zip(chunks, chunks[1:]):
        if b.start < a.end:
            assert overlap > 0
            shared = tokens(doc.text[b.start : a.end])
            # never more than twice the request (plus the few tokens joins re-encode differently)
            assert shared < 2 * overlap + 4, (shared, overlap)


def test_cjk_without_spaces_splits_at_characters_not_bytes() -> None:
    text = "漢字かな交じり文" * 200  # no stop, no space: token runs at character boundaries
    doc = Document(id="cjk", text=text)
    chunks = chunk(doc, 32, 8, ENC)
    check_invariants(doc, chunks, 32)
    assert len(chunks) > 10
    assert all(ENC.decode(ENC.encode_ordinary(c.text)) == c.text for c in chunks)


def test_a_sentence_over_the_budget_is_cut_at_words_and_the_next_starts_a_chunk() -> None:
    long = "This one goes on " + "and on " * 80 + "until it stops."
    doc = Document(id="long-sentence", text=f"A short opener. {long} The next sentence. And one more.")
    chunks = chunk(doc, 40, 8, ENC)
    check_invariants(doc, chunks, 40)
    assert chunks[0].text == "A short opener."  # the long sentence starts a chunk of its own
    assert chunks[1].text.startswith("This one goes on")
    assert all(doc.text[c.start - 1] == " " for c in chunks[1:])  # every cut at a word
    assert chunks[-1].text.endswith("The next sentence. And one more.")


def test_abbreviations_and_decimals_are_not_cut_points() -> None:
    sentences = [f"In cohort {i}, Dr. Lee et al. found 0.{i}% (95% CI 1.2-3.4) vs. 2.{i}% at 3.5 yrs." for i in range(40)]
    doc = Document(id="abbr", text=" ".join(sentences))
    chunks = chunk(doc, 64, 16, ENC)
    check_invariants(doc, chunks, 64)
    for c in chunks:
        assert c.text.startswith("In cohort ") and c.text.endswith(" yrs."), c.text[:30]


# -- SciFact: what a chat frontend shows as the cited source --------------------------------------


def scifact_docs(limit: int | None = None) -> list[Document]:
    if not SCIFACT.exists():
        pytest.skip("SciFact corpus not available")
    with SCIFACT.open("rb") as fh:
        records = [json.loads(line) for line in islice(fh, limit)]
    return [Document(id=r["_id"], text=r["text"], title=r["title"]) for r in records]


def test_scifact_chunks_the_issue_quoted_now_start_at_sentences() -> None:
    # Before: "iferol. In Boston…", ", the importance of this hormone…", ".1%(14.4), with little…"
    want = {
        "275294": ["All vertebrates, including humans", "In Boston, exposure to sunlight"],
        "23267371": ["Vitamin D insufficiency affects", "As the number of people with VDD"],
        "13312471": ["Vitamin D insufficiency is common", "30 patients (10 women in 3 groups)",
                     "Following oral supplementation"],
    }
    docs = {d.id: d for d in scifact_docs() if d.id in want}
    for doc_id, beginnings in want.items():
        chunks = chunk(docs[doc_id], 200, 32, ENC)
        check_invariants(docs[doc_id], chunks, 200)
        assert [c.text[: len(b)] for c, b in zip(chunks, beginnings)] == beginnings
        assert len(chunks) == len(beginnings)


def test_scifact_non_first_chunks_start_at_sentences() -> None:
    docs = scifact_docs(600)
    for max_tokens, overlap in [(200, 32), (64, 16)]:
        at_sentence = total = 0
        for doc in docs:
            spans = split_sentences(doc.text)
            starts = {s for s, _ in spans}
            for c in chunk(doc, max_tokens, overlap, ENC)[1:]:
                total += 1
                assert doc.text[c.start - 1].isspace(), c.text[:40]  # always at a word
                if c.start in starts:
                    at_sentence += 1
                else:  # mid-sentence only inside a sentence longer than the window
                    (s, e), = [(s, e) for s, e in spans if s < c.start < e]
                    assert tokens(doc.text[s:e]) > max_tokens, c.text[:40]
        assert total > 200
        if max_tokens == 200:  # before: 3 % of SciFact's non-first chunks started at a sentence
            assert at_sentence / total >= 0.99, at_sentence / total
