"""``python -m eval``: retrieval evaluation, report comparison, and benchmarks.

- ``retrieval``: index a BEIR corpus through the real ingest worker (or use a running service with
  ``--url``) and score its queries per retrieval mode; writes report.json, report.html, runs/*.trec.
- ``compare A B``: two reports side by side; exit 1 when ``--metric`` dropped by more than ``--max-drop``.
- ``answers``: answer quality (contains gold, citations, EM/F1, abstention, latency, ragas metrics; LLM-judged
  ones with ``--judge-url``) on the report split of SQuAD 2.0 dev, or of any QA JSONL (``--qa``, ``--corpus``),
  through POST /v1/answer, with reliability and answer-rate/abstention plots; ``calibrate``: the
  abstention threshold on the disjoint calibration split.
- ``bench ingest|search|answer|encode``: benchmarks that print figures and write JSON (``encode``: the encoder
  runtimes torch, onnx and onnx-int8 side by side).
- ``drift``: embedding drift between two samples (corpora, vector snapshots, the API's query sample, two
  encoders); writes report.json and report.html; exit 1 on drift only with ``--fail-on-drift``.
  ``drift export``: a snapshot of a collection's dense vectors (.npy) to compare later.

Exit status: 0 success, 1 failure (or a regression in ``compare``), 2 usage error.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rag.runtime import pin_process_environment  # noqa: E402 - before numpy and torch load

pin_process_environment()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from eval.service import use_api_key

    use_api_key(os.environ.get("RAG_API_KEY", ""))  # the key the tools present to a running service
    return _COMMANDS[args.command](args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eval", description="evaluation and benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    which = _add_bench_commands(sub)
    _add_retrieval_command(sub)
    _add_compare_command(sub)
    _add_answer_commands(sub, which)
    _add_drift_command(sub)
    return parser


def _add_bench_commands(sub):
    """``bench ingest|search|encode|tenants|encoders``; returns the bench subparsers, where ``bench answer`` joins them."""
    bench = sub.add_parser("bench", help="performance benchmarks (figures, not tests)")
    which = bench.add_subparsers(dest="bench", required=True)

    ing = which.add_parser("ingest", help="end-to-end ingest throughput vs raw encode on the same chunks")
    ing.add_argument("--dataset", type=Path, required=True, help="a BEIR folder (corpus.jsonl)")
    ing.add_argument("--limit", type=int, default=0, help="use the first N documents (0: all)")
    ing.add_argument("--out", type=Path, default=Path("bench"))

    se = which.add_parser("search", help="/v1/search latency over HTTP at several concurrencies")
    se.add_argument("--dataset", type=Path, required=True, help="a BEIR folder (corpus.jsonl, queries.jsonl)")
    se.add_argument("--limit", type=int, default=0, help="index only the first N documents (0: all)")
    se.add_argument("--url", help="bench an already running service instead of starting one")
    se.add_argument("--data-dir", type=Path, default=Path("bench/search-data"),
                    help="data dir of the service the bench starts (kept, so a second run skips ingest)")
    se.add_argument("--requests", type=int, default=400, help="requests per configuration")
    se.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    se.add_argument("--top-k", type=int, nargs="+", default=[10, 100])
    se.add_argument("--port", type=int, default=8765)
    se.add_argument("--mode", choices=["dense", "sparse", "hybrid"], default="hybrid")
    se.add_argument("--out", type=Path, default=Path("bench"))
    # Search while other work runs (eval/bench_during.py): idle p50/p95 first, then under the load, side by side.
    se.add_argument("--during", choices=["adapt", "ingest"], help="measure at concurrency 1 idle, then while an "
                    "adaptation trains or a bulk upload (another tenant) is indexed")
    se.add_argument("--with-answers", type=int, default=0, metavar="N", help="measure at the largest --concurrency "
                    "alone, then beside N clients asking /v1/answer (extractive) without pause")
    se.add_argument("--seconds", type=float, default=60.0,
                    help="length of each measured window (--during, --with-answers)")
    se.add_argument("--bulk-docs", type=int, default=2000, help="--during ingest: documents uploaded (after --limit)")
    se.add_argument("--adapt-pairs", type=int, default=400, help="--during adapt: the job's max_pairs")

    me = which.add_parser("memory", help="API RSS over many mixed requests (search, answer, upload), per malloc setting")
    me.add_argument("--dataset", type=Path, required=True, help="a QA folder with qa.jsonl and corpus.jsonl")
    me.add_argument("--requests", type=int, default=10000)
    me.add_argument("--every", type=int, default=500, help="sample RSS every N requests (default 500)")
    me.add_argument("--settle", type=int, default=1000, help="growth is measured from this many requests on")
    me.add_argument("--concurrency", type=int, default=4)
    me.add_argument("--data-dir", type=Path, default=Path(".eval-data/bench-memory"))
    me.add_argument("--port", type=int, default=8774)
    me.add_argument("--tenant", default="eval")
    me.add_argument("--seed", type=int, default=13)
    me.add_argument("--only", nargs="+", help="run only these configurations (e.g. 'malloc arenas 2')")
    me.add_argument("--out", type=Path, default=Path("bench"))

    en = which.add_parser("encoders", help="per-tenant encoder cache: memory per loaded encoder, load vs cached query")
    en.add_argument("--tenants", type=int, default=6, help="tenants with an encoder of their own (default 6)")
    en.add_argument("--cache-size", type=int, default=4, help="RAG_ENCODER_CACHE_SIZE for the run (default 4)")
    en.add_argument("--out", type=Path, default=Path("bench"))

    ec = which.add_parser("encode", help="encoder runtimes (torch, onnx, onnx-int8): query latency, chunks/s, "
                                         "cosine to torch fp32, memory; --quality adds SciFact nDCG@10")
    ec.add_argument("--dataset", type=Path, required=True, help="a BEIR folder (queries.jsonl, corpus.jsonl)")
    ec.add_argument("--runtimes", nargs="+", choices=["torch", "onnx", "onnx-int8"], default=["onnx", "onnx-int8"],
                    help="runtimes beside the torch fp32 baseline (always measured)")
    ec.add_argument("--queries", type=int, default=200, help="single queries, one at a time per runtime")
    ec.add_argument("--chunks", type=int, default=512, help="chunks for batch-64 throughput and cosine")
    ec.add_argument("--quality", action="store_true",
                    help="also nDCG@10, dense and hybrid, per runtime: deciding figures on --dataset's train qrels "
                         "(and --squad's calibration half), reported ones on test (indexes each corpus per runtime)")
    ec.add_argument("--squad", type=Path, help="with --quality: a SQuAD BEIR folder (squad2-dev), split in halves "
                                               "(calibration: deciding; report: reported), hybrid nDCG@10")
    ec.add_argument("--squad-queries", type=int, default=0,
                    help="a hash-spread sample of this many SQuAD questions, both halves (0: all 2,910)")
    ec.add_argument("--no-memory", action="store_true", help="skip the per-runtime process RSS")
    ec.add_argument("--out", type=Path, default=Path("bench"))

    te = which.add_parser("tenants", help="tenant-filtered search: the corpus in 1 tenant vs split over N tenants")
    te.add_argument("--data-dir", type=Path, required=True,
                    help="a data dir whose active collection holds real vectors (e.g. .eval-data/scifact-…)")
    te.add_argument("--dataset", type=Path, required=True, help="a BEIR folder whose queries.jsonl gives the queries")
    te.add_argument("--tenants", type=int, default=100)
    te.add_argument("--queries", type=int, default=300)
    te.add_argument("--out", type=Path, default=Path("bench"))

    sc = which.add_parser("scale", help="the embedded store at N chunks: upsert rate, background HNSW build "
                                        "(stalls while it runs), filtered search p50/p95 and recall@10, RSS, disk")
    sc.add_argument("--dataset", type=Path, required=True, help="a BEIR folder: its texts give the real vectors")
    sc.add_argument("--chunks", type=int, default=1_000_000)
    sc.add_argument("--real", type=int, default=2_000, help="real texts embedded; points are drawn around them")
    sc.add_argument("--noise", type=float, default=0.02, help="per-dimension noise around a real vector")
    sc.add_argument("--queries", type=int, default=300, help="real query texts (recall and latency)")
    sc.add_argument("--tenants", type=int, default=10, help="tenants the points are spread over (searches filter)")
    sc.add_argument("--ef", type=int, nargs="+", default=[64, 128, 256], help="HNSW search beams to measure")
    sc.add_argument("--idle-s", type=float, default=20.0, help="seconds of traffic without a build (the baseline)")
    sc.add_argument("--timeout", type=float, default=6 * 3600, help="give up the index build after this long")
    sc.add_argument("--seed", type=int, default=13)
    sc.add_argument("--hnsw-m", type=int, default=0, help="HNSW links per point over all points (0: none)")
    sc.add_argument("--payload-m", type=int, default=16, help="HNSW links per point within each tenant")
    sc.add_argument("--ef-construct", type=int, default=100, help="HNSW candidates per point inserted while building")
    sc.add_argument("--vectors-cache", type=Path, default=None,
                    help="an .npz file: the embedded texts and queries are read from it, or written to it if absent")
    sc.add_argument("--data-dir", type=Path, default=Path(".eval-data/bench-scale"))
    sc.add_argument("--keep", action="store_true", help="keep the store's folder afterwards")
    sc.add_argument("--out", type=Path, default=Path("bench"))
    return which


def _add_retrieval_command(sub) -> None:
    ret = sub.add_parser("retrieval", help="retrieval metrics (nDCG, recall, MRR, P) on a BEIR split",
                         description="Index the corpus through the real ingest pipeline into an evaluation data "
                                     "directory of its own (reused while corpus, encoder and chunking are unchanged), "
                                     "run every query of the split through the real retriever per mode, and report "
                                     "nDCG@10, recall@10/100, MRR@10, P@1/5/10 with 95%% bootstrap CIs. RAG_* "
                                     "variables (e.g. RAG_CHUNK_TOKENS) apply as in the service.")
    ret.add_argument("--dataset", type=Path, required=True, help="a BEIR folder (corpus.jsonl, queries.jsonl, qrels/)")
    ret.add_argument("--split", default="test", help="qrels/<split>.tsv (default: test)")
    ret.add_argument("--mode", nargs="+", default=["dense"], choices=["dense", "sparse", "hybrid"],
                     help="one or more retrieval modes, compared in one table (default: dense)")
    ret.add_argument("--encoder", help="sentence-transformers folder or name (default: RAG_ENCODER_MODEL or the bundled MiniLM)")
    ret.add_argument("--runtime", choices=["torch", "onnx", "onnx-int8"],
                     help="encoder runtime (default: RAG_ENCODER_RUNTIME); ONNX exports are cached in RAG_ONNX_CACHE_DIR")
    ret.add_argument("--limit-queries", type=int, default=0, help="evaluate only the first N queries of the split")
    ret.add_argument("--out", type=Path, required=True, help="folder for report.json, report.html and runs/")
    ret.add_argument("--data-dir", type=Path,
                     help="evaluation data dir (default: .eval-data/<dataset>-<hash of corpus, encoder, chunking>)")
    ret.add_argument("--url", help="evaluate a running service over HTTP (POST /v1/search) instead of in-process")
    ret.add_argument("--tenant", default="eval", help="tenant the corpus is indexed and searched under (default: eval)")
    ret.add_argument("--no-upload", action="store_true", help="with --url: do not upload the corpus first")
    ret.add_argument("--keep-identical-ids", action="store_true",
                     help="keep a retrieved document whose id equals the query id (BEIR drops it)")
    ret.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_compare_command(sub) -> None:
    cmp_ = sub.add_parser("compare", help="compare two retrieval reports; exit 1 on a regression",
                          description="Print reports A (baseline) and B (candidate) side by side and exit 1 when "
                                      "METRIC(B) - METRIC(A) < -MAX_DROP in any compared mode (2 on usage errors).")
    cmp_.add_argument("a", type=Path, help="baseline report.json (or its folder)")
    cmp_.add_argument("b", type=Path, help="candidate report.json (or its folder)")
    cmp_.add_argument("--metric", default="ndcg@10", help="metric that gates, e.g. ndcg@10, recall@100 (default: ndcg@10)")
    cmp_.add_argument("--max-drop", type=float, default=0.01, help="largest allowed drop, absolute (default: 0.01)")
    cmp_.add_argument("--mode", help="compare this mode only (default: every mode both reports hold)")


def _add_answer_commands(sub, which) -> None:
    default_data = Path(".eval-data/squad2-answers")

    def common(p, split: str, any_qa: bool = False) -> None:
        p.add_argument("--dataset", type=Path, required=not any_qa, help="a QA folder with qa.jsonl and corpus.jsonl "
                       "(SQuAD's format)")
        if any_qa:
            p.add_argument("--qa", type=Path, help="any QA JSONL: one {id?, question, answers[], gold_document_ids?[], "
                           "unanswerable?} a line (instead of --dataset's qa.jsonl)")
            p.add_argument("--corpus", type=Path, help="the documents --qa asks about: a BEIR folder (its corpus.jsonl), "
                           "a corpus .jsonl, or files/a folder the service ingests (default: --dataset's corpus.jsonl; "
                           "none with --no-upload: the service already holds them)")
        p.add_argument("--url", help="use a running service instead of starting one")
        p.add_argument("--data-dir", type=Path, default=default_data,
                       help=f"data dir of the service it starts (kept, so a second run skips indexing; default {default_data})")
        p.add_argument("--port", type=int, default=8771)
        p.add_argument("--tenant", default="eval")
        p.add_argument("--no-upload", action="store_true", help="do not upload the corpus first")
        p.add_argument("--seed", type=int, default=13, help="seed of the question shuffle")
        p.add_argument("--concurrency", type=int, default=2)
        p.add_argument("--top-k", type=int, default=8)

    ans = sub.add_parser("answers", help="answer quality on the REPORT split of SQuAD 2.0 dev (or any QA JSONL: --qa) "
                                         "via POST /v1/answer",
                         description="Asks the first N answerable and N unanswerable questions of the report split "
                                     "(a seeded shuffle; disjoint from the calibration split) and scores them offline; "
                                     "report.html plots the reliability curve and the answer-rate/abstention trade-off. "
                                     "RAG_* variables of this process (RAG_LLM_LOCAL, RAG_ABSTAIN_THRESHOLD) go to the "
                                     "service it starts.")
    common(ans, "report", any_qa=True)
    ans.add_argument("--split", choices=["report", "calibration", "all"], default="report",
                     help="which half of the questions, by a hash of the id (default report; all: both, for a file "
                          "nothing was calibrated on)")
    ans.add_argument("--limit", type=int, default=300, help="questions of each kind (0: all; default 300)")
    ans.add_argument("--out", type=Path, required=True, help="folder for results.jsonl, report.json, report.html")
    ans.add_argument("--score-only", action="store_true", help="score OUT/results.jsonl as it is (e.g. a partial run)")
    rg = ans.add_argument_group("ragas", "offline ragas metrics always run (the eval extra); answer correctness and "
                                "faithfulness need a judge: any OpenAI-compatible endpoint")
    rg.add_argument("--no-ragas", action="store_true", help="skip the ragas metrics")
    rg.add_argument("--judge-url", help="judge base URL including /v1 (default: EVAL_JUDGE_URL; none: no judged metrics)")
    rg.add_argument("--judge-model", help="judge model name (default: EVAL_JUDGE_MODEL or 'default')")
    rg.add_argument("--judge-api-key", help="judge API key (default: EVAL_JUDGE_API_KEY)")
    rg.add_argument("--judge-timeout", type=float, default=120.0, help="seconds per judge request (default 120)")
    rg.add_argument("--judge-limit", type=int, default=0, help="judge only the first N answered questions (0: all)")

    cal = sub.add_parser("calibrate", help="pick RAG_ABSTAIN_THRESHOLD on the CALIBRATION split (extractive)")
    common(cal, "calibration", any_qa=True)
    cal.add_argument("--limit", type=int, default=400, help="questions of each kind (0: all; default 400)")
    cal.add_argument("--target-answer-rate", type=float, default=0.9)
    cal.add_argument("--out", type=Path, default=Path("reports/calibration.json"))
    cal.add_argument("--model-out", type=Path, default=None,
                     help="where the answerability model goes (default: the bundled rag/models/answerability.json)")
    cal.add_argument("--no-model", action="store_true", help="only the fallback threshold; no answerability model")
    cal.add_argument("--from-responses", type=Path, help="the .responses.jsonl of an earlier run: no service, same questions")

    ba = which.add_parser("answer", help="streaming /v1/answer TTFT and latency, local LLM vs extractive")
    common(ba, "report")
    ba.add_argument("--requests", type=int, default=30, help="questions per target")
    ba.add_argument("--llm-port", type=int, default=8772, help="port the local llama-server is started on")
    ba.add_argument("--extractive-only", action="store_true")
    ba.add_argument("--out", type=Path, default=Path("bench"))


def _add_drift_command(sub) -> None:
    dr = sub.add_parser("drift", help="embedding drift: MMD permutation test, centroid shift, variance, neighbour overlap",
                        description="Compare a reference sample of embeddings with a current one and give a verdict "
                                    "against the RAG_DRIFT_* thresholds. A source is a BEIR corpus (folder or .jsonl: "
                                    "one random chunk per document, embedded), an .npy matrix (e.g. from `drift export`), "
                                    "a saved query sample (.json/.npy) or the URL of a running service (its "
                                    "/v1/admin/query-sample). `drift export --data-dir D --out X.npy` snapshots the "
                                    "active collection's dense vectors instead.")
    dr.add_argument("action", nargs="?", choices=["compare", "export"], default="compare",
                    help="compare (default) or export a collection snapshot")
    dr.add_argument("--reference", help="reference source (corpus folder/.jsonl, .npy, query-sample .json, or URL)")
    dr.add_argument("--current", help="current source (same kinds)")
    dr.add_argument("--split-half", action="store_true", help="compare two random halves (by document) of --reference")
    dr.add_argument("--queries", help="the API's query sample (service URL or saved file) as the current side; "
                                      "reference: --reference, else the sample's earlier half")
    dr.add_argument("--encoders", nargs=2, metavar=("A", "B"),
                    help="two encoders (folder, hub name, or 'default') on the same chunks of --dataset")
    dr.add_argument("--dataset", help="with --encoders: a BEIR corpus folder whose chunks both encoders embed")
    dr.add_argument("--encoder", help="encoder for corpus sources (default: RAG_ENCODER_MODEL or the bundled MiniLM)")
    dr.add_argument("--max-samples", "--sample", type=int, dest="max_samples",
                    help="rows per side, a seeded subsample (default RAG_DRIFT_MAX_SAMPLES)")
    dr.add_argument("--permutations", type=int, default=200, help="MMD permutation-test permutations (default 200)")
    dr.add_argument("--seed", type=int, default=0)
    dr.add_argument("--k", type=int, default=10, help="neighbour overlap@k with --encoders (default 10)")
    dr.add_argument("--no-classifier", action="store_true", help="skip the classifier two-sample test")
    dr.add_argument("--fail-on-drift", action="store_true", help="exit 1 when the verdict is drift (a deploy gate)")
    dr.add_argument("--out", help="compare: folder for report.json and report.html; export: the .npy file")
    dr.add_argument("--data-dir", help="export: the service's data dir (default RAG_DATA_DIR)")
    dr.add_argument("--collection", help="export: collection to read (default: the active one)")
    dr.add_argument("--tenant", help="export: only this tenant's vectors, from the collection of the encoder it "
                                     "searches with (default: every tenant, the active collection)")
    dr.add_argument("--cache-dir", help="embedding cache per encoder version and text (default .eval-data/drift-cache)")
    dr.add_argument("--no-cache", action="store_true", help="embed every text afresh, cache nothing")
    dr.add_argument("--no-progress", action="store_true", help="no progress bars")


def _drift(args) -> int:
    from eval.drift_run import run_drift, run_export

    if args.permutations < 1 or args.k < 1:
        print("error: --permutations and --k must be at least 1", file=sys.stderr)
        return 2
    return run_export(args) if args.action == "export" else run_drift(args)


def _answers(args) -> int:
    from eval.answers import run_answers, run_calibrate
    from eval.datasets import DatasetError

    if args.limit < 0:
        print("error: --limit must be >= 0", file=sys.stderr)
        return 2
    try:
        return run_answers(args) if args.command == "answers" else run_calibrate(args)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _bench(args) -> int:
    if args.bench == "answer":
        return _bench_answer(args)
    if args.bench == "memory":
        from eval.bench import write_report
        from eval.bench_memory import bench_memory

        print(f"wrote {write_report(bench_memory(args), args.out, 'memory')}")
        return 0
    from rag.logs import configure_logging
    from rag.settings import load_settings

    settings = load_settings(log_format="json", log_level="warning")
    configure_logging(settings.log_format, settings.log_level)
    from eval import bench as b

    if args.bench == "ingest":
        report = b.bench_ingest(settings, args.dataset, limit=args.limit)
    elif args.bench == "tenants":
        report = b.bench_tenants(settings, args)
    elif args.bench == "encoders":
        report = b.bench_encoders(settings, args)
    elif args.bench == "encode":
        report = b.bench_encode(settings, args)
    elif args.bench == "scale":
        from eval.bench_scale import bench_scale

        report = bench_scale(settings, args)
    elif getattr(args, "during", None) or getattr(args, "with_answers", 0):
        from eval.bench_during import bench_search_during, bench_search_with_answers

        report = (bench_search_during if args.during else bench_search_with_answers)(settings, args)
    else:
        report = b.bench_search(settings, args)
    path = b.write_report(report, args.out, f"{args.bench}")
    print(f"wrote {path}")
    return 0


def _bench_answer(args) -> int:
    from eval.answers import run_bench_answer
    from eval.bench import write_report

    report = run_bench_answer(args)
    print(f"wrote {write_report(report, args.out, 'answer')}")
    return 0


def _compare(args) -> int:
    from eval.report import CompareError, compare_reports, load_report

    try:
        text, regressed = compare_reports(load_report(args.a), load_report(args.b), metric=args.metric,
                                          max_drop=args.max_drop, mode=args.mode)
    except CompareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(text)
    return 1 if regressed else 0


def _retrieval(args) -> int:
    from eval.datasets import DatasetError
    from rag.errors import RagError
    from rag.settings import settings_for_cli

    if args.limit_queries < 0:
        print("error: --limit-queries must be >= 0", file=sys.stderr)
        return 2
    overrides: dict[str, object] = {"log_format": "json", "log_level": "warning"}
    if args.encoder:
        overrides["encoder_model"] = args.encoder
    if args.runtime:
        overrides["encoder_runtime"] = args.runtime
    settings = settings_for_cli(**overrides)
    if settings is None:
        return 2
    from eval.report import build_report, format_table, write_reports
    from eval.retrieval import EvalOptions, run_retrieval_eval

    options = EvalOptions(
        dataset=args.dataset, split=args.split, modes=list(dict.fromkeys(args.mode)), limit_queries=args.limit_queries,
        data_dir=args.data_dir, url=args.url, tenant=args.tenant, upload=not args.no_upload,
        ignore_identical_ids=not args.keep_identical_ids, progress=not args.no_progress,
    )
    try:
        run = run_retrieval_eval(settings, options)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RagError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    report = build_report(run)
    paths = write_reports(run, args.out, report)
    ds = run.dataset
    print(f"\n{ds.name} / {ds.split}: {len(run.query_ids)} queries, encoder {run.encoder_version}, "
          f"target {run.target}" + (f", index {run.index.chunks} chunks of {run.index.documents} docs "
                                    f"({'reused' if run.index.reused else f'built in {run.index.ingest_s:.0f}s'}) "
                                    f"in {run.index.data_dir}" if run.index else ""))
    print(format_table(report))
    for name, p in paths.items():
        print(f"wrote {p}" if not name.startswith("run-") else f"wrote {p} (TREC run)")
    return 0


_COMMANDS = {  # subcommand -> its handler (args -> exit status)
    "bench": _bench,
    "retrieval": _retrieval,
    "compare": _compare,
    "answers": _answers,
    "calibrate": _answers,
    "drift": _drift,
}


if __name__ == "__main__":
    sys.exit(main())
