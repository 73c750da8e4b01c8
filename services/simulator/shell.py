"""The simulator's imperative shell: posting batches to intake, reading the metrics back, the
progress bars and the table, and the live loop of `motcua simulate`.

The metrics API answers operators only (CONTRACT section 8): the replay reads it with a
`viewer`'s bearer token, the one it is given or one the dev issuer signs (`OperatorToken`). The
live stream's applicants open their payment links (`/pay/{txn_ref}`), which need no token.

Nothing here logs an applicant's name, address or phone: only counts and status codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import os
import random
import signal
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import httpx
import orjson
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from services.common.events import make_event
from services.common.logging import get_logger
from services.common.survey_links import link_for, sign
from services.common.tz import VIETNAM_TZ
from services.payments.domain import txn_ref_for
from services.simulator.lifecycle import (
    DossierIds,
    Event,
    batches,
    events_of,
    replay_events,
    schedule_live,
)
from services.simulator.plan import PERIOD_END, PERIOD_START, Targets, plan, random_spec, targets
from services.simulator.report import Check, caught_up, checks, groups_of, progress_of

log = get_logger("motcua.simulator")

DEFAULT_INTAKE = "http://127.0.0.1:8001"
DEFAULT_METRICS = "http://127.0.0.1:8000"
DEV_KEY = "dev-portal-key"


class Rejected(Exception):
    """Intake refused a batch for good (401, 403, 409, 413, 422): resending cannot help."""


class MetricsRefused(Exception):
    """The metrics API refused the operator's token (401, 403): asking again cannot help."""


@dataclass
class Sent:
    events: int = 0
    accepted: int = 0
    duplicates: int = 0
    retries: int = 0
    first_at: float | None = None  # time.monotonic() of the first request


class Stopped(Exception):
    """The live stream was told to stop while a batch was still being retried."""


async def post_batch(
    client: httpx.AsyncClient,
    url: str,
    key: str,
    batch: list[Event],
    sent: Sent,
    stop: asyncio.Event | None = None,
) -> None:
    """POST one batch until intake answers 202; 429/503 and broken connections are retried
    (a resent batch is deduplicated by intake, so this is safe)."""
    body = orjson.dumps(batch)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    delay = 0.25
    while True:
        if stop is not None and stop.is_set():
            raise Stopped
        if sent.first_at is None:
            sent.first_at = time.monotonic()
        try:
            response = await client.post(f"{url}/v1/events", content=body, headers=headers)
        except httpx.TransportError as exc:
            sent.retries += 1
            log.warning("intake_unreachable", error_type=type(exc).__name__)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            continue
        if response.status_code == 202:
            answer = response.json()
            sent.events += len(batch)
            sent.accepted += int(answer.get("accepted", 0))
            sent.duplicates += int(answer.get("duplicates", 0))
            return
        if response.status_code in (429, 503):
            sent.retries += 1
            retry_after = response.headers.get("retry-after", "")
            await asyncio.sleep(float(retry_after) if retry_after.isdigit() else delay)
            delay = min(delay * 2, 5.0)
            continue
        raise Rejected(f"intake answered {response.status_code}: {_problem(response)}")


def _problem(response: httpx.Response) -> str:
    """Title, detail and the pointers of a problem answer (no field values: they may be PII)."""
    try:
        problem = response.json()
    except ValueError:
        return response.text[:200]
    errors = problem.get("errors") or []
    where = ", ".join(
        f"#{e.get('index')} {e.get('pointer', '')}" for e in errors[:5] if isinstance(e, dict)
    )
    return f"{problem.get('title')}: {problem.get('detail')} {where}".strip()


# --- replay --------------------------------------------------------------------------------------


@dataclass
class ReplayResult:
    targets: Targets
    checks: list[Check]
    sent: Sent
    dossiers: int
    sending_seconds: float  # first request to the last 202
    catch_up_seconds: float  # first request until the metrics answered every figure
    caught_up: bool

    @property
    def ok(self) -> bool:
        return self.caught_up and all(c.ok for c in self.checks)


