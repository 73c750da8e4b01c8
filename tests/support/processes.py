"""Start motcua processes for integration tests: real subprocesses on free loopback ports."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx

from services.dev.embedded import terminate_group

ROOT = Path(__file__).resolve().parents[2]


def wait_http(
    url: str,
    timeout: float = 60.0,
    expect: int = 200,
    proc: subprocess.Popen[bytes] | None = None,
) -> None:
    """Wait until `url` answers `expect`; if `proc` (the server) exits first, fail at once with
    the end of its log."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"{' '.join(map(str, proc.args))} exited with {proc.returncode} before {url} "
                f"answered:\n{log_tail(proc)}"
            )
        try:
            response = httpx.get(url, timeout=1.0)
            if response.status_code == expect:
                return
            last = response.text
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer {expect} in {timeout}s (last: {last!r})")


LOG_DIR = ROOT / "test-output" / "logs"
LOGS: dict[int, Path] = {}


def log_tail(proc: subprocess.Popen[bytes], lines: int = 40) -> str:
    """The last lines a process started by `process` wrote."""
    path = LOGS.get(proc.pid)
    if path is None or not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def process(
    args: list[str], env: Mapping[str, str], log_name: str
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `python -m <args>` in its own process group; stop the group afterwards."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    path = LOG_DIR / f"{log_name}.log"
    with path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", *args],
            env={**os.environ, **env},
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        LOGS[proc.pid] = path
        try:
            yield proc
        finally:
            terminate_group(proc, timeout=10)
            LOGS.pop(proc.pid, None)


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
        wait_http(f"http://127.0.0.1:{port}/{'readyz' if ready else 'healthz'}", proc=proc)
        yield proc


def run_cli(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """`motcua ARGS...` as a user runs it: a real subprocess, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def until(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Wait for `check()` to hold; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"still not: {what}"
        time.sleep(0.3)
