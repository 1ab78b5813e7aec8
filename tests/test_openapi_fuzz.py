"""Schemathesis against the running service's own OpenAPI document: no input is a server error, every
status is documented for its operation, and every response matches its schema.

The service runs for real (uvicorn on a loopback port, worker inside, embedded Qdrant, the real encoder),
so a 5xx found here is a bug in the service, never in a stand-in. The examples per operation are bounded
(RAG_FUZZ_EXAMPLES, default 25) so the suite stays within minutes on two cores; the stateful run follows
the document's links (upload → job → cancel, upload → document → delete).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck
from hypothesis import settings as hsettings
from schemathesis.checks import (
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from rag.settings import Settings
from tests.conftest import serving

EXAMPLES = int(os.environ.get("RAG_FUZZ_EXAMPLES", "25"))
# The service runs with API keys on; the fuzzer calls with a valid operator key (every route is reachable).
OPERATOR_KEY = "fuzz-operator-" + "k" * 40
AUTH = {"Authorization": f"Bearer {OPERATOR_KEY}"}
CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def service_url(tmp_path_factory, embedder) -> Iterator[str]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("fuzz") / "data", worker_poll_s=0.05, log_format="json",
                        log_level="warning", llm_local="no", adapt_auto_promote=False, adapt_max_pairs=40,
                        query_sample_size=50, auth="keys", bootstrap_key=OPERATOR_KEY,
                        rate_limit_per_s=0)  # limits have tests of their own; here they would only hide work
    with serving(settings, embedder) as (url, _):
        # Something to find, so that searches and answers exercise the whole path, not only empty results.
        httpx.post(f"{url}/v1/documents", json={"id": "seed", "text": "Basalt columns form as thick lava cools slowly."},
                   headers=AUTH, timeout=30).raise_for_status()
        yield url


@pytest.fixture(scope="module")
def api_schema(service_url):
    return schemathesis.openapi.from_url(f"{service_url}/docs/openapi.json")  # the document itself is public


def _document() -> dict:
    """The OpenAPI document as the app serves it (building the app loads no model; the lifespan does)."""
    from rag.api.app import create_app

    return create_app(Settings(llm_local="no")).openapi_schema.to_schema()


# Loaded at import, not from the running service: pytest 9 broke schemathesis' lazy fixture loader; the
# stateful test below reads the served document and checks it is this one.
schema = schemathesis.openapi.from_dict(_document())


@schema.parametrize()
@hsettings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_input_is_a_server_error_and_responses_match_the_document(case, service_url):
    case.call_and_validate(base_url=service_url, headers=AUTH, checks=CHECKS)


def test_stateful_runs_follow_the_documents_links(api_schema):
    assert api_schema.raw_schema["paths"].keys() == schema.raw_schema["paths"].keys()
    links = api_schema.raw_schema["paths"]["/v1/documents"]["post"]["responses"]["202"].get("links", {})
    assert {"GetJob", "GetDocument", "DeleteDocument", "CancelJob"} <= set(links)

    class Machine(api_schema.as_state_machine()):
        def get_call_kwargs(self, case):
            return {"headers": AUTH}

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            case.validate_response(response, checks=CHECKS, transport_kwargs=kwargs)

    Machine.run(settings=hsettings(max_examples=max(5, EXAMPLES // 2), stateful_step_count=6, deadline=None,
                                   suppress_health_check=list(HealthCheck), derandomize=True))