def _period_query(shift: timedelta = timedelta(0)) -> dict[str, str]:
    return {"from": (PERIOD_START + shift).isoformat(), "to": (PERIOD_END + shift).isoformat()}


@dataclass
class OperatorToken:
    """The bearer token the metrics API is read with (a `viewer`'s, CONTRACT section 8).

    `value` is the token given; without one, `issuer_url` names the dev issuer (`motcua dev`,
    `POST /dev/token`) that signs one, and signs a fresh one when the metrics API refuses the
    current one (a token lasts an hour, a full-scale replay may wait longer).
    """

    value: str | None = None
    issuer_url: str | None = None
    sub: str = "motcua-replay"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.value}"} if self.value else {}

    async def renew(self, client: httpx.AsyncClient) -> bool:
        """Ask the dev issuer for a viewer's token; False when there is no issuer to ask."""
        if self.issuer_url is None:
            return False
        url = f"{self.issuer_url.rstrip('/')}/dev/token"
        try:
            response = await client.post(url, json={"sub": self.sub, "roles": ["viewer"]})
            token = response.json()["access_token"] if response.status_code == 200 else None
        except (httpx.TransportError, ValueError, KeyError, TypeError):
            token = None
        if not isinstance(token, str) or not token:
            log.warning("no_operator_token", issuer=url)
            return False
        self.value = token
        return True


async def _read_figures(
    client: httpx.AsyncClient, url: str, params: dict[str, str], token: OperatorToken
) -> Any:
    """One answer of the metrics API (None while it cannot answer); `MetricsRefused` when it
    refuses the token and no fresh one from the dev issuer is accepted either."""
    renewed = False
    while True:
        try:
            response = await client.get(url, params=params, headers=token.headers)
            if response.status_code in (401, 403):
                if response.status_code == 401 and not renewed and await token.renew(client):
                    renewed = True
                    continue
                raise MetricsRefused(
                    f"the metrics API answered {response.status_code}: {_problem(response)} "
                    "(a viewer's token is needed: --operator-token, MOTCUA_OPERATOR_TOKEN, or "
                    "the dev issuer at MOTCUA_OIDC_ISSUER)"
                )
            return response.json() if response.status_code == 200 else None
        except (httpx.TransportError, ValueError):
            return None


async def read_back(
    client: httpx.AsyncClient,
    metrics_url: str,
    t: Targets,
    token: OperatorToken | None = None,
    shift: timedelta = timedelta(0),
) -> list[Check]:
    """The table's figures as the metrics API answers them now, read with `token`, for the
    half-year `shift` later.

    Postal counts are read from the period's start until tomorrow: the post books its orders
    when the replay runs, and `postal.*_requested` carry the carrier's (wall-clock) time.
    """
    token = token or OperatorToken()
    period = _period_query(shift)
    tomorrow = (datetime.now(VIETNAM_TZ) + timedelta(days=1)).replace(microsecond=0)
    queries = [
        ("/v1/metrics/summary", period),
        ("/v1/metrics/breakdown", {**period, "by": "agency_code"}),
        ("/v1/metrics/breakdown", {**period, "by": "sector"}),
        ("/v1/metrics/summary", {"from": period["from"], "to": tomorrow.isoformat()}),
    ]
    answers = [await _read_figures(client, f"{metrics_url}{path}", p, token) for path, p in queries]
    summary, agencies, sectors, postal = answers
    return checks(
        t, summary, groups_of(agencies, "agency_code"), groups_of(sectors, "sector"), postal
    )


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        console=console,
    )


