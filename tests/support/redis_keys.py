"""Removing what a test or a benchmark left in a shared Redis: every key of its namespace
(`MOTCUA_REDIS_NAMESPACE`). A benchmark's intake ledger alone leaves a key per event; left
there, they make every later SCAN of the keyspace (each test's clean-up) slow."""

from __future__ import annotations

from collections.abc import Mapping

import redis


def delete_namespace(url: str, namespace: str) -> int:
    """Delete every key `<namespace>:*` at `url`; return how many. SCAN walks the whole
    keyspace: large steps keep it quick on a Redis that holds much else."""
    client = redis.Redis.from_url(url)
    deleted = 0
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(f"{namespace}:*", count=10_000):
            batch.append(key)
            if len(batch) >= 10_000:
                deleted += int(client.unlink(*batch))
                batch = []
        if batch:
            deleted += int(client.unlink(*batch))
    finally:
        client.close()
    return deleted


def forget_run(env: Mapping[str, str]) -> None:
    """`delete_namespace` of a run's environment (`REDIS_URL`, `MOTCUA_REDIS_NAMESPACE`)."""
    url, namespace = env.get("REDIS_URL"), env.get("MOTCUA_REDIS_NAMESPACE")
    if url and namespace:
        delete_namespace(url, namespace)
