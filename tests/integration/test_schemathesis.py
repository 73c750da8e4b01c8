"""Every service answers as its own OpenAPI document says: schemathesis (`st run`) reads the live
`/openapi.json` of one service at a time (intake, payments, postal, sms, metrics and portals, each
`motcua run` in its own process on its own port, with the module's broker, the real Redis and the
dev OIDC issuer, over HTTP) and drives every operation through its examples, coverage and fuzzing
phases with every check it has (no 500, documented status codes, content types, headers and
bodies, `Allow` on a 405, invalid data refused, valid data accepted, auth not ignored), expecting
zero failures.

Operators' routes are called with an admin token of the dev issuer, `POST /v1/events` with the
test portal's key; the broker is the module's own, so the portal keys made here stay here. The
partners' webhooks are called as a stranger would call them: unsigned. Payments runs beside the
bank sandbox (an operator's reconciliation fetches its statement) with one order opened for a
submitted dossier, which about half the generated lookups and payment links ask for; the carrier and
the SMS gateways are not called by any operation here, so their URLs lead nowhere.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx
import orjson
import pytest

from services.common.kafka import ensure_topics
from services.common.topics import DOSSIER_EVENTS, declared_topics
from services.common.tz import VIETNAM_TZ
from services.dev.embedded import Broker, free_port
from tests.conftest import PORTAL_KEY, service_env
from tests.support import factories
from tests.support.kafka import produce
from tests.support.operators import Issuer
from tests.support.postal import Ports, postal_env, wait_until
from tests.support.processes import motcua, process, wait_http
from tests.support.redis_keys import delete_namespace

pytestmark = pytest.mark.integration

ST = Path(sys.executable).with_name("st")
# Test cases per operation and phase: bounds each service's run to seconds, not minutes.
MAX_EXAMPLES = 10

# A batch valid by the document's JSON Schema may still be refused 422 for what JSON Schema
# cannot say (`subject` equal to `data.dossier_id`, timestamps within 2000-01-01 .. now + 10
# years): the positive-data check accepts that 422 there, and expects what it always does else.
# The coverage phase walks the boundaries of valid envelopes only: its invalid variants of the
# events' schema number thousands (three quarters of the service's run); the fuzzing phase still
# sends invalid ones, and test_intake_bounds.py and test_intake_bounds_property.py drive intake's
# refusals of every kind.
INTAKE = """
[[operations]]
include-path = "/v1/events"
headers = {{ Authorization = "Bearer {portal_key}" }}
phases.coverage.generation.mode = "positive"
checks.positive_data_acceptance.expected-statuses = [
    "2xx", "3xx", "401", "403", "404", "409", "422", "429",
]
"""

# A partner signs its webhook over the raw body (CONTRACT section 6), which no generated request
# is: a body valid by the document is refused 401 (its signature is missing), which the
# positive-data check accepts there. Signed calls are accepted in test_sms_webhook.py,
# test_postal*.py and test_payments.py.
SIGNED_WEBHOOK = """
[[operations]]
include-path-regex = "^/v1/webhooks/"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401"]
"""

# The bank's IPN answers HTTP 200 whatever it is sent (CONTRACT section 6): the outcome is the
# `RspCode` in the body (97 a missing or wrong signature, 99 a malformed call, 01 an unknown
# gateway), so the negative-data check accepts a 200 there; the 200's body schema (an `RspCode`
# of the protocol's) is still checked by the response checks.
BANK_IPN = """
[[operations]]
include-path-regex = "^/v1/webhooks/payments/"
checks.negative_data_rejection.expected-statuses = ["200"]
"""

# A day after today is refused 422: JSON Schema cannot compare a date with today.
RECONCILIATION = """
[[operations]]
include-path = "/v1/admin/reconciliations"
headers = {{ Authorization = "{operator}" }}
checks.positive_data_acceptance.expected-statuses = ["2xx", "422"]
"""

# A finance report's range and amounts each valid may still be refused together 422 (`to_date`
# before `from_date`, totals of more than 366 days, `amount_max` below `amount_min`), as may an
# RFC 3339 form Python's `fromisoformat` does not read: JSON Schema cannot say that. A refund
# valid by the document is refused 422 when it asks for more than is left, or reuses its
# Idempotency-Key for another body; 404 for a dossier without a payment, 409 for an unpaid one.
PAYMENT_REPORTS = """
[[operations]]
include-path-regex = "^/v1/payments([.]csv|/totals)?$"
headers = {{ Authorization = "{operator}" }}
checks.positive_data_acceptance.expected-statuses = ["2xx", "422"]