async def replay(
    scale: float,
    seed: int,
    *,
    intake_url: str = DEFAULT_INTAKE,
    key: str = DEV_KEY,
    metrics_url: str = DEFAULT_METRICS,
    operator_token: str | None = None,
    issuer_url: str | None = None,
    source: str = "portal/dev",
    concurrency: int = 4,
    wait_seconds: float = 900.0,
    settle_seconds: float = 30.0,
    console: Console | None = None,
    shift: timedelta = timedelta(0),
    expect: Targets | None = None,
) -> ReplayResult:
    """Send the half-year at `scale`, wait for the metrics to catch up, and check every figure.

    The figures are read with `operator_token`, else with a viewer's token from the dev issuer
    at `issuer_url` (without either, with no token at all). With `shift`, the half-year is sent
    and read that much later (`replay_events`); `expect` replaces the scaled targets, e.g. for
    the postal counts, which add up over replays sent on the same days.
    """
    console = console or Console()
    t = expect or targets(scale)
    token = OperatorToken(operator_token, None if operator_token else issuer_url)
    console.print(f"planning the half-year at scale {scale} (seed {seed})…")
    specs = plan(scale, seed)
    sent = Sent()
    done = time.monotonic()
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(120.0), limits=httpx.Limits(max_connections=concurrency + 4)
    ) as client:
        if token.value is None:
            await token.renew(client)
        with _progress(console) as progress:
            sending = progress.add_task("sending", total=len(specs), note="")
            slots = asyncio.Semaphore(concurrency)

            async def one(batch: list[Event]) -> None:
                try:
                    await post_batch(client, intake_url, key, batch, sent)
                finally:
                    slots.release()
                dossiers = sum(1 for e in batch if e["type"] == "dossier.submitted")
                progress.update(
                    sending, advance=dossiers, note=f"{sent.events:,} events, {_rate(sent)}"
                )

            async with asyncio.TaskGroup() as group:
                for batch in batches(replay_events(specs, seed, source, shift)):
                    await slots.acquire()
                    group.create_task(one(batch))
            done = time.monotonic()
            sending_seconds = done - (sent.first_at or done)

            waiting = progress.add_task("metrics catching up", total=1, note="")
            found = await read_back(client, metrics_url, t, token, shift)
            last: tuple[Any, ...] = ()
            changed = time.monotonic()
            while not caught_up(found) and time.monotonic() - done < wait_seconds:
                now_seen = tuple(c.read for c in found)
                if now_seen != last:
                    last, changed = now_seen, time.monotonic()
                elif time.monotonic() - changed > settle_seconds and any(now_seen):
                    break  # stable, and not equal: report what is there
                have, want = progress_of(found)
                progress.update(waiting, total=want, completed=have, note="")
                await asyncio.sleep(1.0)
                found = await read_back(client, metrics_url, t, token, shift)
            have, want = progress_of(found)
            progress.update(waiting, total=want, completed=have)
    finished = time.monotonic()
    return ReplayResult(
        targets=t,
        checks=found,
        sent=sent,
        dossiers=len(specs),
        sending_seconds=sending_seconds,
        catch_up_seconds=finished - (sent.first_at or finished),
        caught_up=caught_up(found),
    )


def _rate(sent: Sent) -> str:
    if sent.first_at is None:
        return ""
    elapsed = max(time.monotonic() - sent.first_at, 1e-6)
    return f"{sent.events / elapsed:,.0f}/s"


def table(result: ReplayResult) -> Table:
    out = Table(title=f"Half-year 2019 replay at scale {result.targets.scale}")
    for column in ("figure", "seed (FACTS)", "target", "read back", "difference"):
        out.add_column(column, justify="left" if column == "figure" else "right")
    out.add_column("")
    for check in result.checks:
        out.add_row(*check.cells(), "[green]ok[/]" if check.ok else "[red]DIFFERS[/]")
    return out


