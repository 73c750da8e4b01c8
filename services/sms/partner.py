"""The SMS provider protocol (v1) and its httpx adapter.

    POST /v1/messages
      Idempotency-Key: <key>            the same key always means the same message
      {"to": "+849...", "text": "...", "sender": "MOTCUA", "reference": "<key>",
       "metadata": {"dossier_id": "...", "template": "..."}}
    202 {"message_id": "...", "status": "accepted", "replayed": false}
        a repeated key answers the first message's id with "replayed": true, sending nothing
    400/422 the request can never be accepted; 429 and 5xx: try again later

Delivery reports come back signed (CONTRACT section 6) to `/v1/webhooks/sms/{provider}` with
`{"event_id", "message_id", "reference", "dossier_id", "status", "occurred_at"}`, `status` an
SMPP `stat` word (DELIVRD, UNDELIV, EXPIRED, ENROUTE, ...).

A timeout after the request went out is *ambiguous*: the provider may have accepted. The caller
must ask the same provider again with the same key before trying another one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import httpx

from services.common.partner import IDEMPOTENCY_HEADER, RETRYABLE_STATUS

MESSAGES_PATH = "/v1/messages"


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


class Failure(StrEnum):
    AMBIGUOUS = "timeout"  # the request may have reached the provider
    UNAVAILABLE = "unavailable"  # it certainly was not accepted; worth another try
    REJECTED = "rejected"  # it never will be accepted


class GatewayError(Exception):
    def __init__(self, provider: str, failure: Failure, detail: str, seconds: float) -> None:
        super().__init__(f"{provider}: {failure.value}: {detail}")
        self.provider = provider
        self.failure = failure
        self.detail = detail
        self.seconds = seconds


class SmsGateway:
    """One provider over HTTP: one attempt per `send`; the caller decides about retries."""

    def __init__(self, name: str, base_url: str, *, timeout: float, connections: int = 200):
        self.name = name
        self._client = httpx.AsyncClient(
            base_url=base_url,
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        )

    async def send(self, sms: OutboundSms, idempotency_key: str) -> Accepted:
        started = time.perf_counter()

        def fail(failure: Failure, detail: str) -> GatewayError:
            return GatewayError(self.name, failure, detail, time.perf_counter() - started)

        try:
            response = await self._client.post(
                MESSAGES_PATH, json=sms.body(), headers={IDEMPOTENCY_HEADER: idempotency_key}
            )
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise fail(Failure.UNAVAILABLE, type(exc).__name__) from None
        except (httpx.TimeoutException, httpx.TransportError) as exc:
            raise fail(Failure.AMBIGUOUS, type(exc).__name__) from None
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

    async def aclose(self) -> None:
        await self._client.aclose()
