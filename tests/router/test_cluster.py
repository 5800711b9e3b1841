"""Membership that never cuts a call: the router's `Cluster` with real registry
logic and channels that record when they are closed (no sockets). A clock the test
moves stands in for time, in the registry and for retired channels alike."""

from __future__ import annotations

import asyncio

import pytest

from protos import workers_pb2 as wpb
from router import cluster as cluster_module
from router.cluster import Cluster, RegistrationRefused
from router.registry import Role, WorkerRegistry
from router.routing import PrefixLoadPolicy

MODEL = "test:cluster"
EXPIRY_S = 6.0


class RecordingChannel:
    def __init__(self, address: str) -> None:
        self.address = address
        self.is_closed = False

    async def close(self) -> None:
        self.is_closed = True


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(cluster_module.time, "monotonic", clock)
    return clock


def make_cluster(clock: Clock) -> tuple[Cluster, list[RecordingChannel]]:
    opened: list[RecordingChannel] = []

    def connect(address: str) -> RecordingChannel:
        opened.append(RecordingChannel(address))
        return opened[-1]

    cluster = Cluster(MODEL, PrefixLoadPolicy(), EXPIRY_S, connect=connect)
    cluster.registry = WorkerRegistry(EXPIRY_S, clock=clock)
    return cluster, opened


def registration(worker_id: str, address: str) -> wpb.RegisterRequest:
    return wpb.RegisterRequest(
        worker_id=worker_id,
        role=wpb.WORKER_ROLE_DECODE,
        address=address,
        model=MODEL,
        kv_fingerprint=b"f" * 16,
        block_size=16,
        vocab_size=100,
        max_context_len=64,
    )


def test_registering_again_at_the_same_address_keeps_the_entry_and_channel(clock):
    async def scenario():
        cluster, opened = make_cluster(clock)
        entry = await cluster.register(registration("d0", "h:1"))
        entry.num_inflight = 2  # calls in flight
        again = await cluster.register(registration("d0", "h:1"))
        return entry, again, opened

    entry, again, opened = asyncio.run(scenario())
    assert again is entry and entry.num_inflight == 2
    assert len(opened) == 1 and not opened[0].is_closed


def test_a_restart_elsewhere_keeps_the_old_channel_until_its_calls_end(clock):
    async def scenario():
        cluster, opened = make_cluster(clock)
        old = await cluster.register(registration("d0", "h:1"))
        old.num_inflight = 1
        new = await cluster.register(registration("d0", "h:2"))
        assert new is not old and cluster.channel("d0") is opened[1]
        await cluster.expire()
        assert not opened[0].is_closed and cluster.num_retired_channels == 1
        old.num_inflight = 0  # its last call ended
        await cluster.expire()
        return cluster, opened

    cluster, opened = asyncio.run(scenario())
    assert opened[0].is_closed and not opened[1].is_closed
    assert cluster.num_retired_channels == 0


def test_a_worker_that_leaves_keeps_its_channel_for_its_calls_at_most_the_expiry(clock):
    async def scenario():
        cluster, opened = make_cluster(clock)
        entry = await cluster.register(registration("d0", "h:1"))
        entry.num_inflight = 1
        lost = []
        entry.loss_watchers.add(lambda: lost.append(True))
        await cluster.remove("d0")
        assert cluster.workers(Role.DECODE) == [] and cluster.channel("d0") is None
        assert not opened[0].is_closed  # its call goes on
        clock.now += EXPIRY_S + 1
        await cluster.expire()
        return opened, lost

    opened, lost = asyncio.run(scenario())
    assert opened[0].is_closed and lost == [True]  # the call was told to fail over


def test_one_late_heartbeat_is_not_a_loss_but_the_expiry_time_is(clock):
    async def scenario():
        cluster, opened = make_cluster(clock)
        entry = await cluster.register(registration("d0", "h:1"))
        lost = []
        entry.loss_watchers.add(lambda: lost.append(True))
        clock.now += EXPIRY_S - 1  # two beats missed, not three
        await cluster.expire()
        assert cluster.workers(Role.DECODE) == [entry] and lost == []
        assert cluster.heartbeat(wpb.HeartbeatRequest(worker_id="d0"))
        clock.now += EXPIRY_S - 1
        await cluster.expire()
        assert cluster.workers(Role.DECODE) == [entry]
        clock.now += 2  # now silent for longer than the expiry
        await cluster.expire()
        return cluster, opened, lost

    cluster, opened, lost = asyncio.run(scenario())
    assert cluster.workers(Role.DECODE) == [] and lost == [True] and opened[0].is_closed
    assert not cluster.heartbeat(wpb.HeartbeatRequest(worker_id="d0"))  # register again


def test_draining_is_for_good_and_a_stall_lasts_while_reported(clock):
    async def scenario():
        cluster, _ = make_cluster(clock)
        entry = await cluster.register(registration("d0", "h:1"))
        cluster.heartbeat(wpb.HeartbeatRequest(worker_id="d0", is_stalled=True))
        assert not entry.is_routable
        cluster.heartbeat(wpb.HeartbeatRequest(worker_id="d0"))
        assert entry.is_routable
        cluster.heartbeat(wpb.HeartbeatRequest(worker_id="d0", is_draining=True))
        cluster.heartbeat(wpb.HeartbeatRequest(worker_id="d0"))
        assert not entry.is_routable and cluster.workers(Role.DECODE) == []

    asyncio.run(scenario())


def test_a_worker_storing_kv_in_another_format_is_refused_by_name(clock):
    async def scenario():
        cluster, _ = make_cluster(clock)
        first = registration("d0", "h:1")
        first.kv_cache_dtype = "int8"
        await cluster.register(first)
        other = registration("p0", "h:2")  # "" is auto: the model's dtype
        with pytest.raises(RegistrationRefused) as refused:
            await cluster.register(other)
        same = registration("p1", "h:3")
        same.kv_cache_dtype = "int8"
        await cluster.register(same)
        return cluster, str(refused.value)

    cluster, message = asyncio.run(scenario())
    assert message == (
        "worker stores K/V as 'auto', the cluster as 'int8': start it with "
        "--kv-cache-dtype int8, so that no block is read in another format"
    )
    assert {w.worker_id for w in cluster.registry.workers()} == {"d0", "p1"}
    assert cluster.model.kv_cache_dtype == "int8"
