"""`motcua dev` and its supervisor, for real: a crashed child is restarted and answers again; the
whole stack starts on free ports, prints its banner, restarts a killed sandbox, and stops cleanly
on Ctrl-C (SIGINT), leaving no process behind."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.dev.devstack import ChildSpec, Supervisor
from services.dev.embedded import free_port, terminate_group
from services.dev.supervision import RestartPolicy
from tests.support.processes import ROOT, wait_http

pytestmark = pytest.mark.integration


def wait_until(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return
        time.sleep(0.1)
    raise TimeoutError(what)


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def test_the_supervisor_restarts_a_child_killed_with_sigkill(tmp_path: Path) -> None:
    port = free_port()
    said: list[str] = []
    supervisor = Supervisor(dict(os.environ), tmp_path, policy=RestartPolicy(0.5), say=said.append)
    url = f"http://127.0.0.1:{port}/"
    server = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    try:
        child = supervisor.add(ChildSpec("web", server, port))
        wait_until(lambda: supervisor.tick() or answers(url), 30, "the child did not start")
        first = child.process
        assert first is not None
        os.kill(first.pid, signal.SIGKILL)
        wait_until(
            lambda: supervisor.tick() or (child.process not in (None, first) and answers(url)),
            30,
            f"the child did not come back: {said}",
        )
    finally:
        supervisor.stop()
    own = [line for line in said if not line.startswith("web | ")]  # not the child's lines
    assert own[0] == f"web was killed by SIGKILL; restarting it in 0.5 s (log: {tmp_path}/web.log)"
    assert own[1].startswith("web restarted (pid ")
    assert not answers(url)  # stopped with the supervisor
    log = (tmp_path / "web.log").read_text()
    assert log.count("--- motcua dev: starting web ---") == 2


PORTS = {
    "METRICS_PORT": "metrics",
    "INTAKE_PORT": "intake",
    "PAYMENTS_PORT": "payments",
    "POSTAL_PORT": "postal",
    "SMS_PORT": "sms",
    "PORTALS_PORT": "portals",
    "VNPAY_SANDBOX_PORT": "vnpay-sandbox",
    "VNPOST_SANDBOX_PORT": "vnpost-sandbox",
    "SMS_PRIMARY_SANDBOX_PORT": "sms-primary-sandbox",
    "SMS_SECONDARY_SANDBOX_PORT": "sms-secondary-sandbox",
    "PORTAL_SANDBOX_PORT": "portal-sandbox",
    "OIDC_ISSUER_PORT": "oidc-issuer",
}


@pytest.fixture
def dev_env(redis_url: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    ports = {setting: str(free_port()) for setting in PORTS}

    def url(setting: str) -> str:
        return f"http://127.0.0.1:{ports[setting]}"

    env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP"}
    env.update(
        ports,
        REDIS_URL=redis_url,
        MOTCUA_DEV_LOG_DIR=str(tmp_path / "logs"),
        VNPAY_URL=url("VNPAY_SANDBOX_PORT"),
        VNPOST_URL=url("VNPOST_SANDBOX_PORT"),
        SMS_PRIMARY_URL=url("SMS_PRIMARY_SANDBOX_PORT"),
        SMS_SECONDARY_URL=url("SMS_SECONDARY_SANDBOX_PORT"),
        PAYMENTS_PUBLIC_URL=url("PAYMENTS_PORT"),
        POSTAL_PUBLIC_URL=url("POSTAL_PORT"),
        SMS_PUBLIC_URL=url("SMS_PORT"),
        MOTCUA_TOPIC_PARTITIONS="2",
    )
    yield env


def test_motcua_dev_starts_restarts_a_killed_child_and_stops_on_ctrl_c(
    dev_env: dict[str, str], tmp_path: Path
) -> None:
    broker_port = free_port()
    command = ["dev", "--no-simulator", "--broker-port", str(broker_port), "--scale", "metrics=2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", *command],
        env=dev_env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    output: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            output.append(raw.decode(errors="replace"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    children: list[int] = []
    banner_file = Path(dev_env["MOTCUA_DEV_LOG_DIR"]) / "banner.txt"

    def whole_banner_shown() -> bool:
        # the banner's lines arrive one by one: wait for its last one, as written to its file
        shown = "".join(output)
        return banner_file.exists() and banner_file.read_text().strip() in shown

    try:
        wait_until(lambda: whole_banner_shown() or proc.poll() is not None, 150, "no banner")
        text = "".join(output)
        assert proc.poll() is None, text
        # every URL, aligned in one column after its name; the credentials; where the logs are
        for setting, name in PORTS.items():
            label = "metrics + dashboard" if name == "metrics" else name
            assert re.search(
                rf"^  {re.escape(label)} +http://127\.0\.0\.1:{dev_env[setting]}/", text, re.M
            ), text
        columns = {m.start(1) - m.start() for m in re.finditer(r"^  \S.*?  +(http)", text, re.M)}
        assert len(columns) == 1, text
        # a second metrics process (CONTRACT section 11), on the first extra port
        assert re.search(r"^  metrics-2 +http://127\.0\.0\.1:8100/$", text, re.M), text
        assert "dev-portal-key" in text and "motcua token --role admin" in text
        log_dir = Path(dev_env["MOTCUA_DEV_LOG_DIR"])
        assert f"{log_dir}/" in text or "logs/" in text
        assert (log_dir / "banner.txt").read_text().strip() in text
        for name in PORTS.values():
            assert (log_dir / f"{name}.log").exists(), name
        # per-request lines are for the log files at DEBUG, not for the terminal
        assert "HTTP Request:" not in text

        # every request traced: its spans beside the logs, where the banner says
        assert "traces/<process>.jsonl" in text
        intake = f"http://127.0.0.1:{dev_env['INTAKE_PORT']}"
        wait_http(f"{intake}/readyz", timeout=60)
        posted = httpx.post(
            f"{intake}/v1/events",
            content=(ROOT / "docs/examples/dossier.submitted.json").read_bytes(),
            headers={"authorization": "Bearer dev-portal-key", "content-type": "application/json"},
            timeout=30,
        )
        assert posted.status_code == 202, posted.text
        spans = log_dir / "traces" / "intake.jsonl"
        wait_until(
            lambda: spans.exists() and '"name":"POST /v1/events"' in spans.read_text(),
            30,
            "intake's span of the request",
        )

        metrics = f"http://127.0.0.1:{dev_env['METRICS_PORT']}"
        wait_http(f"{metrics}/healthz", timeout=60)
        wait_http("http://127.0.0.1:8100/healthz", timeout=60)
        sandbox = f"http://127.0.0.1:{dev_env['SMS_PRIMARY_SANDBOX_PORT']}/healthz"
        wait_http(sandbox, timeout=60)
        pid = child_running(proc.pid, "sms-primary-sandbox")
        os.kill(pid, signal.SIGKILL)
        wait_until(
            lambda: "sms-primary-sandbox restarted" in "".join(output),
            60,
            "no restart line",
        )
        wait_http(sandbox, timeout=60)
        assert proc.poll() is None  # the stack did not stop

        children = descendants(proc.pid)
        assert len(children) >= len(PORTS) + 1  # every runnable and the broker
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        reader.join(timeout=10)
        text = "".join(output)
        assert "sms-primary-sandbox was killed by SIGKILL; restarting it in 1 s" in text
        assert "stopped." in text
        assert "Traceback" not in text, text
        wait_until(lambda: not any(alive(p) for p in children), 15, "children left behind")
        assert not answers(f"{metrics}/healthz")
    finally:
        terminate_group(proc, timeout=20)
        for pid in children or descendants(proc.pid):  # what a failure left behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def child_running(parent: int, name: str) -> int:
    """The pid of `parent`'s child running `motcua run NAME`."""
    for pid in descendants(parent):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if args[-3:] == [b"run", name.encode(), b""]:
            return pid
    raise LookupError(f"no child runs {name}")


def descendants(pid: int) -> list[int]:
    """Every process whose chain of parents leads to `pid`."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        kids = [p for p, parent in parents.items() if parent == current]
        found.extend(kids)
        frontier.extend(kids)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_motcua_dev_logs_follows_one_process_log(tmp_path: Path) -> None:
    log = tmp_path / "sms.log"
    log.write_text("2026-11-26T15:00:00Z [info     ] sms_starting port=8004\n")
    (tmp_path / "intake.log").write_text("")
    cli = [sys.executable, "-m", "services.cli", "dev", "--log-dir", str(tmp_path)]
    unknown = subprocess.run(
        [*cli, "--logs", "nope"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert unknown.returncode == 2
    assert "no log for 'nope'" in unknown.stderr and "known: intake, sms" in unknown.stderr
    follower = subprocess.Popen(
        [*cli, "--logs", "sms"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        assert follower.stdout is not None
        assert b"sms_starting" in follower.stdout.readline()
        with log.open("a") as out:
            out.write("2026-11-26T15:00:01Z [warning  ] sms_later\n")
        assert b"sms_later" in follower.stdout.readline()
        follower.send_signal(signal.SIGINT)
        assert follower.wait(timeout=30) == 0
    finally:
        terminate_group(follower, timeout=5)
