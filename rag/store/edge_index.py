"""``python -m rag.store.edge_index <shard-dir>``: build a copied shard's HNSW index in its own process.

:meth:`rag.store.edge.EdgeVectorStore.build_index` runs this on a copy of a live shard: the engine's
optimizer holds the GIL for the whole build, so in the serving process it would stall every search.
Prints one JSON line (points, seconds) and exits 0, or exits 1 with the engine's error on stderr.
"""

from __future__ import annotations

import json
import sys
import time


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m rag.store.edge_index <shard-dir>", file=sys.stderr)
        return 2
    from qdrant_edge import EdgeShard

    started = time.perf_counter()
    try:
        shard = EdgeShard.load(argv[0])
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
