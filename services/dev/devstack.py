"""`motcua dev`: the whole local stack on the embedded default, supervised, stopped cleanly on a
signal.

Every child (the services, the partner sandboxes, the dev issuer, the simulator) writes its log
to a file of its own, `<log dir>/<name>.log` (default `.motcua/logs/`, `--log-dir` or
`MOTCUA_DEV_LOG_DIR`); the terminal shows the banner, the children's warnings and errors, and one
line per exit and restart. A child that exits is restarted with a backoff
(`supervision.after_exit`); Ctrl-C or SIGTERM stops everything.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

from services.common.logging import escape_control
from services.common.settings import Settings, get_settings
from services.dev.embedded import Broker, EmbeddedRedis, port_open, terminate_group
from services.dev.supervision import (
    Crashes,
    GiveUp,
    Restart,
    RestartPolicy,
    after_exit,
    exit_line,
    worth_showing,
)
from services.registry import DEV_TOOLS, SANDBOXES, SERVICES, Runnable

DEFAULT_LOG_DIR = Path(".motcua/logs")
DEFAULT_BROKER_PORT = 9092
# How long the stack waits for every child's port before it prints the banner anyway.
START_TIMEOUT_SECONDS = 180.0
TICK_SECONDS = 0.2

# The page the banner shows per child: the dashboard, the issuer's discovery document, `/docs`.
PAGES = {"metrics": "/", "oidc-issuer": "/.well-known/openid-configuration"}
LABELS = {"metrics": "metrics + dashboard"}


# `--scale SERVICE=N`: the extra processes of a service listen from these ports on (CONTRACT
# section 11: metrics on 8100, 8101, ...).
EXTRA_PORTS = {
    "metrics": 8100,
    "payments": 8110,
    "postal": 8120,
    "sms": 8130,
    "intake": 8140,
    "portals": 8150,
}
MAX_SCALE = 10


@dataclass(frozen=True)
class ChildSpec:
    name: str
    command: list[str]
    port: int | None  # where it listens, if it does
    env: dict[str, str] = field(default_factory=dict)  # beside the stack's environment


def motcua_child(
    name: str, args: list[str], port: int | None, env: dict[str, str] | None = None
) -> ChildSpec:
    """A child running `motcua ARGS` with this interpreter."""
    return ChildSpec(name, [sys.executable, "-m", "services.cli", *args], port, env or {})


def parse_scale(values: list[str]) -> dict[str, int]:
    """`SERVICE=N` options as {service: N}; ValueError naming what is wrong."""
    out: dict[str, int] = {}
    for value in values:
        name, sep, count = value.partition("=")
        if not sep or name not in EXTRA_PORTS:
            raise ValueError(
                f"--scale {value!r}: expected SERVICE=N, SERVICE one of "
                f"{', '.join(sorted(EXTRA_PORTS))}"
            )
        if not count.isdigit() or not 1 <= int(count) <= MAX_SCALE:
            raise ValueError(f"--scale {value!r}: N must be a whole number from 1 to {MAX_SCALE}")
        out[name] = int(count)
    return out


def extra_processes(runnable: Runnable, count: int) -> list[ChildSpec]:
    """The processes of a service beyond its first: `<name>-2`, ... on their own ports."""
    env_name = runnable.port_setting.upper()
    specs = []
    for number in range(2, count + 1):
        port = EXTRA_PORTS[runnable.name] + number - 2
        specs.append(
            motcua_child(
                f"{runnable.name}-{number}", ["run", runnable.name], port, {env_name: str(port)}
            )
        )
    return specs


@dataclass
class Child:
    spec: ChildSpec
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    crashes: Crashes = field(default_factory=Crashes)
    restart_at: float | None = None
    given_up: bool = False
    shown: int = 0  # bytes of the log already looked at for the terminal
    partial: bytes = b""

    @property
    def name(self) -> str:
        return self.spec.name


class Supervisor:
    """Starts children, restarts the ones that exit (as `after_exit` decides), tells the terminal
    their warnings and errors, stops them all. Driven by `tick`, one thread, no timers."""

    def __init__(
        self,
        env: dict[str, str],
        log_dir: Path,
        *,
        policy: RestartPolicy | None = None,
        say: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.env = env
        self.log_dir = log_dir
        self.policy = policy or RestartPolicy()
        self.say = say or _say
        self.clock = clock
        self.children: list[Child] = []

    def add(self, spec: ChildSpec) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        child = Child(spec, self.log_dir / f"{spec.name}.log")
        child.log_path.write_bytes(b"")  # one run, one log
        self.children.append(child)
        self._start(child)
        return child

    def _start(self, child: Child) -> None:
        # a Ctrl-C between the fork and the bookkeeping would leave a child nobody stops
        with _STOP.deferred():
            self._spawn(child)

    def _spawn(self, child: Child) -> None:
        with child.log_path.open("ab") as log:
            log.write(f"--- motcua dev: starting {child.name} ---\n".encode())
            log.flush()
            child.process = subprocess.Popen(
                child.spec.command,
                env={**self.env, **child.spec.env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        child.started_at = self.clock()
        child.restart_at = None

    def tick(self) -> None:
        """Look at every child once: an exit decided on, a restart that is due, new lines."""
        now = self.clock()
        for child in self.children:
            self._show_new_lines(child)
            process = child.process
            if process is not None and process.poll() is not None:
                self._exited(child, process.returncode, now)
            elif child.restart_at is not None and now >= child.restart_at:
                self._start(child)
                assert child.process is not None
                self.say(f"{child.name} restarted (pid {child.process.pid})")

    def _exited(self, child: Child, returncode: int, now: float) -> None:
        self._show_new_lines(child)
        decision, child.crashes = after_exit(
            self.policy, child.crashes, started_at=child.started_at, exited_at=now
        )
        child.process = None
        self.say(exit_line(child.name, returncode, decision, str(child.log_path)))
        if isinstance(decision, Restart):
            child.restart_at = now + decision.after
        elif isinstance(decision, GiveUp):
            child.given_up = True

    def _show_new_lines(self, child: Child) -> None:
        try:
            with child.log_path.open("rb") as log:
                log.seek(child.shown)
                data = log.read(1 << 20)
        except FileNotFoundError:
            return
        child.shown += len(data)
        lines = (child.partial + data).split(b"\n")
        child.partial = lines.pop()
        width = max(len(c.name) for c in self.children)
        for raw in lines:
            line = raw.decode("utf-8", "replace").rstrip()
            if worth_showing(line):  # a raw traceback too cannot repaint the terminal
                self.say(f"{child.name:<{width}} | {escape_control(line)}")

    def pending(self) -> list[Child]:
        """The children with a port nothing listens on yet (and not given up)."""
        return [
            c
            for c in self.children
            if c.spec.port is not None
            and not c.given_up
            and not port_open("127.0.0.1", c.spec.port)
        ]

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every child's process group at once; SIGKILL what is left after `timeout`."""
        running = [c.process for c in reversed(self.children) if c.process is not None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            terminate_group(process, timeout=0)
        for child in self.children:
            self._show_new_lines(child)
        self.children.clear()


def _say(line: str) -> None:
    print(line, flush=True)


@dataclass
class DevStack:
    settings: Settings
    log_dir: Path = DEFAULT_LOG_DIR
    broker_port: int = DEFAULT_BROKER_PORT
    supervisor: Supervisor | None = None
    broker: Broker | None = None
    redis: EmbeddedRedis | None = None
    env: dict[str, str] = field(default_factory=dict)
    scale: dict[str, int] = field(default_factory=dict)  # service -> processes (default 1)

    @property
    def issuer_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.oidc_issuer_port}"

    def start(self, simulator: bool, rate: float) -> Supervisor:
        external_kafka = "KAFKA_BOOTSTRAP" in os.environ
        if not external_kafka:
            if port_open("127.0.0.1", self.broker_port):
                raise SystemExit(
                    f"127.0.0.1:{self.broker_port} is taken: stop the other broker, choose "
                    "another port (--broker-port) or set KAFKA_BOOTSTRAP to use it"
                )
            self.log_dir.mkdir(parents=True, exist_ok=True)
            broker_log = self.log_dir / "broker.log"
            broker_log.write_bytes(b"")
            self.broker = Broker(port=self.broker_port, log_path=broker_log).start()
        bootstrap = (
            self.settings.kafka_bootstrap if external_kafka else f"127.0.0.1:{self.broker_port}"
        )
        self.redis = EmbeddedRedis.ensure(self.settings.redis_url)
        run_id = uuid.uuid4().hex[:8]
        # A fresh namespace and data directory per run: state never outlives the log it came from.
        self.env = {
            **os.environ,
            "KAFKA_BOOTSTRAP": bootstrap,
            "REDIS_URL": self.redis.url,
            "MOTCUA_REDIS_NAMESPACE": f"motcua-dev-{run_id}",
            "MOTCUA_DATA_DIR": tempfile.mkdtemp(prefix=f"motcua-dev-{run_id}-"),
            # every service accepts the operators' tokens of the dev issuer
            "MOTCUA_OIDC_ISSUER": self.issuer_url,
            # portals may be called back on loopback (CONTRACT section 9)
            "MOTCUA_ENV": os.environ.get("MOTCUA_ENV", "dev"),
            # every request and event traced, the spans as JSON lines beside the logs
            "MOTCUA_TRACES_DIR": os.environ.get("MOTCUA_TRACES_DIR")
            or str((self.log_dir / "traces").resolve()),
            "OTEL_TRACES_SAMPLER": os.environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on"),
        }
        subprocess.run(
            [sys.executable, "-m", "services.cli", "topics"],
            env=self.env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        supervisor = Supervisor(self.env, self.log_dir)
        self.supervisor = supervisor
        for runnable in [*DEV_TOOLS.values(), *SANDBOXES.values(), *SERVICES.values()]:
            port = runnable.port(self.settings)
            supervisor.add(motcua_child(runnable.name, ["run", runnable.name], port))
        for name, count in self.scale.items():
            for spec in extra_processes(SERVICES[name], count):
                spec.env["MOTCUA_DATA_DIR"] = f"{self.env['MOTCUA_DATA_DIR']}/{spec.name}"
                supervisor.add(spec)
        late = self._wait_until_listening(supervisor)
        if simulator:
            payments = f"http://127.0.0.1:{self.settings.payments_port}"
            # most applicants pay, so the demo's payments complete (or fail) instead of expiring
            args = ["simulate", "--rate", str(rate), "--payments-url", payments]
            # the portal sandbox hears the simulated portal's callbacks
            args += ["--portals-url", f"http://127.0.0.1:{self.settings.portals_port}"]
            args += [
                "--portal-sandbox-url",
                f"http://127.0.0.1:{self.settings.portal_sandbox_port}",
            ]
            # and half of those whose result came back answer the satisfaction survey
            args += ["--survey-share", "0.5"]
            supervisor.add(motcua_child("simulator", [*args, "--pay-share", "0.8"], None))
        text = banner(self, bootstrap, late)
        (self.log_dir / "banner.txt").write_text(text + "\n")
        print(text, flush=True)
        return supervisor

    def _wait_until_listening(self, supervisor: Supervisor) -> list[str]:
        """Tick the supervisor until every child listens (or the start timeout); the names of
        those that did not."""
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            supervisor.tick()
            waiting = supervisor.pending()
            if not waiting or time.monotonic() > deadline:
                return [c.name for c in waiting]
            time.sleep(TICK_SECONDS)

    def watch(self) -> None:
        """Supervise until a signal stops the stack."""
        assert self.supervisor is not None
        while True:
            self.supervisor.tick()
            time.sleep(TICK_SECONDS)

    def stop(self) -> None:
        if self.supervisor is not None:
            self.supervisor.stop()
        if self.broker is not None:
            self.broker.stop()
        if self.redis is not None:
            self.redis.stop()


def _shown_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path.resolve())


