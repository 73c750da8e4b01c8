"""Start motcua processes for integration tests: real subprocesses on free loopback ports."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx

from services.dev.embedded import terminate_group

ROOT = Path(__file__).resolve().parents[2]


def wait_http(url: str, timeout: float = 60.0, expect: int = 200) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            response = httpx.get(url, timeout=1.0)
            if response.status_code == expect:
                return
            last = response.text
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer {expect} in {timeout}s (last: {last!r})")


@contextmanager
def process(
    args: list[str], env: Mapping[str, str], log_name: str
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `python -m <args>` in its own process group; stop the group afterwards."""
    log_dir = ROOT / "test-output" / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    with (log_dir / f"{log_name}.log").open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", *args],
            env={**os.environ, **env},
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield proc
        finally:
            terminate_group(proc, timeout=10)


@contextmanager
def motcua(
    service: str,
    env: Mapping[str, str],
    port: int,
    *,
    ready: bool = True,
    log_name: str | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """`motcua run SERVICE` on `port`, waited for until /readyz (or /healthz) answers 200."""
    with process(["services.cli", "run", service], env, log_name or service) as proc:
        wait_http(f"http://127.0.0.1:{port}/{'readyz' if ready else 'healthz'}")
        yield proc
