"""Posting deliveries to portals (CONTRACT section 9): the outbound shell.

`Deliverer.post` makes one attempt: `POST <url>` with the event's bytes, `X-Motcua-Signature`
(`signing.sign_body` with the subscription's secret) and `X-Motcua-Delivery` (the event id, the
same on every attempt); a 2xx answer within `timeout` is delivered, anything else (another
status, a refused connection, the timeout) is not. Redirects are not followed; at most
`MAX_ANSWER_BYTES` of an answer is read (and thrown away).

One slow or dead portal never delays another: attempts to one portal run at most
`per_portal` at once (a semaphore per portal), all portals share `concurrency` connections, and
every attempt ends by the timeout. The figures per portal: delivered, retried, given up
(counted by the worker when it applies an outcome) and the latency of each attempt.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import httpx
from prometheus_client import Counter, Histogram

from services.common import tracing
from services.common.partner import http_client
from services.common.signing import SIGNATURE_HEADER, sign_body

DELIVERY_HEADER = "X-Motcua-Delivery"
# What is read of a portal's answer (its status is what counts); a longer one is cut off.
MAX_ANSWER_BYTES = 64 * 1024

DELIVERED = Counter(
    "motcua_portals_delivered_total", "Deliveries a portal answered 2xx", ["portal"]
)
RETRIED = Counter(
    "motcua_portals_retried_total", "Failed attempts that will be tried again", ["portal"]
)
GIVEN_UP = Counter(
    "motcua_portals_given_up_total", "Deliveries given up (dead-lettered)", ["portal"]
)
LATENCY = Histogram(
    "motcua_portals_attempt_seconds",
    "Time from sending a delivery to the portal's answer (or the timeout)",
    ["portal"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)


@dataclass(frozen=True)
class Answer:
    ok: bool
    status_code: int | None
    error: str | None
    seconds: float


class Deliverer:
    def __init__(
        self,
        *,
        timeout: float,
        per_portal: int,
        concurrency: int,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.timeout = timeout
        self.per_portal = per_portal
        # the partners' client (aiohttp's connection pool under httpx); redirects not followed
        self._client = http_client(
            timeout=timeout,
            headers={"User-Agent": "motcua-portals/1"},
            connections=concurrency,
            transport=transport,
        )
        self._gates: dict[str, asyncio.Semaphore] = {}

    def busy(self, portal: str) -> bool:
        """Whether every attempt slot of `portal` is taken."""
        gate = self._gates.get(portal)
        return gate is not None and gate.locked()

    async def post(
        self, portal: str, url: str, secret: str, delivery_id: str, body: bytes
    ) -> Answer:
        """One attempt; in the trace of the event delivered (`body`) when it is traced, the
        call then sending its `traceparent`."""
        with tracing.span_under(
            "portal delivery",
            tracing.contexts_in([body]),
            attributes={"motcua.portal": portal, "motcua.delivery_id": delivery_id},
        ):
            return await self._post(portal, url, secret, delivery_id, body)

    async def _post(
        self, portal: str, url: str, secret: str, delivery_id: str, body: bytes
    ) -> Answer:
        gate = self._gates.get(portal)
        if gate is None:
            gate = self._gates[portal] = asyncio.Semaphore(self.per_portal)
        async with gate:
            headers = {
                "Content-Type": "application/json",
                SIGNATURE_HEADER: sign_body(body, secret),
                DELIVERY_HEADER: delivery_id,
            }
            started = time.perf_counter()
            code: int | None = None  # the status, once the answer's head has come
            answer = Answer(False, None, "no answer", 0.0)
            try:
                async with asyncio.timeout(self.timeout):
                    request = self._client.build_request("POST", url, content=body, headers=headers)
                    response = await self._client.send(request, stream=True)
                    code = response.status_code
                    try:  # read a short answer to its end: its connection is kept for the next
                        read = 0
                        if not response.is_stream_consumed:
                            async for chunk in response.aiter_raw():
                                read += len(chunk)
                                if read > MAX_ANSWER_BYTES:
                                    break
                    finally:
                        await response.aclose()
            except (TimeoutError, httpx.HTTPError) as exc:
                if code is None:  # no answer (a body cut short after its status still counts)
                    error = (
                        f"no answer within {self.timeout:g} s"
                        if isinstance(exc, TimeoutError)
                        else f"{type(exc).__name__}: {exc}"[:200]
                    )
                    answer = Answer(False, None, error, 0.0)
            if code is not None:
                answer = Answer(200 <= code < 300, code, None, 0.0)
            seconds = time.perf_counter() - started
            LATENCY.labels(portal).observe(seconds)
            return Answer(answer.ok, answer.status_code, answer.error, seconds)

    async def close(self) -> None:
        await self._client.aclose()
