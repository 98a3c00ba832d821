"""Settings: one validated object, built from the environment (``LOADWARDEN_*``) in one place.

These are what a producer needs (Redis, the queue, how long reports stay); the worker's
settings extend them in ``loadwarden.worker.config``.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class RedisOptions(BaseModel):
    """How every loadwarden process talks to Redis (``loadwarden.producer.connection``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # A TCP (+ TLS + AUTH) handshake on a LAN takes milliseconds; 5 s rides out one lost SYN
    # (the kernel resends after 1 s, then 3 s) and still fails a dead host quickly.
    connect_timeout_s: Annotated[float, Field(gt=0)] = 5.0
    # The longest wait for one reply. Our commands are O(1) or O(log n) on small values and
    # answer in well under a millisecond; a reply 5 s late means a half-open connection
    # (a peer gone without a FIN), which would otherwise hang a caller for ever.
    socket_timeout_s: Annotated[float, Field(gt=0)] = 5.0
    # A connection idle this long is PINGed before it is used again, so one a restart or a
    # NAT timeout left half-open is replaced before a real command waits on it. 15 s is
    # below the idle timeouts of common load balancers and NATs (30-350 s).
    health_check_interval_s: Annotated[float, Field(ge=0)] = 15.0
    # Once Redis has answered, a command that meets a dropped connection, a timeout, a
    # loading or read-only server is retried with backoff for this long before the caller
    # gets RedisUnavailable. 60 s covers a Sentinel failover with its default
    # down-after-milliseconds (30 s) plus the election and promotion (a few s, measured),
    # and the restart of a Redis whose AOF replays in seconds. A server never reached at
    # all (a wrong URL) fails at once instead.
    ride_through_s: Annotated[float, Field(ge=0)] = 60.0
    # 0: an acknowledgement means the primary has it (Redis' own default). N > 0: an
    # enqueue, a result and a dead letter are confirmed with WAIT N (N replicas have them)
    # before they count as done; see README "High availability" for what this buys.
    wait_replicas: Annotated[int, Field(ge=0)] = 0
    # How long WAIT may block: longer than a replica's usual lag (milliseconds on a LAN),
    # shorter than socket_timeout_s so a WAIT is never mistaken for a dead connection.
    wait_timeout_s: Annotated[float, Field(gt=0)] = 2.0

    @model_validator(mode="after")
    def _wait_within_socket_timeout(self) -> RedisOptions:
        if self.wait_timeout_s >= self.socket_timeout_s:
            raise ValueError("wait_timeout_s must be below socket_timeout_s")
        return self


class Settings(BaseSettings):
    """What a producer reads: ``LOADWARDEN_REDIS_URL``, ``LOADWARDEN_REDIS__<NAME>``, the queue.

    The worker's settings (``loadwarden.worker.config.Settings``) extend these with every
    knob of its own, under the same ``LOADWARDEN_`` names; a producer ignores those.
    """

    model_config = SettingsConfigDict(
        env_prefix="LOADWARDEN_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    # None: no Redis configured (commands that need one say so). redis://, rediss://,
    # unix://, or redis+sentinel:// / rediss+sentinel:// (loadwarden.producer.connection).
    redis_url: str | None = None
    redis: RedisOptions = RedisOptions()
    # One queue per deployment; a prefix keeps loadwarden's keys apart from other arq users.
    queue_name: str = "loadwarden:queue"
    # Reports stay a day: long enough for a producer to come back for them.
    keep_result_s: Annotated[int, Field(gt=0)] = 86_400
