"""The real CrossEncoder class on a tiny model built here from the bundled MiniLM weights.

Its classification head is randomly initialised: the model proves the plumbing only, never quality.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rag.embedding import bundled_model_path
from rag.rerank import CrossEncoderReranker, NoopReranker, load_reranker
from rag.settings import Settings
from rag.types import ScoredPoint


@pytest.fixture(scope="module")
def plumbing_cross_encoder(tmp_path_factory) -> Path:
    import torch
    from sentence_transformers import CrossEncoder

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("ce") / "minilm-ce-plumbing"
    CrossEncoder(str(bundled_model_path()), num_labels=1, max_length=64).save(str(out))
    return out


def hits(n: int) -> list[ScoredPoint]:
    return [ScoredPoint(id=f"p{i}", score=1.0 - i / 100, payload={"text": f"passage number {i} about topic {i % 3}"})
            for i in range(n)]


def test_noop_keeps_fused_order():
    out = NoopReranker().rerank("q", hits(5), depth=3, budget_ms=10)
    assert [h.id for h in out.hits] == ["p0", "p1", "p2", "p3", "p4"] and not out.reranked


def test_cross_encoder_reorders_within_depth_and_keeps_tail(plumbing_cross_encoder):
    rr = CrossEncoderReranker(str(plumbing_cross_encoder))
    out = rr.rerank("topic 1", hits(12), depth=8, budget_ms=60_000)
    assert out.reranked
    ids = [h.id for h in out.hits]
    assert sorted(ids[:8]) == [f"p{i}" for i in range(8)] and ids[8:] == ["p8", "p9", "p10", "p11"]
    head_scores = [h.score for h in out.hits[:8]]
    assert head_scores == sorted(head_scores, reverse=True)
    assert "fusion_score" in out.hits[0].payload


def test_over_budget_returns_fused_order(plumbing_cross_encoder):
    rr = CrossEncoderReranker(str(plumbing_cross_encoder), batch_size=2)
    out = rr.rerank("topic 1", hits(12), depth=12, budget_ms=0.001)
    assert not out.reranked and out.reason == "latency budget exceeded"
    assert [h.id for h in out.hits] == [f"p{i}" for i in range(12)]


def test_load_reranker_from_settings(plumbing_cross_encoder, tmp_path):
    assert isinstance(load_reranker(Settings(data_dir=tmp_path)), NoopReranker)
    rr = load_reranker(Settings(data_dir=tmp_path, reranker_model=str(plumbing_cross_encoder)))
    assert isinstance(rr, CrossEncoderReranker)
