"""Training pairs for domain adaptation, from the corpus in the store (and from users' labels).

- title → body: a document's title finds its first passage.
- inverse cloze (Lee et al., 2019): a sentence finds the rest of its passage; the sentence stays in
  the passage 10 % of the time so the model still learns lexical matching.
- synthetic questions: the configured LLM writes a question per passage; a question is kept only
  if the current retriever finds its passage's document in the top k (a round-trip filter).
- labelled pairs: JSONL ``{"query", "document_id"}`` lines, or a BEIR folder's queries + qrels.

Hard negatives are mined with the current encoder (the vectors already in the store) and the BM25
index, skipping likely false negatives: passages of the positive's own document and passages that
the current encoder scores nearly as high as the positive.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import stat
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import msgspec
import numpy as np
import structlog

from rag.datasets import DatasetLimits, parse_beir, parse_jsonl
from rag.errors import BadRequest
from rag.extractive import split_sentences
from rag.store import VectorStore
from rag.types import ChunkPayload, embedding_text

log = structlog.get_logger("ingest.pairs")

ICT_KEEP_SENTENCE = 0.1
MIN_QUERY_WORDS = 4
# A labelled file (pairs JSONL, BEIR queries or qrels) is read whole; larger than this is refused.
MAX_LABELLED_FILE_BYTES = 256 * 1024 * 1024
# An operator's local files: the file bound above, and none on pairs or text lengths (uploads have theirs).
LOCAL_FILE_LIMITS = DatasetLimits(max_bytes=MAX_LABELLED_FILE_BYTES, max_pairs=2**62,
                                  max_query_chars=MAX_LABELLED_FILE_BYTES,
                                  max_document_id_chars=MAX_LABELLED_FILE_BYTES, max_json_depth=256)


class Passage(msgspec.Struct, kw_only=True):
    """A stored chunk: what it says, where it is, and its current dense vector."""

    id: str
    tenant: str
    document_id: str
    chunk_index: int
    title: str
    text: str
    heading_path: list[str] = msgspec.field(default_factory=list)


class Pair(msgspec.Struct, kw_only=True):
    query: str
    positive: str  # the passage text as the encoder sees it (title and headings included)
    document_id: str
    tenant: str = ""
    source: str  # title | ict | synthetic | labelled
    negative: str | None = None
    negative_document_id: str | None = None


def passage_text(p: Passage | dict) -> str:
    """The text the encoders see for a stored chunk (:func:`rag.types.embedding_text`, from a payload)."""
    if isinstance(p, dict):
        return embedding_text(p.get("title") or "", p.get("heading_path") or [], p.get("text") or "")
    return embedding_text(p.title, p.heading_path, p.text)


def load_passages(store: VectorStore, collection: str, *, tenant: str | None = None) -> tuple[list[Passage], np.ndarray]:
    """Every live passage (of one tenant, or all) with its current dense vector."""
    passages: list[Passage] = []
    vectors: list[list[float]] = []
    for batch in store.iter_points(collection):
        for p in batch:
            pl = ChunkPayload.from_payload(p.payload)
            if not pl.live or (tenant is not None and pl.tenant != tenant):
                continue
            passages.append(Passage(id=p.id, tenant=pl.tenant, document_id=pl.document_id, chunk_index=pl.chunk_index,
                                    title=pl.title, text=pl.text, heading_path=pl.heading_path))
            vectors.append(p.vector)
    # A stable order, independent of the engine's scroll order, keeps runs deterministic.
    order = sorted(range(len(passages)), key=lambda i: (passages[i].tenant, passages[i].document_id,
                                                        passages[i].chunk_index))
    passages = [passages[i] for i in order]
    if not order:
        return [], np.zeros((0, 0), dtype=np.float32)
    mat = np.asarray([vectors[i] for i in order], dtype=np.float32)
    return passages, mat


def title_pairs(passages: Sequence[Passage]) -> list[Pair]:
    """A document's title → its first passage (the body, without the title the encoder would otherwise see)."""
    out = []
    for p in passages:
        if p.chunk_index == 0 and len(p.title.split()) >= MIN_QUERY_WORDS and p.text.strip():
            body = "\n".join([" > ".join(p.heading_path), p.text]) if p.heading_path else p.text
            out.append(Pair(query=p.title, positive=body, document_id=p.document_id, tenant=p.tenant, source="title"))
    return out