def banner(stack: DevStack, bootstrap: str, late: list[str]) -> str:
    """What the terminal shows once the stack is up: where everything is, the dev credentials,
    where the logs are."""
    settings = stack.settings
    assert stack.supervisor is not None
    rows: list[tuple[str, str]] = []
    for child in stack.supervisor.children:
        if child.spec.port is not None:
            base, _, number = child.name.rpartition("-")  # `metrics-2`: a process of metrics
            page = PAGES.get(base if number.isdigit() else child.name, "/docs")
            rows.append(
                (LABELS.get(child.name, child.name), f"http://127.0.0.1:{child.spec.port}{page}")
            )
    rows.append(("broker", bootstrap))
    rows.append(
        ("redis", f"{stack.env['REDIS_URL']} (keys under {stack.env['MOTCUA_REDIS_NAMESPACE']}:)")
    )
    width = max(len(label) for label, _ in rows) + 2
    logs = _shown_path(stack.log_dir)
    token = "motcua token --role admin"
    if settings.oidc_issuer_port != Settings.model_fields["oidc_issuer_port"].default:
        token += f" --issuer {stack.issuer_url}"
    intake = f"localhost:{settings.intake_port}"
    dashboard = f"http://127.0.0.1:{settings.metrics_port}/"
    lines = [
        "",
        "=" * 78,
        "motcua dev is up. Ctrl-C stops everything.",
        "",
        *(f"  {label:<{width}}{where}" for label, where in rows),
        "",
        "Dev credentials (defaults of CONTRACT section 7; never used outside dev):",
        "  portal key   dev-portal-key (source portal/dev), e.g.",
        f"    curl -X POST {intake}/v1/events -H 'Authorization: Bearer dev-portal-key' \\",
        "         -H 'Content-Type: application/json' -d @docs/examples/dossier.submitted.json",
        f"  token        {token}   (or --role viewer / finance; --agency CODE limits it)",
        f"  dashboard    open {dashboard} and pick a role on the dev issuer's sign-in page",
        "",
        f"Logs: one file per process in {logs}/ (sms.log, intake.log, ...);",
        "  follow one with `motcua dev --logs sms` in another terminal. Below: warnings, errors",
        f"  and restarts only. This banner again: {logs}/banner.txt",
        f"Traces: every span as a JSON line in {logs}/traces/<process>.jsonl; one trace across",
        f"  the services: grep TRACE_ID {logs}/traces/*.jsonl (log lines carry their trace_id).",
        "=" * 78,
    ]
    if late:
        lines.insert(3, f"Not listening yet (see their logs): {', '.join(late)}")
    return "\n".join(lines)


