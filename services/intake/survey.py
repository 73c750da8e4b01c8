"""The satisfaction survey's public page on intake: `GET` and `POST /s/{token}`.

No sign-in: the signed link of the SMS (`services.common.survey_links`) is the credential, and
names the dossier and its agency. Every request takes a token from the client address's bucket,
an answer one more from the dossier's (Redis `TokenBucket`s): over either, a 429 page with
`Retry-After`. An invalid link is a 404 page, an expired one 410.

An answer: the dossier's kept answer is swapped for the new one (`SET ... GET`, one atomic step,
so two answers at once still form one chain), then `survey.answered` is published on
`survey.events` (acks=all) naming the answer it replaces; if the broker does not acknowledge,
the kept answer is put back (unless another answer came since) and the page says to retry
(503). The comment is free text that may hold personal data (CONTRACT section 10): it travels
only sealed with the dossier's data key, so it is erased with the dossier's personal data;
when that key is gone already, the comment is dropped and the score still counts.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from prometheus_client import Counter

from services.common.coordination import Keys, TokenBucket
from services.common.data_keys import DataKeys, KeyErased, KeysUnavailable
from services.common.events import make_event
from services.common.kafka import BrokerUnavailable, DurablePublisher
from services.common.logging import get_logger
from services.common.sealing import SealingError, seal
from services.common.survey_links import ExpiredLink, InvalidLink, SurveyLink, verify
from services.common.webhooks import RETRY_AFTER, BodyTooLarge, read_body, unavailable_response
from services.intake.survey_page import (
    FORM_MAX_BYTES,
    SURVEY_SOURCE,
    AnswerRefused,
    answered_data,
    decode_record,
    event_id,
    form_page,
    new_record,
    parse_answer,
    refusal_page,
    thanks_page,
)

log = get_logger("motcua.intake.survey")

ANSWERS = Counter("motcua_survey_answers_total", "Survey page outcomes", ["outcome"])
COMMENT_FIELD = "survey.comment"
# Put the kept answer back after a failed publication, unless another answer replaced it since.
_RESTORE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  if ARGV[2] == '' then redis.call('DEL', KEYS[1])
  else redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL') end
  return 1
end
return 0
"""
HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",  # the link is the credential: never passed on
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
}
_HTML = {"text/html": {"schema": {"type": "string"}}}
_UNAVAILABLE = unavailable_response(
    "the broker did not acknowledge, the dossiers' keys cannot be read, or Redis is away: "
    "nothing was recorded; retry after Retry-After"
)
RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"description": "not a survey link", "content": _HTML},
    410: {"description": "the survey link expired", "content": _HTML},
    429: {
        "description": "too many requests from this address or for this dossier",
        "headers": RETRY_AFTER,
        "content": _HTML,
    },
    503: {**_UNAVAILABLE, "content": {**_UNAVAILABLE["content"], **_HTML}},
}


def client_address(peer: str | None, forwarded_for: str | None) -> str:
    """Who is asking: the peer, or behind a proxy on a private address (the edge, an
    Ingress) the address that proxy appended last to `X-Forwarded-For`."""
    peer = peer or "unknown"
    if not forwarded_for:
        return peer
    try:
        private = ipaddress.ip_address(peer).is_private
    except ValueError:
        private = False
    last = forwarded_for.rsplit(",", 1)[-1].strip()
    return (last or peer) if private else peer


def last_day_text(link: SurveyLink) -> str:
    return link.last_day.strftime("%d/%m/%Y")


def html(body: str, status: int = 200, retry_after: int | None = None) -> HTMLResponse:
    headers = dict(HEADERS)
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return HTMLResponse(body, status_code=status, headers=headers)