def ict_pairs(passages: Sequence[Passage], rng: random.Random, per_passage: int = 1) -> list[Pair]:
    """Inverse cloze: a sentence → its passage, with the sentence removed (kept 10 % of the time)."""
    out = []
    for p in passages:
        spans = [(s, e) for s, e in split_sentences(p.text) if len(p.text[s:e].split()) >= 6]
        if len(spans) < 2:
            continue
        for s, e in rng.sample(spans, min(per_passage, len(spans))):
            sentence = p.text[s:e].strip()
            rest = p.text if rng.random() < ICT_KEEP_SENTENCE else (p.text[:s] + p.text[e:])
            rest = re.sub(r"\s{2,}", " ", rest).strip()
            positive = passage_text(Passage(id=p.id, tenant=p.tenant, document_id=p.document_id,
                                            chunk_index=p.chunk_index, title=p.title, text=rest,
                                            heading_path=p.heading_path))
            out.append(Pair(query=sentence, positive=positive, document_id=p.document_id, tenant=p.tenant, source="ict"))
    return out


def best_passage_per_document(passages: Sequence[Passage]) -> dict[tuple[str, str], list[int]]:
    by_doc: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, p in enumerate(passages):
        by_doc[(p.tenant, p.document_id)].append(i)
    return by_doc


