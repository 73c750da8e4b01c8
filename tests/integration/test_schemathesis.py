"""Intake answers as its own OpenAPI document says: schemathesis (`st run`) reads the live
`/openapi.json` of one intake (real broker, Redis and dev OIDC issuer, over HTTP) and drives every
operation through its examples, coverage and fuzzing phases with every check it has (no 500,
documented status codes, content types, headers and bodies, `Allow` on a 405, invalid data
refused, valid data accepted, auth not ignored), expecting zero failures.

Operators' routes are called with an admin token of the dev issuer, `POST /v1/events` with the
test portal's key; the broker is the module's own, so the portal keys made here stay here.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from services.dev.embedded import Broker, free_port
from tests.conftest import PORTAL_KEY, service_env
from tests.support.processes import motcua

pytestmark = pytest.mark.integration

ST = Path(sys.executable).with_name("st")
# Test cases per operation and phase: bounds the run to seconds, not minutes.
MAX_EXAMPLES = 10

# A batch valid by the document's JSON Schema may still be refused 422 for what JSON Schema
# cannot say (`subject` equal to `data.dossier_id`, timestamps within 2000-01-01 .. now + 10
# years): the positive-data check accepts that 422 there, and expects what it always does else.
CONFIG = """
[phases.stateful]
enabled = false  # the document declares no links between operations

[[operations]]
include-path = "/v1/events"
headers = {{ Authorization = "Bearer {portal_key}" }}
checks.positive_data_acceptance.expected-statuses = [
    "2xx", "3xx", "401", "403", "404", "409", "422", "429",
]

[[operations]]
include-path-regex = "^/v1/admin/"
headers = {{ Authorization = "{operator}" }}
"""


@pytest.fixture(scope="module")
def intake_url(broker: Broker, redis_url: str, issuer: Any) -> Iterator[str]:
    namespace = f"motcua-test-{uuid.uuid4().hex[:10]}"
    port = free_port()
    env = service_env(
        broker, redis_url, namespace, INTAKE_PORT=str(port), MOTCUA_OIDC_ISSUER=issuer.url
    )
    with motcua("intake", env, port):
        yield f"http://127.0.0.1:{port}"
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(f"{namespace}:*", count=1000))
    if keys:
        client.delete(*keys)


@pytest.mark.skipif(not ST.exists() and shutil.which("st") is None, reason="schemathesis")
def test_intake_answers_as_its_openapi_document_says(
    intake_url: str, issuer: Any, tmp_path: Path
) -> None:
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        CONFIG.format(portal_key=PORTAL_KEY, operator=issuer.headers("admin")["Authorization"])
    )
    st = str(ST) if ST.exists() else "st"
    result = subprocess.run(
        [
            st,
            "--config-file",
            str(config),
            "run",
            f"{intake_url}/openapi.json",
            "--checks",
            "all",
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            str(MAX_EXAMPLES),
            "--request-timeout",
            "30",
            "--seed",
            "1",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,  # its cache (`.schemathesis/`) stays out of the tree
    )
    report = result.stdout[-8000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    assert "7 total" in report and "7 selected" in report, report  # every operation ran
