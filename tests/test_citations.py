"""Citations of a generative answer are checked against their sources (rag/citations.py), on the real
app with the real encoder and store; the LLM is the fake edge of tests/llm_server.py, replying with a
citation to the wrong source, or with a claim no source supports."""

from __future__ import annotations

import re

from rag.citations import verify_citations
from rag.context import build_context
from rag.tokens import get_encoding
from rag.types import ScoredPoint
from tests.llm_server import run_fake_llm
from tests import test_answer_api
from tests.test_answer_api import NILE, PARIS, sse

make_client = test_answer_api.make_client  # the fixture: the small corpus on the real app

_SOURCE = re.compile(r'<source id="(\d+)"[^>]*>(.*?)</source>', re.S)


def _citing(claim: str, pick, seen: dict) -> callable:
    """A reply ``claim [n]``, n chosen by ``pick(sources)`` from the sources the answer prompt shows
    (``{n: text}``); what it saw and chose is kept in ``seen``."""
    def reply(body: dict) -> str:
        sources = {int(n): text for n, text in _SOURCE.findall(body["messages"][-1]["content"])}
        seen["sources"] = sources
        seen["n"] = pick(sources)
        return f"{claim} [{seen['n']}]"
    return reply


def _n_of(sources: dict[int, str], word: str) -> int:
    return next(n for n, text in sources.items() if word in text)


def test_a_citation_of_the_wrong_source_is_repointed(make_client):
    seen: dict = {}
    # The prompt shows the sources of the best sentences (all the Nile's here); the context holds 3.
    wrong = lambda sources: _n_of(sources, "Nile") % 3 + 1  # noqa: E731
    with run_fake_llm(reply=_citing("The Nile is about 6,650 kilometres long.", wrong, seen)) as llm:
        client = make_client(llm_base_url=llm.base_url, llm_max_retries=0)
        question = {"question": "How long is the Nile?", "top_k": 3}
        body = client.post("/v1/answer", json=question).json()
        nile = _n_of(seen["sources"], "Nile")
        assert body["mode"] == "generative", body
        [check] = body["citation_checks"]
        assert (check["n"], check["status"], check["to"]) == (seen["n"], "repointed", nile)
        assert body["answer"].startswith(f"The Nile is about 6,650 kilometres long. [{nile}]")
        assert {c["document_id"] for c in body["citations"]} == {"nile"}
        # The stream sent the reply's own marker already: its citations and checks follow the checks.
        events = sse(client.post("/v1/answer", json={**question, "stream": True}).text)
        done = events[-1][1]
        assert [(c["status"], c["to"]) for c in done["citation_checks"]] == [("repointed", nile)]
        assert {c["document_id"] for c in events[-2][1]} == {"nile"}
        assert done["answer"].startswith(f"The Nile is about 6,650 kilometres long. [{seen['n']}]")


def test_a_citation_that_no_source_supports_is_dropped(make_client):
    seen: dict = {}
    with run_fake_llm(reply=_citing("The Eiffel Tower was completed in 1889 for a world fair.", min, seen)) as llm:
        client = make_client(llm_base_url=llm.base_url, llm_max_retries=0)
        body = client.post("/v1/answer", json={"question": "How long is the Nile?", "top_k": 3}).json()
        [check] = body["citation_checks"]
        assert (check["n"], check["status"], check["to"]) == (seen["n"], "dropped", None)
        assert body["answer"].startswith("The Eiffel Tower was completed in 1889 for a world fair.\n\n")
        # What stays cited is the quoted supporting sentence, appended with its own source.
        assert [c["document_id"] for c in body["citations"]] == ["nile"]


def test_a_supported_citation_is_kept(make_client):
    seen: dict = {}
    right = lambda sources: _n_of(sources, "Paris")  # noqa: E731
    with run_fake_llm(reply=_citing("The capital of France is Paris.", right, seen)) as llm:
        client = make_client(llm_base_url=llm.base_url, llm_max_retries=0)
        body = client.post("/v1/answer", json={"question": "What is the capital of France?", "top_k": 3}).json()
        [check] = body["citation_checks"]
        assert (check["status"], check["to"]) == ("kept", seen["n"]) and check["support"] >= 0.6439
        assert f"Paris. [{seen['n']}]" in body["answer"]


def test_each_sentence_is_checked_on_its_own(embedder):
    hits = [ScoredPoint(id=f"c{i}", score=1.0 - i / 10, payload={
        "document_id": doc, "chunk_index": 0, "text": text, "title": doc, "source": "", "start": 0, "end": len(text)})
        for i, (doc, text) in enumerate((("paris", PARIS), ("nile", NILE)))]
    context = build_context(hits, budget_tokens=1000, encoding=get_encoding("cl100k_base"))
    paris, nile = (next(s.n for s in context.sources if s.document_id == d) for d in ("paris", "nile"))
    text = f"Paris lies on the Seine [{nile}]. The Nile flows into the Mediterranean Sea [{nile}]. Cats purr [{paris}]."
    fixed, checks = verify_citations(text, "Tell me about France and the Nile", context, embedder, threshold=0.6439)
    assert [(c.n, c.status, c.to) for c in checks] == [(nile, "repointed", paris), (nile, "kept", nile),
                                                       (paris, "dropped", None)]
    assert fixed == f"Paris lies on the Seine [{paris}]. The Nile flows into the Mediterranean Sea [{nile}]. Cats purr."
