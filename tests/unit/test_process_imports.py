"""What a service process loads as it starts (`motcua run`): with tracing off, neither the
OpenTelemetry SDK nor the optional extras of structlog, httpx and redis (rich, pygments, the SDK's
metrics); tracing switched on still loads the SDK and writes its spans. A fresh interpreter, as
the process is (this test process has imported all of it already)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

START = """
import json, logging, sys
from services.common import lean_imports
lean_imports.load()
from services.common.logging import configure_logging, get_logger
from services.registry import SERVICES
for runnable in SERVICES.values():
    runnable.load()
configure_logging("INFO", json=True)
try:
    raise ValueError("boom")
except ValueError:
    get_logger("test").exception("failed", dossier="D-1")
loaded = sorted(
    m for m in sys.modules if m.split(".")[0] in {"rich", "pygments", "psutil"}
    or m.startswith("opentelemetry.sdk")
)

from pathlib import Path
from services.common import tracing
on = tracing.TracingSettings(MOTCUA_TRACES_DIR=sys.argv[1], OTEL_TRACES_SAMPLER="always_on")
assert tracing.setup("probe", on)
tracing.start_batch("poll", [], {"n": 1}).end()
tracing.shutdown()
import rich.console  # still there for whatever else wants it (the simulator's console)
print(json.dumps({"loaded": loaded, "spans": Path(sys.argv[1], "probe.jsonl").read_text()}))
"""


def test_a_service_starts_without_the_tracing_sdk_or_unused_extras(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "MOTCUA_TRACES"))}
    done = subprocess.run(
        [sys.executable, "-c", START, str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["loaded"] == []
    (span,) = [json.loads(line) for line in result["spans"].splitlines()]
    assert (span["name"], span["service"], span["kind"]) == ("poll", "motcua-probe", "CONSUMER")
    # the log line's traceback is plain text, without rich
    (line,) = [json.loads(line) for line in done.stderr.splitlines() if '"failed"' in line]
    assert "ValueError: boom" in line["exception"]
