"""The SMS provider protocol (v1) and its httpx adapter (on aiohttp's pool, `http_client`).

    POST /v1/messages                   one message
      Idempotency-Key: <key>            the same key always means the same message
      {"to": "+849...", "text": "...", "sender": "MOTCUA", "reference": "<key>",
       "metadata": {"dossier_id": "...", "template": "..."}}
    202 {"message_id": "...", "status": "accepted", "replayed": false}
        a repeated key answers the first message's id with "replayed": true, sending nothing
    400/422 the request can never be accepted; 429 and 5xx: try again later

    POST /v1/messages/batch             up to 500 messages, each with its own key
      {"messages": [{"idempotency_key": "<key>", "to": ..., "text": ..., "sender": ...,
                     "reference": "<key>", "metadata": {...}}, ...]}
    200 {"results": [{"idempotency_key": "<key>", "status": "accepted", "message_id": "...",
                      "replayed": false}
                     | {"idempotency_key": "<key>", "status": "failed", "retryable": true,
                        "error": "..."}, ...]}
        one result per message, in the order sent; each key behaves as on `/v1/messages`
    400/422/413 the whole request can never be accepted; 429 and 5xx: none was accepted

Delivery reports come back signed (CONTRACT section 6) to `/v1/webhooks/sms/{provider}` with
`{"event_id", "message_id", "reference", "dossier_id", "status", "occurred_at"}`, `status` an
SMPP `stat` word (DELIVRD, UNDELIV, EXPIRED, ENROUTE, ...).

A timeout after the request went out is *ambiguous*: the provider may have accepted. The caller
must ask the same provider again with the same key before trying another one; for a batch,
every message of it is ambiguous.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx
import orjson

from services.common.partner import IDEMPOTENCY_HEADER, RETRYABLE_STATUS, http_client
from services.sms.attempts import Failure

MESSAGES_PATH = "/v1/messages"
BATCH_PATH = "/v1/messages/batch"
MAX_BATCH = 500


@dataclass(frozen=True)
class OutboundSms:
    to: str
    text: str
    sender: str
    reference: str
    dossier_id: str
    template: str

    def body(self) -> dict[str, Any]:
        return {
            "to": self.to,
            "text": self.text,
            "sender": self.sender,
            "reference": self.reference,
            "metadata": {"dossier_id": self.dossier_id, "template": self.template},
        }


@dataclass(frozen=True)
class Accepted:
    provider: str
    message_id: str
    replayed: bool
    seconds: float


class GatewayError(Exception):
    def __init__(self, provider: str, failure: Failure, detail: str, seconds: float) -> None:
        super().__init__(f"{provider}: {failure.value}: {detail}")
        self.provider = provider
        self.failure = failure
        self.detail = detail
        self.seconds = seconds


class SmsGateway:
    """One provider over HTTP: one attempt per `send`; the caller decides about retries."""

    def __init__(
        self,
        name: str,
        base_url: str,
        *,
        timeout: float,
        connections: int = 200,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self.name = name
        self._client = http_client(
            base_url=base_url, timeout=timeout, connections=connections, transport=transport
        )

    async def send(self, sms: OutboundSms, idempotency_key: str) -> Accepted:
        started = time.perf_counter()

        def fail(failure: Failure, detail: str) -> GatewayError:
            return GatewayError(self.name, failure, detail, time.perf_counter() - started)

        try:
            response = await self._client.post(
                MESSAGES_PATH, json=sms.body(), headers={IDEMPOTENCY_HEADER: idempotency_key}
            )
        except (httpx.TransportError, aiohttp.ClientError, TimeoutError) as exc:
            raise fail(transport_failure(exc), type(exc).__name__) from None
        if response.status_code >= 400:
            status = response.status_code
            if status in RETRYABLE_STATUS:
                raise fail(Failure.UNAVAILABLE, f"HTTP {status}")
            raise fail(Failure.REJECTED, f"HTTP {status}")
        try:
            body = response.json()
            message_id = str(body["message_id"])
            replayed = bool(body.get("replayed", False))
        except (ValueError, KeyError, TypeError):
            # Accepted (2xx) but unreadable: the message is with the provider.
            message_id, replayed = "", False
        return Accepted(self.name, message_id, replayed, time.perf_counter() - started)

    async def send_batch(
        self, messages: Sequence[tuple[OutboundSms, str]]
    ) -> list[Accepted | GatewayError]:
        """Many messages (each with its idempotency key) in one call: one outcome per message.

        A failure of the whole call (timeout, 5xx, refused connection) is every message's outcome.
        """
        if not messages:
            return []
        if len(messages) > MAX_BATCH:
            raise ValueError(f"at most {MAX_BATCH} messages per batch")
        started = time.perf_counter()

        def everyone(failure: Failure, detail: str) -> list[Accepted | GatewayError]:
            seconds = time.perf_counter() - started
            return [GatewayError(self.name, failure, detail, seconds) for _ in messages]

        body = orjson.dumps(
            {"messages": [{"idempotency_key": key, **sms.body()} for sms, key in messages]}
        )
        try:
            response = await self._client.post(
                BATCH_PATH, content=body, headers={"content-type": "application/json"}
            )
        except (httpx.TransportError, aiohttp.ClientError, TimeoutError) as exc:
            return everyone(transport_failure(exc), type(exc).__name__)
        seconds = time.perf_counter() - started
        status = response.status_code
        if status >= 400:
            failure = Failure.UNAVAILABLE if status in RETRYABLE_STATUS else Failure.REJECTED
            return everyone(failure, f"HTTP {status}")
        try:
            results = orjson.loads(response.content)["results"]
            if not isinstance(results, list) or len(results) != len(messages):
                raise ValueError("one result per message expected")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            # 2xx but unreadable: whether each message was taken is unknown.
            return everyone(Failure.AMBIGUOUS, f"unreadable answer: {type(exc).__name__}")
        return [
            _item_outcome(self.name, result, key, seconds)
            for result, (_, key) in zip(results, messages, strict=True)
        ]

    async def aclose(self) -> None:
        await self._client.aclose()


def transport_failure(exc: BaseException) -> Failure:
    """Whether a request that failed in transport may have reached the provider.

    Only a connection that was never made is certain. httpx over aiohttp (`http_client`) maps
    every aiohttp connection error to `ConnectTimeout`, also a server hanging up after the
    request went out, so the aiohttp error underneath decides.
    """
    cause = exc.__cause__ if isinstance(exc, httpx.TransportError) else exc
    if cause is None:  # raised by httpx itself (its own pool, or before sending)
        certain = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
    else:
        certain = isinstance(cause, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError)
    return Failure.UNAVAILABLE if certain else Failure.AMBIGUOUS


def _item_outcome(provider: str, result: Any, key: str, seconds: float) -> Accepted | GatewayError:
    if not isinstance(result, dict) or result.get("idempotency_key") != key:
        return GatewayError(provider, Failure.AMBIGUOUS, "result out of order", seconds)
    if result.get("status") == "accepted":
        replayed = bool(result.get("replayed", False))
        return Accepted(provider, str(result.get("message_id") or ""), replayed, seconds)
    failure = Failure.UNAVAILABLE if result.get("retryable") else Failure.REJECTED
    return GatewayError(provider, failure, str(result.get("error") or "failed")[:200], seconds)
