"""The SMS provider adapter as a shell, with the provider played by `httpx.MockTransport`:
one outcome per message of a batch, and a whole-call failure classified for the retry rules."""

from __future__ import annotations

import httpx
import orjson

from services.sms.attempts import Failure
from services.sms.partner import Accepted, GatewayError, OutboundSms, SmsGateway


def sms(n: int) -> OutboundSms:
    return OutboundSms(
        to="+84905333444",
        text=f"Ho so {n} da duoc tiep nhan",
        sender="MOTCUA",
        reference=f"ref-{n}",
        dossier_id=f"D-{n}",
        template="received",
    )


async def test_a_batch_gets_one_outcome_per_message_in_order() -> None:
    seen: list[dict[str, object]] = []

    def provider(request: httpx.Request) -> httpx.Response:
        body = orjson.loads(request.content)
        seen.append(body)
        results = [
            {"idempotency_key": m["idempotency_key"], "status": "accepted", "message_id": "m-1"}
            if m["reference"] == "ref-1"
            else {
                "idempotency_key": m["idempotency_key"],
                "status": "failed",
                "retryable": False,
                "error": "blocked number",
            }
            for m in body["messages"]
        ]
        return httpx.Response(200, json={"results": results})

    gateway = SmsGateway(
        "primary", "http://provider", timeout=1.0, transport=httpx.MockTransport(provider)
    )
    outcomes = await gateway.send_batch([(sms(1), "k-1"), (sms(2), "k-2")])
    await gateway.aclose()

    assert [m["idempotency_key"] for m in seen[0]["messages"]] == ["k-1", "k-2"]  # type: ignore[index]
    first, second = outcomes
    assert isinstance(first, Accepted) and first.message_id == "m-1"
    assert isinstance(second, GatewayError) and second.failure == Failure.REJECTED


async def test_a_provider_unavailable_fails_every_message_as_retryable() -> None:
    gateway = SmsGateway(
        "primary",
        "http://provider",
        timeout=1.0,
        transport=httpx.MockTransport(lambda request: httpx.Response(503)),
    )
    outcomes = await gateway.send_batch([(sms(1), "k-1"), (sms(2), "k-2")])
    await gateway.aclose()
    assert all(isinstance(o, GatewayError) and o.failure == Failure.UNAVAILABLE for o in outcomes)


async def test_an_unreadable_answer_is_ambiguous_not_a_failure() -> None:
    gateway = SmsGateway(
        "primary",
        "http://provider",
        timeout=1.0,
        transport=httpx.MockTransport(lambda request: httpx.Response(200, content=b"<html>")),
    )
    outcomes = await gateway.send_batch([(sms(1), "k-1")])
    await gateway.aclose()
    assert isinstance(outcomes[0], GatewayError) and outcomes[0].failure == Failure.AMBIGUOUS
