"""The OpenAPI document: Litestar generates it from the handlers; this adds what it cannot infer.

Links say which response field feeds which later operation (an upload's job id → the job, its document
id → the document). Clients read them as documentation, and the stateful schemathesis suite follows
them to reach real jobs and documents instead of random ids that are all 404s.
"""

from __future__ import annotations

from litestar.openapi.spec import Link, OpenAPI, OpenAPIMediaType, RequestBody, Schema
from litestar.openapi.spec.enums import OpenAPIFormat, OpenAPIType

__all__ = ["add_links", "describe_dataset_upload", "describe_upload", "mark_public"]

# (source path, method, status) → [(link name, target path, target method, {parameter: runtime expression})]
_LINKS: dict[tuple[str, str, str], list[tuple[str, str, str, dict[str, str]]]] = {
    ("/v1/documents", "post", "202"): [
        ("GetJob", "/v1/jobs/{job_id}", "get", {"job_id": "$response.body#/job_ids/0"}),
        ("CancelJob", "/v1/jobs/{job_id}/cancel", "post", {"job_id": "$response.body#/job_ids/0"}),
        ("GetDocument", "/v1/documents/{document_id}", "get", {"document_id": "$response.body#/document_ids/0"}),
        ("DeleteDocument", "/v1/documents/{document_id}", "delete",
         {"document_id": "$response.body#/document_ids/0"}),
    ],
    ("/v1/documents/{document_id}", "get", "200"): [
        ("DeleteDocument", "/v1/documents/{document_id}", "delete", {"document_id": "$response.body#/id"}),
    ],
    ("/v1/datasets", "post", "201"): [
        ("GetDataset", "/v1/datasets/{dataset_id}", "get", {"dataset_id": "$response.body#/id"}),
        ("DeleteDataset", "/v1/datasets/{dataset_id}", "delete", {"dataset_id": "$response.body#/id"}),
    ],
    ("/v1/encoders/adapt", "post", "202"): [
        ("GetJob", "/v1/jobs/{job_id}", "get", {"job_id": "$response.body#/job_id"}),
        ("CancelJob", "/v1/jobs/{job_id}/cancel", "post", {"job_id": "$response.body#/job_id"}),
    ],
    ("/v1/encoders/prune", "post", "202"): [
        ("GetJob", "/v1/jobs/{job_id}", "get", {"job_id": "$response.body#/job_id"}),
    ],
}


def add_links(schema: OpenAPI) -> OpenAPI:
    """Attach the links above to the generated document (in place); unknown paths are skipped."""
    paths = schema.paths or {}
    for (path, method, status), links in _LINKS.items():
        item = paths.get(path)
        operation = getattr(item, method, None) if item is not None else None
        response = (operation.responses or {}).get(status) if operation is not None else None
        if response is None:
            continue
        response.links = dict(response.links or {})
        for name, target_path, target_method, parameters in links:
            target_item = paths.get(target_path)
            target = getattr(target_item, target_method, None) if target_item is not None else None
            if target is None or not target.operation_id:
                continue
            response.links[name] = Link(operation_id=target.operation_id, parameters=dict(parameters))
    return schema


def describe_upload(schema: OpenAPI) -> OpenAPI:
    """The upload route reads its body itself (multipart files or a JSON text), so Litestar cannot see its
    shape: declare both media types here, so clients and fuzzers know what to send."""
    item = (schema.paths or {}).get("/v1/documents")
    operation = getattr(item, "post", None)
    if operation is None:
        return schema
    text = Schema(type=OpenAPIType.STRING)
    metadata = Schema(type=OpenAPIType.OBJECT, description="bounded by RAG_MAX_METADATA_BYTES and RAG_MAX_JSON_DEPTH")
    document_id = Schema(type=OpenAPIType.STRING, min_length=1, max_length=256, pattern=r"^[^\x00-\x1f/]+$")
    operation.request_body = RequestBody(required=True, content={
        "application/json": OpenAPIMediaType(schema=Schema(
            type=OpenAPIType.OBJECT, required=["text"], additional_properties=False,
            properties={"text": text, "id": document_id, "title": text, "metadata": metadata},
        )),
        "multipart/form-data": OpenAPIMediaType(schema=Schema(
            type=OpenAPIType.OBJECT, required=["file"],
            properties={
                "file": Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY,
                               description=".txt .md .html .pdf .docx or a BEIR corpus .jsonl; repeat for more files"),
                "document_id": document_id,
                "title": text,
                "metadata": Schema(type=OpenAPIType.STRING, description="a JSON object"),
            },
        )),
    })
    return schema


def describe_dataset_upload(schema: OpenAPI) -> OpenAPI:
    """The dataset upload reads its body itself too (a multipart file or JSON pairs): declare both shapes."""
    operation = getattr((schema.paths or {}).get("/v1/datasets"), "post", None)
    if operation is None:
        return schema
    name = Schema(type=OpenAPIType.STRING, min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")
    split = Schema(type=OpenAPIType.STRING, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
                   description="the BEIR qrels split (qrels/<split>.tsv); default train")
    pair = Schema(type=OpenAPIType.OBJECT, required=["query", "document_id"], additional_properties=False,
                  properties={"query": Schema(type=OpenAPIType.STRING, min_length=1, max_length=2000),
                              "document_id": Schema(type=OpenAPIType.STRING, min_length=1, max_length=512)})
    operation.request_body = RequestBody(required=True, content={
        "application/json": OpenAPIMediaType(schema=Schema(
            type=OpenAPIType.OBJECT, required=["name", "pairs"], additional_properties=False,
            properties={"name": name, "split": split,
                        "pairs": Schema(type=OpenAPIType.ARRAY, items=pair, min_items=1,
                                        description="at most RAG_DATASET_MAX_PAIRS")},
        )),
        "multipart/form-data": OpenAPIMediaType(schema=Schema(
            type=OpenAPIType.OBJECT, required=["file"],
            properties={
                "file": Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY,
                               description="JSONL {query, document_id} lines, or a BEIR folder (queries.jsonl, "
                                           "qrels/<split>.tsv) as a .zip or .tar(.gz); at most RAG_DATASET_MAX_BYTES"),
                "name": name,
                "split": split,
            },
        )),
    })
    return schema


def mark_public(schema: OpenAPI, public: list[tuple[str, str]]) -> OpenAPI:
    """Operations that need no credentials (``security: []`` overrides the document-wide bearer requirement)."""
    for path, method in public:
        operation = getattr((schema.paths or {}).get(path), method, None)
        if operation is not None:
            operation.security = []
    return schema
