"""An SMS worker that starts where a killed one left off, with Redis emptied meanwhile: the real
broker, a Redis namespace nobody wrote to, two sandbox gateways over loopback HTTP, and the worker
as a real process.

The killed worker's traces are put where it would have left them: its records (the messages
still pending in them) on the changelog; the `sms.sent` / `sms.failed` it published on
`sms.events`; the messages a gateway accepted at that gateway. The new worker sends each message
to the applicant once and announces each outcome once."""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import orjson
import pytest

from services.common import topics
from services.common.events import topic_of
from services.common.kafka import ensure_topics
from services.common.partner import IDEMPOTENCY_HEADER
from services.common.topics import declared_topics
from services.dev.embedded import Broker, free_port
from services.sms.delivery import DeliveryStatus
from services.sms.events import send_failed_event, sent_event
from services.sms.fold import Rules, fold
from services.sms.inbox import Item, decode_item
from services.sms.partner import OutboundSms
from services.sms.providers import ProviderWeights, failover_order, key_point
from services.sms.record import Pending, SmsRecord, decode_record, encode_record
from services.sms.settings import SmsSettings
from services.sms.templates import load_templates
from tests.conftest import service_env
from tests.support.factories import envelope, submitted
from tests.support.kafka import produce, read_all
from tests.support.processes import motcua, process, until, wait_http

pytestmark = pytest.mark.integration

SECRET = "test-sms-secret"
WEIGHTS = {"primary": 50, "secondary": 50}


class Stack:
    def __init__(self, broker: Broker, env: dict[str, str], port: int, gateways: dict[str, str]):
        self.broker = broker
        self.env = env
        self.port = port
        self.gateways = gateways

    def references(self) -> Counter[str]:
        """How many times each message reached an applicant (every gateway counted)."""
        seen: Counter[str] = Counter()
        for url in self.gateways.values():
            accepted = httpx.get(f"{url}/v1/messages", timeout=10).json()["accepted"]
            seen.update(m["reference"] for m in accepted)
        return seen

    def copies(self, keys: set[str]) -> dict[str, int]:
        """How many SMS each message of `keys` became (0: none reached an applicant)."""
        seen = self.references()
        return {key: seen[key] for key in keys}

    def announced(self, keys: set[str]) -> Counter[tuple[str, str]]:
        """(type, key) of every send outcome (`sms.sent`, `sms.failed`) about `keys` on
        `sms.events` (delivery reports, also there, are not counted)."""
        records = asyncio.run(read_all(self.broker.bootstrap, topics.SMS_EVENTS, idle=1.0))
        out: Counter[tuple[str, str]] = Counter()
        for record in records:
            event = orjson.loads(record.value)
            if event["type"] in {"sms.sent", "sms.failed"} and event["data"].get("key") in keys:
                out[(event["type"], event["data"]["key"])] += 1
        return out

    def record(self, dossier: str) -> SmsRecord | None:
        records = asyncio.run(
            read_all(self.broker.bootstrap, topics.SMS_STATE_CHANGELOG, idle=0.5, timeout=10)
        )
        mine = [r for r in records if r.key == dossier.encode()]
        return decode_record(mine[-1].value) if mine and mine[-1].value else None

    def settled(self, dossier: str) -> bool:
        """The dossier's record is there and holds no message pending."""
        record = self.record(dossier)
        return record is not None and not record.pending


@pytest.fixture(scope="module")
def stack(broker: Broker, redis_url: str) -> Iterator[Stack]:
    asyncio.run(ensure_topics(broker.bootstrap, declared_topics(4)))
    namespace = f"motcua-test-sms-restart-{uuid.uuid4().hex[:10]}"  # an empty Redis
    port, primary_port, secondary_port = free_port(), free_port(), free_port()
    env = service_env(
        broker,
        redis_url,
        namespace,
        SMS_PORT=str(port),
        SMS_PUBLIC_URL=f"http://127.0.0.1:{port}",
        SMS_PRIMARY_URL=f"http://127.0.0.1:{primary_port}",
        SMS_SECONDARY_URL=f"http://127.0.0.1:{secondary_port}",
        SMS_PRIMARY_SANDBOX_PORT=str(primary_port),
        SMS_SECONDARY_SANDBOX_PORT=str(secondary_port),
        SMS_SECRETS=SECRET,
        SMS_WEIGHTS=orjson.dumps(WEIGHTS).decode(),
        SMS_SANDBOX_REPORT_DELAY_MS="50",
        MOTCUA_DATA_DIR=tempfile.mkdtemp(prefix="motcua-sms-restart-"),
        SMS_QUIET_START="00:00",
        SMS_QUIET_END="00:00",
        SMS_PER_NUMBER_RATE="1000",
        SMS_PER_NUMBER_BURST="1000",
        SMS_TIMER_SECONDS="0.3",
    )
    with (
        process(["services.cli", "run", "sms-primary-sandbox"], env, "sms-restart-primary"),
        process(["services.cli", "run", "sms-secondary-sandbox"], env, "sms-restart-secondary"),
    ):
        gateways = {
            "primary": f"http://127.0.0.1:{primary_port}",
            "secondary": f"http://127.0.0.1:{secondary_port}",
        }
        for url in gateways.values():
            wait_http(f"{url}/healthz", timeout=30)
        yield Stack(broker, env, port, gateways)


