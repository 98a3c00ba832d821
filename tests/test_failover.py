"""The failover drill: the primary dies (kill -9) mid-batch; Sentinel promotes; no job is lost."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from pathlib import Path

import pytest
from redis.exceptions import RedisError

from loadwarden.producer import Client, LoadRequest
from loadwarden.producer.connection import redis_client
from loadwarden.producer.contract import Outcome
from loadwarden.producer.settings import RedisOptions
from loadwarden.worker.config import Settings
from tests.conftest import StartWorker, eventually
from tests.redis_ha import SERVICE, SentinelTopology

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(120),
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server on PATH"),
]

#: Jobs in the drill's batch.
BATCH = 30
#: A lost worker's job runs again this soon; renewals every half second.
FAST_LEASE = {"concurrency": 3, "lease_s": 2, "lease_renew_s": 0.5}


@pytest.fixture
def topology() -> SentinelTopology:
    with SentinelTopology(replicas=1, sentinels=3) as topo:
        yield topo  # type: ignore[misc]


async def test_primary_killed_mid_batch_loses_no_acknowledged_job(
    topology: SentinelTopology, start_worker: StartWorker, small_model: Path
) -> None:
    """kill -9 of the primary mid-batch: every acknowledged job ends ok; no worker exits."""
    workers = [start_worker(topology.url, "brief", **FAST_LEASE) for _ in range(2)]
    # Acknowledged means replicated: an enqueue returns only once the replica has the job.
    replicated = Settings(redis_url=topology.url, redis=RedisOptions(wait_replicas=1))
    async with Client(settings=replicated) as producer:
        handles = [
            await producer.enqueue(LoadRequest(source=str(small_model), labels={"n": str(i)}))
            for i in range(BATCH)
        ]
        await handles[0].report(timeout_s=30)  # the batch is under way
        old = topology.primary_port()
        topology.primary.kill()
    # The new primary has no replica left, so reports are read without WAIT.
    async with Client(settings=Settings(redis_url=topology.url)) as reader:
        reports = await asyncio.gather(*(reader.report(h.job_id, timeout_s=90) for h in handles))
    assert topology.primary_port() != old
    outcomes = {r.job_id: r.outcome for r in reports}
    assert all(o is Outcome.OK for o in outcomes.values()), outcomes
    assert all(w.poll() is None for w in workers), "a worker exited"


async def test_demoted_primary_is_left_through_sentinel(topology: SentinelTopology) -> None:
    """A client still connected to a primary demoted to replica (READONLY) follows Sentinel."""
    client = redis_client(topology.url)
    try:
        await client.set("before", "1")
        old = topology.primary_port()
        topology.sentinels[0].ask(lambda c: c.execute_command("SENTINEL", "FAILOVER", SERVICE))
        new = topology.wait_for_failover(old)
        # The pooled connection still points at the old primary, now a replica.
        demoted = topology.primary if topology.primary.port == old else topology.replicas[0]

        def is_replica() -> bool:
            with contextlib.suppress(RedisError):  # it drops its clients as it is demoted
                return bool(demoted.ask(lambda c: c.info("replication"))["role"] == "slave")
            return False

        await eventually(is_replica, timeout_s=30, what="old primary demoted")
        await client.set("after", "1")
        info = await client.info("server")
        assert int(info["tcp_port"]) == new
    finally:
        await client.aclose()