def replay_command(
    scale: float,
    seed: int,
    intake_url: str,
    key: str,
    metrics_url: str,
    source: str,
    concurrency: int,
    wait_seconds: float,
    operator_token: str | None = None,
    issuer_url: str | None = None,
) -> int:
    console = Console()
    rejected: list[str] = []
    try:
        result = asyncio.run(
            replay(
                scale,
                seed,
                intake_url=intake_url.rstrip("/"),
                key=key,
                metrics_url=metrics_url.rstrip("/"),
                operator_token=operator_token,
                issuer_url=issuer_url,
                source=source,
                concurrency=concurrency,
                wait_seconds=wait_seconds,
                console=console,
            )
        )
    except* (Rejected, MetricsRefused) as group:
        rejected.extend(str(exc) for exc in group.exceptions)
    if rejected:
        for problem in rejected:
            console.print(f"[red]{problem}[/]")
        return 2
    console.print(table(result))
    rate = result.sent.events / result.catch_up_seconds if result.catch_up_seconds else 0.0
    console.print(
        f"{result.dossiers:,} dossiers, {result.sent.events:,} events "
        f"({result.sent.accepted:,} accepted, {result.sent.duplicates:,} duplicates) sent in "
        f"{result.sending_seconds:,.1f} s; metrics caught up "
        f"{'in' if result.caught_up else 'NOT within'} {result.catch_up_seconds:,.1f} s "
        f"({rate:,.0f} events/s end to end)"
    )
    return 0 if result.ok else 1


# --- live stream ---------------------------------------------------------------------------------


@dataclass(order=True)
class _Due:
    at: datetime
    seq: int
    event: Event = field(compare=False)


def live_dossier(
    rng: random.Random, ids: DossierIds, now: datetime, day_seconds: float, source: str
) -> list[Event]:
    """One dossier's events for the live stream, each built through `make_event`."""
    spec = random_spec(rng)
    times = schedule_live(spec, rng, now, day_seconds)
    dossier_id = ids.next(spec.agency.code, now.date())
    return [
        make_event(
            e["type"],
            source=e["source"],
            id=e["id"],
            subject=e["subject"],
            time=datetime.fromisoformat(e["time"]),
            data=e["data"],
        ).to_dict()
        for e in events_of(spec, times, dossier_id, rng, source)
    ]


def due_events(heap: list[_Due], now: datetime) -> Iterator[Event]:
    while heap and heap[0].at <= now:
        yield heapq.heappop(heap).event


def payers(events: Iterable[Event], rng: random.Random, share: float) -> list[str]:
    """The dossiers of `events` whose applicant opens the payment link: a `share` of those
    submitted with an online fee above zero."""
    chosen = []
    for event in events:
        if event["type"] != "dossier.submitted":
            continue
        fee = event["data"].get("fee") or {}
        online = fee.get("method") == "online" and fee.get("amount_vnd", 0) > 0
        if online and rng.random() < share:
            chosen.append(event["subject"])
    return chosen


# How the simulated applicants score the survey: about four in five satisfied (the Center's
# target), a few not.
SURVEY_SCORES = (5, 4, 3, 2, 1)
SURVEY_WEIGHTS = (45, 35, 12, 5, 3)


def survey_takers(
    events: Iterable[Event], rng: random.Random, share: float
) -> list[tuple[str, str, datetime, int]]:
    """The applicants of `events` who answer the survey their SMS invites them to: a `share`
    of the returned results, each (dossier id, agency code, returned at, score)."""
    chosen = []
    for event in events:
        if event["type"] != "dossier.result_returned" or rng.random() >= share:
            continue
        data = event["data"]
        returned_at = datetime.fromisoformat(data.get("returned_at") or event["time"])
        score = rng.choices(SURVEY_SCORES, SURVEY_WEIGHTS)[0]
        chosen.append((event["subject"], data["agency_code"], returned_at, score))
    return chosen


