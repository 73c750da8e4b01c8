"""`motcua dev`: the whole local stack on the embedded default, stopped cleanly on a signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from types import FrameType

from services.common.settings import Settings, get_settings
from services.dev.embedded import (
    Broker,
    EmbeddedRedis,
    port_open,
    terminate_group,
    wait_for_port,
)
from services.registry import DEV_TOOLS, SANDBOXES, SERVICES


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    port: int | None


# The page the banner shows per child: the dashboard, the issuer's discovery document, `/docs`.
PAGES = {"metrics": "/", "oidc-issuer": "/.well-known/openid-configuration"}


@dataclass
class DevStack:
    settings: Settings
    children: list[Child] = field(default_factory=list)
    broker: Broker | None = None
    redis: EmbeddedRedis | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def issuer_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.oidc_issuer_port}"

    def start(self, simulator: bool, rate: float) -> None:
        external_kafka = "KAFKA_BOOTSTRAP" in os.environ
        if not external_kafka:
            if port_open("127.0.0.1", 9092):
                raise SystemExit(
                    "127.0.0.1:9092 is taken: stop the other broker or set "
                    "KAFKA_BOOTSTRAP to use it"
                )
            self.broker = Broker(port=9092).start()
        bootstrap = self.settings.kafka_bootstrap if external_kafka else "127.0.0.1:9092"
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
        }
        subprocess.run(
            [sys.executable, "-m", "services.cli", "topics"],
            env=self.env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        for runnable in [*DEV_TOOLS.values(), *SANDBOXES.values(), *SERVICES.values()]:
            self._spawn(runnable.name, ["run", runnable.name], runnable.port(self.settings))
        for child in self.children:
            if child.port is not None:
                wait_for_port("127.0.0.1", child.port, timeout=60)
        if simulator:
            payments = f"http://127.0.0.1:{self.settings.payments_port}"
            # most applicants pay, so the demo's payments complete (or fail) instead of expiring
            simulate = ["simulate", "--rate", str(rate), "--payments-url", payments]
            self._spawn("simulator", [*simulate, "--pay-share", "0.8"], None)
        self._print_urls(bootstrap)

    def _spawn(self, name: str, args: list[str], port: int | None) -> None:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.cli", *args], env=self.env, start_new_session=True
        )
        self.children.append(Child(name, process, port))

    def _print_urls(self, bootstrap: str) -> None:
        print("\nmotcua is up:", flush=True)
        width = max(len(child.name) for child in self.children) + 1
        print(f"  {'broker':<{width}}{bootstrap}")
        print(f"  {'redis':<{width}}{self.env['REDIS_URL']}")
        for child in self.children:
            if child.port is not None:
                page = PAGES.get(child.name, "/docs")
                print(f"  {child.name:<{width}}http://127.0.0.1:{child.port}{page}")
        print(
            "Portal key (source portal/dev): dev-portal-key, e.g.\n"
            "  curl -X POST localhost:8001/v1/events -H 'Authorization: Bearer dev-portal-key'"
            " -H 'Content-Type: application/json' -d @docs/examples/dossier.submitted.json\n"
            f"Operators sign in through {self.issuer_url}; a token for curl:\n"
            "  motcua token --role viewer [--agency CODE]...\n"
            "Ctrl-C stops everything.\n",
            flush=True,
        )

    def watch(self) -> int:
        while True:
            for child in self.children:
                code = child.process.poll()
                if code is not None:
                    print(f"{child.name} exited with {code}; stopping the stack", file=sys.stderr)
                    return 1
            time.sleep(0.5)

    def stop(self) -> None:
        for child in reversed(self.children):
            terminate_group(child.process)
        self.children.clear()
        if self.broker is not None:
            self.broker.stop()
        if self.redis is not None:
            self.redis.stop()


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def run_dev(*, simulator: bool, rate: float) -> int:
    stack = DevStack(get_settings())
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    try:
        stack.start(simulator=simulator, rate=rate)
        return stack.watch()
    except _Stop:
        print("\nstopping…", flush=True)
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()
