"""Shared fixtures: a real Tansu broker and a real Redis, on loopback, for the whole session."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from services.common.settings import hash_key
from services.dev.embedded import Broker, EmbeddedRedis, free_port
from tests.support.operators import Issuer, running_issuer
from tests.support.redis_keys import delete_namespace

# Property tests run beside brokers and services on a loaded 2-core machine: no per-example time
# limit there (a slow example is not a wrong one), the failing example printed for a re-run.
# `HYPOTHESIS_PROFILE=dev` keeps hypothesis' own defaults.
settings.register_profile(
    "ci", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile("dev")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Every service the tests start inherits this: Tansu holds a consumer's join for half its session
# timeout, and a worker restarted after SIGKILL waits out its dead member's session, so a 5 s
# session (heartbeats every 1.5 s) makes each start 2.5 s and each restart 5 s instead of 5 and
# 10+ (production: 10 s, deploy/k8s/base/config.env). Shorter, a worker starved of CPU on a busy
# 2-core machine misses its heartbeats and its group rebalances under the test.
os.environ.setdefault("MOTCUA_CONSUMER_SESSION_TIMEOUT_SECONDS", "5")


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    """A fresh broker per test module: Tansu starts in milliseconds, and modules never see
    each other's events or consumer groups."""
    b = Broker(port=free_port()).start()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def issuer() -> Iterator[Issuer]:
    """The dev OIDC issuer, one per test process: a service under test points at it with
    `MOTCUA_OIDC_ISSUER=issuer.url`, and `issuer.token(role)` signs operators' access tokens."""
    with running_issuer() as running:
        yield running


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    server = EmbeddedRedis.ensure(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    yield server.url
    server.stop()


@pytest.fixture
def namespace(redis_url: str) -> Iterator[str]:
    """A Redis key namespace of this test's own, removed afterwards."""
    ns = f"motcua-test-{uuid.uuid4().hex[:10]}"
    yield ns
    delete_namespace(redis_url, ns)


PORTAL_KEY = "test-portal-key"
OTHER_KEY = "other-portal-key"


def portals_env(rate: float = 100000.0, burst: int = 100000) -> str:
    import orjson

    return orjson.dumps(
        [
            {
                "source": "portal/test",
                "key_sha256": hash_key(PORTAL_KEY),
                "rate_per_second": rate,
                "burst": burst,
            },
            {"source": "portal/other", "key_sha256": hash_key(OTHER_KEY)},
        ]
    ).decode()


def service_env(broker: Broker, redis_url: str, namespace: str, **extra: str) -> dict[str, str]:
    return {
        "KAFKA_BOOTSTRAP": broker.bootstrap,
        "REDIS_URL": redis_url,
        "MOTCUA_REDIS_NAMESPACE": namespace,
        "MOTCUA_TOPIC_PARTITIONS": "4",
        "MOTCUA_PORTALS": portals_env(),
        **extra,
    }