async def answer_survey(
    client: httpx.AsyncClient,
    intake_url: str,
    secrets: Sequence[str],
    taker: tuple[str, str, datetime, int],
) -> bool:
    """What an applicant does with the survey's SMS: open the link, send a score."""
    dossier_id, agency_code, returned_at, score = taker
    token = sign(link_for(dossier_id, agency_code, returned_at, 30), secrets)
    try:
        answer = await client.post(f"{intake_url}/s/{token}", data={"score": str(score)})
    except httpx.HTTPError:
        return False
    return answer.status_code == 200


async def pay(client: httpx.AsyncClient, payments_url: str, dossier_id: str) -> bool:
    """What an applicant does: open the payment link of the SMS (`/pay/{txn_ref}`), which leads
    to the gateway's page (the sandbox page pays by itself, with its outcome mix). False while
    the order is not there yet."""
    try:
        link = await client.get(f"{payments_url}/pay/{txn_ref_for(dossier_id)}")
        if link.status_code != 302:
            return False
        await client.get(link.headers["location"], follow_redirects=True)
    except (httpx.HTTPError, KeyError):
        return False
    return True


async def simulate(
    rate: float,
    duration: float,
    *,
    intake_url: str = DEFAULT_INTAKE,
    key: str = DEV_KEY,
    source: str = "portal/dev",
    day_seconds: float = 5.0,
    flush_seconds: float = 1.0,
    seed: int | None = None,
    payments_url: str | None = None,
    pay_share: float = 0.0,
    portals_url: str | None = None,
    portal_sandbox_url: str | None = None,
    survey_share: float = 0.0,
    survey_secrets: Sequence[str] = (),
) -> Sent:
    """New dossiers at `rate` a second, each step posted when its (compressed) time comes.

    With `payments_url`, a `pay_share` of the applicants with an online fee open their payment
    page a few seconds after filing, so payments complete as they would with people behind them.
    With `portals_url` and `portal_sandbox_url`, the portal sandbox is subscribed (with `key`)
    to the portals service's callbacks, and what it hears is logged every
    `HEARD_EVERY_SECONDS` (`portal_callbacks_heard`). A `survey_share` of the applicants whose
    result was returned answer the satisfaction survey a few seconds later (its links signed
    with `survey_secrets`, as the SMS service signs them).
    """
    rng = random.Random(seed if seed is not None else int.from_bytes(os.urandom(8), "big"))
    ids = DossierIds(tag="".join(rng.choice("0123456789ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in "ab"))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if duration:
        loop.call_later(duration, stop.set)
    heap: list[_Due] = []
    seq = 0
    sent = Sent()
    started = time.monotonic()
    owed = 0.0
    last = started
    log.info("simulator_started", rate=rate, duration=duration, source=source)
    paying: list[tuple[float, int, str, int]] = []  # (when, seq, dossier id, attempts so far)
    answering: list[tuple[float, int, tuple[str, str, datetime, int]]] = []  # survey takers
    answers: set[asyncio.Task[bool]] = set()
    payments: set[asyncio.Task[None]] = set()

    async def open_page(client: httpx.AsyncClient, dossier_id: str, attempts: int) -> None:
        assert payments_url is not None
        if not await pay(client, payments_url, dossier_id) and attempts < 5:
            heapq.heappush(paying, (time.monotonic() + 2.0, next(order), dossier_id, attempts + 1))

    order = itertools.count()
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0)) as client:
        listening: asyncio.Task[None] | None = None
        if portals_url is not None and portal_sandbox_url is not None:
            listening = asyncio.create_task(
                listen_to_callbacks(client, portals_url, portal_sandbox_url, key, stop)
            )
        while not stop.is_set():
            tick = time.monotonic()
            owed += rate * (tick - last)
            last = tick
            now = datetime.now(VIETNAM_TZ)
            while owed >= 1:
                owed -= 1
                for event in live_dossier(rng, ids, now, day_seconds, source):
                    seq += 1
                    heapq.heappush(heap, _Due(datetime.fromisoformat(event["time"]), seq, event))
            ready = list(due_events(heap, now))
            for chunk in _chunks(ready, 500):
                try:
                    await post_batch(client, intake_url, key, chunk, sent, stop)
                except Rejected as exc:
                    log.error("batch_rejected", problem=str(exc)[:300], events=len(chunk))
                except Stopped:
                    break
                if survey_share > 0 and survey_secrets:
                    for taker in survey_takers(chunk, rng, survey_share):
                        when = time.monotonic() + rng.uniform(2.0, 15.0)
                        heapq.heappush(answering, (when, next(order), taker))
                if payments_url is not None:
                    for dossier_id in payers(chunk, rng, pay_share):
                        when = time.monotonic() + rng.uniform(3.0, 20.0)
                        heapq.heappush(paying, (when, next(order), dossier_id, 0))
            while answering and answering[0][0] <= time.monotonic():
                _, _, taker = heapq.heappop(answering)
                answer = asyncio.create_task(
                    answer_survey(client, intake_url, survey_secrets, taker)
                )
                answers.add(answer)
                answer.add_done_callback(answers.discard)
            while paying and paying[0][0] <= time.monotonic():
                _, _, dossier_id, attempts = heapq.heappop(paying)
                task = asyncio.create_task(open_page(client, dossier_id, attempts))
                payments.add(task)
                task.add_done_callback(payments.discard)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=flush_seconds)
        if listening is not None:
            listening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listening
    log.info("simulator_stopped", events=sent.events, accepted=sent.accepted)
    return sent


