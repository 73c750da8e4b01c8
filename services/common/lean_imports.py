"""structlog, httpx and redis-py imported without the optional extras each loads for a feature
motcua does not use, so that a service process does not pay for them at every start.

Each library imports optional packages at module level whenever they are installed:

- structlog imports `rich` for its colourful tracebacks and pretty-printed locals; our log lines
  render tracebacks as plain text (`services.common.logging`). It imports `greenlet` too, for the
  greenlet-local context of its deprecated `structlog.threadlocal`; ours is in contextvars.
- httpx imports its command line's (`httpx` in a shell): `pygments` and `rich` (and click,
  which the `motcua` command line loads anyway).
- redis-py imports the OpenTelemetry SDK's metrics (`opentelemetry.sdk.metrics`, and psutil)
  for metrics of its own, off unless a program turns them on; the services export Prometheus
  metrics and never do.

Together that is about 0.15 s of CPU per process (130-150 modules). `load()`, called before
anything else imports these libraries (`motcua run`), imports each with its extras hidden: the
library sees them as not installed, as it would in an image without them. Nothing else is
affected: the extras stay importable afterwards (the simulator's console uses rich,
`tracing_sdk` the OpenTelemetry SDK's tracing).
"""

from __future__ import annotations

import importlib
import sys

# library -> the optional extras it imports when installed but that motcua never uses through it
UNUSED_EXTRAS: dict[str, tuple[str, ...]] = {
    "structlog": ("rich", "greenlet"),
    "httpx": ("pygments", "rich"),
    "redis": ("opentelemetry.sdk.metrics",),
}


def load() -> None:
    """Import each library of `UNUSED_EXTRAS` with its extras hidden; a library already
    imported is left as it is, and so is an extra already imported."""
    for library, extras in UNUSED_EXTRAS.items():
        if library in sys.modules:
            continue
        hidden = [extra for extra in extras if extra not in sys.modules]
        for extra in hidden:
            sys.modules[extra] = None  # type: ignore[assignment]  # importing it: ImportError
        try:
            importlib.import_module(library)
        finally:
            for extra in hidden:
                del sys.modules[extra]
