"""The learned answerability decision: its features, the shipped model file, its operating point, and
every /v1/answer response carrying its probability and model version (real encoder, store and app)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import msgspec
import pytest

from rag.answerability import (
    BUNDLED,
    FEATURES,
    AnswerabilityModel,
    AnswerabilityModelError,
    features,
    load_model,
    question_type,
    version_of,
)
from rag.errors import SettingsError
from rag.settings import load_settings


def _sentence(text: str, n: int = 1, score: float = 0.7) -> SimpleNamespace:
    return SimpleNamespace(n=n, text=text, score=score, cosine=score - 0.1, lexical=0.5)


def _source(text: str, n: int = 1, score: float = 0.03) -> SimpleNamespace:
    return SimpleNamespace(n=n, text=text, score=score)


def _feats(question: str, sentence: str, chunk: str | None = None) -> dict[str, float]:
    return features(question, [_source(chunk or sentence)], [_sentence(sentence)])


@pytest.mark.parametrize(("question", "kind"), [
    ("When did the war end?", "when"), ("In what year was it built?", "when"),
    ("How many people live in Paris?", "how_many"), ("How much did it cost?", "how_many"),
    ("Who wrote Hamlet?", "who"), ("Where is the Nile?", "where"), ("Why did it fail?", "why"),
    ("How does a pump work?", "how"), ("Which river is longest?", "which"), ("What is a berry?", "what"),
    ("Name the capital of France.", "other"),
])
def test_question_type(question, kind):
    assert question_type(question) == kind


def test_when_question_against_a_sentence_without_a_date():
    f = _feats("When did the Normans conquer England?", "The Normans conquered England with a large army.")
    assert f["type_when"] == 1.0 and f["when_no_date"] == 1.0 and f["sentence_has_date"] == 0.0
    g = _feats("When did the Normans conquer England?", "The Normans conquered England in 1066.")
    assert g["when_no_date"] == 0.0 and g["sentence_has_date"] == 1.0
    # the year the question itself names is not an answer to "when"
    h = _feats("When did the battle of 1066 end?", "The battle of 1066 was fought at Hastings.")
    assert h["when_no_date"] == 1.0 and h["sentence_new_number"] == 0.0


def test_how_many_needs_a_number_and_who_needs_a_name():
    f = _feats("How many soldiers crossed the river?", "The soldiers crossed the river at dawn.")
    assert f["how_many_no_number"] == 1.0
    assert _feats("How many soldiers crossed the river?", "About 7,000 soldiers crossed it.")["how_many_no_number"] == 0.0
    assert _feats("Who painted the ceiling?", "the ceiling was painted in four years.")["who_no_name"] == 1.0
    assert _feats("Who painted the ceiling?", "The ceiling was painted by Michelangelo.")["who_no_name"] == 0.0


def test_coverage_of_names_numbers_and_rare_words():
    question = "What did Kublai Khan build in 1271 near the Yangtze?"
    sentence = "Kublai Khan built a palace in 1271."
    chunk = sentence + " The river nearby was wide."
    f = _feats(question, sentence, chunk)
    assert f["q_names"] == 3.0  # kublai, khan, yangtze
    assert f["cover_names_sentence"] == pytest.approx(2 / 3)
    assert f["cover_numbers_sentence"] == 1.0 and f["q_numbers"] == 1.0
    assert f["missing_chunk"] >= 1.0  # yangtze is nowhere in the chunk
    assert f["cover_chunk"] < 1.0
    full = _feats(question, "Kublai Khan had them build a palace near the Yangtze in 1271.")
    assert full["cover_names_sentence"] == 1.0 and full["missing_chunk"] == 0.0


def test_features_without_any_sentence_are_defined():
    f = features("When was it built?", [], [])
    assert set(f) == set(FEATURES) and f["best_score"] == -1.0 and f["cover_sentence"] == 0.0


def test_retrieval_features_read_the_fused_scores():
    sources = [_source("A b c.", 1, 0.032), _source("D e f.", 2, 0.016)]
    f = features("What is b?", sources, [_sentence("A b c.", 1, 0.8), _sentence("D e f.", 2, 0.5)])
    assert f["fused_top"] == pytest.approx(0.032) and f["fused_second_ratio"] == pytest.approx(0.5)
    assert f["best_source_rank"] == 1.0 and f["score_gap"] == pytest.approx(0.3)


# -- the model file -----------------------------------------------------------------------------


def _spec() -> dict:
    return json.loads(BUNDLED.read_text())


def test_bundled_model_loads_and_gives_probabilities():
    model = load_model("bundled")
    assert model is not None and model.version == version_of(BUNDLED.read_bytes())
    assert model.version.startswith("answerability@") and set(model.features) <= set(FEATURES)
    p = model.probability(_feats("When did the Normans conquer England?", "The Normans conquered England in 1066."))
    assert 0.0 < p < 1.0
    spec = _spec()
    assert spec["trained_on"]["split"] == "calibration"  # never the report half
    assert spec["calibration"]["cv_auc"] > spec["calibration"]["support_score_auc"]


def test_operating_point_moves_the_threshold():
    spec = _spec()
    low = AnswerabilityModel(spec, version="v", operating_point="answer_rate=0.5")
    high = AnswerabilityModel(spec, version="v", operating_point="answer_rate=0.98")
    assert low.threshold > high.threshold
    pos = spec["calibration"]["cv_probabilities"]["answerable"]
    assert sum(p >= low.threshold for p in pos) / len(pos) >= 0.5
    assert sum(p >= high.threshold for p in pos) / len(pos) >= 0.98
    strict = AnswerabilityModel(spec, version="v", operating_point="precision=0.8")
    neg = spec["calibration"]["cv_probabilities"]["unanswerable"]
    tp, fp = sum(p >= strict.threshold for p in pos), sum(p >= strict.threshold for p in neg)
    assert strict.threshold == 1.0 or tp / (tp + fp) >= 0.8
    assert AnswerabilityModel(spec, version="v", operating_point="probability=0.7").threshold == 0.7
    f = _feats("When did the Normans conquer England?", "The Normans conquered England in 1066.")
    p = low.probability(f)
    assert AnswerabilityModel(spec, version="v", operating_point=f"probability={p:.6f}").decide(f).answerable is (
        p >= round(p, 6))
    assert AnswerabilityModel(spec, version="v", operating_point="probability=1").decide(f).answerable is False
    assert AnswerabilityModel(spec, version="v", operating_point="probability=0").decide(f).answerable is True


@pytest.mark.parametrize("value", ["answer_rate", "answer_rate=1.5", "recall=0.9", "probability=x"])
def test_bad_operating_point_is_a_settings_error(value):
    with pytest.raises(SettingsError, match="answerability_operating_point|OPERATING_POINT"):
        load_settings({"RAG_ANSWERABILITY_OPERATING_POINT": value})


def test_missing_or_corrupt_model_file_is_a_clear_error(tmp_path):
    with pytest.raises(AnswerabilityModelError, match="nowhere.json.*cannot read"):
        load_model(str(tmp_path / "nowhere.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(AnswerabilityModelError, match="bad.json: not JSON"):
        load_model(str(bad))
    spec = _spec()
    spec["features"] = [*spec["features"][:-1], "no_such_feature"]
    bad.write_text(json.dumps(spec))
    with pytest.raises(AnswerabilityModelError, match="no_such_feature"):
        load_model(str(bad))
    spec = _spec()
    del spec["calibration"]
    bad.write_text(json.dumps(spec))
    with pytest.raises(AnswerabilityModelError, match="calibration"):
        load_model(str(bad))
    assert load_model("") is None  # off: the support_score threshold decides


# -- through the real service -------------------------------------------------------------------


@pytest.fixture
def client_with(settings, embedder):
    from tests.test_answer_api import NILE, PARIS, _client
    from tests.conftest import wait_for

    opened = []

    def make(**overrides):
        client, store, registry = _client(settings, embedder, **overrides)
        client.__enter__()
        opened.append((client, store, registry))
        for doc_id, text in (("paris", PARIS), ("nile", NILE)):
            job = client.post("/v1/documents", json={"id": doc_id, "title": doc_id, "text": text}).json()["job_ids"][0]
            wait_for(lambda: client.get(f"/v1/jobs/{job}").json()["status"] == "succeeded", timeout=120)
        return client

    yield make
    for client, store, registry in opened:
        client.__exit__(None, None, None)
        registry.close()
        store.close()


QUESTIONS = ("What is the capital of France?", "How long is the Nile?", "When did the Nile flood Paris?",
             "Who invented the telephone?")


def test_every_answer_carries_its_probability_and_model_version(client_with):
    client = client_with(answer_explain=True)
    version = load_model("bundled").version
    for q in QUESTIONS:
        body = client.post("/v1/answer", json={"question": q}).json()
        assert body["answerability_model"] == version
        p = body["answerable_probability"]
        assert 0.0 <= p <= 1.0
        decision = body["retrieval"]["answerability"]
        assert decision["model"] == version and body["answerable"] is (p >= decision["threshold"])
        # The features the service computed are the ones calibration recomputes from the explanation.
        from eval.answerability_train import _parse, rerank

        sources, sentences = _parse(body)
        model = load_model("bundled")
        offline = features(q, sources, rerank(sources, sentences, model.retrieval_weights))
        for name in FEATURES:
            assert offline[name] == pytest.approx(decision["features"][name], abs=1e-4), name
    streamed = client.post("/v1/answer", json={"question": QUESTIONS[0], "stream": True}).text
    done = json.loads(streamed.strip().split("\n\n")[-1].split("data: ", 1)[1])
    assert done["answerability_model"] == version and 0.0 <= done["answerable_probability"] <= 1.0


def test_operating_point_setting_changes_decisions(client_with, tmp_path):
    # two services side by side: each its own data dir (an embedded store belongs to one process)
    never = client_with(answerability_operating_point="probability=1", data_dir=tmp_path / "never")
    always = client_with(answerability_operating_point="probability=0", data_dir=tmp_path / "always")
    for q in QUESTIONS[:2]:
        a, b = never.post("/v1/answer", json={"question": q}).json(), always.post("/v1/answer", json={"question": q}).json()
        assert a["answerable"] is False and a["citations"] == []
        assert b["answerable"] is True and b["citations"]
        assert a["answerable_probability"] == b["answerable_probability"]


def test_without_a_model_the_threshold_decides(client_with):
    client = client_with(answerability_model="", abstain_threshold=0.0)
    body = client.post("/v1/answer", json={"question": "Who invented the telephone?"}).json()
    assert body["answerable_probability"] is None and body["answerability_model"] is None
    assert body["answerable"] is True  # threshold 0: everything with a source is answered
    assert "answerability" not in body["retrieval"]


def test_a_configured_model_that_is_missing_stops_the_service(settings, embedder, tmp_path):
    from tests.test_answer_api import _client

    client, store, registry = _client(settings, embedder, answerability_model=str(tmp_path / "gone.json"))
    try:
        with pytest.raises(BaseException) as info:  # the lifespan's task group wraps it in an ExceptionGroup
            client.__enter__()
    finally:
        registry.close()
        store.close()

    def found(exc: BaseException) -> bool:
        if isinstance(exc, AnswerabilityModelError):
            return "gone.json" in exc.message and "RAG_ANSWERABILITY_MODEL=" in exc.message
        return any(found(e) for e in getattr(exc, "exceptions", ()))

    assert found(info.value), repr(info.value)


def test_settings_read_the_model_variables():
    s = load_settings({"RAG_ANSWERABILITY_MODEL": "", "RAG_ANSWERABILITY_OPERATING_POINT": "precision=0.8"})
    assert s.answerability_model == "" and s.answerability_operating_point == "precision=0.8"
    assert msgspec.structs.replace(s, answerability_model="bundled").answerability_model == "bundled"