[[operations]]
include-path = "/v1/payments/{{dossier_id}}/refunds"
headers = {{ Authorization = "{operator}" }}
checks.positive_data_acceptance.expected-statuses = ["2xx", "404", "409", "422"]
"""

# The range is `window` or `from`/`to`, not both, `from` not after `to`: JSON Schema cannot say
# that of query parameters, so a range valid parameter by parameter may be refused 422 (so is a
# series of more than 400 steps, or an RFC 3339 form Python's `fromisoformat` does not read: a
# lowercase `t` or `z`, a leap second). The
# dashboard's code exchange passes on the issuer's answer: a code only the issuer handed to a
# browser's sign-in is accepted, any other is refused 400 `invalid_grant`.
METRICS = """
[[operations]]
include-path-regex = "^/v1/metrics/(summary|breakdown|series)$"
headers = {{ Authorization = "{operator}" }}
checks.positive_data_acceptance.expected-statuses = ["2xx", "422"]

[[operations]]
include-path = "/auth/token"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400"]
"""

# Portals call with their key. A subscription's URL valid by JSON Schema may still be refused 422
# (https to a public address only, checked on what its host resolves to), a dossier or delivery
# of no one is 404, and a subscription never put is 404. The same holds for an admin's calls on
# any portal's subscription, whose source may also be refused 422 (motcua's own sources are
# reserved).
PORTALS = """
[[operations]]
include-path-regex = "^/v1/(subscription|deliveries|dossiers)"
headers = {{ Authorization = "Bearer {portal_key}" }}
checks.positive_data_acceptance.expected-statuses = ["2xx", "404", "422"]

[[operations]]
include-path-regex = "^/v1/admin/subscriptions"
headers = {{ Authorization = "{operator}" }}
checks.positive_data_acceptance.expected-statuses = ["2xx", "404", "422"]
"""

# An order that exists (`open_order`) is asked for by about half the generated lookups and payment
# links, so that their 200 and 302 are checked against the document too, not only the 404 of an
# unknown one. (Braces are doubled: these blocks are `str.format` templates.)
ORDER = """
[dictionaries.dossiers]
values = ["{dossier_id}"]

[dictionaries.txn_refs]
values = ["{txn_ref}"]

[[operations]]
include-path = "/v1/payments/{{dossier_id}}"
headers = {{ Authorization = "{operator}" }}
parameters = {{ "path.dossier_id" = {{ dictionary = "dossiers", probability = 0.5 }} }}

[[operations]]
include-path = "/pay/{{txn_ref}}"
parameters = {{ "path.txn_ref" = {{ dictionary = "txn_refs", probability = 0.5 }} }}
"""

# Operators' routes (`/v1/admin/...`, `/v1/metrics/...`, `/v1/payments...`) get an admin
# token, which every one of them admits; the matching block listed first wins, so this comes last.
OPERATORS = """
[phases.stateful]
enabled = false  # no document declares links between operations

[[operations]]
include-path-regex = "^/v1/(admin/|metrics/|payments)"
headers = {{ Authorization = "{operator}" }}
"""

Env = Callable[[Broker, str, str, int], dict[str, str]]


@dataclass(frozen=True)
class Service:
    name: str
    env: Env  # (broker, redis_url, namespace, port) -> `motcua run NAME`'s environment
    config: str = ""  # its schemathesis blocks, before OPERATORS
    sandbox: tuple[str, str] | None = None  # a partner's sandbox beside it: (name, port variable)
    # what exists once it runs, for its config's placeholders: (broker, url, issuer) -> values
    known: Callable[[Broker, str, Issuer], dict[str, str]] | None = None


def nobody() -> str:
    """A loopback URL nobody listens on."""
    return f"http://127.0.0.1:{free_port()}"


def data_dir() -> str:
    return tempfile.mkdtemp(prefix="motcua-schemathesis-")


def intake_env(broker: Broker, redis_url: str, namespace: str, port: int) -> dict[str, str]:
    return service_env(broker, redis_url, namespace, INTAKE_PORT=str(port))


def payments_env(broker: Broker, redis_url: str, namespace: str, port: int) -> dict[str, str]:
    bank = free_port()
    return service_env(
        broker,
        redis_url,
        namespace,
        PAYMENTS_PORT=str(port),
        PAYMENTS_PUBLIC_URL=f"http://127.0.0.1:{port}",
        VNPAY_SANDBOX_PORT=str(bank),
        VNPAY_URL=f"http://127.0.0.1:{bank}",
        JSONPAY_URL=f"http://127.0.0.1:{bank}/jsonpay",
        PAYMENTS_GATEWAY_TIMEOUT_SECONDS="1",
        PAYMENTS_RECONCILE_ENABLED="false",
        PAYMENTS_RECONCILE_DIR=data_dir(),
    )


def open_order(broker: Broker, url: str, issuer: Issuer) -> dict[str, str]:
    """A dossier submitted now with an online fee, once payments has opened its order: its
    dossier id and the order's txn ref."""
    event = factories.submitted(
        f"000.00.12.H34-{uuid.uuid4().hex[:8]}", time=datetime.now(VIETNAM_TZ).isoformat()
    )
    message = (event["subject"].encode(), orjson.dumps(event))
    asyncio.run(produce(broker.bootstrap, DOSSIER_EVENTS, [message]))
    finance = issuer.headers("finance")

    def opened() -> httpx.Response | None:
        r = httpx.get(f"{url}/v1/payments/{event['subject']}", headers=finance, timeout=10)
        return r if r.status_code == 200 else None

    found = wait_until(opened, timeout=30, interval=0.2)
    assert found is not None, "payments opened no order for a submitted dossier"
    return {"dossier_id": event["subject"], "txn_ref": found.json()["txn_ref"]}


