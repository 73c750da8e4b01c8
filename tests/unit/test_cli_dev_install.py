"""Where the dev-only packages are missing (the production image), the commands that need them
say so instead of failing with a traceback. Each case runs the command line in a subprocess
in which those packages cannot be imported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def motcua_without(package: str, *args: str) -> subprocess.CompletedProcess[str]:
    code = (
        "import sys\n"
        f"sys.modules[{package!r}] = None  # as if it were not installed\n"
        "from services.cli import app\n"
        "app()\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("package", "args", "command"),
    [
        ("services.sandboxes", ["run", "vnpay-sandbox"], "motcua run vnpay-sandbox"),
        ("services.dev", ["dev"], "motcua dev"),
        ("services.dev", ["run", "oidc-issuer"], "motcua run oidc-issuer"),
        ("services.simulator", ["simulate", "--duration", "1"], "motcua simulate"),
        ("services.simulator", ["replay", "--scale", "0.001"], "motcua replay"),
    ],
)
def test_a_dev_command_without_the_dev_install_says_what_it_needs(
    package: str, args: list[str], command: str
) -> None:
    result = motcua_without(package, *args)
    assert result.returncode == 2, result.stderr
    assert f"{command} needs the dev install" in result.stderr
    assert package in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unknown_service_is_still_a_usage_error() -> None:
    result = motcua_without("services.sandboxes", "run", "no-such-service")
    assert result.returncode == 2 and "unknown service" in result.stderr