HEARD_EVERY_SECONDS = 30.0


async def listen_to_callbacks(
    client: httpx.AsyncClient, portals_url: str, sandbox_url: str, key: str, stop: asyncio.Event
) -> None:
    """Subscribe the portal sandbox to the portals service (asking again until both answer),
    then log what it has heard every `HEARD_EVERY_SECONDS`."""
    while not stop.is_set():
        try:
            answer = await client.post(
                f"{sandbox_url}/v1/subscribe", json={"portals_url": portals_url, "portal_key": key}
            )
            if answer.status_code == 200:
                log.info("portal_sandbox_subscribed", url=answer.json().get("url"))
                break
            log.warning("portal_sandbox_not_subscribed", status=answer.status_code)
        except httpx.HTTPError as exc:
            log.warning("portal_sandbox_not_subscribed", error=type(exc).__name__)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=5.0)
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=HEARD_EVERY_SECONDS)
        try:
            heard = (await client.get(f"{sandbox_url}/v1/received", params={"limit": 0})).json()
        except (httpx.HTTPError, ValueError):
            continue
        log.info(
            "portal_callbacks_heard",
            deliveries=heard.get("unique"),
            attempts=heard.get("attempts"),
            bad_signatures=heard.get("bad_signatures"),
            by_type=heard.get("by_type"),
        )


def _chunks(events: list[Event], size: int) -> Iterable[list[Event]]:
    for start in range(0, len(events), size):
        yield events[start : start + size]


def simulate_command(
    rate: float,
    duration: float,
    intake_url: str,
    key: str,
    source: str,
    day_seconds: float,
    seed: int | None,
    payments_url: str | None = None,
    pay_share: float = 0.0,
    portals_url: str | None = None,
    portal_sandbox_url: str | None = None,
    survey_share: float = 0.0,
) -> int:
    from services.common.logging import configure_logging
    from services.common.settings import get_settings

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise here
    asyncio.run(
        simulate(
            rate,
            duration,
            intake_url=intake_url.rstrip("/"),
            key=key,
            source=source,
            day_seconds=day_seconds,
            seed=seed,
            payments_url=payments_url.rstrip("/") if payments_url else None,
            pay_share=pay_share,
            portals_url=portals_url.rstrip("/") if portals_url else None,
            portal_sandbox_url=portal_sandbox_url.rstrip("/") if portal_sandbox_url else None,
            survey_share=survey_share,
            survey_secrets=settings.survey_secrets,
        )
    )
    return 0