def postal_env_on(broker: Broker, redis_url: str, namespace: str, port: int) -> dict[str, str]:
    return postal_env(broker, redis_url, namespace, Ports(postal=port))


def sms_env(broker: Broker, redis_url: str, namespace: str, port: int) -> dict[str, str]:
    return service_env(
        broker,
        redis_url,
        namespace,
        SMS_PORT=str(port),
        SMS_SECRETS="test-sms-schemathesis-secret",
        SMS_PRIMARY_URL=nobody(),
        SMS_SECONDARY_URL=nobody(),
        MOTCUA_DATA_DIR=data_dir(),
    )


def portals_env(broker: Broker, redis_url: str, namespace: str, port: int) -> dict[str, str]:
    return service_env(
        broker,
        redis_url,
        namespace,
        PORTALS_PORT=str(port),
        MOTCUA_ENV="dev",
        MOTCUA_DATA_DIR=data_dir(),
    )


def metrics_env(broker: Broker, redis_url: str, namespace: str, port: int) -> dict[str, str]:
    return service_env(
        broker, redis_url, namespace, METRICS_PORT=str(port), MOTCUA_DATA_DIR=data_dir()
    )


SERVICES = [
    Service("intake", intake_env, INTAKE),
    Service(
        "payments",
        payments_env,
        SIGNED_WEBHOOK + BANK_IPN + RECONCILIATION + PAYMENT_REPORTS + ORDER,
        sandbox=("vnpay-sandbox", "VNPAY_SANDBOX_PORT"),
        known=open_order,
    ),
    Service("postal", postal_env_on, SIGNED_WEBHOOK),
    Service("sms", sms_env, SIGNED_WEBHOOK),
    Service("metrics", metrics_env, METRICS),
    Service("portals", portals_env, PORTALS),
]


@dataclass(frozen=True)
class Live:
    service: Service
    url: str
    known: dict[str, str]


@pytest.fixture(scope="module", params=SERVICES, ids=lambda service: service.name)
def live(
    request: pytest.FixtureRequest, broker: Broker, redis_url: str, issuer: Issuer
) -> Iterator[Live]:
    """One service at a time: each is stopped before the next one starts."""
    service: Service = request.param
    asyncio.run(ensure_topics(broker.bootstrap, declared_topics(4)))
    namespace = f"motcua-test-{uuid.uuid4().hex[:10]}"
    port = free_port()
    env = {**service.env(broker, redis_url, namespace, port), "MOTCUA_OIDC_ISSUER": issuer.url}
    with ExitStack() as running:
        # the sandbox starts while the service does (each spends seconds importing)
        sandbox = None
        if service.sandbox is not None:
            name, port_variable = service.sandbox
            log = f"{name}-schemathesis"
            sandbox = running.enter_context(process(["services.cli", "run", name], env, log))
        log = f"{service.name}-schemathesis"
        running.enter_context(motcua(service.name, env, port, log_name=log))
        if sandbox is not None:
            wait_http(f"http://127.0.0.1:{env[port_variable]}/healthz", proc=sandbox)
        url = f"http://127.0.0.1:{port}"
        yield Live(service, url, service.known(broker, url, issuer) if service.known else {})
    delete_namespace(redis_url, namespace)


@pytest.mark.skipif(not ST.exists() and shutil.which("st") is None, reason="schemathesis")
def test_each_service_answers_as_its_openapi_document_says(
    live: Live, issuer: Issuer, tmp_path: Path
) -> None:
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        (live.service.config + OPERATORS).format(
            portal_key=PORTAL_KEY,
            operator=issuer.headers("admin")["Authorization"],
            **live.known,
        )
    )
    document = httpx.get(f"{live.url}/openapi.json", timeout=10).json()
    operations = sum(len(item) for item in document["paths"].values())
    st = str(ST) if ST.exists() else "st"
    result = subprocess.run(
        [
            st,
            "--config-file",
            str(config),
            "run",
            f"{live.url}/openapi.json",
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
    # every operation of the live document ran
    assert f"{operations} total" in report and f"{operations} selected" in report, report
