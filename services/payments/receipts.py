"""Receipts: one `payment.receipt_issued` per successful payment, numbered per agency and year
without gaps, for the agency's e-receipt system to pick up.

- The ledger's outbox asks for a receipt with each payment that succeeds (`receipt_request`, on
  `payments.receipt-requests`, keyed by agency code), after its `payment.succeeded` is on
  `payment.events`; a repeat of the outbox asks again.
- One consumer group (`motcua-payments-receipts`) reads the requests: one partition holds every
  request of an agency, in order, so exactly one process numbers an agency's receipts at a time.
  Its `StateTable` (changelog `topics.PAYMENTS_RECEIPTS_CHANGELOG`, keyed by agency code like the
  requests, so restored with the partitions it is assigned) keeps each agency's last number per
  year and its latest receipts (`AgencyReceipts`).
- `issue` (pure) numbers a request: the next number of the agency's year (of the payment's
  Vietnamese day), or the number the dossier already has (a request asked again). The events are
  published before the state is written and the offsets committed: a process killed in between
  reads the same requests again from the same state, so it gives the same numbers and publishes
  the same events (same ids: `<dossier id>/receipt`) again. A number is never skipped nor given
  twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aiokafka.structs import ConsumerRecord
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from services.common import topics
from services.common.dead_letters import PoisonMessage
from services.common.events import CloudEvent, make_event
from services.common.kafka import DurablePublisher
from services.common.logging import get_logger
from services.common.settings import Settings
from services.common.state import StateTable
from services.common.tz import VIETNAM_TZ

log = get_logger("motcua.payments.receipts")

RECEIPT_EVENT = "payment.receipt_issued"
SOURCE = "motcua/payments"
GROUP = "motcua-payments-receipts"
# The receipts an agency's state remembers by dossier: a request asked again comes within
# minutes (an outbox published twice), long before this many receipts later.
RECENT = 2000


class ReceiptRequest(BaseModel):
    """What a receipt needs to know of a successful payment (no personal data)."""

    model_config = ConfigDict(frozen=True)

    dossier_id: str = Field(min_length=1)
    agency_code: str = Field(min_length=1)
    amount_vnd: int = Field(gt=0)
    currency: str = "VND"
    paid_at: AwareDatetime
    txn_ref: str
    gateway: str

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


class Issued(BaseModel):
    model_config = ConfigDict(frozen=True)

    dossier_id: str
    year: int
    number: int


class AgencyReceipts(BaseModel):
    """One agency's receipts: the last number of each year, and its latest receipts."""

    model_config = ConfigDict(frozen=True)

    last: dict[int, int] = Field(default_factory=dict)  # year -> last number given
    recent: tuple[Issued, ...] = ()

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> AgencyReceipts:
        return cls.model_validate_json(raw)


class Receipt(BaseModel):
    model_config = ConfigDict(frozen=True)

    request: ReceiptRequest
    year: int
    number: int

    @property
    def receipt_no(self) -> str:
        """Unique within the agency: `<year>-<number, 7 digits>`."""
        return f"{self.year}-{self.number:07d}"


def receipt_year(request: ReceiptRequest) -> int:
    return request.paid_at.astimezone(VIETNAM_TZ).year


def issue(state: AgencyReceipts, request: ReceiptRequest) -> tuple[AgencyReceipts, Receipt]:
    """The receipt of `request`: the one its dossier has (state unchanged), else the agency's
    next number of the payment's year."""
    known = next((i for i in state.recent if i.dossier_id == request.dossier_id), None)
    if known is not None:
        return state, Receipt(request=request, year=known.year, number=known.number)
    year = receipt_year(request)
    number = state.last.get(year, 0) + 1
    issued = Issued(dossier_id=request.dossier_id, year=year, number=number)
    after = AgencyReceipts(
        last={**state.last, year: number},
        recent=(*state.recent, issued)[-RECENT:],
    )
    return after, Receipt(request=request, year=year, number=number)


def receipt_event(receipt: Receipt) -> CloudEvent[Any]:
    """`payment.receipt_issued`: one id per dossier, the same bytes however often issued."""
    r = receipt.request
    return make_event(
        RECEIPT_EVENT,
        source=SOURCE,
        id=f"{r.dossier_id}/receipt",
        subject=r.dossier_id,
        time=r.paid_at,
        data={
            "dossier_id": r.dossier_id,
            "agency_code": r.agency_code,
            "receipt_no": receipt.receipt_no,
            "year": receipt.year,
            "number": receipt.number,
            "amount_vnd": r.amount_vnd,
            "currency": r.currency,
            "paid_at": r.paid_at.isoformat(),
            "txn_ref": r.txn_ref,
            "gateway": r.gateway,
        },
    )


def request_message(request: ReceiptRequest) -> tuple[str, bytes, bytes]:
    """The request as a record of `payments.receipt-requests`, keyed by agency."""
    return (
        topics.PAYMENT_RECEIPT_REQUESTS,
        request.agency_code.encode(),
        request.to_bytes(),
    )


def decode_request(record: ConsumerRecord[bytes, bytes]) -> ReceiptRequest:
    try:
        return ReceiptRequest.model_validate_json(record.value or b"")
    except ValidationError as exc:
        raise PoisonMessage(f"not a receipt request: {exc.error_count()} errors") from None


def receipts_table(settings: Settings, publisher: DurablePublisher) -> StateTable[AgencyReceipts]:
    return StateTable.on_changelog(
        settings,
        publisher,
        topics.PAYMENTS_RECEIPTS_CHANGELOG,
        encode=AgencyReceipts.to_bytes,
        decode=lambda _agency, raw: AgencyReceipts.from_bytes(raw),
    )


class ReceiptIssuer:
    """The receipts consumer's handler: number a poll's requests, publish their receipts."""

    def __init__(self, table: StateTable[AgencyReceipts], publish: Any) -> None:
        self.table = table
        self._publish = publish  # Service.publish: events to their topics, acks=all

    async def on_batch(self, requests: Sequence[ReceiptRequest]) -> None:
        events: list[CloudEvent[Any]] = []
        for request in requests:  # one agency's requests in their partition's order
            state = self.table.get(request.agency_code) or AgencyReceipts()
            after, receipt = issue(state, request)
            if after is not state:
                self.table.put(request.agency_code, after)
                log.info(
                    "receipt_issued",
                    dossier_id=request.dossier_id,
                    agency_code=request.agency_code,
                    receipt_no=receipt.receipt_no,
                )
            events.append(receipt_event(receipt))
        await self._publish(events)