def register(
    api: FastAPI,
    *,
    secrets: Sequence[str],
    redis: aioredis.Redis,
    keys: Keys,
    per_client: TokenBucket,
    per_dossier: TokenBucket,
    publisher: DurablePublisher,
    data_keys: DataKeys,
) -> None:
    restore = redis.register_script(_RESTORE)

    def record_key(dossier_id: str) -> str:
        return keys("intake", "survey", dossier_id)

    async def over_rate(bucket: TokenBucket, name: str) -> HTMLResponse | None:
        wait = await bucket.take(name)
        if wait <= 0:
            return None
        ANSWERS.labels("rate_limited").inc()
        return html(
            refusal_page(
                "Quá nhiều yêu cầu",
                "Too many requests",
                "Vui lòng thử lại sau ít phút.",
                "Please try again in a few minutes.",
            ),
            429,
            retry_after=max(1, math.ceil(wait)),
        )

    def refused_link(exc: InvalidLink | ExpiredLink) -> HTMLResponse:
        if isinstance(exc, ExpiredLink):
            ANSWERS.labels("expired").inc()
            return html(
                refusal_page(
                    "Đường dẫn khảo sát đã hết hạn",
                    "This survey link has expired",
                    f"Đường dẫn này chỉ dùng được đến hết ngày {last_day_text(exc.link)}.",
                    f"This link could be used until {last_day_text(exc.link)}.",
                ),
                410,
            )
        ANSWERS.labels("invalid").inc()
        return html(
            refusal_page(
                "Đường dẫn không hợp lệ",
                "This link is not valid",
                "Vui lòng kiểm tra lại đường dẫn trong tin nhắn.",
                "Please check the link in the text message.",
            ),
            404,
        )

    def unavailable() -> HTMLResponse:
        return html(
            refusal_page(
                "Hệ thống đang bận",
                "The service is busy",
                "Câu trả lời chưa được ghi nhận. Vui lòng gửi lại sau ít phút.",
                "Your answer was not recorded. Please send it again in a few minutes.",
            ),
            503,
            retry_after=5,
        )

    def client_of(request: Request) -> str:
        peer = request.client.host if request.client else None
        return client_address(peer, request.headers.get("x-forwarded-for"))

    @api.get(
        "/s/{token}",
        response_class=HTMLResponse,
        responses={200: {"content": _HTML, "description": "the survey's question"}, **RESPONSES},
        tags=["survey"],
    )
    async def survey_page(token: str, request: Request) -> HTMLResponse:
        """The satisfaction survey of the dossier a signed link names (public, no sign-in)."""
        limited = await over_rate(per_client, client_of(request))
        if limited is not None:
            return limited
        try:
            link = verify(token, secrets, datetime.now(UTC))
        except (InvalidLink, ExpiredLink) as exc:
            return refused_link(exc)
        return html(form_page(link.dossier_id, last_day_text(link)))

    @api.post(
        "/s/{token}",
        response_class=HTMLResponse,
        responses={
            200: {"content": _HTML, "description": "the answer was recorded: thanks"},
            413: {"description": "the form is over its size limit", "content": _HTML},
            422: {"description": "no score 1-5, or a comment too long", "content": _HTML},
            **RESPONSES,
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/x-www-form-urlencoded": {
                        "schema": {
                            "type": "object",
                            "required": ["score"],
                            "properties": {
                                "score": {"type": "integer", "minimum": 1, "maximum": 5},
                                "comment": {"type": "string", "maxLength": 500},
                            },
                        }
                    }
                },
            }
        },
        tags=["survey"],
    )
    async def survey_answer(token: str, request: Request) -> HTMLResponse:
        """An answer to the survey: a score from 1 to 5 and an optional comment. A second answer
        for the same dossier replaces the first."""
        limited = await over_rate(per_client, client_of(request))
        if limited is not None:
            return limited
        now = datetime.now(UTC)
        try:
            link = verify(token, secrets, now)
        except (InvalidLink, ExpiredLink) as exc:
            return refused_link(exc)
        limited = await over_rate(per_dossier, link.dossier_id)
        if limited is not None:
            return limited
        try:
            body = await read_body(request, FORM_MAX_BYTES)
        except BodyTooLarge:
            return html(
                form_page(
                    link.dossier_id,
                    last_day_text(link),
                    AnswerRefused("Nội dung gửi lên quá dài.", "The form is too long."),
                ),
                413,
            )
        answer = parse_answer(body)
        if isinstance(answer, AnswerRefused):
            ANSWERS.labels("refused").inc()
            return html(form_page(link.dossier_id, last_day_text(link), answer), 422)
        try:
            sealed = await seal_comment(link.dossier_id, answer.comment)
        except KeysUnavailable:
            return unavailable()
        record = new_record(answer.score, now)
        ttl = max(60, math.ceil((link.expires_at() - now).total_seconds()) + 86400)
        previous_raw = await redis.set(
            record_key(link.dossier_id), record.encode(), ex=ttl, get=True
        )
        previous = decode_record(previous_raw if isinstance(previous_raw, bytes | str) else None)
        event = make_event(
            "survey.answered",
            source=SURVEY_SOURCE,
            id=event_id(link.dossier_id, record),
            subject=link.dossier_id,
            time=now,
            data=answered_data(link.dossier_id, link.agency_code, record, previous, sealed),
        )
        try:
            await publisher.publish([(event.topic, event.key, event.to_json())])
        except BaseException as exc:
            await restore(
                keys=[record_key(link.dossier_id)],
                args=[record.encode(), previous.encode() if previous else ""],
            )
            if isinstance(exc, BrokerUnavailable):
                return unavailable()
            raise
        ANSWERS.labels("updated" if previous else "answered").inc()
        return html(thanks_page(link.dossier_id, answer.score, last_day_text(link)))

    async def seal_comment(dossier_id: str, comment: str | None) -> str | None:
        if comment is None:
            return None
        try:
            key = await data_keys.data_key(dossier_id)
        except (KeyErased, SealingError):
            ANSWERS.labels("comment_dropped").inc()
            return None
        return seal(key, dossier_id, COMMENT_FIELD, comment)
