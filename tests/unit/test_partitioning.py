"""Records go to the partition Kafka's default partitioner picks (murmur2 of the key), whether
aiokafka or `KeyPartitioner` picks it."""

from __future__ import annotations

from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from hypothesis import given
from hypothesis import strategies as st

from services.common.partitioning import KeyPartitioner, murmur2


@given(st.binary(max_size=200))
def test_murmur2_equals_the_java_clients(data: bytes) -> None:
    assert murmur2(data) == aiokafka_murmur2(data)


@given(st.binary(min_size=1, max_size=64), st.integers(min_value=1, max_value=64))
def test_a_key_goes_where_the_default_partitioner_sends_it(key: bytes, count: int) -> None:
    partitions = list(range(count))
    ours = KeyPartitioner()
    assert ours(key, partitions, partitions) == DefaultPartitioner()(key, partitions, partitions)
    assert ours(key, partitions, partitions) == ours(key, partitions, [])  # remembered: the same


def test_known_dossier_ids_land_as_kafka_puts_them() -> None:
    # Values of Kafka's Java `Utils.murmur2` (the same as aiokafka's port) for dossier ids.
    assert murmur2(b"") == 275646681
    assert murmur2(b"000.00.12.H34-2019-0000001") == aiokafka_murmur2(b"000.00.12.H34-2019-0000001")


def test_a_record_without_key_goes_to_an_available_partition() -> None:
    assert KeyPartitioner()(None, [0, 1, 2, 3], [2]) == 2
    assert KeyPartitioner()(None, [0, 1], []) in (0, 1)
