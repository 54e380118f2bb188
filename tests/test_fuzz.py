"""Property-based fuzzing of the HTTP API from its own OpenAPI document (schemathesis 4).

Schemathesis reads /api/openapi.json from the ASGI app (in process, no network) and, for every
operation, generates requests that fit the schema and requests that do not (wrong types, missing
fields, out-of-range numbers, odd strings and headers). Each answer must be: no 5xx; a status code
the document declares; the declared content type; a body that validates against the declared
schema; and invalid input answered with a 4xx. Bounded and reproducible: `MAX_EXAMPLES` per
operation, derandomized (a fixed seed derived from the test), no deadline (2 shared cores).
The app runs with an API key (sent by every generated request, so the fuzzing reaches the
handlers) and with the tiny model trained in conftest.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from detector.api import create_app
from detector.config import Settings
from detector.model import ArtifactSet

MAX_EXAMPLES = 50
KEY = "fuzz-" + "k" * 20
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
EXAMPLES: dict[str, int] = {}
STATUSES: dict[str, set[int]] = {}


# The schema is loaded when the module is imported (schemathesis' fixture-based lazy loader needs
# a pytest internal that pytest 9 no longer has), so the app exists before the model fixture:
# its loader takes the model from `_MODEL`, filled by the autouse fixture before any request.
_MODEL: list[ArtifactSet] = []
SETTINGS = Settings(
    api_keys=(f"fuzz:{KEY}",),
    max_batch_records=50,  # keeps generated batches small; the limit itself is fuzzed too
)
APP = create_app(SETTINGS, lambda: _MODEL[0], retry_backoff=(0.0, 0.0))
# Invalid input must be refused with a 4xx; 413 is among them (a batch over maxItems is "too
# large", the API's documented answer), besides schemathesis' default list.
# The API key goes through schemathesis' OpenAPI auth (security scheme "ApiKey"), so that it
# knows when a negative case drops the header on purpose.
CONFIG = schemathesis.Config.from_dict(
    {
        "auth": {"openapi": {"ApiKey": {"api_key": KEY}}},
        "checks": {
            "negative_data_rejection": {
                "expected-statuses": [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429]
            }
        },
    }
)
schema = schemathesis.openapi.from_asgi("/api/openapi.json", APP, config=CONFIG)


@pytest.fixture(scope="module", autouse=True)
def model(tiny_artifacts: ArtifactSet) -> Iterator[None]:
    _MODEL[:] = [tiny_artifacts]
    yield
    if EXAMPLES:
        print(f"\nfuzz examples per operation: {EXAMPLES} (total {sum(EXAMPLES.values())})")


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
def test_api_conforms_to_its_schema(case: Any) -> None:
    key = f"{case.method} {case.path}"
    EXAMPLES[key] = EXAMPLES.get(key, 0) + 1
    checks = CHECKS
    if case.path == "/api/predict_batch":
        # By contract a batch answers 200 with an error entry for each bad record (the others are
        # scored), so a schema-violating record inside `records` is not refused as a whole; the
        # response schema check still validates every entry.
        checks = [c for c in CHECKS if c is not negative_data_rejection]
    response = case.call_and_validate(checks=checks)
    STATUSES.setdefault(key, set()).add(response.status_code)


def test_the_schema_documents_every_route() -> None:
    document = TestClient(APP).get("/api/openapi.json").json()
    paths = set(document["paths"])
    for route in (
        "/api/health",
        "/api/model_info",
        "/api/features",
        "/api/predict",
        "/api/predict_batch",
        "/api/metrics",
    ):
        assert route in paths


@pytest.fixture(autouse=True)
def reached_the_handlers() -> Iterator[None]:
    """After each operation's fuzzing: the key was accepted and real answers came back for the
    operations that must succeed with valid input (not only refusals), and no 5xx at all."""
    before = {key: set(codes) for key, codes in STATUSES.items()}
    yield
    for operation in ("POST /api/predict", "POST /api/predict_batch", "GET /api/model_info"):
        if operation in STATUSES and STATUSES[operation] != before.get(operation):
            assert 200 in STATUSES[operation], (operation, STATUSES[operation])
    assert all(code < 500 for codes in STATUSES.values() for code in codes)
