"""`Sealer.write_keys` when the key write fails: claims of keys that may have reached the broker
stay until they expire (a retry then waits for those keys on `dossier.keys` instead of making
others that the earlier write could land after); claims of keys that surely did not are
released at once, so the portal's retry makes them. Fakes stand for Redis and the broker."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from services.common.coordination import Keys
from services.common.data_keys import DataKeys
from services.common.kafka import BrokerUnavailable
from services.common.sealing import Keks, new_data_key
from services.common.settings import DEV_KEK
from services.intake.personal import SealedBatch, Sealer


class FakeRedis:
    """What `Sealer` asks of Redis: a script whose calls are recorded."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def register_script(self, _source: str) -> Any:
        async def call(*, args: Sequence[str]) -> int:
            self.calls.append(list(args))
            return 1

        return call


class FailingPublisher:
    def __init__(self, maybe_sent: bool) -> None:
        self.maybe_sent = maybe_sent

    async def publish(self, _records: Sequence[tuple[str, bytes, bytes | None]]) -> None:
        raise BrokerUnavailable("not acknowledged: KafkaTimeoutError", maybe_sent=self.maybe_sent)


@pytest.mark.parametrize("maybe_sent", [True, False])
async def test_a_failed_key_write_releases_its_claims_only_if_nothing_was_sent(
    maybe_sent: bool,
) -> None:
    redis = FakeRedis()
    keys = DataKeys("127.0.0.1:1", Keks.parse(DEV_KEK), partitions=1)  # never started
    sealer = Sealer(
        keys,
        FailingPublisher(maybe_sent),  # type: ignore[arg-type]
        redis,  # type: ignore[arg-type]
        Keys("motcua-test"),
        wait_seconds=0.1,
    )
    batch = SealedBatch([b"{}"], {"D-1": new_data_key()}, "token-1")
    with pytest.raises(BrokerUnavailable):
        await sealer.write_keys(batch, "1")
    released = [call for call in redis.calls if call and call[0] == "token-1"]
    assert bool(released) is (not maybe_sent)
    assert not keys.known("D-1")  # a key not acknowledged is not taken for written
