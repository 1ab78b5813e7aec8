"""Extractive answers with the real encoder, and the sentence splitter's edge cases."""

from __future__ import annotations

import numpy as np
import pytest

from rag.context import Context, build_context
from rag.extractive import (
    LEXICAL_WEIGHT,
    SECOND_SENTENCE_MARGIN,
    ExtractiveAnswer,
    best_support,
    extract_answer,
    split_sentences,
)
from rag.tokens import get_encoding
from rag.types import ScoredPoint

SOURCES = [
    (
        "water",
        "Properties of water",
        "Water is a transparent, tasteless and nearly colourless chemical substance. "
        "At sea level, pure water boils at 100 degrees Celsius. "
        "It freezes at 0 degrees Celsius and is densest at about 4 degrees Celsius.",
    ),
    (
        "paris",
        "Paris",
        "Paris is the capital and most populous city of France. "
        "The city is known for its museums, e.g. the Louvre, and its architecture. "
        "Dr. Haussmann rebuilt much of central Paris in the 19th century.",
    ),
    (
        "photo",
        "Photosynthesis",
        "Photosynthesis is the process by which plants turn light into chemical energy.\n\n"
        "In plant cells, photosynthesis takes place in the chloroplasts. "
        "Oxygen is released as a by-product of photosynthesis.",
    ),
]


def make_context(sources=SOURCES) -> Context:
    hits = [
        ScoredPoint(id=f"{doc}-0", score=1.0 - i / 10, payload={
            "tenant": "t", "document_id": doc, "content_hash": "h", "chunk_index": 0,
            "text": text, "start": 0, "end": len(text), "title": title, "source": f"{doc}.md",
        })
        for i, (doc, title, text) in enumerate(sources)
    ]
    return build_context(hits, budget_tokens=1500, encoding=get_encoding("cl100k_base"))


def texts(text: str) -> list[str]:
    return [text[s:e] for s, e in split_sentences(text)]


# -- splitter -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", []),
        ("   \n ", []),
        ("One sentence without a stop", ["One sentence without a stop"]),
        ("First one. Second one! Third one? Fourth…", ["First one.", "Second one!", "Third one?", "Fourth…"]),
        ("Dr. Smith met Mr. Jones. They talked.", ["Dr. Smith met Mr. Jones.", "They talked."]),
        ("Use fruit, e.g. apples, i.e. red ones. Then eat.", ["Use fruit, e.g. apples, i.e. red ones.", "Then eat."]),
        ("It costs 3.50 dollars, about 2.9 euros. Cheap.", ["It costs 3.50 dollars, about 2.9 euros.", "Cheap."]),
        ("The U.S. Army landed. It won.", ["The U.S. Army landed.", "It won."]),
        ("He moved to the U.S. in 1990. He stayed.", ["He moved to the U.S. in 1990.", "He stayed."]),
        ("J. R. R. Tolkien wrote it. Fine.", ["J. R. R. Tolkien wrote it.", "Fine."]),
        ("See No. 5 and Fig. 3 here. Done.", ["See No. 5 and Fig. 3 here.", "Done."]),
        ("It ended in 1995. The next began.", ["It ended in 1995.", "The next began."]),
        ('He said "Stop." Then he left.', ['He said "Stop."', "Then he left."]),
        ("It was (mostly) done.) Next part.", ["It was (mostly) done.)", "Next part."]),
        ("Wait... what happened? nothing.", ["Wait... what happened? nothing."]),
        ("Version 2.0.1 shipped. Great.", ["Version 2.0.1 shipped.", "Great."]),
        ("A wrapped line\ncontinues here. Next.", ["A wrapped line\ncontinues here.", "Next."]),
        ("Paragraph one\n\nParagraph two", ["Paragraph one", "Paragraph two"]),
        (
            "# Heading\nBody text here.\n- item one\n- item two\n1. first",
            ["# Heading", "Body text here.", "- item one", "- item two", "1. first"],
        ),
        ("東京は日本の首都です。大阪は大きい。", ["東京は日本の首都です。", "大阪は大きい。"]),
    ],
)
def test_split_sentences(text, expected):
    assert texts(text) == expected


def test_spans_are_trimmed_ordered_offsets_into_the_text():
    text = "  Alpha beta.   Gamma delta!\n\n  Epsilon.  "
    spans = split_sentences(text)
    assert spans == sorted(spans)
    for s, e in spans:
        assert text[s:e] == text[s:e].strip() and text[s:e]
    assert texts(text) == ["Alpha beta.", "Gamma delta!", "Epsilon."]


# -- extraction with the real encoder -----------------------------------------------------------


