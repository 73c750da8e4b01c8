"""What a worker holds before its first event is mostly the modules it imported: the services
started by `motcua run` load none of the dev install's packages (the partner sandboxes, the dev
stack, the simulator), nor PyJWT until an operator's token comes (`services.common.auth`), nor the
greenlet support structlog would import for a context kept in contextvars. A fresh interpreter,
as a worker's process is (this test process has imported all of it already)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# what `motcua run SERVICE` imports before it calls the service's `run`, for every service
START = """
import json, sys
import services.cli
from services.common import lean_imports
lean_imports.load()
from services.common.logging import configure_logging
from services.registry import SERVICES
configure_logging("INFO", json=True)
for runnable in SERVICES.values():
    runnable.load()
print(json.dumps(sorted(sys.modules)))
"""

NOT_IN_A_WORKER = ("services.sandboxes", "services.dev", "services.simulator", "jwt", "greenlet")


def test_the_workers_import_no_dev_package_nor_what_they_do_not_use() -> None:
    done = subprocess.run(
        [sys.executable, "-c", START],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    loaded = json.loads(done.stdout.splitlines()[-1])
    packages = tuple(f"{name}." for name in NOT_IN_A_WORKER)
    assert [m for m in loaded if m in NOT_IN_A_WORKER or m.startswith(packages)] == []
