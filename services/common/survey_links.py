"""The satisfaction survey's signed links (`{MOTCUA_SURVEY_BASE_URL}/s/{token}`). Pure.

A token names a dossier, its agency and the last day the link is open, and proves that motcua
made it: `base64url(payload || mac)` without padding, where `payload` is
`<dossier id>\\n<agency code>\\n<expiry epoch-day>` (UTF-8; ids and codes never hold a control
character, `services.common.events.ID_PATTERN`) and `mac` the first `MAC_BYTES` bytes of
HMAC-SHA256 over `DOMAIN || payload` with a survey secret. No personal data is in it: anyone
holding the SMS may answer for that dossier, which is what the link is for.

Several secrets may be active (rotation, `MOTCUA_SURVEY_SECRETS`): the first signs, every one
verifies; every one is tried, so the time taken says nothing about which matched. The signature
is checked before anything in the payload is believed: an altered token is `InvalidLink`, never
"expired".
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

MAC_BYTES = 12
DOMAIN = b"motcua-survey-link\x00"
# A token longer than this is refused before it is decoded (two codes of 128 characters, a day
# number and the MAC fit well within it).
TOKEN_MAX = 400
_EPOCH = date(1970, 1, 1)


class LinkRefused(ValueError):
    """A link that opens no survey."""


class InvalidLink(LinkRefused):
    """Not a token motcua made (altered, truncated, signed with an unknown secret)."""


class ExpiredLink(LinkRefused):
    """A genuine link whose last day has passed."""

    def __init__(self, link: SurveyLink) -> None:
        super().__init__(f"the survey link of {link.dossier_id} expired on {link.last_day}")
        self.link = link


@dataclass(frozen=True)
class SurveyLink:
    """What a token says: the dossier, its agency, and the last day (UTC) it may be answered."""

    dossier_id: str
    agency_code: str
    last_day: date

    @property
    def expiry_day(self) -> int:
        """The last day as days since the Unix epoch."""
        return (self.last_day - _EPOCH).days

    def open_on(self, moment: datetime) -> bool:
        return moment.astimezone(UTC).date() <= self.last_day

    def expires_at(self) -> datetime:
        """The first instant the link is closed (the day after its last day, 00:00 UTC)."""
        return datetime.combine(self.last_day + timedelta(days=1), datetime.min.time(), UTC)


def link_for(dossier_id: str, agency_code: str, issued_at: datetime, days: int) -> SurveyLink:
    """The link of a dossier whose result was returned at `issued_at`, open `days` days."""
    if not dossier_id or not agency_code or "\n" in dossier_id + agency_code:
        raise ValueError("a survey link needs a dossier id and an agency code, one line each")
    return SurveyLink(dossier_id, agency_code, issued_at.astimezone(UTC).date() + timedelta(days))


def _payload(link: SurveyLink) -> bytes:
    return f"{link.dossier_id}\n{link.agency_code}\n{link.expiry_day}".encode()


def _mac(secret: str, payload: bytes) -> bytes:
    return hmac.new(secret.encode(), DOMAIN + payload, hashlib.sha256).digest()[:MAC_BYTES]


def sign(link: SurveyLink, secrets: Sequence[str]) -> str:
    """The token of `link`, signed with the first secret."""
    if not secrets:
        raise ValueError("no survey secret to sign with")
    payload = _payload(link)
    return base64.urlsafe_b64encode(payload + _mac(secrets[0], payload)).decode().rstrip("=")


def url_for(base_url: str, token: str) -> str:
    return f"{base_url.rstrip('/')}/s/{token}"


def verify(token: str, secrets: Sequence[str], now: datetime) -> SurveyLink:
    """The link a token names, if motcua signed it and its last day is not past; raises
    `InvalidLink` or `ExpiredLink`."""
    if not token or len(token) > TOKEN_MAX or not secrets:
        raise InvalidLink("not a survey link")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        raise InvalidLink("not a survey link") from None
    if base64.urlsafe_b64encode(raw).decode().rstrip("=") != token:  # not canonical: altered
        raise InvalidLink("not a survey link")
    if len(raw) <= MAC_BYTES:
        raise InvalidLink("not a survey link")
    payload, given = raw[:-MAC_BYTES], raw[-MAC_BYTES:]
    matched = False
    for secret in secrets:  # every one, whichever matches
        matched |= hmac.compare_digest(given, _mac(secret, payload))
    if not matched:
        raise InvalidLink("not a survey link")
    try:
        dossier_id, agency_code, day = payload.decode().split("\n")
        link = SurveyLink(dossier_id, agency_code, _EPOCH + timedelta(days=int(day)))
    except (UnicodeDecodeError, ValueError, OverflowError):
        raise InvalidLink("not a survey link") from None
    if not link.open_on(now):
        raise ExpiredLink(link)
    return link
