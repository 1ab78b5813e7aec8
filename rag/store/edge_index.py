"""``python -m rag.store.edge_index <shard-dir> [--m M] [--payload-m PM] [--ef-construct EF]``: build a copied shard's HNSW index
in its own process.

:meth:`rag.store.edge.EdgeVectorStore.build_index` runs this on a copy of a live shard: the engine's
optimizer holds the GIL for the whole build, so in the serving process it would stall every search.
The copy is loaded with the HNSW layout given (written into its config, so the built shard keeps it)
and its payload indexes get the parameters of :func:`field_index_params` before the build.
Prints one JSON line (points, seconds) and exits 0, or exits 1 with the engine's error on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

# The engine's defaults, kept: candidates per insert while building (RAG_HNSW_EF_CONSTRUCT), and the filtered-set size (in KiB of
# vectors; ~6,700 points at 384-d) below which a filtered search scans the set exactly instead.
EF_CONSTRUCT = 100
FULL_SCAN_THRESHOLD_KB = 10_000


def hnsw_config(m: int, payload_m: int | None, ef_construct: int = EF_CONSTRUCT) -> Any:
    """``m``: links per point in the graph over all points (0: none). ``payload_m``: links per point in the
    per-tenant graphs (None: the engine uses ``m``; 0: none). ``ef_construct``: candidates considered per
    point inserted (a better graph, so a higher recall at the same search beam, for a longer build)."""
    from qdrant_edge import HnswIndexConfig

    return HnswIndexConfig(m=m, ef_construct=ef_construct, full_scan_threshold=FULL_SCAN_THRESHOLD_KB,
                           payload_m=payload_m)


def sentence_vector_params(dimension: int) -> Any:
    """The ``"sentences"`` multivector: float16 on disk (mmap), cosine, never in an HNSW graph (it is only read by
    point id; rag/sentence_vectors.py)."""
    from qdrant_edge import Distance, EdgeVectorParams, MultiVectorComparator, MultiVectorConfig, VectorStorageDatatype

    return EdgeVectorParams(size=dimension, distance=Distance.Cosine, on_disk=True,
                            multivector_config=MultiVectorConfig(MultiVectorComparator.MaxSim),
                            datatype=VectorStorageDatatype.Float16, hnsw_config=hnsw_config(0, 0))


def field_index_params(field: str) -> Any:
    """The payload index of ``field``. Only ``tenant`` gets per-value graphs (``is_tenant``, HNSW enabled):
    with ``m=0`` the engine builds a graph for every large enough value of every HNSW-enabled field, and
    ``live=true`` (nearly every point) or a shared ``content_hash`` would each cost a whole extra graph."""
    from qdrant_edge import BoolIndexParams, KeywordIndexParams

    from rag.store.protocol import BOOL_INDEXES

    if field == "tenant":
        return KeywordIndexParams(is_tenant=True, enable_hnsw=True)
    if field in BOOL_INDEXES:
        return BoolIndexParams(enable_hnsw=False)
    return KeywordIndexParams(enable_hnsw=False)


def edge_config(shard_dir: Path, m: int, payload_m: int | None, ef_construct: int = EF_CONSTRUCT) -> Any:
    """The shard's own vector layout (from its ``edge_config.json``) with the HNSW config given."""
    from qdrant_edge import Distance, EdgeConfig, EdgeSparseVectorParams, EdgeVectorParams, Modifier

    saved = json.loads((shard_dir / "edge_config.json").read_text(encoding="utf-8"))
    vectors = {name: sentence_vector_params(int(p["size"])) if p.get("multivector_config")
               else EdgeVectorParams(size=int(p["size"]), distance=getattr(Distance, p["distance"]))
               for name, p in (saved.get("vectors") or {}).items()}
    sparse = {name: EdgeSparseVectorParams(modifier=Modifier.Idf if str((p or {}).get("modifier", "")).lower() == "idf"
                                           else None)
              for name, p in (saved.get("sparse_vectors") or {}).items()}
    return EdgeConfig(vectors=vectors or None, sparse_vectors=sparse or None, hnsw_config=hnsw_config(m, payload_m, ef_construct))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m rag.store.edge_index")
    parser.add_argument("shard_dir", type=Path)
    parser.add_argument("--m", type=int, default=None, help="HNSW links per point (default: the shard's config)")
    parser.add_argument("--payload-m", type=int, default=None, help="links per point in the per-tenant graphs")
    parser.add_argument("--ef-construct", type=int, default=EF_CONSTRUCT, help="candidates per point inserted")
    args = parser.parse_args(argv)
    from qdrant_edge import EdgeShard, UpdateOperation

    from rag.store.protocol import BOOL_INDEXES, KEYWORD_INDEXES

    started = time.perf_counter()
    try:
        if args.m is None:
            shard = EdgeShard.load(str(args.shard_dir))
        else:
            shard = EdgeShard.load(str(args.shard_dir), edge_config(args.shard_dir, args.m, args.payload_m, args.ef_construct))
        for field in shard.info().payload_schema:
            if field not in KEYWORD_INDEXES + BOOL_INDEXES:
                continue
            shard.update(UpdateOperation.create_field_index(field, field_index_params(field)))
        shard.optimize()
        shard.flush()
        points = shard.info().points_count
        shard.close()
    except Exception as exc:  # the bindings raise bare Exception
        print(f"index build failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"points": points, "seconds": round(time.perf_counter() - started, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