def read_regular_bytes(path: Path, limit: int = MAX_LABELLED_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes.

    The path comes from a caller: a FIFO would block the reading worker forever, a device never
    ends, so anything but a regular file is refused (checked on the opened file, so that a path
    swapped after a first look gains nothing).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as exc:
        raise BadRequest(f"{path}: no such file") from exc
    except OSError as exc:
        raise BadRequest(f"{path}: cannot be opened ({exc.strerror})") from exc
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise BadRequest(f"{path} is not a regular file")
        if info.st_size > limit:
            raise BadRequest(f"{path} is {info.st_size} bytes; a labelled file may have at most {limit}")
        data = f.read(limit + 1)
    if len(data) > limit:  # it grew after the size check
        raise BadRequest(f"{path} has more than {limit} bytes; a labelled file may have at most {limit}")
    return data


def read_regular_text(path: Path, limit: int = MAX_LABELLED_FILE_BYTES) -> str:
    """The UTF-8 text of a regular file of at most ``limit`` bytes (see :func:`read_regular_bytes`)."""
    data = read_regular_bytes(path, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"{path} is not UTF-8 text (byte {exc.start})") from exc


def read_labelled(path: Path, split: str = "train") -> list[tuple[str, str]]:
    """(query, document id) pairs from a JSONL file, or from a BEIR folder's queries and qrels/<split>.tsv.

    The files are read here (regular files only, bounded); their text is parsed by ``rag.datasets``, the
    parser that tenants' uploaded datasets go through too.
    """
    path = Path(path)
    if path.is_dir():
        qfile = path / "queries.jsonl"
        qrels = path / "qrels" / f"{split}.tsv"
        if not qfile.exists() or not qrels.exists():
            raise BadRequest(f"{path} is not a BEIR folder with queries.jsonl and qrels/{split}.tsv")
        return parse_beir(read_regular_bytes(qfile), read_regular_bytes(qrels), queries_source=str(qfile),
                          qrels_source=str(qrels), limits=LOCAL_FILE_LIMITS)
    return parse_jsonl(read_regular_bytes(path), source=str(path), limits=LOCAL_FILE_LIMITS)


def labelled_pairs(labels: Iterable[tuple[str, str]], passages: Sequence[Passage], vectors: np.ndarray,
                   embed_queries: Callable[[Sequence[str]], np.ndarray], *, tenant: str | None = None) -> list[Pair]:
    """Each labelled (query, document) → the document's passage the current encoder ranks highest for the query."""
    labels = list(labels)
    by_doc: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(passages):
        if tenant is None or p.tenant == tenant:
            by_doc[p.document_id].append(i)
    known = [(q, d) for q, d in labels if d in by_doc]
    if labels and not known:
        raise BadRequest("none of the labelled pairs' document ids is in the corpus")
    if len(known) < len(labels):
        log.warning("labelled_pairs_unknown_documents", skipped=len(labels) - len(known))
    qv = embed_queries([q for q, _ in known]) if known else np.zeros((0, vectors.shape[1]), np.float32)
    out = []
    for (q, d), v in zip(known, qv):
        idx = by_doc[d]
        best = idx[int(np.argmax(vectors[idx] @ v))]
        p = passages[best]
        out.append(Pair(query=q, positive=passage_text(p), document_id=d, tenant=p.tenant, source="labelled"))
    return out


def mine_hard_negatives(pairs: list[Pair], passages: Sequence[Passage], vectors: np.ndarray,
                        embed_queries: Callable[[Sequence[str]], np.ndarray],
                        sparse_search: Callable[[str, str], list[str]] | None = None, *,
                        rank_from: int = 3, rank_to: int = 30, max_ratio: float = 0.95, seed: int = 13) -> int:
    """Give each pair one hard negative; returns how many got one.

    Candidates are the dense ranks ``rank_from..rank_to`` of the current encoder, alternating with the
    BM25 ranks when ``sparse_search(query, tenant) -> [point ids]`` is given. A candidate is skipped when
    it comes from the positive's document or scores above ``max_ratio`` × the positive's score (likely
    an unlabelled positive).
    """
    rng = random.Random(seed)
    id_to_idx = {p.id: i for i, p in enumerate(passages)}
    doc_of = [(p.tenant, p.document_id) for p in passages]
    got = 0
    qvecs = embed_queries([p.query for p in pairs]) if pairs else np.zeros((0, vectors.shape[1]), np.float32)
    pos_docs = best_passage_per_document(passages)
    block_scores = np.zeros((0, len(passages)), np.float32)
    for n, (pair, qv) in enumerate(zip(pairs, qvecs)):
        if n % 256 == 0:  # one matrix product per block of queries instead of one per query
            block_scores = qvecs[n:n + 256] @ vectors.T
        scores = block_scores[n % 256]
        own = pos_docs.get((pair.tenant, pair.document_id), [])
        pos_score = float(scores[own].max()) if own else 1.0
        top = np.argpartition(-scores, min(rank_to, len(scores) - 1))[: rank_to + 1]
        dense_ranked = [int(i) for i in top[np.argsort(-scores[top])]][rank_from:rank_to]
        candidates = dense_ranked
        if sparse_search is not None:
            sparse_ranked = [id_to_idx[x] for x in sparse_search(pair.query, pair.tenant) if x in id_to_idx]
            sparse_ranked = sparse_ranked[rank_from:rank_to]
            candidates = [c for ab in zip(dense_ranked, sparse_ranked) for c in ab] + dense_ranked[len(sparse_ranked):]
        usable = [c for c in candidates if doc_of[c] != (pair.tenant, pair.document_id)
                  and passages[c].tenant == pair.tenant and scores[c] < max_ratio * pos_score]
        if usable:
            pick = usable[rng.randrange(min(len(usable), 5))]
            pair.negative = passage_text(passages[pick])
            pair.negative_document_id = passages[pick].document_id
            got += 1
    return got


def pairs_hash(pairs: Sequence[Pair]) -> str:
    h = hashlib.sha256()
    for p in pairs:
        h.update(msgspec.json.encode(p))
    return h.hexdigest()[:16]


def split_validation(pairs: list[Pair], fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Hold out whole documents (not single pairs), so a validation query's document was never trained on."""
    docs = sorted({(p.tenant, p.document_id) for p in pairs})
    rng = random.Random(seed)
    rng.shuffle(docs)
    n_val = int(round(len(docs) * fraction))
    held = set(docs[:n_val])
    train = [p for p in pairs if (p.tenant, p.document_id) not in held]
    val = [p for p in pairs if (p.tenant, p.document_id) in held]
    return train, val


def order_for_in_batch_negatives(pairs: Sequence[Pair], batch_size: int, seed: int) -> list[Pair]:
    """Shuffle, then arrange pairs so that no batch holds two pairs touching the same document.

    With in-batch negatives every other passage in a batch counts as wrong for a query; a second
    passage of the query's own document would be a false negative. Pairs that would clash wait for
    the next batch.
    """
    rng = random.Random(seed)
    queue = list(pairs)
    rng.shuffle(queue)
    out: list[Pair] = []
    while queue:
        batch: list[Pair] = []
        used: set[tuple[str, str]] = set()
        rest: list[Pair] = []
        for p in queue:
            keys = {(p.tenant, p.document_id)}
            if p.negative_document_id:
                keys.add((p.tenant, p.negative_document_id))
            if len(batch) < batch_size and not (keys & used):
                batch.append(p)
                used |= keys
            else:
                rest.append(p)
        out.extend(batch)
        if len(batch) < batch_size:
            # Only pairs that clash with each other are left; a partial batch mid-stream would shift
            # every later batch boundary, so they are dropped (a handful at most on a real corpus).
            if rest:
                log.info("pairs_dropped_for_batching", pairs=len(rest))
            break
        queue = rest
    return out


QUESTION_PROMPT = (
    "Write one specific question that the passage below answers. Reply with the question only.\n\n"
    "Passage:\n{passage}"
)


def synthetic_question_pairs(llm, passages: Sequence[Passage], vectors: np.ndarray,
                             embed_queries: Callable[[Sequence[str]], np.ndarray], n: int, *, rng: random.Random,
                             keep_top_k: int = 20, concurrency: int = 2) -> list[Pair]:
    """LLM-written questions for ``n`` sampled passages, kept only if the current encoder finds the passage's
    document in its top ``keep_top_k`` (a round-trip filter that drops vague or wrong questions)."""
    import asyncio

    chosen = rng.sample(range(len(passages)), min(n, len(passages)))

    async def ask_all() -> list[str | None]:
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int) -> str | None:
            async with sem:
                try:
                    done = await llm.complete([{"role": "user", "content": QUESTION_PROMPT.format(
                        passage=passages[i].text[:2000])}])
                except Exception as exc:  # noqa: BLE001 - one failed question must not end the run
                    log.warning("synthetic_question_failed", error=str(exc))
                    return None
            text = done.text.strip().splitlines()[0].strip() if done.text.strip() else ""
            return text if text.endswith("?") and len(text.split()) >= MIN_QUERY_WORDS else None

        return await asyncio.gather(*(one(i) for i in chosen))

    questions = asyncio.run(ask_all())
    asked = [(i, q) for i, q in zip(chosen, questions) if q]
    if not asked:
        return []
    qv = embed_queries([q for _, q in asked])
    docs = [(p.tenant, p.document_id) for p in passages]
    out = []
    for (i, q), v in zip(asked, qv):
        top = np.argsort(-(vectors @ v))[: keep_top_k * 3]
        if docs[i] in list(dict.fromkeys(docs[j] for j in top))[:keep_top_k]:
            p = passages[i]
            out.append(Pair(query=q, positive=passage_text(p), document_id=p.document_id, tenant=p.tenant,
                            source="synthetic"))
    log.info("synthetic_questions", asked=len(chosen), written=len(asked), kept=len(out))
    return out
