"""The one typed settings object, read from ``RAG_*`` environment variables at entry points only."""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import msgspec

from rag.errors import SettingsError

PREFIX = "RAG_"


class Settings(msgspec.Struct, kw_only=True, frozen=True):
    """Every knob of the service. Built from the environment by :func:`load_settings`."""

    data_dir: Path = Path("data")
    # The registry (documents, jobs, keys, quotas, datasets): empty means SQLite under data_dir; a
    # postgresql://user:password@host:5432/dbname URL means PostgreSQL, shared by every API and worker process.
    database_url: str = ""
    database_pool_min_size: int = 1  # connections each process keeps open to PostgreSQL
    database_pool_max_size: int = 10  # the most it opens; a call waits for a free one up to the timeout
    database_pool_timeout_s: float = 30.0
    # Qdrant: empty means the embedded engine (qdrant-edge) under data_dir/qdrant.
    qdrant_url: str = ""
    qdrant_api_key: str = ""
    qdrant_timeout_s: float = 10.0
    # Collection layout on a Qdrant server or cluster, fixed when a collection is created (README, "Scaling out").
    qdrant_shards: int = 1
    qdrant_replication_factor: int = 1
    qdrant_write_consistency_factor: int = 1
    qdrant_on_disk: bool = False  # original vectors memory-mapped on disk
    qdrant_on_disk_payload: bool = False
    qdrant_quantization: Literal["none", "int8"] = "none"  # int8: a 4x smaller in-RAM copy for search
    qdrant_write_ordering: Literal["weak", "medium", "strong"] = "weak"
    # Embedded store: the HNSW search beam, and how many points written outside the index start a
    # background index build (in a child process; 0: never). See `python -m eval bench scale`.
    hnsw_ef: int = 128
    index_auto_build_points: int = 20_000
    # The graph an index build makes: links per point over all points (0: none) and within each tenant.
    hnsw_m: int = 0
    hnsw_payload_m: int = 16
    hnsw_ef_construct: int = 100  # candidates per point inserted while building (the engine's default)
    # Encoder: a local sentence-transformers folder or a hub name; empty means the bundled MiniLM.
    encoder_model: str = ""
    encoder_batch_size: int = 64
    encoder_device: str = "cpu"
    # How vectors are computed: torch (sentence-transformers), onnx (ONNX Runtime, fp32: torch's vectors, same
    # version; the default, chosen by `python -m eval bench encode --quality`) or onnx-int8 (quantized: its own
    # version, <version>-onnx-int8). README "Encoder runtimes".
    encoder_runtime: Literal["torch", "onnx", "onnx-int8"] = "onnx"
    torch_threads: int = 0  # 0: torch's default; also ONNX Runtime's intra-op threads (0: one per CPU, unpinned)
    # ONNX exports, shared by every data dir and process of this user (keyed by the weights' sha256, the
    # runtime and the export recipe; meta.json records the torch/onnxruntime versions): a setting only.
    onnx_cache_dir: Path = msgspec.field(default_factory=lambda: default_onnx_cache_dir())
    # Chunking
    tokenizer_encoding: Literal["cl100k_base", "o200k_base"] = "cl100k_base"
    chunk_tokens: int = 200
    chunk_overlap: int = 32
    # HTTP
    host: str = "127.0.0.1"
    # auto: open (X-Tenant trusted, no keys) when the API listens on loopback, API keys otherwise.
    auth: Literal["auto", "open", "keys"] = "auto"
    # An operator key's secret from the environment (a compose/k8s secret), registered at start as key "bootstrap".
    bootstrap_key: str = ""
    # The key the command-line tools (python -m ingest/eval with a running service) present as a Bearer token.
    api_key: str = ""
    cors_allow_origins: str = ""  # comma-separated origins a browser may call from; empty: no CORS
    # Limits (with keys): requests per second per key, refilled continuously, up to a burst; 0 turns it off.
    rate_limit_per_s: float = 20.0
    rate_limit_burst: int = 200
    # Quotas per tenant (0: none); PUT /v1/quotas/{tenant} overrides them for one tenant.
    quota_documents: int = 0
    quota_chunks: int = 0
    quota_stored_bytes: int = 0  # UTF-8 bytes of a tenant's chunks' text in the store
    quota_concurrent_jobs: int = 0
    quota_llm_tokens_per_minute: int = 0
    quota_llm_tokens_per_day: int = 0
    quota_datasets: int = 100  # labelled datasets a tenant keeps (POST /v1/datasets)
    port: int = 8000
    max_upload_bytes: int = 50 * 1024 * 1024
    max_files_per_upload: int = 100
    max_text_chars: int = 5_000_000  # text of a JSON document, and text extracted from any uploaded file
    # Hostile-input bounds (each applies on every upload path; exceeding one is a 413 or a failed document
    # that names the setting).
    max_decompressed_bytes: int = 200 * 1024 * 1024  # what a .docx (zip) may inflate to, all members together
    max_pdf_pages: int = 2000
    max_metadata_bytes: int = 16 * 1024  # a document's metadata as JSON; it is copied into every chunk
    max_title_chars: int = 1000
    max_json_depth: int = 32  # nesting of any JSON body, multipart metadata or JSONL line
    max_query_chars: int = 2000
    # Labelled datasets (POST /v1/datasets): the file or JSON body as sent, and the pairs in one dataset.
    dataset_max_bytes: int = 32 * 1024 * 1024
    dataset_max_pairs: int = 200_000
    max_top_k: int = 100
    page_size_max: int = 500
    # Retrieval (hybrid fusion and reranking)
    search_mode: Literal["dense", "sparse", "hybrid"] = "hybrid"
    rrf_k: int = 60
    dense_weight: float = 1.0
    sparse_weight: float = 1.0
    prefetch_k: int = 100
    reranker_model: str = ""  # a sentence-transformers CrossEncoder folder or name; empty: no reranking
    rerank_depth: int = 30
    rerank_budget_ms: float = 800.0
    # Answers
    prompts_dir: Path = Path("prompts")
    context_tokens: int = 1500
    context_encoding: Literal["cl100k_base", "o200k_base"] = "cl100k_base"
    # Answers whose best supporting sentence scores below this abstain. 0.6439 answers 90 % of the
    # answerable questions of the SQuAD 2.0 dev calibration half (`python -m eval calibrate`); 0 disables.
    abstain_threshold: float = 0.6439
    # The learned answerability decision (rag/answerability.py): "bundled" (rag/models/answerability.json),
    # a path to a model file, or empty to decide by abstain_threshold alone. Its operating point:
    # answer_rate=R, precision=P (on the calibration sample) or probability=T.
    answerability_model: str = "bundled"
    answerability_operating_point: str = "answer_rate=0.9"
    answer_explain: bool = False  # every answer lists its sources and ranked sentences with score parts (calibration)
    # A cited [n] stands when a sentence of source n supports the claim at this score (rag/citations.py);
    # the default reuses abstain_threshold's value (calibrated for question-to-sentence support).
    citation_threshold: float = 0.6439
    # Follow-ups made standalone for retrieval (rag/conversation.py): auto (the LLM at RAG_LLM_BASE_URL,
    # else the previous question's key terms: the bundled 135M model rarely rewrites usably), llm (any
    # configured LLM, the bundled one too), terms (key terms only), off.
    query_rewrite: Literal["auto", "llm", "terms", "off"] = "auto"
    rewrite_timeout_s: float = 5.0  # the LLM's rewrite; past it, the key-terms rewrite is used
    llm_base_url: str = ""  # an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8081/v1; empty: extractive answers
    # auto: start the bundled llama-server (SmolLM2) when no endpoint is set and it is installed
    llm_local: Literal["auto", "yes", "no"] = "auto"
    llm_local_port: int = 0  # 0: any free port
    llm_model: str = "default"
    llm_api_key: str = ""
    llm_connect_timeout_s: float = 5.0
    llm_timeout_s: float = 60.0
    llm_max_tokens: int = 256
    llm_max_retries: int = 2
    llm_temperature: float = 0.0
    # Worker
    run_worker: Literal["auto", "yes", "no"] = "auto"  # auto: in-process when the store is embedded
    worker_poll_s: float = 0.5
    job_max_attempts: int = 3
    job_lease_s: float = 300.0
    # /readyz turns 503 when the in-process worker has not beaten its heartbeat for this long; a dead
    # worker thread is restarted by its supervisor.
    worker_stale_s: float = 600.0  # an adaptation's corpus read or negative mining can go minutes without a beat
    # Where the worker's heavy compute runs (ingest embedding, training, the gate's and promotion's encodes): in a
    # child process at a lower CPU priority with its own thread budget, so the API's encoder keeps the cores for
    # queries. auto: yes when `python -m rag serve` runs the worker in its own process; no elsewhere (the standalone
    # `python -m ingest worker`, the CLIs, programs that build the app themselves such as the tests).
    background_process: Literal["auto", "yes", "no"] = "auto"
    background_threads: int = 1  # that child's torch and ONNX Runtime threads (README, "What runs where")
    # fp32 vectors in that child: torch (same vectors and version as onnx fp32, and faster on long texts on this
    # CPU class: 13.4 vs 10.7 chunks/s at 1 thread, README "What runs where") or the runtime the API serves with.
    background_fp32_runtime: Literal["torch", "same"] = "torch"
    background_nice: int = 10  # added to the child's nice value (0-19; higher: gives way sooner)
    # Answers prepared at once (rerank, context, sentence ranking: the expensive part); others wait their turn, so
    # answers cannot take every core and thread from searches (README, "What runs where").
    answer_concurrency: int = 1
    # Domain adaptation (`python -m ingest adapt`, POST /v1/encoders/adapt)
    adapt_epochs: int = 1  # when no labelled pairs are given (with them, cross-validation chooses)
    adapt_cv_folds: int = 3  # folds that choose the epochs when labelled pairs are given (0: use adapt_epochs)
    adapt_batch_size: int = 64  # the contrastive batch (in-batch negatives); cached: memory stays at the mini batch
    adapt_mini_batch_size: int = 16
    adapt_max_seq_length: int = 160  # training length; 2 CPU cores train ~3x faster than at 256
    adapt_learning_rate: float = 2e-5
    adapt_seed: int = 13
    adapt_max_pairs: int = 4000  # generated pairs are sampled down to this many (CPU time grows with it)
    adapt_hard_negatives: bool = True
    adapt_validation_fraction: float = 0.1  # of generated pairs held out for the gate when no labelled set is given
    adapt_gate_metric: Literal["ndcg@10", "mrr@10", "recall@10"] = "ndcg@10"
    adapt_gate_margin: float = 0.005  # the candidate must beat the active encoder by this much
    adapt_teacher_model: str = ""  # a CrossEncoder folder/name: MarginMSE (GPL-style) instead of MNRL
    adapt_auto_promote: bool = True  # promote (re-embed + switch) when the gate passes on labelled validation
    # Also auto-promote on held-out generated pairs (titles, inverse cloze): off, because on SciFact they
    # favoured a candidate that was worse on real queries (README, "Domain adaptation").
    adapt_promote_unlabelled: bool = False
    query_cache_size: int = 1024  # recent query vectors kept per encoder (keyed by tenant; 0: off)
    sentence_cache_size: int = 20000  # context-sentence vectors kept for extractive answers (~1.6 KB each; 0: off)
    # Embed each chunk's sentences at ingest and store them with it (rag/sentence_vectors.py): extractive answers
    # then embed no context sentence; ingest embeds about twice the text.
    sentence_vectors: bool = True
    metrics_port: int = 0  # python -m ingest worker: serve its /metrics on this port (0: none)
    otel_endpoint: str = ""  # an OTLP/HTTP collector (http://host:4318): traces of requests and jobs; empty: off
    otel_service_name: str = "rag"
    reconcile_interval_s: float = 3600.0  # compare registry and store this often (report only; 0: never)
    malloc_arena_max: int = 2  # glibc malloc arenas for the serving process (0: glibc's default, 8 per core)
    encoder_cache_size: int = 4  # adapted encoders kept loaded (LRU) besides the default one
    encoder_poll_s: float = 1.0  # how often the API checks whether a promotion moved the active collection
    # Drift monitoring. The API keeps a uniform sample of this many query embeddings (vectors only,
    # never text) for `python -m eval drift --queries`; 0 turns it off and costs nothing.
    query_sample_size: int = 0
    # `python -m eval drift`: rows per side (seeded subsample) and the verdict's thresholds, chosen from
    # SciFact halves vs SciFact-vs-SQuAD corpus chunks (README, "Embedding drift").
    drift_max_samples: int = 1000
    drift_monitor_interval_s: float = 300.0  # with query sampling on: compare reference and recent queries this often (0: off)
    drift_monitor_permutations: int = 100
    # An encoder version without a reference saved at its promotion freezes its first this many queries as one.
    drift_reference_rows: int = 200
    # When a drift check fires: propose (or, with adapt_on_drift, queue) an adaptation for each tenant of that
    # encoder holding at least this many feedback pairs (POST /v1/feedback).
    adapt_propose_min_pairs: int = 50
    adapt_on_drift: bool = False
    drift_p_value: float = 0.01
    drift_min_mmd2: float = 0.001
    drift_max_centroid_shift: float = 0.02
    drift_min_variance_ratio: float = 0.1
    drift_min_neighbour_overlap: float = 0.5
    # Logging
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    def __post_init__(self) -> None:
        checks = [
            (self.chunk_tokens >= 16, "chunk_tokens", "must be at least 16"),
            (re.fullmatch(r"\s*(answer_rate|precision|probability)\s*=\s*(0(\.\d+)?|1(\.0*)?|\.\d+)\s*",
                          self.answerability_operating_point) is not None, "answerability_operating_point",
             "must be answer_rate=R, precision=P or probability=T with a number in [0, 1]"),
            (0 <= self.chunk_overlap < self.chunk_tokens, "chunk_overlap", "must be >= 0 and below RAG_CHUNK_TOKENS"),
            (self.encoder_batch_size >= 1, "encoder_batch_size", "must be at least 1"),
            (self.encoder_cache_size >= 1, "encoder_cache_size", "must be at least 1"),
            (self.qdrant_shards >= 1, "qdrant_shards", "must be at least 1"),
            (self.hnsw_ef >= 1, "hnsw_ef", "must be at least 1"),
            (self.hnsw_m >= 0, "hnsw_m", "must be 0 (no graph over all points) or more"),
            (self.hnsw_payload_m >= 0, "hnsw_payload_m", "must be 0 (no per-tenant graphs) or more"),
            (self.hnsw_m > 0 or self.hnsw_payload_m > 0, "hnsw_m", "cannot be 0 with RAG_HNSW_PAYLOAD_M 0 too"),
            (self.hnsw_ef_construct >= 4, "hnsw_ef_construct", "must be at least 4"),
            (self.index_auto_build_points >= 0, "index_auto_build_points", "must be 0 (off) or more"),
            (self.qdrant_replication_factor >= 1, "qdrant_replication_factor", "must be at least 1"),
            (1 <= self.qdrant_write_consistency_factor <= self.qdrant_replication_factor,
             "qdrant_write_consistency_factor", "must be between 1 and RAG_QDRANT_REPLICATION_FACTOR"),
            (0 <= self.metrics_port <= 65535, "metrics_port", "must be 0 (none) or a TCP port"),
            (self.reconcile_interval_s >= 0, "reconcile_interval_s", "must be >= 0 (0: never)"),
            (self.malloc_arena_max >= 0, "malloc_arena_max", "must be >= 0 (0: glibc's default)"),
            (self.query_cache_size >= 0, "query_cache_size", "must be >= 0 (0: off)"),
            (self.sentence_cache_size >= 0, "sentence_cache_size", "must be >= 0 (0: off)"),
            (self.adapt_cv_folds == 0 or 2 <= self.adapt_cv_folds <= 10, "adapt_cv_folds", "must be 0 or 2-10"),
            (1 <= self.port <= 65535, "port", "must be a TCP port (1-65535)"),
            (self.max_upload_bytes >= 1, "max_upload_bytes", "must be positive"),
            (self.max_top_k >= 1, "max_top_k", "must be positive"),
            (self.dataset_max_bytes >= 1, "dataset_max_bytes", "must be positive"),
            (self.dataset_max_pairs >= 1, "dataset_max_pairs", "must be positive"),
            (self.quota_datasets >= 0, "quota_datasets", "must be >= 0 (0: no quota)"),
            (self.quota_stored_bytes >= 0, "quota_stored_bytes", "must be >= 0 (0: no quota)"),
            (self.max_decompressed_bytes >= 1, "max_decompressed_bytes", "must be positive"),
            (self.max_pdf_pages >= 1, "max_pdf_pages", "must be positive"),
            (self.max_metadata_bytes >= 2, "max_metadata_bytes", "must be at least 2"),
            (self.max_title_chars >= 1, "max_title_chars", "must be positive"),
            (2 <= self.max_json_depth <= 256, "max_json_depth", "must be between 2 and 256"),
            (self.worker_stale_s > 0, "worker_stale_s", "must be positive"),
            (self.background_threads >= 1, "background_threads", "must be at least 1"),
            (0 <= self.background_nice <= 19, "background_nice", "must be between 0 and 19"),
            (self.answer_concurrency >= 1, "answer_concurrency", "must be at least 1"),
            (self.rate_limit_per_s >= 0, "rate_limit_per_s", "must be >= 0 (0: no limit)"),
            (self.rate_limit_burst >= 1, "rate_limit_burst", "must be at least 1"),
            (self.job_max_attempts >= 1, "job_max_attempts", "must be at least 1"),
            (self.torch_threads >= 0, "torch_threads", "must be >= 0"),
            (
                self.encoder_runtime == "torch" or self.encoder_device == "cpu",
                "encoder_runtime",
                "the onnx runtimes run on the CPU: use RAG_ENCODER_DEVICE=cpu (or RAG_ENCODER_RUNTIME=torch)",
            ),
            (self.rrf_k >= 1, "rrf_k", "must be at least 1"),
            (self.dense_weight >= 0, "dense_weight", "must be >= 0"),
            (self.sparse_weight >= 0, "sparse_weight", "must be >= 0"),
            (self.rerank_depth >= 1, "rerank_depth", "must be at least 1"),
            (self.context_tokens >= 64, "context_tokens", "must be at least 64"),
            (self.llm_max_tokens >= 1, "llm_max_tokens", "must be at least 1"),
            (self.llm_max_retries >= 0, "llm_max_retries", "must be >= 0"),
            (self.rewrite_timeout_s > 0, "rewrite_timeout_s", "must be positive"),
            (0 <= self.query_sample_size <= 1_000_000, "query_sample_size", "must be between 0 (off) and 1000000"),
            (self.drift_max_samples >= 10, "drift_max_samples", "must be at least 10"),
            (self.drift_monitor_interval_s >= 0, "drift_monitor_interval_s", "must be >= 0 (0: off)"),
            (self.adapt_propose_min_pairs >= 1, "adapt_propose_min_pairs", "must be at least 1"),
            (self.drift_monitor_permutations >= 10, "drift_monitor_permutations", "must be at least 10"),
            (40 <= self.drift_reference_rows <= 100_000, "drift_reference_rows", "must be between 40 and 100000"),
            (0 < self.drift_p_value < 1, "drift_p_value", "must be between 0 and 1"),
            (self.drift_min_mmd2 >= 0, "drift_min_mmd2", "must be >= 0"),
            (0 <= self.drift_max_centroid_shift <= 2, "drift_max_centroid_shift", "must be between 0 and 2"),
            (0 <= self.drift_min_variance_ratio <= 1, "drift_min_variance_ratio", "must be between 0 and 1"),
            (0 <= self.drift_min_neighbour_overlap <= 1, "drift_min_neighbour_overlap", "must be between 0 and 1"),
            (
                not self.llm_base_url or self.llm_base_url.startswith(("http://", "https://")),
                "llm_base_url",
                "must start with http:// or https:// (or be empty for extractive answers)",
            ),
            (self.database_pool_min_size >= 0, "database_pool_min_size", "must be >= 0"),
            (self.database_pool_max_size >= max(1, self.database_pool_min_size), "database_pool_max_size",
             "must be at least 1 and at least RAG_DATABASE_POOL_MIN_SIZE"),
            (self.database_pool_timeout_s > 0, "database_pool_timeout_s", "must be positive"),
            (
                not self.database_url or self.database_url.startswith(("postgresql://", "postgres://")),
                "database_url",
                "must start with postgresql:// (or be empty for SQLite in RAG_DATA_DIR)",
            ),
            (
                not self.qdrant_url or self.qdrant_url.startswith(("http://", "https://", ":memory:")),
                "qdrant_url",
                "must start with http:// or https:// (or be empty for the embedded engine)",
            ),
        ]
        for ok, field, why in checks:
            if not ok:
                shown = "…" if field == "database_url" else repr(getattr(self, field))  # it may hold a password
                raise SettingsError(f"{PREFIX}{field.upper()}={shown}: {why}")
        if self.auth == "open" and not is_loopback(self.host):
            raise SettingsError(
                f"RAG_AUTH=open lets anyone who reaches {self.host}:{self.port} act as every tenant and the operator; "
                "it is allowed only on a loopback address. Use RAG_AUTH=keys and create the first key with "
                "`python -m rag keys create --tenant default --scopes operator` (or set RAG_BOOTSTRAP_KEY)"
            )
        if self.bootstrap_key and len(self.bootstrap_key) < 32:
            raise SettingsError("RAG_BOOTSTRAP_KEY must be at least 32 characters (a random secret)")

    @property
    def auth_mode(self) -> Literal["open", "keys"]:
        """``open`` only where nobody but this machine can reach the port; ``keys`` everywhere else."""
        if self.auth == "auto":
            return "open" if is_loopback(self.host) else "keys"
        return self.auth

    @property
    def cors_origins(self) -> list[str]:
        return [o.strip() for o in self.cors_allow_origins.split(",") if o.strip()]

    @property
    def embedded(self) -> bool:
        return not self.qdrant_url

    @property
    def worker_in_process(self) -> bool:
        return self.run_worker == "yes" or (self.run_worker == "auto" and self.embedded)

    def background_compute(self, beside_api: bool) -> bool:
        """Whether the worker's heavy compute runs in a low-priority child process (``RAG_BACKGROUND_PROCESS``):
        ``auto`` says yes only for a worker that shares its process with the API (``beside_api``)."""
        return self.background_process == "yes" or (self.background_process == "auto" and beside_api)

    @property
    def qdrant_dir(self) -> Path:
        return self.data_dir / "qdrant"

    @property
    def registry_path(self) -> Path:
        return self.data_dir / "registry.sqlite3"

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir / "uploads"

    @property
    def encoders_dir(self) -> Path:
        return self.data_dir / "encoders"

    @property
    def onnx_dir(self) -> Path:
        """Cached ONNX exports of encoders (``RAG_ONNX_CACHE_DIR``), one folder per weights, runtime and recipe."""
        return self.onnx_cache_dir.expanduser()


