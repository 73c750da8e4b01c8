"""How the simulator talks to operator endpoints and payment links: the replay reads the metrics
with a viewer's token (given, or signed by the dev issuer, and signed again when refused), and
an applicant opens the payment link of the SMS, which needs no token. Over an in-memory HTTP
transport: what is checked is what the simulator sends and how it takes each answer."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import orjson
import pytest

from services.payments.domain import txn_ref_for
from services.simulator.plan import targets
from services.simulator.report import Check
from services.simulator.shell import MetricsRefused, OperatorToken, pay, read_back

METRICS = "http://metrics.test"
ISSUER = "http://issuer.test"
PAYMENTS = "http://payments.test"
SUMMARY = {"dossiers": {"received": 2957, "resolved": 2791}}


class Recorder:
    """Answers like the metrics API (and the dev issuer), and keeps every request."""

    def __init__(self, accepts: Callable[[str | None], int]) -> None:
        self.accepts = accepts  # Authorization header -> status of the metrics API
        self.requests: list[httpx.Request] = []
        self.issued = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.host == "issuer.test":
            assert request.url.path == "/dev/token"
            assert orjson.loads(request.content)["roles"] == ["viewer"]
            self.issued += 1
            return httpx.Response(200, json={"access_token": f"fresh-{self.issued}"})
        status = self.accepts(request.headers.get("authorization"))
        if status != 200:
            return httpx.Response(status, json={"title": "Unauthorized", "detail": "no"})
        if request.url.path == "/v1/metrics/summary":
            return httpx.Response(200, json=SUMMARY)
        return httpx.Response(200, json={"groups": []})

    def metrics_headers(self) -> list[str | None]:
        return [
            r.headers.get("authorization") for r in self.requests if r.url.host == "metrics.test"
        ]


def client(recorder: Recorder) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(recorder))


def received(found: list[Check]) -> float | None:
    """The figure `received` as read back."""
    return next(c.read for c in found if c.label == "received")


async def test_every_query_carries_the_given_token() -> None:
    recorder = Recorder(lambda auth: 200 if auth == "Bearer given" else 401)
    async with client(recorder) as http:
        found = await read_back(http, METRICS, targets(0.01), OperatorToken("given", None))
    assert recorder.metrics_headers() == ["Bearer given"] * 4
    assert received(found) == 2957


async def test_a_refused_token_is_renewed_once_at_the_dev_issuer() -> None:
    recorder = Recorder(lambda auth: 200 if auth == "Bearer fresh-1" else 401)
    token = OperatorToken("expired", ISSUER)
    async with client(recorder) as http:
        found = await read_back(http, METRICS, targets(0.01), token)
    assert recorder.issued == 1 and token.value == "fresh-1"
    assert recorder.metrics_headers() == ["Bearer expired", *["Bearer fresh-1"] * 4]
    assert received(found) == 2957


async def test_a_first_token_comes_from_the_dev_issuer() -> None:
    recorder = Recorder(lambda auth: 200)
    token = OperatorToken(None, ISSUER)
    async with client(recorder) as http:
        assert await token.renew(http)
    assert token.headers == {"Authorization": "Bearer fresh-1"}


@pytest.mark.parametrize(
    ("status", "token"),
    [(403, OperatorToken("a-finance-less-viewer", ISSUER)), (401, OperatorToken("old", None))],
)
async def test_a_refusal_that_a_new_token_cannot_fix_stops_the_replay(
    status: int, token: OperatorToken
) -> None:
    recorder = Recorder(lambda auth: status)
    async with client(recorder) as http:
        with pytest.raises(MetricsRefused, match=f"answered {status}.*--operator-token"):
            await read_back(http, METRICS, targets(0.01), token)
    assert recorder.issued == 0


async def test_a_token_the_issuer_signs_but_metrics_refuses_is_not_asked_for_forever() -> None:
    recorder = Recorder(lambda auth: 401)
    async with client(recorder) as http:
        with pytest.raises(MetricsRefused, match="answered 401"):
            await read_back(http, METRICS, targets(0.01), OperatorToken(None, ISSUER))
    assert recorder.issued == 1


async def test_metrics_that_check_no_token_are_read_with_or_without_one() -> None:
    recorder = Recorder(lambda auth: 200)
    async with client(recorder) as http:
        with_token = await read_back(http, METRICS, targets(0.01), OperatorToken("t", None))
        without = await read_back(http, METRICS, targets(0.01))
    assert recorder.metrics_headers() == [*["Bearer t"] * 4, *[None] * 4]
    assert received(with_token) == 2957
    assert received(without) == 2957


async def test_an_unreachable_issuer_leaves_no_token() -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    token = OperatorToken(None, ISSUER)
    async with httpx.AsyncClient(transport=httpx.MockTransport(down)) as http:
        assert not await token.renew(http)
    assert token.value is None and token.headers == {}


async def test_an_applicant_opens_the_payment_link_without_a_token() -> None:
    dossier_id = "000.00.12.H34-261126-0001"
    opened: list[httpx.Request] = []

    def payments(request: httpx.Request) -> httpx.Response:
        opened.append(request)
        assert "authorization" not in request.headers
        if request.url.path == f"/pay/{txn_ref_for(dossier_id)}":
            return httpx.Response(302, headers={"location": "http://gateway.test/page?o=1"})
        if request.url.host == "gateway.test":
            return httpx.Response(200, text="paid")
        return httpx.Response(404, json={"title": "Not Found"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(payments)) as http:
        assert await pay(http, PAYMENTS, dossier_id)
        assert not await pay(http, PAYMENTS, "000.00.12.H34-261126-0002")  # no order yet
    assert [str(r.url) for r in opened] == [
        f"{PAYMENTS}/pay/{txn_ref_for(dossier_id)}",
        "http://gateway.test/page?o=1",
        f"{PAYMENTS}/pay/{txn_ref_for('000.00.12.H34-261126-0002')}",
    ]
