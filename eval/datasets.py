"""Evaluation data: BEIR folders (corpus, queries, graded qrels) and QA JSONL with reference answers.

Every loader validates as it reads and raises :class:`DatasetError` naming the file, the line
number and what is wrong, so a malformed benchmark fails before any model is loaded.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rag.errors import RagError

__all__ = [
    "BeirDataset",
    "CorpusDoc",
    "DatasetError",
    "QAExample",
    "dataset_hash",
    "file_sha256",
    "iter_corpus",
    "load_beir",
    "load_qa",
    "load_qa_jsonl",
    "load_qrels",
    "load_queries",
    "qa_as_retrieval",
]


class DatasetError(RagError):
    """A benchmark file is missing or malformed; the message names the file and line."""

    code = "invalid_dataset"

    def __init__(self, path: Path | str, reason: str, line: int | None = None) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {reason}")
        self.path = Path(path)
        self.line = line
        self.reason = reason


@dataclass(frozen=True, slots=True)
class CorpusDoc:
    id: str
    title: str
    text: str


@dataclass(slots=True)
class BeirDataset:
    """One split of a BEIR folder: the queries that split judges and their graded qrels."""

    name: str
    root: Path
    split: str
    corpus_path: Path
    queries: dict[str, str]  # every query of queries.jsonl, id -> text
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: graded relevance}
    files: list[Path] = field(default_factory=list)
    hash: str = ""
    corpus_hash: str = ""

    @property
    def split_query_ids(self) -> list[str]:
        """Query ids judged in this split, in qrels file order (the order queries are run in)."""
        return list(self.qrels)


# ---------------------------------------------------------------------------------------------
# Hashes
# ---------------------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def dataset_hash(paths: Iterable[Path], root: Path | None = None) -> str:
    """sha256 over (name, content hash) of each file, in the order given; names relative to ``root``."""
    h = hashlib.sha256()
    for p in paths:
        p = Path(p)
        name = p.relative_to(root).as_posix() if root is not None else p.name
        h.update(name.encode())
        h.update(b"\x00")
        h.update(file_sha256(p).encode())
        h.update(b"\x00")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# JSONL helpers
# ---------------------------------------------------------------------------------------------


def _require(path: Path) -> Path:
    if not path.is_file():
        raise DatasetError(path, "file not found")
    return path


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; a BOM and CRLF line ends are tolerated."""
    _require(path)
    with path.open("r", encoding="utf-8-sig", newline=None) as fh:
        try:
            for number, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DatasetError(path, f"invalid JSON ({exc.msg} at column {exc.colno})", number) from exc
                if not isinstance(record, dict):
                    raise DatasetError(path, f"expected a JSON object, got {type(record).__name__}", number)
                yield number, record
        except UnicodeDecodeError as exc:
            raise DatasetError(path, f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc


def _id_field(path: Path, number: int, record: dict[str, Any], key: str = "_id") -> str:
    raw = record.get(key)
    if raw is None:
        raise DatasetError(path, f"missing {key!r}", number)
    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        raise DatasetError(path, f"{key!r} must be a string or an integer, not {type(raw).__name__}", number)
    value = str(raw).strip()
    if not value:
        raise DatasetError(path, f"empty {key!r}", number)
    return value


def _str_field(path: Path, number: int, record: dict[str, Any], key: str, *, required: bool) -> str:
    raw = record.get(key)
    if raw is None:
        if required:
            raise DatasetError(path, f"missing {key!r}", number)
        return ""
    if not isinstance(raw, str):
        raise DatasetError(path, f"{key!r} must be a string, not {type(raw).__name__}", number)
    return raw


# ---------------------------------------------------------------------------------------------
# BEIR
# ---------------------------------------------------------------------------------------------


def iter_corpus(path: Path) -> Iterator[CorpusDoc]:
    """Validate and yield a BEIR ``corpus.jsonl``: ``_id`` unique, ``text``/``title`` strings."""
    seen: dict[str, int] = {}
    for number, record in _iter_jsonl(path):
        doc_id = _id_field(path, number, record)
        if doc_id in seen:
            raise DatasetError(path, f"duplicate _id {doc_id!r} (first on line {seen[doc_id]})", number)
        seen[doc_id] = number
        title = _str_field(path, number, record, "title", required=False)
        text = _str_field(path, number, record, "text", required=True)
        yield CorpusDoc(id=doc_id, title=title, text=text)


def load_queries(path: Path) -> dict[str, str]:
    """``queries.jsonl`` as {id: text}; ids unique, text non-empty."""
    out: dict[str, str] = {}
    lines: dict[str, int] = {}
    for number, record in _iter_jsonl(path):
        qid = _id_field(path, number, record)
        text = _str_field(path, number, record, "text", required=True).strip()
        if not text:
            raise DatasetError(path, f"query {qid!r} has empty text", number)
        if qid in out:
            raise DatasetError(path, f"duplicate _id {qid!r} (first on line {lines[qid]})", number)
        out[qid] = text
        lines[qid] = number
    if not out:
        raise DatasetError(path, "no queries")
    return out


QRELS_HEADER = ("query-id", "corpus-id", "score")


def load_qrels(path: Path) -> dict[str, dict[str, int]]:
    """A BEIR qrels TSV as {query id: {doc id: relevance}}, in file order.

    The header ``query-id corpus-id score`` is required; lines may end in CRLF; a score is an
    integer (graded relevance; 0 or below means judged not relevant). A repeated (query, doc)
    pair is an error rather than a silent overwrite.
    """
    _require(path)
    qrels: dict[str, dict[str, int]] = {}
    lines: dict[tuple[str, str], int] = {}
    try:
        with path.open("r", encoding="utf-8-sig", newline="") as fh:
            header_seen = False
            for number, raw in enumerate(fh, start=1):
                line = raw.rstrip("\r\n")
                if not line.strip():
                    continue
                cols = line.split("\t")
                if not header_seen:
                    header_seen = True
                    if tuple(c.strip() for c in cols) != QRELS_HEADER:
                        raise DatasetError(
                            path, f"expected the header 'query-id<TAB>corpus-id<TAB>score', got {line!r}", number
                        )
                    continue
                if len(cols) != 3:
                    raise DatasetError(
                        path, f"expected 3 tab-separated columns (query-id, corpus-id, score), got {len(cols)}", number
                    )
                qid, did, score_text = (c.strip() for c in cols)
                if not qid or not did:
                    raise DatasetError(path, "empty query-id or corpus-id", number)
                try:
                    score = int(score_text)
                except ValueError:
                    raise DatasetError(path, f"score must be an integer, got {score_text!r}", number) from None
                if (qid, did) in lines:
                    raise DatasetError(
                        path, f"duplicate judgement for query {qid!r}, doc {did!r} (first on line {lines[qid, did]})",
                        number,
                    )
                lines[qid, did] = number
                qrels.setdefault(qid, {})[did] = score
    except UnicodeDecodeError as exc:
        raise DatasetError(path, f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
    if not header_seen:
        raise DatasetError(path, "empty file (expected a header and judgements)")
    if not qrels:
        raise DatasetError(path, "no judgements after the header")
    return qrels


def load_beir(root: Path, split: str = "test", *, validate_corpus: bool = True) -> BeirDataset:
    """Load one split of a BEIR folder (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``).

    Every qrels query must exist in ``queries.jsonl`` and (when the corpus is validated) every
    judged document in the corpus: a dangling id is an error, because it silently caps recall.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(root, "not a directory (a BEIR folder holds corpus.jsonl, queries.jsonl, qrels/)")
    corpus_path = _require(root / "corpus.jsonl")
    queries_path = root / "queries.jsonl"
    qrels_path = root / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        available = sorted(p.stem for p in (root / "qrels").glob("*.tsv")) if (root / "qrels").is_dir() else []
        raise DatasetError(qrels_path, f"split {split!r} not found; available: {', '.join(available) or 'none'}")
    queries = load_queries(queries_path)
    qrels = load_qrels(qrels_path)
    missing = [q for q in qrels if q not in queries]
    if missing:
        raise DatasetError(qrels_path, f"{len(missing)} query ids are not in queries.jsonl, e.g. {missing[:3]}")
    if validate_corpus:
        ids = {d.id for d in iter_corpus(corpus_path)}
        dangling = sorted({d for judged in qrels.values() for d in judged if d not in ids})
        if dangling:
            raise DatasetError(qrels_path, f"{len(dangling)} judged doc ids are not in corpus.jsonl, e.g. {dangling[:3]}")
    files = [corpus_path, queries_path, qrels_path]
    return BeirDataset(
        name=root.resolve().name, root=root, split=split, corpus_path=corpus_path, queries=queries, qrels=qrels,
        files=files, hash=dataset_hash(files, root), corpus_hash=file_sha256(corpus_path),
    )


# ---------------------------------------------------------------------------------------------
# QA JSONL (SQuAD-style, with reference answers)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QAExample:
    id: str
    question: str
    answer: str  # the first reference answer ("" when unanswerable)
    answers: tuple[str, ...]
    answer_starts: tuple[int, ...]
    is_impossible: bool
    gold_doc_ids: tuple[str, ...]
    contexts: tuple[str, ...]
    title: str


def _str_list(path: Path, number: int, record: dict[str, Any], key: str) -> tuple[str, ...]:
    raw = record.get(key, [])
    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
        raise DatasetError(path, f"{key!r} must be a list of strings", number)
    return tuple(raw)


def load_qa(path: Path) -> list[QAExample]:
    """QA JSONL: ``id, question, answer, answers[], answer_starts, is_impossible, gold_doc_ids, contexts, title``.

    An answerable question needs at least one answer and one gold document; an unanswerable one
    (``is_impossible: true``) is kept for abstention tests.
    """
    path = Path(path)
    out: list[QAExample] = []
    seen: dict[str, int] = {}
    for number, record in _iter_jsonl(path):
        qid = _id_field(path, number, record, "id")
        if qid in seen:
            raise DatasetError(path, f"duplicate id {qid!r} (first on line {seen[qid]})", number)
        seen[qid] = number
        question = _str_field(path, number, record, "question", required=True).strip()
        if not question:
            raise DatasetError(path, "empty 'question'", number)
        impossible = record.get("is_impossible", False)
        if not isinstance(impossible, bool):
            raise DatasetError(path, "'is_impossible' must be true or false", number)
        answers = _str_list(path, number, record, "answers")
        starts_raw = record.get("answer_starts", [])
        if not isinstance(starts_raw, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in starts_raw):
            raise DatasetError(path, "'answer_starts' must be a list of integers", number)
        answer = _str_field(path, number, record, "answer", required=False) or (answers[0] if answers else "")
        gold = _str_list(path, number, record, "gold_doc_ids")
        contexts = _str_list(path, number, record, "contexts")
        if not impossible and not (answer or answers):
            raise DatasetError(path, f"question {qid!r} is answerable but has no answer", number)
        if not impossible and not gold:
            raise DatasetError(path, f"question {qid!r} is answerable but has no gold_doc_ids", number)
        out.append(QAExample(
            id=qid, question=question, answer=answer, answers=answers or ((answer,) if answer else ()),
            answer_starts=tuple(starts_raw), is_impossible=impossible, gold_doc_ids=gold, contexts=contexts,
            title=_str_field(path, number, record, "title", required=False),
        ))
    if not out:
        raise DatasetError(path, "no questions")
    return out


# ---------------------------------------------------------------------------------------------
# QA JSONL of any corpus (what a user brings)
# ---------------------------------------------------------------------------------------------

QA_FIELDS = ("id", "question", "answers", "gold_document_ids", "unanswerable")
# SQuAD's names (eval's own qa.jsonl) are read as the same fields.
_QA_ALIASES = {"is_impossible": "unanswerable", "gold_doc_ids": "gold_document_ids"}


def question_id(question: str) -> str:
    """The id of a line without one: a hash of its question text, so the split stays put when lines move."""
    return "q-" + hashlib.sha256(question.strip().encode()).hexdigest()[:16]


def load_qa_jsonl(path: Path, *, documents: dict[str, str] | None = None) -> list[QAExample]:
    """A user's QA JSONL, one question a line::

        {"id"?: str|int, "question": str, "answers": [str, …], "gold_document_ids"?: [str|int, …], "unanswerable"?: bool}

    An answerable question needs at least one non-empty answer; an unanswerable one
    (``"unanswerable": true``) has none. ``id`` defaults to a hash of the question (:func:`question_id`);
    ids are unique. SQuAD's ``is_impossible`` and ``gold_doc_ids`` are accepted for the last two
    fields. With ``documents`` (the corpus's ids and texts, "" where unknown), every gold document id
    must be one of them — a dangling id would silently lower the cited-gold-document rate — and the
    gold documents' texts become the question's ``contexts`` (what ragas' context metrics compare
    the cited sources with, as SQuAD's gold paragraph). Every problem is a
    :class:`DatasetError` naming the line and the field.
    """
    path = Path(path)
    out: list[QAExample] = []
    seen: dict[str, int] = {}
    for number, record in _iter_jsonl(path):
        for alias, name in _QA_ALIASES.items():
            if alias in record:
                if name in record:
                    raise DatasetError(path, f"both {name!r} and its alias {alias!r}: give one", number)
                record[name] = record[alias]
        question = _str_field(path, number, record, "question", required=True).strip()
        if not question:
            raise DatasetError(path, "empty 'question'", number)
        qid = _id_field(path, number, record, "id") if record.get("id") is not None else question_id(question)
        if qid in seen:
            if record.get("id") is not None:
                raise DatasetError(path, f"duplicate 'id' {qid!r} (first on line {seen[qid]})", number)
            raise DatasetError(path, f"duplicate 'question' without an 'id' (first on line {seen[qid]}); "
                                     "give each line an 'id'", number)
        seen[qid] = number
        unanswerable = record.get("unanswerable", False)
        if not isinstance(unanswerable, bool):
            raise DatasetError(path, f"'unanswerable' must be true or false, not {json.dumps(unanswerable)}", number)
        if "answers" not in record and not unanswerable:
            raise DatasetError(path, "missing 'answers' (a list of answer strings; [] with \"unanswerable\": true)",
                               number)
        raw = record.get("answers", [])
        if not isinstance(raw, list) or not all(isinstance(a, str) for a in raw):
            raise DatasetError(path, f"'answers' must be a list of strings, not {json.dumps(raw)[:80]}", number)
        answers = tuple(dict.fromkeys(a.strip() for a in raw if a.strip()))
        if unanswerable and answers:
            raise DatasetError(path, "'answers' must be empty when 'unanswerable' is true", number)
        if not unanswerable and not answers:
            raise DatasetError(path, "'answers' holds no non-empty answer (set \"unanswerable\": true for a question "
                                     "the documents do not answer)", number)
        gold_raw = record.get("gold_document_ids", [])
        if gold_raw is None:
            gold_raw = []
        if not isinstance(gold_raw, list) or not all(isinstance(g, (str, int)) and not isinstance(g, bool)
                                                     for g in gold_raw):
            raise DatasetError(path, "'gold_document_ids' must be a list of document ids (strings)", number)
        gold = tuple(dict.fromkeys(str(g).strip() for g in gold_raw if str(g).strip()))
        contexts: tuple[str, ...] = ()
        if documents is not None:
            unknown = [g for g in gold if g not in documents]
            if unknown:
                raise DatasetError(path, f"'gold_document_ids' names documents the corpus does not hold: {unknown[:3]}",
                                   number)
            contexts = tuple(documents[g] for g in gold if documents[g])
        out.append(QAExample(id=qid, question=question, answer=answers[0] if answers else "", answers=answers,
                             answer_starts=(), is_impossible=unanswerable, gold_doc_ids=gold, contexts=contexts,
                             title=""))
    if not out:
        raise DatasetError(path, "no questions")
    return out


def qa_as_retrieval(examples: Iterable[QAExample]) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    """Queries and binary qrels (gold documents relevant) for the answerable questions."""
    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    for ex in examples:
        if ex.is_impossible or not ex.gold_doc_ids:
            continue
        queries[ex.id] = ex.question
        qrels[ex.id] = {d: 1 for d in ex.gold_doc_ids}
    return queries, qrels