def follow_log(log_dir: Path, name: str, *, lines: int = 20) -> int:
    """Print the end of `<log_dir>/<name>.log`, then what is written to it, until Ctrl-C; a new
    `motcua dev` run (which starts the file again) is followed too."""
    path = log_dir / f"{name}.log"
    if not path.exists():
        known = sorted(p.stem for p in log_dir.glob("*.log")) if log_dir.is_dir() else []
        hint = f"; known: {', '.join(known)}" if known else " (is `motcua dev` running here?)"
        print(f"no log for {name!r} in {_shown_path(log_dir)}{hint}", file=sys.stderr)
        return 2
    # Ctrl-C stops it even when started with SIGINT ignored (a background job of a script)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    out: IO[bytes] = sys.stdout.buffer
    data = path.read_bytes()
    out.write(b"\n".join(data.split(b"\n")[-lines - 1 :]))
    out.flush()
    offset = len(data)
    try:
        while True:
            size = path.stat().st_size if path.exists() else 0
            if size < offset:  # a new run started the file again
                offset = 0
            if size > offset:
                with path.open("rb") as log:
                    log.seek(offset)
                    chunk = log.read()
                offset += len(chunk)
                out.write(chunk)
                out.flush()
            time.sleep(TICK_SECONDS)
    except KeyboardInterrupt:
        return 0


class _Stop(Exception):
    pass


class _StopSignal:
    """SIGINT and SIGTERM stop the stack (`_Stop`), except inside `deferred()`, which raises it
    at its end instead: a child is never started without being recorded."""

    def __init__(self) -> None:
        self._deferring = False
        self._pending = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self._deferring:
            self._pending = True
            return
        raise _Stop

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        if self._pending:
            self._pending = False
            raise _Stop


_STOP = _StopSignal()


def run_dev(
    *,
    simulator: bool,
    rate: float,
    log_dir: Path = DEFAULT_LOG_DIR,
    broker_port: int = DEFAULT_BROKER_PORT,
    scale: dict[str, int] | None = None,
) -> int:
    stack = DevStack(
        get_settings(), log_dir=log_dir, broker_port=broker_port, scale=dict(scale or {})
    )
    signal.signal(signal.SIGTERM, _STOP)
    signal.signal(signal.SIGINT, _STOP)
    try:
        stack.start(simulator=simulator, rate=rate)
        stack.watch()
        return 0
    except _Stop:
        print("\nstopping…", flush=True)
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()
        print("stopped.", flush=True)