def test_the_sentence_that_answers_wins(embedder):
    ctx = make_context()
    answer = extract_answer("At what temperature does water boil?", None, ctx, embedder, max_sentences=1)
    assert isinstance(answer, ExtractiveAnswer)
    assert answer.text == "At sea level, pure water boils at 100 degrees Celsius. [1]"
    [best] = answer.sentences
    assert (best.n, best.document_id) == (1, "water")
    assert best.score == answer.best_score
    assert 0.3 < best.score < 1.2


@pytest.mark.parametrize(
    ("question", "doc", "needle"),
    [
        ("Who rebuilt central Paris?", "paris", "Haussmann"),
        ("Where does photosynthesis happen in a plant cell?", "photo", "chloroplasts"),
        ("Which gas do plants release during photosynthesis?", "photo", "Oxygen"),
        ("What is the capital of France?", "paris", "capital"),
    ],
)
def test_the_right_source_and_sentence_are_quoted(embedder, question, doc, needle):
    ctx = make_context()
    answer = extract_answer(question, None, ctx, embedder)
    top = answer.sentences[0]
    assert top.document_id == doc and needle in top.text
    source = next(s for s in ctx.sources if s.n == top.n)
    assert answer.text.startswith(f"{top.text} [{top.n}]")
    assert source.text[top.start : top.end] == top.text


def test_offsets_map_back_into_every_source(embedder):
    ctx = make_context()
    answer = extract_answer("Tell me about water, Paris and plants.", None, ctx, embedder, max_sentences=9)
    assert answer.sentences
    scores = [s.score for s in answer.sentences]
    assert scores == sorted(scores, reverse=True)
    for s in answer.sentences:
        assert ctx.sources[s.n - 1].text[s.start : s.end] == s.text


def test_a_given_question_vector_is_used(embedder):
    ctx = make_context()
    question = "At what temperature does water boil?"
    vec = embedder.embed_queries([question])[0]
    given = extract_answer(question, vec, ctx, embedder)
    computed = extract_answer(question, None, ctx, embedder)
    assert given.text == computed.text
    assert given.best_score == pytest.approx(computed.best_score, abs=1e-5)
    # A (1, d) row works too.
    assert extract_answer(question, vec[None, :], ctx, embedder).text == computed.text


def test_a_second_sentence_only_when_close_to_the_best(embedder):
    ctx = make_context()
    answer = extract_answer("At what temperature does water boil?", None, ctx, embedder, max_sentences=2)
    best = answer.sentences[0].score
    assert all(best - s.score <= SECOND_SENTENCE_MARGIN + 1e-6 for s in answer.sentences)
    assert answer.text.count("[") == len(answer.sentences)


def test_headings_are_not_quoted_when_a_sentence_exists(embedder):
    ctx = make_context([("doc", "Doc", "# Boiling water\n\nAt sea level, water boils at 100 degrees Celsius.")])
    answer = extract_answer("boiling water", None, ctx, embedder, max_sentences=1)
    assert answer.sentences[0].text.startswith("At sea level")


def test_an_empty_context_gives_an_empty_answer(embedder):
    empty = build_context([], budget_tokens=100, encoding=get_encoding("cl100k_base"))
    answer = extract_answer("anything?", None, empty, embedder)
    assert (answer.text, answer.sentences, answer.best_score) == ("", [], -1.0)
    assert best_support("Some answer [1].", empty, embedder) is None
    with pytest.raises(ValueError):
        extract_answer("anything?", None, empty, embedder, max_sentences=0)


def test_best_support_finds_the_sentence_behind_a_generated_answer(embedder):
    ctx = make_context()
    support = best_support("The Louvre is one of the museums Paris is famous for [2].", ctx, embedder)
    assert support is not None
    assert support.document_id == "paris" and "Louvre" in support.text
    assert ctx.sources[support.n - 1].text[support.start : support.end] == support.text
    assert best_support("[1]", ctx, embedder) is None


def test_scores_are_cosine_plus_a_small_lexical_term(embedder):
    ctx = make_context([("doc", "Doc", "Cats sleep a lot. Dogs bark loudly.")])
    question = "Do dogs bark?"
    answer = extract_answer(question, None, ctx, embedder, max_sentences=1)
    cosine = float(embedder.embed_documents(["Dogs bark loudly."])[0] @ embedder.embed_queries([question])[0])
    # Question content words: "dog", "bark" - both in the sentence, so overlap is 1.
    assert answer.best_score == pytest.approx(cosine + LEXICAL_WEIGHT, abs=1e-5)
    assert np.isfinite(answer.best_score)
