"""What the client says when Redis fails it: ``RedisUnavailable``, with the reason."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Iterator
from typing import TypeVar

from loadwarden.producer._ride_through import RETRIED
from loadwarden.producer.connection import NotReplicated
from loadwarden.producer.errors import RedisUnavailable

T = TypeVar("T")


@contextlib.contextmanager
def redis_unavailable() -> Iterator[None]:
    """Turn a Redis that did not answer (after its ride-through) into RedisUnavailable."""
    try:
        yield
    except NotReplicated as exc:
        raise RedisUnavailable(f"Redis did not replicate in time: {exc}") from exc
    except RETRIED as exc:
        raise RedisUnavailable(f"Redis did not answer: {exc}") from exc


async def guard(awaitable: Awaitable[T]) -> T:
    """Await a Redis operation, turning connection failures into RedisUnavailable."""
    with redis_unavailable():
        return await awaitable