def default_onnx_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/rag/onnx``, else ``~/.cache/rag/onnx`` (``.cache/rag/onnx`` here without a home).

    ``RAG_ONNX_CACHE_DIR`` in the environment wins even for settings built without :func:`load_settings`:
    the tests give their whole session, and the processes they start, one cache of their own this way."""
    if os.environ.get("RAG_ONNX_CACHE_DIR"):
        return Path(os.environ["RAG_ONNX_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not base or not os.path.isabs(base):  # the XDG spec ignores a relative value
        try:
            base = str(Path.home() / ".cache")
        except RuntimeError:  # no HOME and no passwd entry
            base = ".cache"
    return Path(base) / "rag" / "onnx"


def redacted_url(url: str) -> str:
    """A database URL as it may be shown: its password (in the authority or as a parameter) replaced by ***."""
    url = re.sub(r"(://[^/@:]*:)[^/@]*@", r"\1***@", url)
    return re.sub(r"([?&]password=)[^&]*", r"\1***", url)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or name the API binds to) is reachable from this machine only."""
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _decode(type_: type, obj: object) -> object:
    # msgspec does not turn strings into Paths on its own.
    if type_ is Path and isinstance(obj, str):
        return Path(obj)
    raise TypeError(f"Expected `{type_.__name__}`, got `{type(obj).__name__}`")


