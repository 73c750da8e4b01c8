"""Container health check: 0 when the service's /healthz answers on any of the motcua ports."""

from __future__ import annotations

import os
import sys
import urllib.request

PORTS = {
    "METRICS_PORT": "8000",
    "INTAKE_PORT": "8001",
    "PAYMENTS_PORT": "8002",
    "POSTAL_PORT": "8003",
    "SMS_PORT": "8004",
    "VNPAY_SANDBOX_PORT": "8012",
    "VNPOST_SANDBOX_PORT": "8013",
    "SMS_PRIMARY_SANDBOX_PORT": "8014",
    "SMS_SECONDARY_SANDBOX_PORT": "8015",
}


def healthy(port: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def main() -> int:
    ports = dict.fromkeys(os.environ.get(name, default) for name, default in PORTS.items())
    return 0 if any(healthy(port) for port in ports) else 1


if __name__ == "__main__":
    sys.exit(main())