def left_pending(dossiers: list[str]) -> tuple[dict[str, SmsRecord], list[Pending]]:
    """The records a worker killed right after it decided the messages of `dossiers` (submitted,
    received, payment requested: two messages each) left behind, and those messages."""
    sms = SmsSettings(quiet_start="00:00", quiet_end="00:00")
    rules = Rules(load_templates(), frozenset(), sms.quiet_hours, sms.policy, sms.retirement)
    now = datetime.now(UTC)
    items: list[Item | None] = []
    for i, dossier in enumerate(dossiers):
        at = now.isoformat()
        tag = uuid.uuid4().hex[:12]
        events = [
            submitted(
                dossier,
                event_id=f"sub-{tag}",
                time=at,
                applicant={"name": "Nguyễn Thị B", "phone": f"090512{i:04d}"},
            ),
            envelope(
                "dossier.received",
                dossier,
                {"received_at": at, "due_at": at, "receipt_no": f"R-{tag}"},
                event_id=f"rec-{tag}",
                time=at,
            ),
            envelope(
                "payment.requested",
                dossier,
                {"amount_vnd": 1000, "payment_url": "https://pay.example/x", "expires_at": at},
                source="motcua/payments",
                event_id=f"pay-{tag}",
                time=at,
            ),
        ]
        for event in events:
            topic = topic_of(event["type"])
            items.append(decode_item(topic, dossier.encode(), orjson.dumps(event)))
    outcome = fold(lambda _: None, [i for i in items if i is not None], rules, now)
    assert len(outcome.due) == 2 * len(dossiers)
    return outcome.records, outcome.due


def write_records(stack: Stack, records: dict[str, SmsRecord]) -> None:
    changelog = [(d.encode(), encode_record(r)) for d, r in records.items()]
    asyncio.run(produce(stack.broker.bootstrap, topics.SMS_STATE_CHANGELOG, changelog))


def first_gateway(message: Pending) -> str:
    return failover_order(ProviderWeights.of(WEIGHTS), key_point(message.key))[0]


def accepted_by(stack: Stack, gateway: str, message: Pending) -> None:
    """What the killed worker got done at `gateway`: the message accepted there."""
    outbound = OutboundSms(
        message.to, message.text, "MOTCUA", message.key, message.dossier_id, message.template
    )
    reply = httpx.post(
        f"{stack.gateways[gateway]}/v1/messages",
        headers={IDEMPOTENCY_HEADER: message.key},
        json=outbound.body(),
        timeout=10,
    )
    assert reply.status_code == 202, reply.text


def test_messages_announced_before_the_kill_are_neither_sent_nor_announced_again(
    stack: Stack,
) -> None:
    tag = uuid.uuid4().hex[:6].upper()
    told, untold = f"000.00.12.H34-{tag}-0001", f"000.00.12.H34-{tag}-0002"
    records, messages = left_pending([told, untold])
    sent, failed, *others = messages  # the first two are the told dossier's
    assert {sent.dossier_id, failed.dossier_id} == {told}
    # What the killed worker got done: the gateway accepted one (announced `sms.sent`), the
    # other was given up on (`sms.failed`); neither reached the record, nor the (lost) Redis.
    now = datetime.now(UTC)
    asyncio.run(
        produce(
            stack.broker.bootstrap,
            topics.SMS_EVENTS,
            [
                (told.encode(), sent_event(sent, "secondary", "m-1", now).to_json()),
                (told.encode(), send_failed_event(failed, "send_failed: 400", None, now).to_json()),
            ],
        )
    )
    accepted_by(stack, "secondary", sent)
    write_records(stack, records)

    keys = {m.key for m in messages}
    others_keys = [m.key for m in others]
    with motcua("sms", stack.env, stack.port, log_name="sms-restart-worker"):
        until(lambda: set(others_keys) <= set(stack.references()), "the others sent")
        until(lambda: stack.settled(told) and stack.settled(untold), "both records settled")

    # one SMS per message (the failed one never went), one announcement per outcome
    assert stack.copies(keys) == {**dict.fromkeys([sent.key, *others_keys], 1), failed.key: 0}
    assert stack.announced(keys) == Counter(
        {
            ("sms.sent", sent.key): 1,
            ("sms.failed", failed.key): 1,
            **{("sms.sent", key): 1 for key in others_keys},
        }
    )
    record = stack.record(told)
    assert record is not None and not record.pending
    assert record.sent[sent.key].provider == "secondary"  # sent (its reports may be in too)
    assert record.sent[sent.key].status in {DeliveryStatus.SENT, DeliveryStatus.DELIVERED}
    assert record.sent[failed.key].status is DeliveryStatus.PERMANENT_FAILURE


def test_a_message_a_gateway_took_before_redis_was_lost_goes_to_that_gateway_again(
    stack: Stack,
) -> None:
    tag = uuid.uuid4().hex[:6].upper()
    dossiers = [f"000.00.12.H34-{tag}-{i:04d}" for i in range(4)]
    records, messages = left_pending(dossiers)
    # The killed worker had each message accepted by its first gateway, and died before it
    # announced any: only the gateways know (eight messages, both gateways among them).
    for message in messages:
        accepted_by(stack, first_gateway(message), message)
    assert {first_gateway(m) for m in messages} == {"primary", "secondary"}
    write_records(stack, records)

    keys = {m.key for m in messages}
    with motcua("sms", stack.env, stack.port, log_name="sms-restart-worker"):
        until(lambda: len(stack.announced(keys)) == len(keys), "every message announced")
        until(lambda: all(stack.settled(d) for d in dossiers), "every record settled")

    assert stack.copies(keys) == dict.fromkeys(keys, 1)
    announced = stack.announced(keys)
    assert announced == Counter({("sms.sent", key): 1 for key in keys})