_FIELDS = {f.lower(): f for f in Settings.__struct_fields__}


def load_settings(env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
    """Build settings from ``RAG_*`` variables; unknown or malformed ones raise :class:`SettingsError`."""
    env = os.environ if env is None else env
    raw: dict[str, object] = {}
    for key, value in env.items():
        if not key.startswith(PREFIX):
            continue
        name = key[len(PREFIX):].lower()
        if name not in _FIELDS:
            raise SettingsError(f"unknown setting {key}; known: {', '.join(PREFIX + f.upper() for f in _FIELDS)}")
        raw[name] = value
    raw.update(overrides)
    if "encoder_runtime" not in raw and str(raw.get("encoder_device", "cpu")) != "cpu":
        raw["encoder_runtime"] = "torch"  # the onnx default runs on the CPU; a GPU device keeps torch unless told
    try:
        return msgspec.convert(raw, Settings, strict=False, dec_hook=_decode)
    except msgspec.ValidationError as exc:
        # msgspec names the field as `$.field`; translate to the variable a user set.
        msg = str(exc)
        for name in _FIELDS:
            if f"`$.{name}`" in msg:
                raise SettingsError(f"{PREFIX}{name.upper()}={raw.get(name)!r}: {msg.split(' - at')[0]}") from exc
        raise SettingsError(msg) from exc


def settings_for_cli(**overrides: object) -> Settings | None:
    """Settings for a command-line entry point, with logging configured; None, after saying why, when invalid."""
    try:
        settings = load_settings(**overrides)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    from rag.logs import configure_logging

    configure_logging(settings.log_format, settings.log_level)
    return settings
