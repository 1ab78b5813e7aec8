"""Which collection holds which encoder's vectors."""

from __future__ import annotations

from rag.embedding import Embedder
from rag.store import VectorStore


def collection_name(encoder_version: str) -> str:
    """One collection per encoder version, so a collection never mixes two vector spaces."""
    return f"chunks-{encoder_version}"


def ensure_collection_for(store: VectorStore, embedder: Embedder) -> str:
    """Create the encoder's collection if needed; it becomes the active one when none is."""
    name = collection_name(embedder.version)
    store.ensure_collection(name, embedder.dimension)
    if store.get_active() is None:
        store.set_active(name)
    return name
