"""The VectorStore contract as capability groups (Haystack-style mixins), one class of tests each.

A backend's test class inherits :class:`VectorStoreContract` (or only the groups it supports) and
provides a ``store`` fixture: a fresh store holding an empty collection ``COLL`` of ``DIM``-d
vectors. tests/test_store_contract.py runs every group on the embedded engine and on qdrant-client.
"""

import pytest

# The groups live outside test_*.py files, so pytest would not rewrite their asserts by itself.
pytest.register_assert_rewrite(
    "tests.store_contract.hybrid",
    "tests.store_contract.lifecycle",
    "tests.store_contract.scroll",
    "tests.store_contract.search",
    "tests.store_contract.sentences",
    "tests.store_contract.writes",
)

from tests.store_contract.hybrid import HybridTest  # noqa: E402
from tests.store_contract.lifecycle import ActivePointerTest, CollectionTest  # noqa: E402
from tests.store_contract.scroll import ScrollTest  # noqa: E402
from tests.store_contract.search import FilterTest, SearchTest  # noqa: E402
from tests.store_contract.sentences import SentenceVectorTest  # noqa: E402
from tests.store_contract.writes import PublishTest, WriteTest  # noqa: E402

__all__ = [
    "ActivePointerTest",
    "CollectionTest",
    "FilterTest",
    "HybridTest",
    "PublishTest",
    "ScrollTest",
    "SearchTest",
    "SentenceVectorTest",
    "VectorStoreContract",
    "WriteTest",
]


class VectorStoreContract(
    CollectionTest, ActivePointerTest, WriteTest, PublishTest, FilterTest, SearchTest, HybridTest, ScrollTest,
    SentenceVectorTest,
):
    """Every capability group: what any :class:`rag.store.VectorStore` must pass."""
