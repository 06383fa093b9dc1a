"""The CDC Redis sink against a real redis-server: chunks of changes in one script call each, the
LSN guard per row, and a change Redis refuses rejected alone while the rest of its chunk applies."""

from __future__ import annotations

from typing import Any, Dict, Iterator, Optional

import orjson
import pytest
import redis

from agents.cdc import sinks
from agents.cdc.sinks import RedisSink, TransientSinkError
from models.cdc import Change

DB = 11  # a database of the session's throwaway Redis of its own


def change(row: int, lsn: int, op: str = "u", **values: Any) -> Change:
    after: Optional[Dict[str, Any]] = None if op == "d" else {"id": row, **values}
    return Change(schema="shop", table="items", op=op, key={"id": row}, before=None, after=after, lsn=lsn, ts_ms=0)


@pytest.fixture
def redis_url(redis_server) -> Iterator[str]:
    url = f"{redis_server.url.rsplit('/', 1)[0]}/{DB}"
    redis.Redis.from_url(url).flushdb()
    yield url


def stored(url: str, row: int) -> Dict[str, Any]:
    fields = redis.Redis.from_url(url).hgetall(f"shop.items:{row}")
    return {name.decode(): orjson.loads(value) for name, value in fields.items()}


async def test_a_row_keeps_its_newest_change_whatever_order_the_changes_arrive_in(redis_url):
    sink = RedisSink(redis_url)
    try:
        assert await sink.apply([change(1, 10, name="new"), change(2, 10, name="two"), change(3, 10, name="three")]) == []
        assert await sink.apply([change(1, 5, name="old"), change(2, 20, op="d"), change(3, 10, name="same LSN")]) == []
    finally:
        await sink.close()
    assert stored(redis_url, 1) == {"id": 1, "name": "new"}  # the older change did not win
    assert stored(redis_url, 2) == {}  # deleted; its guard stays, so a late older upsert cannot revive it
    assert redis.Redis.from_url(redis_url).get("_cdc_lsn:shop.items:2") == b"%020d" % 20
    assert stored(redis_url, 3) == {"id": 3, "name": "same LSN"}  # one transaction's changes share its LSN


async def test_values_reach_redis_as_each_columns_json_whatever_they_hold(redis_url):
    values = {
        "text": 'quotes " and \\ backslash, \x00 NUL, \n newline, é, 😀, \ud7ff',
        "number": 2**63 - 1,
        "float": 1e-300,
        "doc": {"nested": [1, {"a": None}], "": True},
        "empty": "",
        "none": None,
    }
    sink = RedisSink(redis_url)
    try:
        assert await sink.apply([change(1, 3, **values)]) == []
    finally:
        await sink.close()
    raw = redis.Redis.from_url(redis_url).hgetall("shop.items:1")
    assert raw == {name.encode(): orjson.dumps(value) for name, value in {"id": 1, **values}.items()}


async def test_a_change_redis_refuses_is_rejected_alone_and_the_rest_of_its_chunk_applies(redis_url, monkeypatch):
    monkeypatch.setattr(sinks, "REDIS_CHUNK", 2)  # three script calls for five changes
    redis.Redis.from_url(redis_url).hset("_cdc_lsn:shop.items:3", "not", "a string")  # GET of it: WRONGTYPE
    sink = RedisSink(redis_url)
    try:
        rejected = await sink.apply([change(row, 7, name=f"row {row}") for row in range(1, 6)])
    finally:
        await sink.close()
    assert [(refused.key, reason.split(" ", 4)[:4]) for refused, reason in rejected] == [
        ({"id": 3}, ["redis", "refused", "it:", "WRONGTYPE"])
    ]
    assert {row: stored(redis_url, row) for row in (1, 2, 4, 5)} == {row: {"id": row, "name": f"row {row}"} for row in (1, 2, 4, 5)}
    assert stored(redis_url, 3) == {}


async def test_a_redis_out_of_memory_is_retried_not_dead_lettered(redis_url):
    """redis-py strips OOM's code and raises its own type: matched by type, it means "not now"."""
    admin = redis.Redis.from_url(redis_url)
    admin.set("ballast", "x" * 100_000)
    before = admin.config_get("maxmemory")["maxmemory"]
    admin.config_set("maxmemory", 1024)  # far below what the server uses: every write refused
    sink = RedisSink(redis_url)
    try:
        with pytest.raises(TransientSinkError, match="redis"):
            await sink.apply([change(1, 3, name="x")])
    finally:
        admin.config_set("maxmemory", before)
        await sink.close()
    assert stored(redis_url, 1) == {}


async def test_a_row_with_thousands_of_columns_is_written_whole(redis_url):
    """More fields than Lua's unpack takes at once: written in slices, after the fields were read."""
    values = {f"c{i}": i for i in range(5000)}
    sink = RedisSink(redis_url)
    try:
        assert await sink.apply([change(1, 3, **values)]) == []
    finally:
        await sink.close()
    assert stored(redis_url, 1) == {"id": 1, **values}
